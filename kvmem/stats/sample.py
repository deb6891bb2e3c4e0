"""A uniform random sample of each neuron's activating tokens (m > 0): per neuron the k tokens of largest
priority p(t, n) = (hash32(t) + hash32'(n)) mod 2**32 (kvmem.stats.keys), so the sample is the same
whatever the batches, shards or their order, and merges exactly.

Sampling guarantee: for one neuron, the sample is a uniform draw without replacement of min(k, #active)
of its active tokens (the hash order is a fixed pseudo-random permutation of token indices). Unlike
independent samples, the orders of two neurons are rotations of one another (the neuron's hash is added),
so samples of different neurons are not independent draws.

State: ``value`` [d, k] float32 (NaN empty), ``index`` [d, k] int64 (-1 empty), ``priority`` [d, k] int64
in [0, 2**32) (-1 empty): kept so that shifting token indices (merging independent runs) keeps the sample
that was drawn.

Torch update: the tokens whose priority can beat a neuron's k-th priority T form one cyclic interval of
token hashes, found by searchsorted on the sorted hashes of the batch, so the sample costs
O(N log N + candidates) and never touches [N, d_mlp] once the store is warm; a narrower window holding
about SAMPLE_WINDOW·k expected positives is tried first. While the interval would visit more than
SAMPLE_RANGE_LIMIT of the batch's pairs (the first batches), a dense pass is cheaper.

Sync-free update (``update_dense``, the GPU path): the sample keys of the batch's active pairs [N, d]
(EMPTY elsewhere), the top min(k, N) per column by one topk along the tokens, merged into the store by one
topk along the slots (kvmem.stats.store.merge_dense); fixed shapes, the same state as ``update``.
"""

from __future__ import annotations

import torch

from kvmem.stats.base import Batch, LayerSpec, Stat
from kvmem.stats.keys import EMPTY, LOW, decode_index, encode_high, key_high, neuron_hash, sample_key, token_hash
from kvmem.stats.store import column_topk, merge_dense, merge_entries, pick
from kvmem.stats.topk import Slots, entries

SAMPLE_RANGE_LIMIT = 0.125
SAMPLE_WINDOW = 4


class Sample(Stat):
    """Uniform sample of k activating (m > 0) tokens per neuron (see the module docstring)."""

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        d, k, dev = spec.d_mlp, spec.k, spec.device
        self.keys = torch.full((d, k), EMPTY, dtype=torch.int64, device=dev)  # high: priority - 2**31
        self.value = torch.full((d, k), float("nan"), device=dev)
        self.neuron_c = neuron_hash(torch.arange(d, device=dev))

    def slots(self) -> Slots:
        return Slots(self.value.clone(), decode_index(self.keys))

    def priority(self) -> torch.Tensor:
        """Priorities [d, k] int64 in [0, 2**32) (-1 = empty)."""
        k = self.keys
        return torch.where(k == EMPTY, torch.full_like(k, -1), key_high(k) + 2**31)

    def state_dict(self) -> dict[str, torch.Tensor]:
        s = self.slots()
        return {"value": s.value, "index": s.index, "priority": self.priority()}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        index = self._get(sd, "index")
        high = self._get(sd, "priority") - 2**31  # the stored priority, not one recomputed from the index
        self.keys = torch.where(index >= 0, encode_high(high, index), torch.full_like(index, EMPTY))
        self.value = self._get(sd, "value")

    def merge(self, other: "Sample") -> None:
        dev = self.spec.device
        rows, key, pay = entries(other.keys.to(dev), other.value.to(dev))
        self.keys, (self.value,) = merge_entries(self.keys, [self.value], [float("nan")], rows, key, pay)

    def update_dense(self, batch: Batch) -> None:
        """update without host synchronisation (module docstring)."""
        m, ti = batch.m, batch.index
        n = m.shape[0]
        prio = (token_hash(ti)[:, None] + self.neuron_c[None, :]) & LOW  # [N, d]
        keys = torch.where(m > 0, encode_high(prio - 2**31, ti[:, None]), EMPTY)
        del prio
        top = torch.topk(keys, min(self.spec.k, n), dim=0)
        v = torch.where(top.values == EMPTY, float("nan"), m.gather(0, top.indices))
        self.keys, (self.value,) = merge_dense(self.keys, top.values.T, [(self.value, v.T)])
        batch.paths["sample"] = "fixed"

    def _hash_ranges(self, T: torch.Tensor, active: torch.Tensor, hs: torch.Tensor):
        """Per neuron the sorted-hash positions whose priority is >= T [d] (unsigned), for active neurons:
        one cyclic interval [start, start + 2**32 - T) of token hashes, i.e. at most two position ranges.
        Returns (a1, c1, cnt): first range start and length, total count per neuron."""
        start = (T - self.neuron_c) & LOW
        end = start + (2**32 - T)
        a1 = torch.searchsorted(hs, start)
        b1 = torch.searchsorted(hs, end.clamp(max=2**32))
        b2 = torch.searchsorted(hs, (end - 2**32).clamp(min=0))
        zero = torch.zeros_like(a1)
        c1 = torch.where(active, b1 - a1, zero)
        return a1, c1, c1 + torch.where(active, b2, zero)

    def update(self, batch: Batch) -> None:
        m, ti = batch.m, batch.index
        n, d = m.shape
        k = self.spec.k
        paths = batch.paths
        kth = self.keys[:, -1]
        T = torch.where(kth == EMPTY, torch.zeros_like(kth), key_high(kth) + 2**31)  # unsigned priority
        pos_count = batch.positives[1]
        active = pos_count > 0
        window = (2**32 * SAMPLE_WINDOW * k) // pos_count.clamp(min=1) + 1
        Tw = torch.maximum(T, (2**32 - window).clamp(min=0))
        narrowed = Tw > T
        hs, order = torch.sort(token_hash(ti))
        a1, c1, cnt = self._hash_ranges(Tw, active, hs)
        total = int(cnt.sum())
        if total == 0:
            paths["sample"] = "none"
            return
        if total <= SAMPLE_RANGE_LIMIT * n * d:
            paths["sample"] = "range"
            rows, nrn = _expand(a1, c1, cnt, order)
            keep = pick(m, rows, nrn) > 0
            found = torch.bincount(nrn[keep], minlength=d)
            redo = narrowed & (found < k)
            if bool(redo.any()):
                keep &= ~redo[nrn]
                a1, c1, cnt = self._hash_ranges(T, redo, hs)
                rows2, nrn2 = _expand(a1, c1, cnt, order)
                rows, nrn = torch.cat([rows[keep], rows2]), torch.cat([nrn[keep], nrn2])
                keep = pick(m, rows, nrn) > 0
            rows, nrn = rows[keep], nrn[keep]
            key = sample_key(ti[rows], nrn)
            sel = key > kth[nrn]
            cols, key, rows = nrn[sel], key[sel], rows[sel]
        else:
            paths["sample"] = "dense"
            prio = (token_hash(ti)[:, None] + self.neuron_c[None, :]) & LOW  # [N, d]
            ok = (m > 0) & (prio >= T[None, :])
            keys = torch.where(ok, encode_high(prio - 2**31, ti[:, None]), torch.full_like(prio, EMPTY))
            del prio, ok
            cols, key, rows = column_topk(keys, k)
        v = pick(m, rows, cols)
        self.keys, (self.value,) = merge_entries(self.keys, [self.value], [float("nan")], cols, key, [v])


def _expand(a1, c1, cnt, order):
    """(rows, neurons) of all positions described by Sample._hash_ranges (order: sorted position -> row)."""
    total = int(cnt.sum())
    dev = cnt.device
    nrn = torch.repeat_interleave(torch.arange(cnt.numel(), device=dev), cnt, output_size=total)
    j = torch.arange(total, device=dev) - (torch.cumsum(cnt, 0) - cnt)[nrn]
    c1n = c1[nrn]
    return order[torch.where(j < c1n, a1[nrn] + j, j - c1n)], nrn
