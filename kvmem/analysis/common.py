"""Shared pieces of the analyses: the token sample, batching, depth thirds, next-token loss.

A *sample* is a set of model input rows with, per position, everything a measure needs to count it:

  rows     [n_rows, L] int64   model input ids (BOS first when the run's layout has one; right-padded)
  mask     [n_rows, L] bool    attention mask (False on padding)
  counted  [n_rows, L] bool    positions that enter statistics (a real token, not padding, not BOS, not the
                               skipped position 0 of the layout)
  index    [n_rows, L] int64   global token index in the run's token store (-1 = BOS / padding)
  doc      [n_rows, L] int64   bootstrap cluster of the position: the global document id for run and corpus
                               samples, the row number for a bare id stream (-1 = BOS / padding)

``sample_from_run(run, max_tokens, seed)`` draws the run's own model rows (its ``RowLayout``) at random
across the whole store (a seeded permutation of the rows, stated in ``Sample.source``), so a sample spans
documents instead of being the store's first tokens; ``head(n)`` keeps the first rows of that random order
(still a random sample). Every analysis reports the number of counted tokens it used (``n_tokens``) and
bootstraps its rates over ``doc`` (kvmem.analysis.ci).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, NamedTuple

import torch

from kvmem.errors import KvmemError
from kvmem.profile.run import Run, slots
from kvmem.profile.tokens import TokenStore

if TYPE_CHECKING:
    from kvmem.models.kvmodel import KVModel


@dataclass
class Sample:
    """Model rows and, per position, mask / counted / global index / document (see the module docstring).
    ``mask``, ``counted``, ``index`` and ``doc`` default to: every position real and counted, index =
    position in the flattened rows, doc = row number."""

    rows: torch.Tensor
    source: str
    mask: torch.Tensor | None = None
    counted: torch.Tensor | None = None
    index: torch.Tensor | None = None
    doc: torch.Tensor | None = None

    def __post_init__(self):
        self.rows = self.rows.long()
        shape = self.rows.shape
        if self.mask is None:
            self.mask = torch.ones(shape, dtype=torch.bool)
        if self.counted is None:
            self.counted = self.mask.clone()
        if self.index is None:
            self.index = torch.arange(self.rows.numel()).view(shape)
        if self.doc is None:
            self.doc = torch.arange(shape[0])[:, None].expand(shape).clone()
        for name in ("mask", "counted", "index", "doc"):
            if getattr(self, name).shape != shape:
                raise KvmemError(f"sample {name} has shape {tuple(getattr(self, name).shape)}, rows {tuple(shape)}")
        self.counted = self.counted & self.mask

    @property
    def n_tokens(self) -> int:
        """Counted positions (the tokens every rate rests on)."""
        return int(self.counted.sum())

    @property
    def n_positions(self) -> int:
        """Every model input position, BOS and padding included (what the forward passes cost)."""
        return int(self.rows.numel())

    @property
    def n_docs(self) -> int:
        """Distinct clusters (documents) among the counted positions."""
        return int(self.doc[self.counted].unique().numel())

    @property
    def seq_len(self) -> int:
        return int(self.rows.shape[1])

    @property
    def padded(self) -> bool:
        return not bool(self.mask.all())

    def take(self, n_rows: int) -> "Sample":
        """The first ``n_rows`` rows."""
        return Sample(self.rows[:n_rows], self.source, self.mask[:n_rows], self.counted[:n_rows],
                      self.index[:n_rows], self.doc[:n_rows])

    def spread(self, per_row: int | None = None, length: int | None = None, seed: int = 0) -> "Sample":
        """The same rows, cheaper per document: each row cut to its first ``length`` positions (a model row
        is causal, so the kept positions see exactly the context they had), then at most ``per_row`` counted
        positions kept per row, drawn at random (seeded). A measure whose cost is per counted token (the
        vocabulary readouts) or per position (the forward passes) then spreads the same budget over more
        rows, hence more documents: its intervals rest on more clusters."""
        rows, mask, counted, index, doc = self.rows, self.mask, self.counted, self.index, self.doc
        if length is not None:
            if length < 2:
                raise KvmemError("length must be at least 2")
            rows, mask, counted, index, doc = (t[:, :length] for t in (rows, mask, counted, index, doc))
        counted = counted.clone()
        if per_row is not None:
            if per_row < 1:
                raise KvmemError("per_row must be at least 1")
            gen = torch.Generator().manual_seed(int(seed))
            keys = torch.rand(counted.shape, generator=gen).masked_fill(~counted, 2.0)
            rank = keys.argsort(dim=1).argsort(dim=1)  # rank of each position's random key within its row
            counted &= rank < per_row
        note = "; ".join(x for x in (f"rows cut to their first {length} positions" if length else "",
                                     f"{per_row} counted positions per row at random (seed {seed})" if per_row
                                     else "") if x)
        return Sample(rows, f"{self.source}; {note}" if note else self.source, mask, counted, index, doc)

    def head(self, max_tokens: int | None) -> "Sample":
        """The fewest first rows holding at least ``max_tokens`` counted tokens (all rows if they hold
        fewer; at least one row). A run sample's rows are in random order, so a head is a random sample."""
        if max_tokens is None or max_tokens >= self.n_tokens:
            return self
        per_row = self.counted.sum(1).cumsum(0)
        n = int((per_row < max_tokens).sum()) + 1
        return self.take(max(1, min(n, self.rows.shape[0])))


class Part(NamedTuple):
    """One batch of a sample on the device: ids, mask, counted [b, L] and index, doc [b, L] (see Sample)."""

    ids: torch.Tensor
    mask: torch.Tensor
    counted: torch.Tensor
    index: torch.Tensor
    doc: torch.Tensor


def sample_from_ids(ids: torch.Tensor, seq_len: int, max_tokens: int | None = None, source: str = "ids") -> Sample:
    """Full rows of ``seq_len`` tokens from a flat id stream [n] (the short tail is dropped, unless the
    stream is shorter than one row); every position counted, each row its own bootstrap cluster."""
    ids = ids.reshape(-1).long()
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() == 0:
        raise KvmemError("no tokens to analyze")
    if seq_len < 1:
        raise KvmemError("the sequence length must be at least 1")
    seq_len = min(seq_len, int(ids.numel()))
    n = ids.numel() // seq_len
    return Sample(ids[: n * seq_len].view(n, seq_len).clone(), source)


def sample_from_store(store: TokenStore, seq_len: int, max_tokens: int | None = None, source: str = "store") -> Sample:
    """Like ``sample_from_ids`` on a token store's stream, with global indices and document ids."""
    s = sample_from_ids(store.ids, seq_len, max_tokens, source)
    index = s.index + store.offset
    return Sample(s.rows, source, index=index, doc=store.doc_of(index))


def sample_from_run(run: Run, max_tokens: int | None = None, seed: int = 0) -> Sample:
    """The run's own model rows (``run.layout``), drawn in a seeded random order across the whole token store
    until they hold at least ``max_tokens`` counted tokens (all rows when None)."""
    layout = run.layout
    n_rows = int(layout.starts.numel())
    if n_rows == 0:
        raise KvmemError(f"run {run.path} has no token rows to analyze")
    if max_tokens is not None and max_tokens < 1:
        raise KvmemError("max_tokens must be at least 1")
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(int(seed)))
    if max_tokens is not None:  # counted tokens per row: its store tokens, less position 0 when that is one
        per_row = layout.lengths[order].long() - int(layout.skip_first and layout.bos_id is None)
        order = order[: int((per_row.cumsum(0) < max_tokens).sum()) + 1]
    b = layout.batch(run.tokens, order)
    index = b.index.long()
    doc = torch.where(index >= 0, run.tokens.doc_of(index.clamp(min=run.tokens.offset)), torch.full_like(index, -1))
    kind = ("document-aligned rows" if layout.doc_rows else "stream rows") + (
        f", BOS {layout.bos_id} first" if layout.bos_id is not None else ", no BOS") + (
        ", position 0 not counted" if layout.skip_first else "")
    source = (f"run {run.path}: {order.numel()} of its {n_rows} rows ({kind}) drawn at random, seed {seed}")
    return Sample(b.ids.long(), source, b.mask.bool(), b.counted.bool(), index, doc)


def row_batches(sample: Sample, device, tokens_per_batch: int = 2048) -> Iterator[Part]:
    """Yield the sample as ``Part``s on ``device`` of about ``tokens_per_batch`` positions each."""
    b = max(1, tokens_per_batch // sample.seq_len)
    for start in range(0, sample.rows.shape[0], b):
        sl = slice(start, start + b)
        yield Part(sample.rows[sl].to(device), sample.mask[sl].to(device), sample.counted[sl].to(device),
                   sample.index[sl].to(device), sample.doc[sl].to(device))


def batches(sample: Sample, device, tokens_per_batch: int = 2048):
    """Yield ``rows [b, seq_len]`` ids on ``device`` (the ids only; new code takes ``row_batches``, which also
    gives the mask and the counted positions)."""
    for part in row_batches(sample, device, tokens_per_batch):
        yield part.ids


def forward(model: KVModel, part: Part, **kwargs):
    """``model.hf`` on a Part: its ids, its attention mask, no cache."""
    return model.hf(input_ids=part.ids, attention_mask=part.mask, use_cache=False, **kwargs)


def run_slots(run: Run, layer: int, kind: str = "top") -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's example store (kvmem.profile.run.slots) on the CPU: values [d_mlp, k] (NaN = empty),
    global token index [d_mlp, k] int64 (-1 = empty)."""
    s = slots(run.layer_stats(layer), kind)
    return s.value.cpu(), s.index.cpu().long()


def local_index(index: torch.Tensor, store: TokenStore) -> torch.Tensor:
    """Global token indices [...] (-1 = none) -> indices into ``store.ids`` (-1 kept): a run of one shard
    starts at ``store.offset``."""
    return torch.where(index >= 0, index - store.offset, index)


def sample_from_corpus(model: KVModel, corpus: str = "pydoc", tokens: int = 20000, seq_len: int = 128) -> Sample:
    """Tokenize a corpus source (see kvmem.profile.corpus) and cut it into stream rows (every position
    counted, clustered by document)."""
    from kvmem.profile.corpus import Corpus
    from kvmem.profile.tokens import tokenize

    store, _ = tokenize(Corpus(corpus), model.tokenizer, tokens)
    return sample_from_store(store, seq_len, tokens, source=f"corpus {corpus}")


def thirds(layers: list[int], n_layers: int) -> dict[str, list[int]]:
    """Layers split by relative depth: lower (< 1/3), middle, upper (>= 2/3 of the model)."""
    out = {"lower": [], "middle": [], "upper": []}
    for layer in layers:
        depth = layer / max(n_layers - 1, 1)
        out["lower" if depth < 1 / 3 else "upper" if depth >= 2 / 3 else "middle"].append(layer)
    return out


def next_token_nll(logits: torch.Tensor, part: Part) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position cross-entropy of the next token: nll [b, L-1] float32 (position t predicts t+1) and
    valid [b, L-1] bool: t is counted and t+1 is a real token of the same row (never BOS or padding).
    logits [b, L, d_vocab]."""
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -lp.gather(-1, part.ids[:, 1:, None]).squeeze(-1)
    valid = part.counted[:, :-1] & part.mask[:, 1:] & (part.index[:, 1:] >= 0)
    return torch.where(valid, nll, torch.zeros_like(nll)), valid


def derangement(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random permutation of range(n) with no fixed point (n >= 2): a uniform random shift of a
    random ordering, so every i maps to a different j."""
    if n < 2:
        raise KvmemError("a derangement needs at least two items")
    order = torch.randperm(n, generator=generator)
    shift = int(torch.randint(1, n, (1,), generator=generator))
    perm = torch.empty(n, dtype=torch.long)
    perm[order] = order.roll(-shift)
    return perm


def progress_step(progress, label: str) -> None:
    if progress is not None:
        progress(label)
