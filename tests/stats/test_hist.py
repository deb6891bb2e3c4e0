"""Histogram bins against torch.bucketize on HIST_EDGES; count_above within its bound."""

import numpy as np
import torch
from stats_reference import hist_ref, make_stream

from kvmem.stats import HIST_EDGES, N_BINS, ZERO_BIN, LayerStats, bins_of
from kvmem.stats.hist import batch_hist


def test_edges():
    e = HIST_EDGES
    assert e.numel() == N_BINS + 1 and torch.all(e[1:] >= e[:-1])
    assert torch.equal(e, -e.flip(0))  # symmetric
    assert e[ZERO_BIN].item() == -(2.0**-126) and e[ZERO_BIN + 1].item() == 2.0**-126
    assert 9e-4 < e[ZERO_BIN + 2].item() < 1e-3 and 1e4 < e[-2].item() < 2e4
    ratios = e[ZERO_BIN + 3 : -1] / e[ZERO_BIN + 2 : -2]
    assert ratios.min() > 1.1 and ratios.max() < 1.3  # log-spaced: 4 bins per octave


def test_bins_match_bucketize():
    v = torch.cat([HIST_EDGES[1:-1], torch.nextafter(HIST_EDGES[1:-1], torch.tensor(0.0)),
                   torch.nextafter(HIST_EDGES[1:-1], HIST_EDGES[1:-1] * 2),
                   torch.tensor([0.0, -0.0, 1e-45, -1e-45, 3e38, -3e38]),
                   torch.randn(3000) * 10 ** torch.randint(-6, 6, (3000,)).float()])
    right = torch.bucketize(v, HIST_EDGES, right=True) - 1  # edges[b] <= v < edges[b+1]
    left = torch.bucketize(v, HIST_EDGES, right=False) - 1  # edges[b] < v <= edges[b+1]
    expect = torch.where(v > 0, right, left)
    assert torch.equal(bins_of(v), expect)
    assert torch.equal(bins_of(v.bfloat16()), torch.where(v.bfloat16().float() > 0,
                       torch.bucketize(v.bfloat16().float(), HIST_EDGES, right=True) - 1,
                       torch.bucketize(v.bfloat16().float(), HIST_EDGES) - 1))
    assert bins_of(torch.tensor([0.0])).item() == ZERO_BIN


def test_batch_hist_counts():
    m = torch.randn(300, 7) * 10 ** torch.randint(-5, 5, (300, 7)).float()
    m[::5] = 0.0
    code = torch.empty(300, 7, dtype=torch.int32)
    flat = torch.empty(300, 7, dtype=torch.int32)
    np.testing.assert_array_equal(batch_hist(m, code, flat).T.numpy(), hist_ref(m))


def test_count_above_within_bound():
    st = make_stream(seed=21, n=2500, d=10)
    s = st.feed(LayerStats(10, k=5, max_pos=64))
    m = st.m.float()
    mx = s.max.clone()
    mx[~torch.isfinite(mx) | (mx <= 0)] = 1.0
    for frac in (0.01, 0.1, 0.5, 0.9):
        thr = frac * mx
        est, bound = s.count_above(thr, return_bound=True)
        true = (m > thr).sum(0).double()
        assert ((est - true).abs() <= bound + 1e-9).all()
        assert torch.equal(est, s.count_above(thr))
    # a threshold on a bin edge is exact (no straddling mass above it) ... up to the bin's own count
    est, bound = s.count_above(torch.full((10,), 1.0), return_bound=True)
    true = (m > 1.0).sum(0).double()
    assert ((est - true).abs() <= bound).all()
    # and the bound is tight in a constructed case: 100 values uniform in one bin [1, 1.25)
    h = LayerStats(1, k=2, max_pos=4)
    vals = torch.linspace(1.0, 1.24, 100)[:, None]
    h.update(vals, torch.arange(100), torch.zeros(100, dtype=torch.int64), torch.arange(100) % 4)
    est, bound = h.count_above(torch.tensor([1.12]), return_bound=True)
    assert bound.item() == 100 and abs(est.item() - (vals > 1.12).sum().item()) <= 2
