"""LayerStats.update against brute force over the concatenated stream."""

import numpy as np
import pytest
import torch
from stats_reference import (
    docs_ref,
    hist_ref,
    make_stream,
    quadrants_ref,
    sample_ref,
    topk_ref,
)

from kvmem.errors import KvmemError
from kvmem.stats import LayerStats
from kvmem.stats import sample as sample_mod

K = 5


def assert_slots(got, ref_val, ref_ind):
    np.testing.assert_array_equal(got.index.numpy(), ref_ind)
    np.testing.assert_array_equal(got.value.numpy(), ref_val)  # NaN == NaN for empty slots


def check(s: LayerStats, st, k=K, sample=True):
    m = st.m.float()
    n, d = m.shape
    assert s.n == n
    assert_slots(s.top, *topk_ref(m, st.ti, k))
    assert_slots(s.bottom, *topk_ref(m, st.ti, k, largest=False))
    val, ind, docs = docs_ref(m, st.ti, st.doc, k)
    assert_slots(s.top_docs, val, ind)
    np.testing.assert_array_equal(s.top_docs.doc.numpy(), docs)
    if sample:
        assert_slots(s.sample, *sample_ref(m, st.ti, k))
    np.testing.assert_array_equal(s.count_pos.numpy(), (m > 0).sum(0).numpy())
    m64 = m.double()
    scale = m64.abs().sum(0) + 1e-30
    assert ((s.sum - m64.sum(0)).abs() / scale).max() < 1e-12  # float64 rounding only
    assert ((s.sumsq - (m64 * m64).sum(0)).abs() / (m64 * m64).sum(0).clamp(min=1e-300)).max() < 1e-12
    np.testing.assert_array_equal(s.max.numpy(), m.max(0).values.numpy())
    np.testing.assert_array_equal(s.min.numpy(), m.min(0).values.numpy())
    np.testing.assert_array_equal(s.hist.numpy(), hist_ref(m))
    l0 = (m > 0).sum(1)
    np.testing.assert_array_equal(s.l0_hist.numpy(), torch.bincount(l0, minlength=d + 1).numpy())
    ps = torch.zeros(s.max_pos, dtype=torch.int64).index_add_(0, st.pos, l0)
    np.testing.assert_array_equal(s.l0_pos_sum.numpy(), ps.numpy())
    np.testing.assert_array_equal(s.l0_pos_count.numpy(), torch.bincount(st.pos, minlength=s.max_pos).numpy())
    if s.gated:
        counts, qv, qi = quadrants_ref(m, st.ti, st.gate, st.up)
        q = s.quadrants
        np.testing.assert_array_equal(q.count.numpy(), counts)
        np.testing.assert_array_equal(q.index.numpy(), qi)
        np.testing.assert_array_equal(q.value.numpy(), qv)
    else:
        assert s.quadrants is None


@pytest.mark.parametrize("gated", [False, True])
def test_update_matches_brute_force(gated, stats_path):
    st = make_stream(seed=1, gated=gated)
    s = st.feed(LayerStats(st.m.shape[1], k=K, gated=gated, max_pos=64))
    check(s, st)
    if stats_path == "torch":  # the warm paths ran: sparse candidates, hash intervals for the sample
        for store in ("top", "bottom", "top_docs"):
            assert st.paths[0][store] == "dense" and st.paths[-2][store] == "sparse"
        assert st.paths[0]["sample"] == "dense" and st.paths[-2]["sample"] == "range"


def test_reference_is_sensitive():
    """The brute force sees what matters: the long repeated document fills the token top-k of the
    boosted neurons while the document store holds it once, and ties really occur."""
    st = make_stream(seed=1)
    m = st.m
    val, ind = topk_ref(m, st.ti, K)
    dval, dind, docs = docs_ref(m, st.ti, st.doc, K)
    long_doc = int(torch.mode(st.doc).values)
    tok_doc = dict(zip(st.ti.tolist(), st.doc.tolist()))
    assert all(tok_doc[int(i)] == long_doc for i in ind[6])  # neuron 6: every top token from one doc
    assert (docs[6] == long_doc).sum() == 1 and (dind[6] >= 0).all()
    assert len(set(val[2].tolist())) < K  # exact ties at the top of the quantized neuron
    s = st.feed(LayerStats(m.shape[1], k=K, max_pos=64))
    assert not np.array_equal(s.top.index.numpy(), s.top_docs.index.numpy())
    assert not np.array_equal(s.sample.index.numpy(), s.top.index.numpy())
    assert (s.sample.index[0] == -1).all() and (s.sample.index[3] == -1).all()  # never positive: empty


@pytest.mark.parametrize("limit,window", [(0.0, 4), (1.0, 4), (1.0, 1), (1.0, 10**6)])
def test_sample_paths(monkeypatch, limit, window, stats_path):
    """Every sample path is exact on its own: cyclic hash intervals (a narrow first window that often
    needs the redo, the default, one that never narrows) and the dense fallback."""
    monkeypatch.setattr(sample_mod, "SAMPLE_RANGE_LIMIT", limit)
    monkeypatch.setattr(sample_mod, "SAMPLE_WINDOW", window)
    redo = []
    real = sample_mod.Sample._hash_ranges
    monkeypatch.setattr(sample_mod.Sample, "_hash_ranges", lambda *a: redo.append(1) or real(*a))
    st = make_stream(seed=2, n=1500, d=10)
    s = LayerStats(10, k=K, max_pos=64)
    paths = set()
    for m, ti, doc, pos, _, _ in st.batches():
        s.update(m, ti, doc, pos)
        paths.add(s._paths.get("sample"))
    if stats_path == "torch":
        assert paths - {"none"} == {"dense" if limit == 0.0 else "range"}
    if window == 1 and stats_path == "torch":
        assert len(redo) > len(st.bounds)  # the second pass ran
    assert_slots(s.sample, *sample_ref(st.m, st.ti, K))


def test_out_of_order_batches():
    """Batches arriving out of token order (no strict-threshold shortcut) stay exact."""
    st = make_stream(seed=3, n=2000, d=10)
    nb = len(st.bounds) - 1
    s = st.feed(LayerStats(10, k=K, max_pos=64), order=list(reversed(range(nb))))
    check(s, st)


def test_k_larger_than_everything():
    st = make_stream(seed=4, n=60, d=7)
    s = st.feed(LayerStats(7, k=80, max_pos=64))
    check(s, st, k=80)
    assert (s.top.index[:, 60:] == -1).all() and torch.isnan(s.top.value[:, 60:]).all()


def test_bf16_input():
    st = make_stream(seed=5, n=1200, d=10, gated=True)
    st.m, st.gate, st.up = st.m.bfloat16(), st.gate.bfloat16(), st.up.bfloat16()
    s = st.feed(LayerStats(10, k=K, gated=True, max_pos=64))
    check(s, st)
    assert s.top.value.dtype == torch.float32


def test_deterministic():
    st = make_stream(seed=6, n=1500, d=9, gated=True)
    a = st.feed(LayerStats(9, k=K, gated=True, max_pos=64)).state_dict()
    b = st.feed(LayerStats(9, k=K, gated=True, max_pos=64)).state_dict()
    for name in a:
        assert torch.equal(a[name].nan_to_num(), b[name].nan_to_num()), name


def test_bad_input():
    s = LayerStats(4, k=2, max_pos=8)
    m = torch.randn(3, 4)
    ti, doc, pos = torch.tensor([0, 1, 2]), torch.tensor([0, 0, 1]), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError):
        s.update(m, torch.tensor([0, 2, 1]), doc, pos)
    with pytest.raises(ValueError):
        s.update(m, ti, torch.tensor([1, 0, 0]), pos)
    with pytest.raises(ValueError):
        s.update(m, ti, doc, torch.tensor([0, 1, 8]))
    with pytest.raises(ValueError):
        s.update(m, ti, doc, pos, gate=m, up=m)
    with pytest.raises(ValueError):
        s.update(torch.randn(3, 5), ti, doc, pos)
    with pytest.raises(ValueError):
        LayerStats(4, gated=True).update(m, ti, doc, pos)
    with pytest.raises(KvmemError):
        LayerStats(0)
    s.update(m[:0], ti[:0], doc[:0], pos[:0])  # empty batch: no-op
    assert s.n == 0 and torch.isnan(s.max).all()


def test_noncontiguous_inputs_and_large_token_indices():
    """Views straight from a capture ([N, d] slices of wider tensors, transposed storage) and token
    indices near the 2**32 - 2 limit."""
    st = make_stream(seed=7, n=1500, d=8, gated=True, offset=2**32 - 6000)
    assert st.ti.max() <= 2**32 - 2
    wide = lambda x: torch.cat([x, x], 1).T.contiguous().T[:, :8]  # noqa: E731
    st.m, st.gate, st.up = wide(st.m), wide(st.gate), wide(st.up)
    assert not st.m.is_contiguous() and not st.gate.is_contiguous()
    s = st.feed(LayerStats(8, k=K, gated=True, max_pos=64))
    check(s, st)
    with pytest.raises(ValueError):
        s.update(st.m[:2], torch.tensor([2**32 - 1, 2**32]), st.doc[:2], st.pos[:2], gate=st.gate[:2], up=st.up[:2])


def test_dense_path_is_the_one_under_test(stats_path):
    """numba is a dependency: on CPU the fused pass runs (and the torch path when it is switched off)."""
    st = make_stream(seed=8, n=300, d=6)
    s = LayerStats(6, k=K, max_pos=64)
    m, ti, doc, pos, _, _ = next(iter(st.batches()))
    s.update(m, ti, doc, pos)
    assert s._paths["dense"] == ("fused" if stats_path == "fused" else "torch")
    assert LayerStats(6, backend="torch")._fused(m) is False


@pytest.mark.parametrize("gated", [False, True])
def test_many_neuron_blocks(gated):
    """Wider than one block of the fused pass (kvmem.stats.fused.BLOCK = 64), the last block partial."""
    st = make_stream(seed=9, n=1200, d=150, gated=gated)
    check(st.feed(LayerStats(150, k=K, gated=gated, max_pos=64)), st)
