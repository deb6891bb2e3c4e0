"""Shared pieces of the analyses: the token sample, batching, depth thirds, next-token loss.

A *sample* is token ids cut into model rows, ``rows [n_rows, seq_len]`` (int64, CPU), taken from
the start of a run's token store (or a freshly tokenized corpus). Every analysis reports the
number of tokens it used (``n_tokens``) next to each figure.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvmem.errors import KvmemError
from kvmem.profile.run import Run, slots
from kvmem.profile.tokens import TokenStore


@dataclass
class Sample:
    """Token rows [n_rows, seq_len] (CPU int64) and where they came from."""

    rows: torch.Tensor
    source: str

    @property
    def n_tokens(self) -> int:
        return int(self.rows.numel())

    @property
    def seq_len(self) -> int:
        return int(self.rows.shape[1])

    def head(self, max_tokens: int | None) -> "Sample":
        """The first rows holding at most ``max_tokens`` tokens (at least one row)."""
        if max_tokens is None or max_tokens >= self.n_tokens:
            return self
        n = max(1, max_tokens // self.seq_len)
        return Sample(self.rows[:n], self.source)


def sample_from_ids(ids: torch.Tensor, seq_len: int, max_tokens: int | None = None, source: str = "ids") -> Sample:
    """Full rows of ``seq_len`` tokens from a flat id stream [n] (the short tail is dropped,
    unless the stream is shorter than one row)."""
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


def sample_from_run(run: Run, max_tokens: int | None = None) -> Sample:
    """Rows of the run's own seq_len from the start of its token store."""
    return sample_from_ids(run.tokens.ids, run.seq_len, max_tokens,
                           source=f"run {run.path} (first tokens of its token store)")


def run_slots(run: Run, layer: int, kind: str = "top") -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's example store (kvmem.profile.run.slots) on the CPU: values [d_mlp, k] (NaN = empty),
    global token index [d_mlp, k] int64 (-1 = empty)."""
    s = slots(run.layer_stats(layer), kind)
    return s.value.cpu(), s.index.cpu().long()


def local_index(index: torch.Tensor, store: TokenStore) -> torch.Tensor:
    """Global token indices [...] (-1 = none) -> indices into ``store.ids`` (-1 kept): a run of one shard
    starts at ``store.offset``."""
    return torch.where(index >= 0, index - store.offset, index)


def sample_from_corpus(model, corpus: str = "pydoc", tokens: int = 20000, seq_len: int = 128) -> Sample:
    """Tokenize a corpus source (see kvmem.profile.corpus) and cut it into rows."""
    from kvmem.profile.corpus import Corpus
    from kvmem.profile.tokens import tokenize

    store, _ = tokenize(Corpus(corpus), model.tokenizer, tokens)
    return sample_from_ids(store.ids, seq_len, tokens, source=f"corpus {corpus}")


def batches(sample: Sample, device, tokens_per_batch: int = 2048):
    """Yield ``rows [b, seq_len]`` on ``device``, about ``tokens_per_batch`` tokens each."""
    b = max(1, tokens_per_batch // sample.seq_len)
    for start in range(0, sample.rows.shape[0], b):
        yield sample.rows[start:start + b].to(device)


def thirds(layers: list[int], n_layers: int) -> dict[str, list[int]]:
    """Layers split by relative depth: lower (< 1/3), middle, upper (>= 2/3 of the model)."""
    out = {"lower": [], "middle": [], "upper": []}
    for layer in layers:
        depth = layer / max(n_layers - 1, 1)
        out["lower" if depth < 1 / 3 else "upper" if depth >= 2 / 3 else "middle"].append(layer)
    return out


def next_token_loss(logits: torch.Tensor, rows: torch.Tensor) -> tuple[float, int]:
    """Summed cross-entropy of predicting rows[:, 1:] from logits[:, :-1], and the count.
    logits [b, pos, d_vocab], rows [b, pos]."""
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -lp.gather(-1, rows[:, 1:, None]).squeeze(-1)
    return float(nll.sum()), int(nll.numel())


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
