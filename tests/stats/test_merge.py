"""merge of shards == one pass over all tokens; state_dict round trip continues bit-identically."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from stats_reference import Stream, make_stream
from test_layer import K, check

from kvmem.errors import KvmemError
from kvmem.stats import LayerStats, sample_priority

EXACT = ("top.", "bottom.", "top_docs.", "sample.", "quadrants.", "count_pos", "hist", "l0_", "n", "meta.")


def shard(st: Stream, a: int, b: int) -> Stream:
    """Tokens [a, b) of the stream, batch boundaries clipped to it."""
    bounds = sorted({a, b} | {x for x in st.bounds if a < x < b})
    sl = slice(a, b)
    gate = None if st.gate is None else st.gate[sl]
    up = None if st.up is None else st.up[sl]
    return Stream(st.m[sl], st.ti[sl], st.doc[sl], st.pos[sl], gate, up, [x - a for x in bounds])


def assert_same(a: LayerStats, b: LayerStats, sums_exact: bool):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        x, y = sa[name], sb[name]
        if name in ("moments.sum", "moments.sumsq") and not sums_exact:
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-9, msg=name)
        else:
            assert x.dtype == y.dtype and torch.equal(x.nan_to_num(), y.nan_to_num()), name


@pytest.mark.parametrize("gated", [False, True])
def test_merge_two_shards_equals_one_pass(gated):
    st = make_stream(seed=11, n=2400, d=10, gated=gated)
    d = st.m.shape[1]
    long_doc = int(torch.mode(st.doc).values)
    inside = (st.doc == long_doc).nonzero().squeeze(1)
    cut = int(inside[inside.numel() // 2])  # split in the middle of the long document
    make = lambda: LayerStats(d, k=K, gated=gated, max_pos=64)  # noqa: E731
    whole = st.feed(make())
    a, b = shard(st, 0, cut).feed(make()), shard(st, cut, st.m.shape[0]).feed(make())
    b2 = shard(st, cut, st.m.shape[0]).feed(make())
    merged = a.merge(b)
    assert_same(merged, whole, sums_exact=False)
    check(merged, st)
    # the other order gives the same stores
    other = b2.merge(shard(st, 0, cut).feed(make()))
    assert_same(other, whole, sums_exact=False)


def test_merge_is_associative_and_handles_interleaved_shards():
    st = make_stream(seed=12, n=2400, d=9)
    nb = len(st.bounds) - 1
    make = lambda: LayerStats(9, k=K, max_pos=64)  # noqa: E731
    parts = [st.feed(make(), order=[i for i in range(nb) if i % 3 == r]) for r in range(3)]
    left = parts[0].merge(parts[1]).merge(parts[2])
    parts = [st.feed(make(), order=[i for i in range(nb) if i % 3 == r]) for r in range(3)]
    right = parts[0].merge(parts[1].merge(parts[2]))
    assert_same(left, right, sums_exact=False)
    check(left, st)


def test_merge_into_empty_and_mismatch():
    st = make_stream(seed=13, n=800, d=8)
    s = st.feed(LayerStats(8, k=K, max_pos=64))
    e = LayerStats(8, k=K, max_pos=64).merge(s)
    assert_same(e, s, sums_exact=True)
    with pytest.raises(KvmemError):
        s.merge(LayerStats(8, k=K + 1, max_pos=64))
    with pytest.raises(KvmemError):
        s.merge(LayerStats(8, k=K, max_pos=64, gated=True))


@pytest.mark.parametrize("gated", [False, True])
def test_state_dict_round_trip_continues_bit_identically(tmp_path, gated):
    st = make_stream(seed=14, n=2000, d=10, gated=gated)
    nb = len(st.bounds) - 1
    first, rest = list(range(nb // 2)), list(range(nb // 2, nb))
    make = lambda: LayerStats(10, k=K, gated=gated, max_pos=64)  # noqa: E731
    s = st.feed(make(), order=first)
    sd = s.state_dict()
    assert all(isinstance(t, torch.Tensor) and t.is_contiguous() for t in sd.values())
    save_file(sd, str(tmp_path / "layer.safetensors"))
    restored = LayerStats.from_state_dict(load_file(str(tmp_path / "layer.safetensors")))
    st.feed(s, order=rest)
    st.feed(restored, order=rest)
    assert_same(restored, s, sums_exact=True)
    whole = st.feed(make())
    assert_same(restored, whole, sums_exact=True)  # same batches: bit-identical to one pass
    # load_state_dict into an existing object, and a mismatching one refuses
    other = make()
    other.load_state_dict(sd)
    assert_same(other, LayerStats.from_state_dict(sd), sums_exact=True)
    with pytest.raises(KvmemError):
        LayerStats(11, k=K, gated=gated, max_pos=64).load_state_dict(sd)


def test_state_differs_when_it_should():
    st = make_stream(seed=15, n=1200, d=8)
    nb = len(st.bounds) - 1
    a = st.feed(LayerStats(8, k=K, max_pos=64)).state_dict()
    b = st.feed(LayerStats(8, k=K, max_pos=64), order=list(range(nb - 3))).state_dict()
    differ = [n for n in a if not torch.equal(a[n].nan_to_num(), b[n].nan_to_num())]
    assert {"meta.n", "hist.count", "counts.pos", "moments.sum", "top_docs.index"} <= set(differ) or len(differ) > 5
    assert np.any(a["hist.count"].numpy() != b["hist.count"].numpy())


def test_shifted_independent_run_keeps_its_sample():
    """Merging an independent run after shifting its token indices and doc ids in the state dict (as
    `kvmem profile merge` does): the shifted run keeps the sample it drew (priorities are stored, not
    recomputed from the new indices), so the merged sample is the top-k over both runs' own priorities."""
    a_st, b_st = make_stream(seed=16, n=1200, d=8), make_stream(seed=17, n=1300, d=8)
    sa = a_st.feed(LayerStats(8, k=K, max_pos=64))
    sb = b_st.feed(LayerStats(8, k=K, max_pos=64))
    dt, dd = int(a_st.ti.max()) + 1, int(a_st.doc.max()) + 1
    moved = sb.shifted(dt, dd)
    assert torch.equal(moved.sample.index, torch.where(sb.sample.index >= 0, sb.sample.index + dt, -1))
    merged = sa.merge(moved)
    union = Stream(torch.cat([a_st.m, b_st.m]), torch.cat([a_st.ti, b_st.ti + dt]),
                   torch.cat([a_st.doc, b_st.doc + dd]), torch.cat([a_st.pos, b_st.pos]), None, None, [0])
    check(merged, union, sample=False)
    # sample reference: each token ranked by the priority of the index it had in its own run
    m = union.m.numpy()
    prio_idx = torch.cat([a_st.ti, b_st.ti])
    for j in range(8):
        act = np.nonzero(m[:, j] > 0)[0]
        prio = sample_priority(prio_idx[act], torch.tensor(j)).numpy()
        o = act[np.lexsort((union.ti.numpy()[act], -prio))[:K]]
        got = merged.sample.index[j]
        assert got[: len(o)].tolist() == union.ti[o].tolist(), j
        assert (got[len(o):] == -1).all()
