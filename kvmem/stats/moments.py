"""Moments of m per neuron: ``sum`` and ``sumsq`` [d] float64 (the token count is the layer's ``n``).

Every value is converted to float64 first (squares of float32 values are exact in float64), so only the
float64 additions round; sums of different batchings or merges agree to float64 rounding, not bit for bit.
Read-outs: ``mean(n)``, ``std(n)`` (population).
"""

from __future__ import annotations

import torch

from kvmem.stats.base import Batch, Counters
from kvmem.stats.store import work_buffer


class Moments(Counters):
    FIELDS = {"sum": (lambda s: (s.d_mlp,), torch.float64), "sumsq": (lambda s: (s.d_mlp,), torch.float64)}

    def update(self, batch: Batch) -> None:
        m = batch.m
        # row-vector products (BLAS gemv: deterministic for a given thread count, twice as fast as sum(0))
        x = work_buffer("f64", tuple(m.shape), torch.float64, m.device)
        x.copy_(m)
        ones = torch.ones(1, m.shape[0], dtype=torch.float64, device=m.device)
        self.sum += (ones @ x)[0]
        x.mul_(x)
        self.sumsq += (ones @ x)[0]

    def update_dense(self, batch: Batch) -> None:
        """update out of place (a failed sync-free update leaves the state as it was: LayerStats)."""
        m = batch.m
        x = work_buffer("f64", tuple(m.shape), torch.float64, m.device)
        x.copy_(m)
        ones = torch.ones(1, m.shape[0], dtype=torch.float64, device=m.device)
        s = (ones @ x)[0]
        x.mul_(x)
        self.sum, self.sumsq = self.sum + s, self.sumsq + (ones @ x)[0]

    def mean(self, n) -> torch.Tensor:
        """Mean of m per neuron, float64 [d] (NaN before any token). n: the token count, an int or per
        neuron [d] (MoE layers: the tokens routed to the neuron's expert; NaN where 0)."""
        if isinstance(n, torch.Tensor):
            return torch.where(n > 0, self.sum / n.clamp(min=1), float("nan"))
        return self.sum / n if n else torch.full_like(self.sum, float("nan"))

    def std(self, n) -> torch.Tensor:
        """Population standard deviation of m per neuron, float64 [d] (NaN before any token; n as in mean)."""
        if isinstance(n, torch.Tensor):
            c = n.clamp(min=1).to(torch.float64)
            mu = self.sum / c
            return torch.where(n > 0, (self.sumsq / c - mu * mu).clamp(min=0.0).sqrt(), float("nan"))
        if not n:
            return torch.full_like(self.sum, float("nan"))
        mu = self.sum / n
        return (self.sumsq / n - mu * mu).clamp(min=0.0).sqrt()
