"""Test data streams and brute-force statistics (plain numpy over the concatenated data) for kvmem.stats."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvmem.stats import HIST_EDGES, sample_priority


@dataclass
class Stream:
    m: torch.Tensor  # [N, d] float32 (or other dtype)
    ti: torch.Tensor  # [N] int64
    doc: torch.Tensor  # [N] int64
    pos: torch.Tensor  # [N] int64
    gate: torch.Tensor | None
    up: torch.Tensor | None
    bounds: list[int]  # batch boundaries (0 = first, N = last)

    def batches(self):
        for a, b in zip(self.bounds[:-1], self.bounds[1:]):
            g = None if self.gate is None else self.gate[a:b]
            u = None if self.up is None else self.up[a:b]
            yield self.m[a:b], self.ti[a:b], self.doc[a:b], self.pos[a:b], g, u

    def feed(self, s, order=None):
        """Stream the batches (in order, or in the given batch order) into s; returns s. The code paths
        each update took are kept in self.paths."""
        bs = list(self.batches())
        self.paths = []
        for i in order if order is not None else range(len(bs)):
            m, ti, doc, pos, g, u = bs[i]
            s.update(m, ti, doc, pos, gate=g, up=u)
            self.paths.append(dict(s._paths))
        return s


def make_stream(seed: int = 0, n: int = 3000, d: int = 12, gated: bool = False, max_pos: int = 64,
                offset: int = 0) -> Stream:
    """Activations with exact ties, zeros (both signs), negatives, subnormals, a dead neuron, a rarely
    firing neuron, documents spanning batches and one long document that repeats a 5-token pattern."""
    g = torch.Generator().manual_seed(seed)
    ti = offset + torch.cumsum(torch.randint(1, 4, (n,), generator=g), 0)
    # documents: short ones and one long repetitive one in the middle
    lens, total = [], 0
    while total < n:
        ln = int(torch.randint(1, 40, (1,), generator=g))
        if len(lens) == 6:
            ln = n // 3
        lens.append(ln)
        total += ln
    doc_of = torch.repeat_interleave(torch.arange(len(lens)) * 3 + 7, torch.tensor(lens))[:n]
    long_doc = 6 * 3 + 7
    # positions inside model input rows of random length <= max_pos
    pos, p = [], 0
    while len(pos) < n:
        row = int(torch.randint(1, max_pos + 1, (1,), generator=g))
        pos.extend(range(row))
    pos = torch.tensor(pos[:n])
    gate = up = None
    if gated:
        gate = torch.round(torch.randn(n, d, generator=g) * 3) / 4
        up = torch.round(torch.randn(n, d, generator=g) * 3) / 4
        m = torch.nn.functional.silu(gate) * up
    else:
        x = torch.randn(n, d, generator=g)
        m = torch.nn.functional.gelu(x * 2)
        m[:, 0] = 0.0  # dead
        m[:, 1] = torch.relu(x[:, 1])  # exact zeros
        m[:, 2] = torch.round(x[:, 2] * 2) / 2  # exact ties, +-0
        m[:, 3] = -x[:, 3].abs() - 0.5  # never positive
        m[:, 4] = torch.where(torch.rand(n, generator=g) < 0.01, x[:, 4].abs() + 1, torch.full_like(x[:, 4], -0.1))
        m[:, 5] = x[:, 5] * 10.0 ** torch.randint(-44, 6, (n,), generator=g).float()  # subnormals .. 1e5
        m[::7, 5] = -0.0
    # the long document repeats a 5-token pattern (ties across tokens of one doc)
    where = (doc_of == long_doc).nonzero().squeeze(1)
    pattern = m[where[:5]].clone()
    boost = 5.0 * ((torch.arange(d) % 2 == 0) & (torch.arange(d) >= 6))
    m[where] = pattern[torch.arange(where.numel()) % 5] + boost
    if gated:
        gate[where] = gate[where[:5]][torch.arange(where.numel()) % 5]
        up[where] = up[where[:5]][torch.arange(where.numel()) % 5]
    # uneven batches: tiny ones, big ones, boundaries inside the long document
    cuts = {0, n, 1, 4, 5, 37, n // 2, n // 3 + 11, n // 3 + 12, n - 1}
    cuts |= set(torch.randint(1, n, (6,), generator=g).tolist())
    return Stream(m, ti, doc_of, pos, gate, up, sorted(cuts))


def _np(x):
    return x.detach().cpu().float().numpy() if x.is_floating_point() else x.detach().cpu().numpy()


def topk_ref(m, ti, k, largest=True):
    """Per neuron the k largest (or smallest) values, ties to the lower token index: (value, index) [d, k]."""
    v, idx = _np(m), _np(ti)
    n, d = v.shape
    val = np.full((d, k), np.nan, np.float32)
    ind = np.full((d, k), -1, np.int64)
    for j in range(d):
        o = np.lexsort((idx, -v[:, j] if largest else v[:, j]))[:k]
        val[j, : len(o)], ind[j, : len(o)] = v[o, j], idx[o]
    return val, ind


def docs_ref(m, ti, doc, k):
    """Per neuron the k documents with the largest max (doc counted once; argmax = lowest index)."""
    v, idx, dd = _np(m), _np(ti), _np(doc)
    n, d = v.shape
    val = np.full((d, k), np.nan, np.float32)
    ind = np.full((d, k), -1, np.int64)
    docs = np.full((d, k), -1, np.int64)
    for j in range(d):
        best = {}
        for t in range(n):  # a plain loop: the per-document max with its first argmax
            key = dd[t]
            if key not in best or v[t, j] > best[key][0]:
                best[key] = (v[t, j], idx[t])
        items = sorted(best.items(), key=lambda it: (-it[1][0], it[1][1]))[:k]
        for r, (dk, (bv, bi)) in enumerate(items):
            val[j, r], ind[j, r], docs[j, r] = bv, bi, dk
    return val, ind, docs


def sample_ref(m, ti, k):
    """Per neuron the k tokens with m > 0 of largest sample priority: (value, index) [d, k]."""
    v, idx = _np(m), _np(ti)
    n, d = v.shape
    val = np.full((d, k), np.nan, np.float32)
    ind = np.full((d, k), -1, np.int64)
    for j in range(d):
        act = np.nonzero(v[:, j] > 0)[0]
        prio = sample_priority(torch.as_tensor(idx[act]), torch.tensor(j)).numpy()
        o = act[np.argsort(-prio, kind="stable")[:k]]
        val[j, : len(o)], ind[j, : len(o)] = v[o, j], idx[o]
    return val, ind


def hist_ref(m):
    """Counts [d, 197] by searchsorted on HIST_EDGES (right-closed for m < 0, left-closed for m > 0)."""
    v = _np(m).astype(np.float32)
    e = HIST_EDGES.numpy()
    b = np.where(v > 0, np.searchsorted(e, v, side="right"), np.searchsorted(e, v, side="left")) - 1
    d = v.shape[1]
    out = np.zeros((d, len(e) - 1), np.int64)
    for j in range(d):
        out[j] = np.bincount(b[:, j], minlength=len(e) - 1)
    return out


def quadrants_ref(m, ti, gate, up):
    """counts [d, 4], and per quadrant the largest-|m| example (value, index) [d, 4], ties to lower index."""
    v, idx, gg, uu = _np(m), _np(ti), _np(gate), _np(up)
    n, d = v.shape
    q = (gg <= 0).astype(np.int64) * 2 + (uu <= 0).astype(np.int64)
    counts = np.zeros((d, 4), np.int64)
    val = np.full((d, 4), np.nan, np.float32)
    ind = np.full((d, 4), -1, np.int64)
    for j in range(d):
        counts[j] = np.bincount(q[:, j], minlength=4)
        for qq in range(4):
            rows = np.nonzero(q[:, j] == qq)[0]
            if len(rows):
                o = rows[np.lexsort((idx[rows], -np.abs(v[rows, j])))[0]]
                val[j, qq], ind[j, qq] = v[o, j], idx[o]
    return counts, val, ind
