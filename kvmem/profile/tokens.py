"""The token store: the corpus tokenized once, as one flat stream with document offsets.

  ids          [n_tokens] int32   token ids, documents back to back (each followed by EOS if the
                                  tokenizer has one, so a document never runs into the next unmarked)
  doc_offsets  [n_docs + 1] int64 document d is ids[doc_offsets[d]:doc_offsets[d+1]]

A token's global index is its place in the stream. How the stream is cut into model input rows is a
``RowLayout`` (kept in the run manifest, rebuilt from the store): since run format 3 every row lies in
one document (a document longer than a row continues in the next row, each row starting afresh), the
tokenizer's BOS is prepended to every row when it has one (the store never holds it: its global
index is -1), and statistics skip row position 0 (the BOS, or the first token without one: the
attention-sink position) unless asked to keep it. Runs of formats 1-2 cut the flat stream into rows
of ``seq_len`` tokens across documents, without BOS (``doc_rows=False``). Saved as ``tokens.safetensors``.

Memory: ``tokenize`` streams the corpus to that file in bounded batches and ``TokenStore.load`` maps it
(kvmem.profile.tokenfile): ``ids`` stay on disk (a numpy memmap shared by a torch tensor) and
``doc_offsets`` (8 bytes per document) are in memory. ``read`` / ``RowLayout.batch`` / ``context`` copy
only the tokens they need out of the file without touching the map, so a pass over the whole store
keeps resident memory flat; indexing ``ids`` directly works too but maps the pages it touches (file-backed,
reclaimable). ``ids.long()`` or ``ids.tolist()`` on a whole mapped store reads it all into memory.

A shard (``--shard i/n``, torchrun ranks) holds a contiguous block of rows of the whole stream:
``offset`` is the global index of its first token and ``doc_base`` the global id of its first
document, so its statistics use global indices and shards merge exactly; ``continues_doc`` marks a
shard whose first document started in the previous shard. Indices given to the methods below are
global; ``ids`` and ``doc_offsets`` are local to the store.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path

import numpy as np
import torch

from kvmem.errors import KvmemError
from kvmem.profile.tokenfile import MappedIds, TokenWriter, open_tokens

_SAVE_CHUNK = 1 << 22  # tokens copied at a time when a store is saved or joined (16 MB of int32)


@dataclass
class TokenStore:
    ids: torch.Tensor  # [n_tokens] int32; memory-mapped (not in RAM) when the store comes from a file
    doc_offsets: torch.Tensor  # [n_docs + 1] int64, local, in memory
    continues_doc: bool = False
    offset: int = 0  # global index of ids[0]
    doc_base: int = 0  # global id of the first document
    # the file ``ids`` is mapped from and where they start in its ids (None: ids in memory)
    file: MappedIds | None = field(default=None, repr=False, compare=False)
    file_start: int = field(default=0, repr=False, compare=False)

    @property
    def n_tokens(self) -> int:
        return int(self.ids.numel())

    @property
    def n_docs(self) -> int:
        return int(self.doc_offsets.numel() - 1)

    @property
    def mapped(self) -> bool:
        """Whether ``ids`` are memory-mapped from a file rather than held in memory."""
        return self.file is not None

    def read(self, a: int, b: int) -> torch.Tensor:
        """Local ids [a, b) as a fresh int32 tensor (a mapped store reads just them from the file, leaving
        the map untouched: reading the whole store in order keeps resident memory flat)."""
        a, b = max(int(a), 0), min(int(b), self.n_tokens)
        if self.file is None:
            return self.ids[a:b].clone() if b > a else self.ids[:0].clone()
        return torch.from_numpy(self.file.read(self.file_start + a, self.file_start + max(a, b)))

    def take(self, local_index: torch.Tensor) -> torch.Tensor:
        """ids at local indices (any shape, each in [0, n_tokens)) as int64, the same shape: a gather that
        touches only their pages of a mapped store (unlike ``ids.long()[...]``, which copies the whole store)."""
        return self.ids[torch.as_tensor(local_index, dtype=torch.int64)].long()

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
        return self.read(lo, hi).tolist(), local - lo

    def slice_rows(self, start_row: int, end_row: int, seq_len: int) -> "TokenStore":
        """The shard holding stream rows [start_row, end_row) of ``seq_len`` tokens (legacy layout)."""
        a, b = start_row * seq_len, min(end_row * seq_len, self.n_tokens)
        if a >= b:
            raise KvmemError(f"rows {start_row}..{end_row} hold no tokens (the stream has {self.rows(seq_len)} rows)")
        return self.slice_tokens(a, b)

    def slice_tokens(self, a: int, b: int) -> "TokenStore":
        """The shard holding local tokens [a, b): ids, local doc offsets, continues_doc, global offsets kept.
        A mapped store's shard is a view of the same map (nothing is copied)."""
        if not 0 <= a < b <= self.n_tokens:
            raise KvmemError(f"tokens {a}..{b} are not a non-empty range of the store's {self.n_tokens}")
        ends = self.local_doc_of(torch.tensor([a, b - 1]))
        first, last = int(ends[0]), int(ends[1])
        offsets = self.doc_offsets[first:last + 2].clone().clamp(a, b) - a
        ids = self.ids[a:b] if self.mapped else self.ids[a:b].clone()
        return TokenStore(ids, offsets, int(self.doc_offsets[first]) < a, self.offset + a, self.doc_base + first,
                          self.file, self.file_start + a)

    @property
    def end(self) -> tuple[int, int]:
        """(global index after the last token, global id after the last document)."""
        return self.offset + self.n_tokens, self.doc_base + self.n_docs

    def concat(self, other: "TokenStore", path: Path | None = None) -> "TokenStore":
        """This stream followed by ``other``'s, which must start where this one ends (a document that
        ``other`` continues becomes one document). See ``join``."""
        return TokenStore.join([self, other], path)

    @staticmethod
    def join(stores: list["TokenStore"], path: Path | None = None) -> "TokenStore":
        """The streams of ``stores`` one after the other, each starting where the previous one ends. With
        ``path`` the result is streamed to that file and returned mapped (memory: one chunk); without, it
        is built in memory."""
        first, offsets, n = stores[0], [stores[0].doc_offsets], stores[0].n_tokens
        for prev, other in zip(stores, stores[1:]):
            doc_end = prev.end[1] - (1 if other.continues_doc else 0)
            if (other.offset, other.doc_base) != (prev.end[0], doc_end):
                raise KvmemError("token stores are not contiguous: cannot concatenate")
            offsets[-1] = offsets[-1][:-1]
            offsets.append((other.doc_offsets[1:] if other.continues_doc else other.doc_offsets) + n)
            n += other.n_tokens
        offsets = torch.cat(offsets)
        if path is None:
            return TokenStore(torch.cat([s.read(0, s.n_tokens) for s in stores]), offsets, first.continues_doc,
                              first.offset, first.doc_base)
        with TokenWriter(path) as w:
            for store in stores:
                for a in range(0, store.n_tokens, _SAVE_CHUNK):
                    w.add(store.read(a, a + _SAVE_CHUNK).numpy(), np.zeros(0, dtype=np.int64))
            w.add_doc_ends(offsets[1:].numpy())
            w.close((int(first.continues_doc), first.offset, first.doc_base))
        return TokenStore.load(path)

    def save(self, path: Path) -> None:
        """Write the store to ``path`` (kvmem.profile.tokenfile's layout), ``_SAVE_CHUNK`` tokens at a time."""
        with TokenWriter(path) as w:
            for a in range(0, self.n_tokens, _SAVE_CHUNK):
                w.add(self.read(a, a + _SAVE_CHUNK).numpy(), np.zeros(0, dtype=np.int64))
            w.add_doc_ends(self.doc_offsets[1:].numpy())
            w.close((int(self.continues_doc), self.offset, self.doc_base))

    @classmethod
    def load(cls, path: Path) -> "TokenStore":
        """The store in ``path``, ``ids`` memory-mapped (nothing of them is read here), offsets in memory."""
        ids, offsets, shard = open_tokens(Path(path))
        continues, offset, doc_base = shard.tolist() if shard is not None else (0, 0, 0)
        return cls(ids.tensor(), torch.from_numpy(offsets), bool(continues), offset, doc_base, ids, 0)


def tokenize(corpus, tokenizer, max_tokens: int | None, *, path: Path | None = None, batch_docs: int = 256,
             batch_chars: int = 1 << 22) -> tuple[TokenStore, bool]:
    """Tokenize documents until ``max_tokens``; returns the store (memory-mapped from ``path``) and whether
    the corpus ran out before ``max_tokens`` were reached.

    Streamed: documents are read ``batch_docs`` at a time (fewer when they reach ``batch_chars``
    characters), encoded by one batch call of the fast tokenizer (its Rust thread pool uses every core;
    ``TOKENIZERS_PARALLELISM=false`` turns that off) and appended to the file, so host memory holds one
    batch whatever the corpus size. Each document is followed by EOS when the tokenizer has one; the
    last one is cut at ``max_tokens``. Without ``path`` the store goes to a temporary file that is
    removed at once (the map keeps it alive while the store lives)."""
    eos = tokenizer.eos_token_id
    encode = _encoder(tokenizer)
    unlink = path is None
    if path is None:
        fd, name = tempfile.mkstemp(prefix="kvmem-tokens-", suffix=".safetensors")
        os.close(fd)
        path = Path(name)
    docs = corpus.documents()
    try:
        with TokenWriter(path) as w:
            while max_tokens is None or w.n_tokens < max_tokens:
                chunk = _take(docs, batch_docs, batch_chars)
                if not chunk:
                    break
                lists = [toks + [eos] for toks in encode(chunk)] if eos is not None else encode(chunk)
                lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
                lists, lengths = [t for t, n in zip(lists, lengths) if n], lengths[lengths > 0]
                ends = np.cumsum(lengths)
                if max_tokens is not None and w.n_tokens + int(ends[-1] if ends.size else 0) > max_tokens:
                    room = max_tokens - w.n_tokens
                    keep = int(np.searchsorted(ends, room, side="left")) + 1  # documents reaching into the room
                    lists, ends = lists[:keep], np.minimum(ends[:keep], room)
                total = int(ends[-1]) if ends.size else 0
                flat = np.fromiter(chain.from_iterable(lists), dtype=np.int32, count=total) if total else \
                    np.zeros(0, dtype=np.int32)
                w.add(flat, ends)
            if w.n_tokens == 0:
                raise KvmemError("the corpus gives no tokens")
            ran_out = max_tokens is not None and w.n_tokens < max_tokens
            w.close()
        store = TokenStore.load(path)
    finally:
        if unlink:
            path.unlink(missing_ok=True)
    return store, ran_out


def _encoder(tokenizer):
    """documents -> token id lists without special tokens: the Rust tokenizer's batch call when there is
    one (the same ids as ``tokenizer(docs, add_special_tokens=False)``, without offsets and masks)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    fast = getattr(backend, "encode_batch_fast", None) or getattr(backend, "encode_batch", None)
    if fast is not None:
        return lambda docs: [e.ids for e in fast(docs, add_special_tokens=False)]
    return lambda docs: tokenizer(docs, add_special_tokens=False)["input_ids"]


def _take(docs, n: int, chars: int) -> list[str]:
    """Up to ``n`` next documents, stopping after the one that reaches ``chars`` characters in all."""
    out, size = [], 0
    for d in islice(docs, n):
        out.append(d)
        size += len(d)
        if size >= chars:
            break
    return out


# --- rows -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RowLayout:
    """How a token store is cut into model input rows (axes: R rows; b rows of a batch, L positions).

    Rows are numbered in stream order (``starts`` strictly increasing); row r holds the store tokens
    [starts[r], starts[r] + lengths[r]) (global indices), after the BOS when ``bos_id`` is set. With
    ``doc_rows`` a document of n tokens gives ceil(n / c) rows of c = seq_len - (1 if BOS) tokens, the
    last one shorter; rows never span two documents. Build one with ``RowLayout.build``; the manifest
    keeps ``settings()`` and the rows are rebuilt from the store (they depend on it alone)."""

    seq_len: int  # tokens per model row INCLUDING the BOS token
    bos_id: int | None  # prepended to every row when not None (the tokenizer's BOS)
    doc_rows: bool  # True: rows start at a document start or continue one document; False: legacy stream rows
    skip_first: bool  # statistics skip row position 0 (the BOS, or the first token without BOS)
    starts: torch.Tensor = field(repr=False)  # [R] int64 global index of each row's first store token
    lengths: torch.Tensor = field(repr=False)  # [R] int64 store tokens in each row
    pad_id: int = 0  # id written at padded positions (masked out; any valid id)

    @classmethod
    def build(cls, store: TokenStore, seq_len: int, bos_id: int | None = None, doc_rows: bool = True,
              skip_first: bool = True, pad_id: int | None = None) -> "RowLayout":
        """The rows of ``store`` (a whole stream or a shard; a shard cut at row boundaries of the whole
        stream's layout gets exactly those rows, with the same global indices)."""
        bos_id = None if bos_id is None else int(bos_id)
        per_row = seq_len - (1 if bos_id is not None else 0)
        if per_row < 1:
            raise KvmemError(f"seq_len must be at least {2 if bos_id is not None else 1} "
                             f"({'1 token after the BOS' if bos_id is not None else 'one token'}); got {seq_len}")
        n = store.n_tokens
        if doc_rows:
            off = store.doc_offsets.long()
            size = off[1:] - off[:-1]
            per_doc = (size + per_row - 1) // per_row  # rows of each document
            doc = torch.repeat_interleave(torch.arange(size.numel()), per_doc)
            first_row = torch.cumsum(per_doc, 0) - per_doc
            k = torch.arange(doc.numel()) - first_row[doc]
            local = off[doc] + k * per_row
            lengths = torch.minimum(off[doc + 1] - local, torch.full_like(local, per_row))
        else:
            local = torch.arange(0, n, per_row, dtype=torch.int64)
            lengths = (n - local).clamp(max=per_row)
        pad = pad_id if pad_id is not None else (bos_id if bos_id is not None else 0)
        return cls(int(seq_len), bos_id, bool(doc_rows), bool(skip_first), local + store.offset, lengths, int(pad))

    @classmethod
    def from_settings(cls, store: TokenStore, settings: dict) -> "RowLayout":
        """The layout of ``store`` from ``settings()`` as kept in a run manifest."""
        return cls.build(store, int(settings["seq_len"]), settings.get("bos_id"), bool(settings["doc_rows"]),
                         bool(settings["skip_first"]), settings.get("pad_id"))

    def settings(self) -> dict:
        """What the run manifest keeps ("layout"): the rows follow from these and the store."""
        return {"seq_len": self.seq_len, "bos_id": self.bos_id, "doc_rows": self.doc_rows,
                "skip_first": self.skip_first, "pad_id": self.pad_id}

    @property
    def n_rows(self) -> int:
        return int(self.starts.numel())

    @property
    def first(self) -> int:
        """Model row position of a row's first store token (1 after a BOS, else 0)."""
        return 1 if self.bos_id is not None else 0

    def row_of(self, index: torch.Tensor) -> torch.Tensor:
        """Row number of each global token index (same shape); the index must lie in the layout's rows."""
        index = torch.as_tensor(index, dtype=torch.int64)
        row = torch.searchsorted(self.starts, index, right=True) - 1
        bad = (row < 0) | (index >= self.starts[row.clamp(min=0)] + self.lengths[row.clamp(min=0)])
        if bool(bad.any()):
            raise KvmemError(f"token index {int(index[bad].flatten()[0])} is not in this layout's rows")
        return row

    def position(self, index: torch.Tensor) -> torch.Tensor:
        """Position of each global token index in its model row (BOS = position 0; same shape)."""
        index = torch.as_tensor(index, dtype=torch.int64)
        return index - self.starts[self.row_of(index)] + self.first

    def prefix(self, store: TokenStore, index: int) -> list[int]:
        """The ids the model saw in that token's row up to and including the token (BOS first)."""
        row = int(self.row_of(torch.tensor([int(index)]))[0])
        a = int(self.starts[row]) - store.offset
        ids = store.read(a, int(index) - store.offset + 1).tolist()
        return ([self.bos_id] if self.bos_id is not None else []) + ids

    def batch(self, store: TokenStore, rows) -> "RowBatch":
        """Model input of ``rows`` (row numbers, in the order given), right-padded to the longest."""
        rows = torch.as_tensor(rows, dtype=torch.int64).reshape(-1)
        if rows.numel() == 0:
            raise KvmemError("a batch needs at least one row")
        starts, lengths = self.starts[rows], self.lengths[rows]
        f = self.first
        width = int(lengths.max()) + f
        col = torch.arange(width)[None, :] - f  # [1, L] offset in the row's store tokens (-1: BOS)
        real = (col >= 0) & (col < lengths[:, None])  # [b, L]
        index = torch.where(real, starts[:, None] + col, torch.full_like(col, -1))
        ids = torch.full((rows.numel(), width), self.pad_id, dtype=torch.int64)
        if store.mapped:  # one read per row: only these tokens leave the file
            for r, (s, n) in enumerate(zip((starts - store.offset).tolist(), lengths.tolist())):
                ids[r, f:f + n] = store.read(s, s + n)
        else:
            ids[real] = store.ids[index[real] - store.offset].long()
        mask = real.clone()
        if f:
            ids[:, 0] = self.bos_id
            mask[:, 0] = True
        counted = real.clone()
        if self.skip_first:
            counted[:, 0] = False
        return RowBatch(ids, mask, index, counted)


@dataclass
class RowBatch:
    """Model input of some rows of a RowLayout (axes: b rows, L positions, L = longest row incl. BOS)."""

    ids: torch.Tensor  # [b, L] int64 model input (BOS first when bos_id; right-padded with pad_id)
    mask: torch.Tensor  # [b, L] bool attention mask (False on padding)
    index: torch.Tensor  # [b, L] int64 global token index; -1 for BOS and padding
    counted: torch.Tensor  # [b, L] bool positions that enter statistics (index >= 0 and not skipped)

    @property
    def pos(self) -> torch.Tensor:
        """[b, L] int64 position of each entry in its model row."""
        return torch.arange(self.ids.shape[1]).expand_as(self.ids)
