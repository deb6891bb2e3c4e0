"""The token store: the corpus tokenized once, as one flat stream with document offsets.

  ids          [n_tokens] int32   token ids, documents back to back (each followed by EOS if the
                                  tokenizer has one, so a document never runs into the next unmarked)
  doc_offsets  [n_docs + 1] int64 document d is ids[doc_offsets[d]:doc_offsets[d+1]]

The stream is cut into model input rows of ``seq_len`` tokens (the last row may be shorter); a
token's global index is its place in the stream, its position is index % seq_len. A document
longer than ``seq_len`` simply spans rows. Saved as ``tokens.safetensors``.

A shard (``--shard i/n``, torchrun ranks) holds a contiguous block of rows of the whole stream:
``offset`` is the global index of its first token and ``doc_base`` the global id of its first
document, so its statistics use global indices and shards merge exactly; ``continues_doc`` marks a
shard whose first document started in the previous shard. Indices given to the methods below are
global; ``ids`` and ``doc_offsets`` are local to the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kvmem.errors import KvmemError


@dataclass
class TokenStore:
    ids: torch.Tensor  # [n_tokens] int32
    doc_offsets: torch.Tensor  # [n_docs + 1] int64, local
    continues_doc: bool = False
    offset: int = 0  # global index of ids[0]
    doc_base: int = 0  # global id of the first document

    @property
    def n_tokens(self) -> int:
        return int(self.ids.numel())

    @property
    def n_docs(self) -> int:
        return int(self.doc_offsets.numel() - 1)

    def local_doc_of(self, local_index: torch.Tensor) -> torch.Tensor:
        """Local document id of each local token index (same shape)."""
        return torch.searchsorted(self.doc_offsets.to(local_index.device), local_index, right=True) - 1

    def doc_of(self, index: torch.Tensor) -> torch.Tensor:
        """Global document id of each global token index (same shape)."""
        return self.local_doc_of(index - self.offset) + self.doc_base

    def doc_start(self, index: torch.Tensor) -> torch.Tensor:
        """Global index of the first token of each global index's document (within this store)."""
        return self.doc_offsets[self.local_doc_of(index - self.offset)] + self.offset

    def rows(self, seq_len: int) -> int:
        return -(-self.n_tokens // seq_len)

    def context(self, index: int, before: int = 12, after: int = 4) -> tuple[list[int], int]:
        """Token ids around ``index`` inside its document, and the place of ``index`` in them."""
        local = index - self.offset
        doc = int(self.local_doc_of(torch.tensor([local]))[0])
        lo = max(int(self.doc_offsets[doc]), local - before)
        hi = min(int(self.doc_offsets[doc + 1]), local + after + 1)
        return self.ids[lo:hi].tolist(), local - lo

    def slice_rows(self, start_row: int, end_row: int, seq_len: int) -> "TokenStore":
        """The shard holding rows [start_row, end_row): ids, local doc offsets, continues_doc."""
        a, b = start_row * seq_len, min(end_row * seq_len, self.n_tokens)
        if a >= b:
            raise KvmemError(f"rows {start_row}..{end_row} hold no tokens (the stream has {self.rows(seq_len)} rows)")
        ends = self.local_doc_of(torch.tensor([a, b - 1]))
        first, last = int(ends[0]), int(ends[1])
        offsets = self.doc_offsets[first:last + 2].clone().clamp(a, b) - a
        return TokenStore(self.ids[a:b].clone(), offsets, int(self.doc_offsets[first]) < a,
                          self.offset + a, self.doc_base + first)

    @property
    def end(self) -> tuple[int, int]:
        """(global index after the last token, global id after the last document)."""
        return self.offset + self.n_tokens, self.doc_base + self.n_docs

    def concat(self, other: "TokenStore") -> "TokenStore":
        """This stream followed by ``other``'s, which must start where this one ends (a document that
        ``other`` continues becomes one document)."""
        doc_end = self.end[1] - (1 if other.continues_doc else 0)
        if (other.offset, other.doc_base) != (self.end[0], doc_end):
            raise KvmemError("token stores are not contiguous: cannot concatenate")
        tail = other.doc_offsets[1:] if other.continues_doc else other.doc_offsets
        offsets = torch.cat([self.doc_offsets[:-1], tail + self.n_tokens])
        return TokenStore(torch.cat([self.ids, other.ids]), offsets, self.continues_doc, self.offset, self.doc_base)

    def save(self, path: Path) -> None:
        # shard position as a tensor: safetensors' metadata map is not written in a fixed order
        where = torch.tensor([int(self.continues_doc), self.offset, self.doc_base], dtype=torch.int64)
        save_file({"ids": self.ids.contiguous(), "doc_offsets": self.doc_offsets.contiguous(), "shard": where},
                  str(path))

    @classmethod
    def load(cls, path: Path) -> "TokenStore":
        t = load_file(str(path))
        continues, offset, doc_base = t["shard"].tolist() if "shard" in t else (0, 0, 0)
        return cls(t["ids"], t["doc_offsets"], bool(continues), offset, doc_base)


def tokenize(corpus, tokenizer, max_tokens: int | None, *, batch_docs: int = 64) -> tuple[TokenStore, bool]:
    """Tokenize documents until ``max_tokens``; returns the store and whether the corpus ran out
    before ``max_tokens`` were reached."""
    eos = tokenizer.eos_token_id
    ids: list[torch.Tensor] = []
    offsets, total = [0], 0
    docs = corpus.documents()
    while max_tokens is None or total < max_tokens:
        chunk = [d for _, d in zip(range(batch_docs), docs)]
        if not chunk:
            break
        for toks in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
            toks = toks + [eos] if eos is not None else toks
            if max_tokens is not None:
                toks = toks[: max_tokens - total]
            if toks:
                ids.append(torch.tensor(toks, dtype=torch.int32))
                total += len(toks)
                offsets.append(total)
            if max_tokens is not None and total >= max_tokens:
                break
    if total == 0:
        raise KvmemError("the corpus gives no tokens")
    ran_out = max_tokens is not None and total < max_tokens
    return TokenStore(torch.cat(ids), torch.tensor(offsets, dtype=torch.int64)), ran_out
