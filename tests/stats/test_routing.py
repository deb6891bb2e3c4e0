"""kvmem.stats.routing against plain loops over a synthetic MoE stream (tests/stats/moe_reference.py):
load, weights, entropies, co-selection; merge of halves; state round trip; the sync-free path under the
host-sync guard; bad input."""

import math

import numpy as np
import pytest
import torch

from kvmem.analysis.ci import wilson
from kvmem.errors import KvmemError
from kvmem.stats import LayerStats
from kvmem.stats.routing import Router, Routing
from kvmem.stats.syncguard import no_host_sync
from tests.stats.moe_reference import D, E, EXPERT_OF, FEW, K, NEVER, make_moe_stream, routing_ref


def moe_stats(**kw):
    return LayerStats(D, k=4, max_pos=32, n_experts=E, expert_of=EXPERT_OF, **kw)


def check_routing(r: Routing, ref: dict):
    assert int(r.n) == ref["n"]
    assert r.load.tolist() == ref["load"].tolist()
    assert r.cosel.tolist() == ref["cosel"].tolist()
    np.testing.assert_allclose(r.weight_sum.numpy(), ref["wsum"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(r.weight_sumsq.numpy(), ref["wsq"], rtol=1e-12, atol=1e-12)
    assert float(r.entropy_sum) == pytest.approx(ref["h"].sum(), rel=1e-6)  # float32 logits -> float64
    assert float(r.sel_entropy_sum) == pytest.approx(ref["hs"].sum(), rel=1e-6)
    assert float(r.entropy_sumsq) == pytest.approx((ref["h"] ** 2).sum(), rel=1e-6)


@pytest.mark.parametrize("sync_free", [False, True])
def test_routing_matches_loops(sync_free):
    st = make_moe_stream()
    s = st.feed(moe_stats(sync_free=sync_free))
    ref = routing_ref(st)
    check_routing(s.routing, ref)
    assert ref["load"][NEVER] == 0 and 0 < ref["load"][FEW] < ref["load"].max() / 3  # the stream's design
    t = s.routing.table()
    n = ref["n"]
    assert t["load"].tolist() == ref["load"].tolist() and (t["n"] == n).all()
    for e in range(E):
        lo, hi = wilson(int(ref["load"][e]), n)
        assert t.loc[e, "share"] == ref["load"][e] / n
        assert (t.loc[e, "share_lo"], t.loc[e, "share_hi"]) == (lo, hi)
        assert t.loc[e, "slot_share"] == pytest.approx(ref["load"][e] / (n * K))
        if ref["load"][e]:
            assert t.loc[e, "mean_weight"] == pytest.approx(ref["wsum"][e] / ref["load"][e])
        else:
            assert math.isnan(t.loc[e, "mean_weight"])
    assert t["uniform"].iloc[0] == pytest.approx(K / E)
    sm = s.routing.summary()
    assert sm["top_k"] == K and sm["n"] == n
    assert sm["entropy_mean"] == pytest.approx(ref["h"].mean(), rel=1e-6)
    assert sm["entropy_std"] == pytest.approx(ref["h"].std(), rel=1e-4)
    assert sm["sel_entropy_mean"] == pytest.approx(ref["hs"].mean(), rel=1e-6)
    assert sm["entropy_max"] == pytest.approx(math.log(E)) and sm["sel_entropy_max"] == pytest.approx(math.log(K))
    # neuron denominators: the tokens routed to the neuron's expert; shared experts: every token
    nn = s.neuron_n()
    assert nn.tolist() == [int(ref["load"][e]) if e >= 0 else n for e in EXPERT_OF.tolist()]


def test_merge_of_halves_equals_whole():
    st = make_moe_stream(seed=1)
    whole = st.feed(moe_stats())
    a = st.feed(moe_stats(), 0, 150)
    b = st.feed(moe_stats(), 150)
    a.merge(b)
    for key in ("n", "load", "cosel"):
        assert torch.equal(getattr(a.routing, key), getattr(whole.routing, key))
    for key in ("weight_sum", "weight_sumsq", "entropy_sum", "sel_entropy_sum"):
        assert torch.allclose(getattr(a.routing, key), getattr(whole.routing, key), rtol=1e-12)


def test_state_round_trip_continues_bit_identically():
    st = make_moe_stream(seed=2)
    s = st.feed(moe_stats(), 0, 200)
    sd = s.state_dict()
    assert int(sd["meta.n_experts"]) == E and torch.equal(sd["routing.expert"], EXPERT_OF)
    r = LayerStats.from_state_dict(sd)
    assert r.moe and r.routing is not None and r.missing() == []
    st.feed(s, 200)
    st.feed(r, 200)
    a, b = s.state_dict(), r.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key].nan_to_num(), b[key].nan_to_num()), key


def test_sync_free_update_makes_no_host_sync():
    st = make_moe_stream(seed=3)
    s = moe_stats(sync_free=True)
    with no_host_sync():
        st.feed(s)
    check_routing(s.routing, routing_ref(st))


def test_dense_layers_keep_no_routing():
    s = LayerStats(D, k=4, max_pos=32)
    assert s.routing is None and "routing" not in s.parts and not s.moe
    with pytest.raises(ValueError, match="router"):
        s.update(torch.zeros(2, D), torch.arange(2), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long),
                 router=Router(torch.zeros(2, E), torch.zeros(2, K, dtype=torch.long), torch.zeros(2, K)))


def test_bad_router_input_is_refused():
    st = make_moe_stream()
    s = moe_stats()
    args = (st.m[:4], st.ti[:4], st.doc[:4], st.pos[:4])
    with pytest.raises(ValueError, match="router"):
        s.update(*args)
    with pytest.raises(KvmemError, match="lie in"):
        s.update(*args, router=Router(st.logits[:4], st.idx[:4] + E, st.weight[:4]))
    with pytest.raises(KvmemError, match="once per token"):
        s.update(*args, router=Router(st.logits[:4], st.idx[:4, :1].expand(4, K), st.weight[:4]))
    with pytest.raises(KvmemError, match="logits"):
        s.update(*args, router=Router(st.logits[:4, :3], st.idx[:4], st.weight[:4]))
    with pytest.raises(KvmemError, match="expert_of"):
        LayerStats(D, n_experts=E)
    with pytest.raises(KvmemError, match="gated"):
        LayerStats(D, gated=True, n_experts=E, expert_of=EXPERT_OF)
    assert s.n == 0


def test_moe_and_dense_statistics_do_not_merge():
    st = make_moe_stream()
    moe = st.feed(moe_stats())
    dense = LayerStats(D, k=4, max_pos=32)
    with pytest.raises(KvmemError, match="dense"):
        moe.merge(dense)
    with pytest.raises(KvmemError, match="dense"):
        dense.merge(moe)
    other = LayerStats(D, k=4, max_pos=32, n_experts=E, expert_of=EXPERT_OF.flip(0).clamp(max=E - 1))
    with pytest.raises(KvmemError, match="different experts"):
        moe.merge(other)


def test_sync_free_path_flags_bad_router_input_at_the_next_check():
    st = make_moe_stream()
    s = moe_stats(sync_free=True)
    args = (st.m[:4], st.ti[:4], st.doc[:4], st.pos[:4])
    with no_host_sync():
        s.update(*args, router=Router(st.logits[:4], st.idx[:4] + E, st.weight[:4]))
    with pytest.raises(KvmemError, match="router idx"):
        s.check()
    with no_host_sync():
        s.update(*args, router=Router(st.logits[:4], st.idx[:4, :1].expand(4, K), st.weight[:4]))
    with pytest.raises(KvmemError, match="once"):
        s.check()
    s.check()  # cleared
