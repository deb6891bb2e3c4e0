"""kvmem.stats.mass: k_f (neurons carrying a share f of Σ|m|·‖v‖ per token) on both paths against a numpy
brute force (float64 sort descending, cumsum, first prefix reaching f·S); merge, state round trip, read-outs."""

import numpy as np
import pytest
import torch

from kvmem.errors import KvmemError
from kvmem.stats import fused, mass
from kvmem.stats.base import Batch, LayerSpec
from kvmem.stats.mass import FRACTIONS, MassCounts

PATHS = ["numba", "torch"]


@pytest.fixture(autouse=True)
def stats_path():
    """This module runs each path explicitly (replaces conftest's run-everything-twice fixture)."""
    return None


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setattr(mass, "FORCE_TORCH", True)
    else:
        monkeypatch.setattr(mass, "FORCE_TORCH", False)
        monkeypatch.setattr(fused, "available", True)
    return request.param


# ---------------------------------------------------------------- brute force
def k_ref(m, w, strict=False):
    """k_f [N, F] by definition (numpy float64); strict=True: the off-by-one variant (prefix > f·S)."""
    c = np.abs(np.asarray(m, dtype=np.float64)) * np.asarray(w, dtype=np.float64)
    out = np.zeros((c.shape[0], len(FRACTIONS)), dtype=np.int64)
    for i, row in enumerate(c):
        p = np.cumsum(np.sort(row)[::-1])
        s = p[-1]
        if s == 0:
            continue
        for fi, f in enumerate(FRACTIONS):
            t = f * s
            out[i, fi] = int(np.argmax(p > t if strict else p >= t)) + 1
    return out


def state_ref(k, pos, d, max_pos):
    hist = np.zeros((len(FRACTIONS), d + 1), np.int64)
    pos_sum = np.zeros((len(FRACTIONS), max_pos), np.int64)
    for fi in range(len(FRACTIONS)):
        np.add.at(hist[fi], k[:, fi], 1)
        np.add.at(pos_sum[fi], pos, k[:, fi])
    return hist, pos_sum, np.bincount(pos, minlength=max_pos)


# ---------------------------------------------------------------- data
def hard_data(seed, n, d):
    """Random m with zeros, all-zero rows, negatives, exact ties, a few huge outliers and tiny values."""
    g = np.random.default_rng(seed)
    m = g.standard_normal((n, d)) * g.random((n, d)) ** 2
    m[g.random((n, d)) < 0.2] = 0.0  # zeros
    m[3::11] = np.round(m[3::11] * 4) / 4  # few levels: exact ties (and zeros)
    m[5::13, : d // 2] = 0.75  # a block of exact ties
    out = g.random((n, d)) < 0.002
    m[out] = g.choice([-1, 1], out.sum()) * 10.0 ** g.uniform(3, 30, out.sum())  # huge outliers
    m[9::17] *= 10.0 ** g.uniform(-30, -5, (len(m[9::17]), d))  # a tiny scale, wide spread
    m[::7] = 0.0  # all-zero rows
    w = g.uniform(0.25, 3.0, d)
    dead = g.random(d) < 0.05
    dead[0] = False
    w[dead] = 0.0  # dead value vectors
    return torch.from_numpy(m.astype(np.float32)), torch.from_numpy(w.astype(np.float32))


def exact_data(seed, n, d):
    """Small integers (all sums exact in float64) with many rows where a prefix sum equals f·S exactly:
    reaching (>=) and exceeding (>) f·S then differ."""
    g = np.random.default_rng(seed)
    m = g.integers(-3, 4, (n, d)).astype(np.float32)
    w = g.integers(0, 3, d).astype(np.float32)
    w[:4] = 1.0
    # rows c = (5, 4, 1, 0...): 0.5·10 = 5, 0.9·10 = 9 = 5 + 4; (2, 1, 1, 0...): 0.5·4 = 2
    m[0::5] = 0.0
    m[0::5, :3] = [5, 4, 1]
    m[1::5] = 0.0
    m[1::5, :3] = [-1, 2, -1]
    return torch.from_numpy(m), torch.from_numpy(w)


def batches(m, bounds, max_pos, seed=0):
    g = np.random.default_rng(seed)
    pos = torch.from_numpy(g.integers(0, max_pos, m.shape[0]))
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        n = b - a
        out.append(Batch(m[a:b].contiguous(), torch.arange(a, b), torch.zeros(n, dtype=torch.int64), pos[a:b],
                         None, None, a, b - 1, True))
    return out, pos


def feed(stat, bs):
    for b in bs:
        stat.update(b)
    return stat


def spec(w, max_pos=16):
    return LayerSpec(w.numel(), max_pos=max_pos, value_norm=w)


def check_state(stat, k, pos):
    hist, pos_sum, pos_count = state_ref(k, pos.numpy(), stat.spec.d_mlp, stat.spec.max_pos)
    np.testing.assert_array_equal(stat.hist.numpy(), hist)
    np.testing.assert_array_equal(stat.pos_sum.numpy(), pos_sum)
    np.testing.assert_array_equal(stat.pos_count.numpy(), pos_count)


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("d", [1, 2, 7, 64, 333])
def test_matches_brute_force(path, d):
    m, w = hard_data(d, 700, d)
    bs, pos = batches(m, [0, 1, 250, 251, 600, 700], max_pos=16)
    s = feed(MassCounts(spec(w)), bs)
    assert s.last_path == path
    k = k_ref(m, w)
    np.testing.assert_array_equal(s.token_k(m).numpy(), k)
    check_state(s, k, pos)
    assert s.n == 700 and k[::7].sum() == 0 and (k > 0).mean() > 0.5


def test_reach_not_exceed(path):
    """Exact data where '>= f·S' and '> f·S' give different k: the off-by-one would be caught."""
    m, w = exact_data(1, 400, 50)
    k, strict = k_ref(m, w), k_ref(m, w, strict=True)
    for fi in range(len(FRACTIONS)):
        assert (k[:, fi] != strict[:, fi]).sum() >= 20  # both fractions hit the knife edge exactly
    assert (k[0::5] == [1, 2]).all() and (k[1::5] == [1, 3]).all()
    assert (strict[0::5] == [2, 3]).all() and (strict[1::5] == [2, 3]).all()
    bs, pos = batches(m, [0, 150, 400], max_pos=8)
    s = feed(MassCounts(spec(w, 8)), bs)
    np.testing.assert_array_equal(s.token_k(m).numpy(), k)
    check_state(s, k, pos)


def test_crowded_crossing_buckets(path):
    """Crossing buckets with many members: exact ties (> 32 equal values), values within one bucket's width
    (the second split), and within one sub-bucket's width (the sort behind it); d of a larger layer."""
    g = np.random.default_rng(5)
    d = 3000
    m = np.empty((6, d), np.float32)
    m[0] = 1.0  # all tied: k = ceil(f·d)
    m[1] = 1.0 + g.random(d) * 0.02  # one octave's 1/32: one bucket
    m[2] = 1.0 + g.random(d) * 1e-4  # within a sub-bucket
    m[3] = np.where(g.random(d) < 0.5, 2.0, 1.0)  # two tied levels
    m[4] = g.standard_normal(d)
    m[4, 0] = 1e6  # one outlier carrying everything
    m[5] = g.standard_normal(d) ** 2
    w = np.ones(d, np.float32)
    m, w = torch.from_numpy(m), torch.from_numpy(w)
    k = k_ref(m, w)
    assert tuple(k[0]) == (1500, 2700) and tuple(k[4]) == (1, 1)
    s = MassCounts(spec(w))
    np.testing.assert_array_equal(s.token_k(m).numpy(), k)
    w2 = torch.from_numpy(g.uniform(0.5, 2, d).astype(np.float32))
    np.testing.assert_array_equal(MassCounts(spec(w2)).token_k(m).numpy(), k_ref(m, w2))


def test_bucket_edges_and_second_split(path):
    """Values exactly on the numba kernel's bucket edges 2**e·(1 + j/32) (dyadic: exact sums), and rows of
    4000 values in one octave (about 125 per bucket: the crossing bucket is split a second time)."""
    g = np.random.default_rng(11)
    edges = (2.0 ** g.integers(-3, 4, (150, 200)) * (1 + g.integers(0, 32, (150, 200)) / 32)).astype(np.float32)
    edges[::3, 1:] = edges[::3, :1] * np.float32(1 + 1 / 32)  # one value, then all on the next edge up
    edges[::3, 2:] = edges[::3, :1]
    octave = (1 + g.random((150, 4000))).astype(np.float32)
    for m in (edges, octave):
        m = torch.from_numpy(m)
        w = torch.ones(m.shape[1])
        np.testing.assert_array_equal(MassCounts(spec(w)).token_k(m).numpy(), k_ref(m, w))


@pytest.mark.parametrize("nb", [1, 2, 40])
def test_few_buckets_still_exact(monkeypatch, nb):
    """The kernel stays exact when the crossing falls in the bottom bucket (all sizes below the range):
    impossible with n_buckets(d), forced here."""
    monkeypatch.setattr(mass, "n_buckets", lambda d: nb)
    m, w = hard_data(12, 300, 90)
    np.testing.assert_array_equal(MassCounts(spec(w)).token_k(m, use_numba=True).numpy(), k_ref(m, w))


def test_paths_agree_on_larger_random_data():
    g = torch.Generator().manual_seed(3)
    m = torch.randn(512, 1536, generator=g) * torch.rand(512, 1536, generator=g)
    w = torch.rand(1536, generator=g) + 0.5
    s = MassCounts(spec(w))
    a, b = s.token_k(m, use_numba=True), s.token_k(m, use_numba=False)
    assert torch.equal(a, b)
    np.testing.assert_array_equal(a[:64].numpy(), k_ref(m[:64], w))


def test_threads_and_chunks_do_not_change_results(monkeypatch):
    m, w = hard_data(8, 300, 40)
    s = MassCounts(spec(w))
    k = k_ref(m, w)
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            np.testing.assert_array_equal(s.token_k(m, use_numba=True).numpy(), k)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(mass, "ROWS_PER_TASK", 1)
    np.testing.assert_array_equal(s.token_k(m, use_numba=True).numpy(), k)
    monkeypatch.setattr(mass, "CHUNK_BYTES", 32 * 40 * 7)  # 7 rows per chunk
    np.testing.assert_array_equal(s.token_k(m, use_numba=False).numpy(), k)


def test_dispatch(monkeypatch):
    m, w = hard_data(2, 40, 9)
    bs, _ = batches(m, [0, 40], 16)
    monkeypatch.setattr(mass, "FORCE_TORCH", False)
    monkeypatch.setattr(fused, "available", True)
    s = MassCounts(spec(w))
    s.update(bs[0])
    assert s.last_path == "numba" and bs[0].paths["mass"] == "numba"
    bs[0].stats = type("Stats", (), {"backend": "torch"})()  # LayerStats(backend="torch")
    s.update(bs[0])
    assert s.last_path == "torch"
    bs[0].stats = None
    monkeypatch.setattr(fused, "available", False)  # the stats' numba switch (conftest's torch run)
    s.update(bs[0])
    assert s.last_path == "torch"
    monkeypatch.setattr(fused, "available", True)
    monkeypatch.setattr(mass, "FORCE_TORCH", True)
    s.update(bs[0])
    assert s.last_path == "torch"
    k = k_ref(m, w)
    np.testing.assert_array_equal(s.hist.numpy(), 4 * state_ref(k, bs[0].pos.numpy(), 9, 16)[0])


def test_merge_of_halves_equals_one_pass(path):
    m, w = hard_data(4, 500, 30)
    bs, _ = batches(m, [0, 100, 230, 400, 500], 16)
    whole = feed(MassCounts(spec(w)), bs)
    a = feed(MassCounts(spec(w)), bs[:2])
    b = feed(MassCounts(spec(w)), bs[2:])
    a.merge(b)
    for key, t in whole.state_dict().items():
        assert torch.equal(a.state_dict()[key], t), key


def test_state_roundtrip_continues_bit_identically(path):
    m, w = hard_data(6, 400, 25)
    bs, _ = batches(m, [0, 120, 300, 400], 16)
    whole = feed(MassCounts(spec(w)), bs)
    first = feed(MassCounts(spec(w)), bs[:1])
    sd = first.state_dict()
    assert set(sd) == {"hist", "pos_sum", "pos_count", "value_norm"}
    assert sd["value_norm"].dtype == torch.float32 and torch.equal(sd["value_norm"], w)
    # a fresh statistic built with other norms takes the state's (a run file describes itself)
    resumed = MassCounts(spec(torch.ones(25)))
    resumed.load_state_dict({key: t.clone() for key, t in sd.items()})
    assert torch.equal(resumed.value_norm, w)
    feed(resumed, bs[1:])
    for key, t in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], t), key


def test_mismatched_value_norm_or_shapes_refused():
    m, w = hard_data(7, 50, 10)
    a, b = MassCounts(spec(w)), MassCounts(spec(w * 2))
    with pytest.raises(KvmemError, match="value norms"):
        a.merge(b)
    sd = a.state_dict()
    with pytest.raises(KvmemError, match="hist"):
        MassCounts(spec(w)).load_state_dict(sd | {"hist": torch.zeros(2, 5, dtype=torch.int64)})
    with pytest.raises(KvmemError, match="value_norm"):
        MassCounts(spec(w)).load_state_dict(sd | {"value_norm": torch.ones(11)})
    with pytest.raises(KvmemError, match="value_norm"):
        MassCounts(spec(w)).load_state_dict({k: v for k, v in sd.items() if k != "value_norm"})
    with pytest.raises(KvmemError, match="value_norm"):
        MassCounts(spec(torch.full((10,), -1.0)))


def test_applies_only_with_value_norms():
    assert MassCounts.applies(LayerSpec(4, value_norm=torch.ones(4)))
    assert not MassCounts.applies(LayerSpec(4))
    with pytest.raises(KvmemError, match="value norms"):
        MassCounts(LayerSpec(4))


def test_readouts():
    m, w = exact_data(9, 300, 20)
    bs, pos = batches(m, [0, 300], max_pos=10)
    s = MassCounts(spec(w, 10))
    assert s.n == 0 and np.isnan(s.mean(0.5)) and torch.isnan(s.by_position(0.9)).all()
    feed(s, bs)
    k = k_ref(m, w)
    assert s.n == 300
    for fi, f in enumerate(FRACTIONS):
        kf = k[:, fi]
        np.testing.assert_array_equal(s.distribution(f).numpy(), np.bincount(kf, minlength=21))
        assert s.mean(f) == pytest.approx(kf.mean(), rel=1e-12)
        srt = np.sort(kf)
        for q in (0.0, 0.1, 0.5, 0.9, 1.0):
            expect = srt[max(int(np.ceil(q * 300)) - 1, 0)]  # smallest j with cdf >= q
            assert s.quantile(f, q) == expect
        by = s.by_position(f).numpy()
        for p in range(10):
            sel = pos.numpy() == p
            assert (np.isnan(by[p]) and not sel.any()) or by[p] == pytest.approx(kf[sel].mean(), rel=1e-12)
    with pytest.raises(KvmemError, match="fraction"):
        s.mean(0.75)
    with pytest.raises(KvmemError, match="fraction"):
        s.distribution(1.0)
    with pytest.raises(KvmemError):
        s.quantile(0.5, 1.5)
