"""The dense part of LayerStats.update fused into one pass over the batch, on CPU (numba).

The torch path of ``LayerStats.update`` (kvmem.stats.layer, kvmem.stats.update) reads the batch m
[N, d_mlp] some twenty times: positive counts, float64 moments, histogram codes, the candidate mask of
the top-k stores, the quadrant sign counts. On a CPU each of those is a trip through memory, and
together they cost about half a transformer layer's forward pass. ``dense_pass`` does all of them in a
single read of m (and gate, up): neurons are split into blocks of ``BLOCK`` columns, each block is
walked row by row by one thread, so every per-neuron accumulator is private to one thread and is
summed in token order: the result does not depend on the number of threads. The kernel is compiled
without numba's own threading (a second OpenMP runtime beside torch's would make the two spin
against each other on a small CPU); the blocks are shared out to torch.get_num_threads() plain
threads instead (the kernel releases the GIL).

Per batch it adds into the statistics in place:
  count_pos [d] int64, sum / sumsq [d] float64 (float32 values converted exactly, added in token
  order), hist [d, N_BINS] int64 (kvmem.stats.hist bins, read off the float32 bits), quadrant counts
  [d, 4] int64 (gated); and returns the batch's positives per token (l0 [N]) and per neuron
  (pos [d]) and the flat indices i * d + j of the candidates for the top-k stores: entries with
  m > hi[j] or m < lo[j] or, gated, |m| > q[j, quadrant of (gate, up)] (kvmem.stats.update.Bounds).

GPU (and any device that is not the CPU) uses the torch path, which the tests run on CPU too; both
paths are checked against the same brute-force statistics.
"""

from __future__ import annotations

import numpy as np
import torch

from kvmem.stats.store import run_parallel

try:  # numba is a dependency; a platform without its wheels still works on the torch path
    import numba
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None

BLOCK = 64  # neurons per block: a block's local histogram (64 * 197 int32) stays in the core's cache
CAND_PER_BLOCK = 1 << 16  # candidate slots per block; more than that and the caller takes the torch path

available = numba is not None
N_BINS = 197  # kvmem.stats.hist.N_BINS (checked there)


def _kernel(b0, b1, m, bits, gate, up, gated, lut, hi, lo, q, cap,
            l0_part, pos, s1, s2, hist, quad, cand, ncand):
    # Each block keeps its accumulators in local arrays (no aliasing with the inputs, so the simple
    # per-row loops below vectorize) and adds them into the statistics once at the end.
    n, d = m.shape
    for b in range(b0, b1):
        j0 = b * BLOCK
        w = min(d, j0 + BLOCK) - j0
        a1 = np.zeros(BLOCK)
        a2 = np.zeros(BLOCK)
        npos = np.zeros(BLOCK, np.int32)
        h = np.zeros((BLOCK, N_BINS), np.int32)
        ng = np.zeros(BLOCK, np.int32)
        nu = np.zeros(BLOCK, np.int32)
        ngu = np.zeros(BLOCK, np.int32)
        qc = np.zeros(BLOCK, np.int32)
        hi_b = hi[j0:j0 + w].copy()
        lo_b = lo[j0:j0 + w].copy()
        q_b = q[j0:j0 + w].copy()
        c = 0
        base = b * cap
        for i in range(n):
            row = m[i, j0:j0 + w]
            lp = 0
            for j in range(w):
                x = np.float64(row[j])
                a1[j] += x
                a2[j] += x * x
                p = np.int32(row[j] > 0)
                lp += p
                npos[j] += p
            l0_part[b, i] = lp
            brow = bits[i, j0:j0 + w]
            for j in range(w):
                h[j, lut[(brow[j] >> 21) & 2047]] += 1
            if gated:
                grow = gate[i, j0:j0 + w]
                urow = up[i, j0:j0 + w]
                for j in range(w):
                    g = np.int32(grow[j] > 0)
                    u = np.int32(urow[j] > 0)
                    ng[j] += g
                    nu[j] += u
                    ngu[j] += g & u
                    qc[j] = 3 - 2 * g - u  # the quadrant's column in q (and in LayerStats.quadrants)
                for j in range(w):
                    v = row[j]
                    if v > hi_b[j] or v < lo_b[j] or abs(v) > q_b[j, qc[j]]:
                        if c < cap:
                            cand[base + c] = i * d + j0 + j
                        c += 1
            else:
                for j in range(w):
                    v = row[j]
                    if v > hi_b[j] or v < lo_b[j]:
                        if c < cap:
                            cand[base + c] = i * d + j0 + j
                        c += 1
        ncand[b] = c
        for j in range(w):
            s1[j0 + j] += a1[j]
            s2[j0 + j] += a2[j]
            pos[j0 + j] = npos[j]
            for k in range(N_BINS):
                hist[j0 + j, k] += h[j, k]
            if gated:
                quad[j0 + j, 0] += ngu[j]
                quad[j0 + j, 1] += ng[j] - ngu[j]
                quad[j0 + j, 2] += nu[j] - ngu[j]
                quad[j0 + j, 3] += n - ng[j] - nu[j] + ngu[j]


_compiled = None


def _get_kernel():
    global _compiled
    if _compiled is None:
        _compiled = numba.njit(cache=True, nogil=True)(_kernel)
    return _compiled


_LUT = None


def _lut() -> np.ndarray:
    global _LUT
    if _LUT is None:
        from kvmem.stats.hist import BIN_LUT, N_BINS as hist_bins

        assert hist_bins == N_BINS
        _LUT = BIN_LUT.numpy().astype(np.int32)
    return _LUT


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def dense_pass(s, m: torch.Tensor, gate, up, hi: torch.Tensor, lo: torch.Tensor, q: torch.Tensor):
    """One fused pass of batch m [N, d] float32 contiguous (CPU) into LayerStats s (see the module
    docstring). Returns (l0 [N] int64, pos [d] int64, candidates [C] int64 flat indices, or None when a
    block overflowed its candidate slots)."""
    n, d = m.shape
    nblk = (d + BLOCK - 1) // BLOCK
    if s.gated:
        g = gate.to(torch.float32).contiguous()
        u = up.to(torch.float32).contiguous()
    else:
        g = u = torch.zeros(1, 1)
    l0_part = np.empty((nblk, n), dtype=np.int32)
    pos = np.zeros(d, dtype=np.int64)
    cand = np.empty(nblk * CAND_PER_BLOCK, dtype=np.int64)
    ncand = np.zeros(nblk, dtype=np.int64)
    quad = _np(s.quadrant_count) if s.gated else np.zeros((1, 4), dtype=np.int64)
    args = (
        _np(m), _np(m.view(torch.int32)), _np(g), _np(u), s.gated, _lut(),
        _np(hi.float().contiguous()), _np(lo.float().contiguous()),
        _np(q.float().contiguous()), CAND_PER_BLOCK,
        l0_part, pos, _np(s.sum), _np(s.sumsq), _np(s.hist), quad, cand, ncand,
    )
    kernel = _get_kernel()
    parts = min(torch.get_num_threads(), nblk)
    cuts = [nblk * p // parts for p in range(parts + 1)]
    run_parallel([lambda a=a, b=b: kernel(a, b, *args) for a, b in zip(cuts[:-1], cuts[1:])])
    l0 = torch.from_numpy(l0_part.sum(0, dtype=np.int64))
    pos_t = torch.from_numpy(pos)
    if (ncand > CAND_PER_BLOCK).any():
        return l0, pos_t, None
    parts = [cand[b * CAND_PER_BLOCK: b * CAND_PER_BLOCK + ncand[b]] for b in range(nblk)]
    return l0, pos_t, torch.from_numpy(np.concatenate(parts))
