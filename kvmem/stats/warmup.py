"""Candidates from one batch alone, for stores that are not full yet (the first batches).

While a store has empty slots there is no threshold to prefilter with, so the batch's own best
entries are found directly, in float32 (no int64 keys over [N, d]):
  * batch_topk_rows: per column exactly min(k, N) rows, the k largest (or smallest) values with ties
    to the lower row (= lower token index): one float topk for the k-th value, then ties at that value
    are taken in row order (a cumulative count, only over the columns that have surplus ties).
  * group_max: per column and group (document, quadrant) the max value and the first row holding it
    (scatter amax, then scatter amin of the row index among the rows equal to the max).
The merge into the store is the same exact key merge as in steady state.
"""

from __future__ import annotations

import torch

from kvmem.stats.keys import EMPTY, encode
from kvmem.stats.store import column_topk, nonzero_flat


def batch_topk_rows(m: torch.Tensor, k: int, largest: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [C], cols [C]) of the k largest (smallest) entries of each column of m [N, d]."""
    n, d = m.shape
    kk = min(k, n)
    part = torch.topk(m, kk, dim=0, largest=largest, sorted=False).values  # [kk, d]
    kth = part.amin(0) if largest else part.amax(0)
    strict = m > kth if largest else m < kth
    tie = m == kth
    need = kk - strict.sum(0, dtype=torch.int32)  # >= 1: kth itself is not strictly beyond kth
    surplus = (tie.sum(0, dtype=torch.int32) > need).nonzero().squeeze(1)
    if surplus.numel():  # keep only the first `need` ties of those columns
        sub = tie[:, surplus]
        tie[:, surplus] = sub & (sub.cumsum(0, dtype=torch.int32) <= need[surplus])
    flat = nonzero_flat(strict.logical_or_(tie))
    return flat // d, flat % d


def group_max(values: torch.Tensor, group: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column the max of values [N, a] over the rows of each group and the first row holding it.

    group [N, a] int64 (an expanded [N, 1] works) in [0, n_groups). Returns (max [G, a] float32, -inf
    for empty groups; row [G, a] int64, N for empty groups)."""
    n, a = values.shape
    dev = values.device
    gmax = torch.full((n_groups, a), float("-inf"), device=dev).scatter_reduce_(0, group, values, "amax")
    at_max = values == gmax.gather(0, group)
    row = torch.arange(n, dtype=torch.int32, device=dev)[:, None] - n  # row - n < 0
    first = (at_max.to(torch.int32) * row).add_(n)  # the row where at the max, else n
    first_row = torch.full((n_groups, a), n, dtype=torch.int32, device=dev).scatter_reduce_(0, group, first, "amin")
    return gmax, first_row.long()


def batch_doc_rows(m: torch.Tensor, ti: torch.Tensor, doc: torch.Tensor, k: int):
    """The k best documents of the batch per column: (cols [C], keys [C], doc ids [C]).

    A document's entry is its max m and the first token holding it (key = encode(max, token index)).
    doc [N] non-decreasing."""
    n, d = m.shape
    seg = torch.zeros(n, dtype=torch.int64, device=m.device)
    seg[1:] = torch.cumsum(doc[1:] != doc[:-1], 0)
    seg_doc = torch.unique_consecutive(doc)
    docmax, first_row = group_max(m, seg[:, None].expand(n, d), seg_doc.numel())
    cols, key, drow = column_topk(encode(docmax, ti[first_row]), k)
    return cols, key, seg_doc[drow]


def quadrant_best(m: torch.Tensor, ti: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Keys [a, 4] of the largest-|m| token per (gate, up) sign quadrant of each column (EMPTY if none).

    m, gate, up [N, a]; quadrant 0..3 = (gate>0, up>0), (gate>0, up<=0), (gate<=0, up>0), (gate<=0, up<=0)."""
    quad = (gate <= 0).to(torch.int64) * 2 + (up <= 0).to(torch.int64)
    qmax, first_row = group_max(m.abs(), quad, 4)
    n = m.shape[0]
    keys = encode(qmax, ti[first_row.clamp(max=n - 1)])
    return torch.where(first_row < n, keys, torch.full_like(keys, EMPTY)).T
