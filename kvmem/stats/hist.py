"""The fixed activation histogram shared by every neuron of every model.

Bins are symmetric in |m| and log-spaced by the float32 bit pattern: 4 bins per octave (edges
2**e * {1, 1.25, 1.5, 1.75}) from 2**-10 (~9.8e-4) to 2**14 (16384), plus per sign a "tiny" bin
[2**-126, 2**-10) and an overflow bin [2**14, inf), and one zero bin for |m| < 2**-126 (exact zeros and
float32 subnormals). 197 bins in all; ``HIST_EDGES`` (198 float32 values, -inf ... inf) are their edges:

    m > 0:  bin b holds HIST_EDGES[b] <= m <  HIST_EDGES[b+1]
    m < 0:  bin b holds HIST_EDGES[b] <  m <= HIST_EDGES[b+1]     (mirror image of the positive side)
    |m| < 2**-126: bin ZERO_BIN (= 98)

A value's bin is read off its float32 bits: (bits >> 21) & 2047 is sign, exponent and the top two
mantissa bits, and a 2048-entry table maps that code to the bin. No rounding is involved, so counts are
exact with respect to the edges, for any input dtype (bf16/fp16 values are exactly representable).
"""

from __future__ import annotations

import torch

from kvmem.stats.base import Batch, Counters
from kvmem.stats.store import bincount, bincount_fixed, work_buffer

OCT_LO, OCT_HI, PER_OCT = -10, 14, 4
N_REG = (OCT_HI - OCT_LO) * PER_OCT  # 96 regular bins per sign
N_SIDE = N_REG + 2  # + tiny + overflow
N_BINS = 2 * N_SIDE + 1  # 197
ZERO_BIN = N_SIDE  # 98

_MAG_EDGES = [2.0**-126] + [2.0**e * (1 + j / PER_OCT) for e in range(OCT_LO, OCT_HI) for j in range(PER_OCT)]
_MAG_EDGES.append(2.0**OCT_HI)
HIST_EDGES = torch.tensor(
    [float("-inf")] + [-x for x in reversed(_MAG_EDGES)] + _MAG_EDGES + [float("inf")], dtype=torch.float32
)
assert HIST_EDGES.numel() == N_BINS + 1


def _build_lut() -> torch.Tensor:
    """code (sign bit, 8 exponent bits, 2 mantissa bits) [2048] -> bin [2048] int64."""
    mc = torch.arange(1024)
    first_reg = (127 + OCT_LO) * PER_OCT  # code of 2**-10
    end_reg = (127 + OCT_HI) * PER_OCT  # code of 2**14
    pos = torch.where(
        mc < PER_OCT,  # exponent field 0: zero or subnormal
        torch.full_like(mc, ZERO_BIN),
        torch.where(
            mc < first_reg,
            torch.full_like(mc, ZERO_BIN + 1),
            torch.where(mc < end_reg, ZERO_BIN + 2 + (mc - first_reg), torch.full_like(mc, N_BINS - 1)),
        ),
    )
    return torch.cat([pos, N_BINS - 1 - pos])


BIN_LUT = _build_lut()
_LUT_CACHE: dict = {}


def bins_of(values: torch.Tensor) -> torch.Tensor:
    """Bin index (int64) of each value of a float tensor [...] (any float dtype, cast to float32 exactly)."""
    code = (values.to(torch.float32).contiguous().view(torch.int32) >> 21) & 2047
    return BIN_LUT.to(values.device)[code.long()]


def _scaled_lut(d: int, device: torch.device) -> torch.Tensor:
    """BIN_LUT * d as int32 on device (bin-major flat index base), cached."""
    key = (d, str(device))
    lut = _LUT_CACHE.get(key)
    if lut is None:
        lut = (BIN_LUT * d).to(torch.int32).to(device)
        _LUT_CACHE[key] = lut
    return lut


def batch_hist(m: torch.Tensor, code: torch.Tensor, flat: torch.Tensor, fixed: bool = False) -> torch.Tensor:
    """Counts [N_BINS, d] int64 of the float32 activations m [N, d] (contiguous).

    code, flat: int32 work buffers [N, d] (overwritten). Four elementwise passes and one bincount
    (fixed: an index_add_ instead, no host synchronisation; the same counts)."""
    n, d = m.shape
    torch.bitwise_right_shift(m.view(torch.int32), 21, out=code)
    code.bitwise_and_(2047)
    torch.index_select(_scaled_lut(d, m.device), 0, code.view(-1), out=flat.view(-1))
    flat.add_(torch.arange(d, dtype=torch.int32, device=m.device))
    count = bincount_fixed if fixed else bincount
    return count(flat.view(-1), N_BINS * d).view(N_BINS, d)


def count_above(hist: torch.Tensor, threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimated number of values > threshold per row of hist [d, N_BINS], and its error bound.

    threshold [d] (float). Bins entirely above the threshold's bin count in full; the bin holding the
    threshold (the straddling bin) contributes its count times the fraction of its width above the
    threshold (linear interpolation; one half for the two unbounded end bins). The true count lies in
    [above, above + straddling count], so |estimate - truth| <= bound = the straddling bin's count.
    Returns (estimate float64 [d], bound float64 [d])."""
    d = hist.shape[0]
    t = threshold.to(torch.float32).to(hist.device).reshape(d)
    b = bins_of(t)
    suffix = torch.cat([hist.flip(1).cumsum(1).flip(1), torch.zeros(d, 1, dtype=hist.dtype, device=hist.device)], 1)
    rows = torch.arange(d, device=hist.device)
    above = suffix[rows, b + 1].to(torch.float64)
    straddle = hist[rows, b].to(torch.float64)
    edges = HIST_EDGES.to(torch.float64).to(hist.device)
    lo, hi = edges[b], edges[b + 1]
    frac = (hi - t.to(torch.float64)) / (hi - lo)
    frac = torch.where(torch.isfinite(lo) & torch.isfinite(hi) & (hi > lo), frac, torch.full_like(frac, 0.5))
    frac = frac.clamp(0.0, 1.0)
    return above + frac * straddle, straddle



class Histogram(Counters):
    """The component (kvmem.stats.base): ``count`` [d, N_BINS] int64, tokens per neuron and bin of HIST_EDGES
    (MoE layers: only the tokens routed to the neuron's expert, whose m is 0 elsewhere; sync-free path).
    Read-outs: ``above(t)`` / ``below(t)``: estimated tokens with m > t / m < -t per neuron, with error bounds."""

    FIELDS = {"count": (lambda s: (s.d_mlp, N_BINS), torch.int64)}

    def update(self, batch: Batch) -> None:
        m = batch.m
        n, d = m.shape
        code = work_buffer("i32_a", (n, d), torch.int32, m.device)
        flat = work_buffer("i32_b", (n, d), torch.int32, m.device)
        self.count += batch_hist(m, code, flat).T
        if batch.active is not None:  # MoE layers: m = 0 at the tokens not routed to the expert: not counted
            self.count[:, ZERO_BIN] -= n - batch.active.sum(0)

    def update_dense(self, batch: Batch) -> None:
        """update without host synchronisation (an index_add_ for the bincount)."""
        m = batch.m
        n, d = m.shape
        code = work_buffer("i32_a", (n, d), torch.int32, m.device)
        flat = work_buffer("i32_b", (n, d), torch.int32, m.device)
        count = batch_hist(m, code, flat, fixed=True).T  # [d, N_BINS]
        if batch.active is not None:  # MoE layers: m = 0 at the tokens not routed to the expert: not counted
            outside = n - (torch.ones(1, n, device=m.device) @ batch.active.to(torch.float32))[0].to(torch.int64)
            count[:, ZERO_BIN] -= outside
        self.count = self.count + count  # out of place: see LayerStats

    def above(self, threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(estimate, bound) float64 [d] of the number of tokens with m > threshold [d]."""
        return count_above(self.count, threshold)

    def below(self, threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(estimate, bound) float64 [d] of the number of tokens with m < -threshold [d] (the mirror image)."""
        return count_above(self.count.flip(1), threshold)
