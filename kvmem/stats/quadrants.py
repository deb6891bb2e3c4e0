"""Gated FFNs (m = act(gate) · up): how often each (gate, up) sign combination occurs per neuron, and the
largest-|m| example of each.

State: ``count`` [d, 4] int64 tokens per quadrant, columns (gate > 0, up > 0), (gate > 0, up <= 0),
(gate <= 0, up > 0), (gate <= 0, up <= 0); ``value`` [d, 4] float32 the m of each quadrant's largest-|m|
token (NaN while the quadrant is empty), ``index`` [d, 4] int64 its token (-1 empty; ties to the lower index).

Torch update: each token is held to the example of its own quadrant (one mask |m| > bound[quadrant]);
quadrants seen for the first time in a neuron take a dense pass over that neuron's column (at most four
times per neuron). A quadrant's example is empty exactly until its count is non-zero.

Sync-free update (``update_dense``, the GPU path): the best key of |m| per (quadrant, neuron) by one scatter
amax over the batch, the larger of it and the kept one; the example's m read back by a searchsorted of its
token in the batch, taken where the key changed. Fixed shapes; the same state as ``update``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kvmem.stats.base import Batch, LayerSpec, Stat
from kvmem.stats.keys import EMPTY, decode_index, decode_value, encode, next_down
from kvmem.stats.store import nonzero_flat, pick, work_buffer
from kvmem.stats.topk import keys_of
from kvmem.stats.warmup import quadrant_best


class QuadrantSlots(NamedTuple):
    """count [d, 4] int64; largest-|m| example per quadrant: value [d, 4], index [d, 4]."""

    count: torch.Tensor
    value: torch.Tensor
    index: torch.Tensor


class Quadrants(Stat):
    @classmethod
    def applies(cls, spec: LayerSpec) -> bool:
        return spec.gated

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        d, dev = spec.d_mlp, spec.device
        self.keys = torch.full((d, 4), EMPTY, dtype=torch.int64, device=dev)  # keys of |m|
        self.value = torch.full((d, 4), float("nan"), device=dev)
        self.count = torch.zeros(d, 4, dtype=torch.int64, device=dev)

    def slots(self) -> QuadrantSlots:
        return QuadrantSlots(self.count.clone(), self.value.clone(), decode_index(self.keys))

    def state_dict(self) -> dict[str, torch.Tensor]:
        s = self.slots()
        return {"count": s.count, "value": s.value, "index": s.index}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.count = self._get(sd, "count")
        self.value = self._get(sd, "value")
        self.keys = keys_of(self.value.abs(), self._get(sd, "index"))

    def merge(self, other: "Quadrants") -> None:
        dev = self.spec.device
        ok, ov = other.keys.to(dev), other.value.to(dev)
        take = ok > self.keys
        self.keys = torch.where(take, ok, self.keys)
        self.value = torch.where(take, ov, self.value)
        self.count += other.count.to(dev)

    def _count(self, m, gate, up) -> None:
        """Add the batch's tokens per quadrant (float sums of 0/1: exact integers below 2**24)."""
        n, d = m.shape
        dev = m.device
        g = work_buffer("f32_a", (n, d), torch.float32, dev)
        u = work_buffer("f32_b", (n, d), torch.float32, dev)
        torch.gt(gate, 0, out=g)
        torch.gt(up, 0, out=u)
        ones = torch.ones(n, device=dev)
        gs, us = ones @ g, ones @ u
        g.mul_(u)
        gus = ones @ g
        self.count = self.count + torch.stack([gus, gs - gus, us - gus, n - gs - us + gus], 1).to(torch.int64)

    def update_dense(self, batch: Batch) -> None:
        """update without host synchronisation (module docstring)."""
        m, ti, gate, up = batch.m, batch.index, batch.gate, batch.up
        n, d = m.shape
        self._count(m, gate, up)
        quad = (gate <= 0).to(torch.int64) * 2 + (up <= 0).to(torch.int64)  # [N, d]
        best = torch.full((4, d), EMPTY, dtype=torch.int64, device=m.device)
        best.scatter_reduce_(0, quad, encode(m.abs(), ti[:, None]), "amax")
        new = torch.maximum(self.keys, best.T)
        row = torch.searchsorted(ti, decode_index(new)).clamp_(0, n - 1)  # [d, 4]
        v = m.gather(0, row.T).T  # m[row[j, q], j]
        self.value = torch.where(new != self.keys, v, self.value)
        self.keys = new
        batch.paths["quadrants"] = "fixed"

    def update(self, batch: Batch) -> None:
        m, ti, gate, up = batch.m, batch.index, batch.gate, batch.up
        n, d = m.shape
        dev = m.device
        self._count(m, gate, up)
        old = self.keys
        new = old.clone()
        if bool((old != EMPTY).any()):  # every token held to its own quadrant's example (+inf where empty)
            qv = decode_value(old)
            q = torch.where(torch.isnan(qv), torch.full_like(qv, float("inf")), qv)
            q = (q if batch.monotone else next_down(q)).contiguous()
            gp = work_buffer("mask_c", (n, d), torch.bool, dev)
            upos = work_buffer("mask_d", (n, d), torch.bool, dev)
            torch.gt(gate, 0, out=gp)
            torch.gt(up, 0, out=upos)
            bound = work_buffer("f32_q", (n, d), torch.float32, dev)
            side = work_buffer("f32_q2", (n, d), torch.float32, dev)
            torch.where(upos, q[:, 0], q[:, 1], out=bound)  # gate > 0
            torch.where(upos, q[:, 2], q[:, 3], out=side)  # gate <= 0
            torch.where(gp, bound, side, out=bound)
            absm = work_buffer("f32_abs", (n, d), torch.float32, dev)
            torch.abs(m, out=absm)
            mask = work_buffer("mask_a", (n, d), torch.bool, dev)
            torch.gt(absm, bound, out=mask)
            flat = nonzero_flat(mask)
            batch.paths["quadrant_candidates"] = int(flat.numel())
            rows, cols = flat // d, flat % d
            v = m.view(-1).index_select(0, flat)
            quad = (pick(gate, rows, cols) <= 0).to(torch.int64) * 2 + (pick(up, rows, cols) <= 0).to(torch.int64)
            slot = cols * 4 + quad
            key = encode(v.abs(), ti.index_select(0, rows))
            sel = key > old.view(-1)[slot]
            new.view(-1).scatter_reduce_(0, slot[sel], key[sel], "amax")
        # quadrants seen for the first time: dense over those neurons only (at most 4 times per neuron)
        fresh = ((old == EMPTY) & (self.count > 0)).any(1).nonzero().squeeze(1)
        batch.paths["quadrant_fresh"] = int(fresh.numel())
        if fresh.numel():
            if fresh.numel() == d:
                best = quadrant_best(m, ti, gate, up)
            else:
                best = quadrant_best(m[:, fresh], ti, gate[:, fresh], up[:, fresh])
            new[fresh] = torch.maximum(new[fresh], best)
        changed = (new != old).view(-1).nonzero().squeeze(1)
        if changed.numel():
            tok = decode_index(new.view(-1)[changed])
            row = torch.searchsorted(ti, tok)
            self.value.view(-1)[changed] = m[row, changed // 4]
        self.keys = new
