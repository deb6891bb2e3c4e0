"""Neuron statistics of MoE layers relative to each expert's own tokens (kvmem.stats.layer with n_experts):
against brute force over only the tokens routed to each neuron's expert (tests/stats/moe_reference.py).
A non-routed token is never an example and never counts in a rate, histogram or moment: the stream has an
expert never chosen, one chosen on few tokens (fewer than the stores' k) and one whose m is negative on
every token it gets (so a non-routed zero would enter its top store if it could)."""

import numpy as np
import pytest
import torch

from kvmem.stats import LayerStats
from kvmem.stats.syncguard import no_host_sync
from tests.stats.moe_reference import D, D_EXPERT, E, EXPERT_OF, FEW, NEGATIVE, NEVER, make_moe_stream, neuron_ref

KS = 20  # store slots: more than the tokens of expert FEW


def eq(a, b):
    np.testing.assert_array_equal(np.nan_to_num(np.asarray(a), nan=-12345.0), np.nan_to_num(np.asarray(b), nan=-12345.0))


@pytest.mark.parametrize("sync_free", [False, True])
def test_neuron_stats_count_only_routed_tokens(sync_free):
    st = make_moe_stream(seed=4, n=500)
    s = LayerStats(D, k=KS, max_pos=32, n_experts=E, expert_of=EXPERT_OF, sync_free=sync_free)
    if sync_free:
        with no_host_sync():
            st.feed(s)
    else:
        st.feed(s)
    ref = neuron_ref(st, KS)
    assert 0 < ref["n"][FEW * D_EXPERT] < KS and ref["n"][NEVER * D_EXPERT] == 0  # the stream's design
    assert s.neuron_n().tolist() == ref["n"].tolist()
    assert s.count_pos.tolist() == ref["pos"].tolist()
    eq(s.top.value, ref["top_v"]), eq(s.top.index, ref["top_i"])
    eq(s.bottom.value, ref["bot_v"]), eq(s.bottom.index, ref["bot_i"])
    docs = s.top_docs
    eq(docs.value, ref["doc_v"]), eq(docs.index, ref["doc_i"]), eq(docs.doc, ref["doc_d"])
    eq(s.sample.value, ref["smp_v"]), eq(s.sample.index, ref["smp_i"])
    assert s.hist.tolist() == ref["hist"].tolist()
    np.testing.assert_allclose(s.sum.numpy(), ref["sum"], rtol=1e-12, atol=1e-12)
    n = ref["n"].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = ref["sum"] / n
        std = np.sqrt(np.maximum(ref["sumsq"] / n - mean ** 2, 0))
        rate = ref["pos"] / n
    np.testing.assert_allclose(s.mean().numpy(), mean, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(s.std().numpy(), std, rtol=1e-9, atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(s.firing_rate().numpy(), rate, rtol=1e-12, equal_nan=True)
    # the expert with m < 0 on all its tokens: no zero of a non-routed token among its largest values
    neg = slice(NEGATIVE * D_EXPERT, (NEGATIVE + 1) * D_EXPERT)
    assert (s.max[neg] < 0).all() and (s.top.value[neg][~s.top.value[neg].isnan()] < 0).all()
    never = slice(NEVER * D_EXPERT, (NEVER + 1) * D_EXPERT)
    assert (s.top.index[never] == -1).all() and s.hist[never].sum() == 0 and s.mean()[never].isnan().all()
    # the neuron table: the same denominators, expert ids
    df = s.to_frame(7)
    assert df["n"].tolist() == ref["n"].tolist()
    assert df["neuron_id"].iloc[0] == "7.e0.0" and df["neuron_id"].iloc[D_EXPERT + 1] == "7.e1.1"
    assert df["neuron_id"].iloc[-1] == "7.s0.1" and df["shared"].iloc[-1] and not df["shared"].iloc[0]
    assert df["expert"].tolist() == [e if e >= 0 else -1 - e for e in EXPERT_OF.tolist()]
    np.testing.assert_allclose(df["expert_share"], ref["n"] / st.m.shape[0])


def test_checked_and_sync_free_paths_agree_bit_for_bit():
    st = make_moe_stream(seed=5)
    a = st.feed(LayerStats(D, k=6, max_pos=32, n_experts=E, expert_of=EXPERT_OF, sync_free=False))
    b = st.feed(LayerStats(D, k=6, max_pos=32, n_experts=E, expert_of=EXPERT_OF, sync_free=True))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key].nan_to_num(), sb[key].nan_to_num()), key


def test_nonzero_m_off_the_experts_tokens_is_ignored():
    """m at tokens not routed to the expert is set to 0 before any statistic (the contract says it is 0)."""
    st = make_moe_stream(seed=6)
    noisy = st.m + torch.where(st.active, 0.0, 5.0)
    a = st.feed(LayerStats(D, k=6, max_pos=32, n_experts=E, expert_of=EXPERT_OF))
    st.m = noisy
    b = st.feed(LayerStats(D, k=6, max_pos=32, n_experts=E, expert_of=EXPERT_OF))
    for key, t in a.state_dict().items():
        assert torch.equal(t.nan_to_num(), b.state_dict()[key].nan_to_num()), key


def test_merge_of_halves_and_shift():
    st = make_moe_stream(seed=7)
    whole = st.feed(LayerStats(D, k=6, max_pos=32, n_experts=E, expert_of=EXPERT_OF))
    a = st.feed(LayerStats(D, k=6, max_pos=32, n_experts=E, expert_of=EXPERT_OF), 0, 123)
    b = st.feed(LayerStats(D, k=6, max_pos=32, n_experts=E, expert_of=EXPERT_OF), 123)
    a.merge(b)
    sw, sa = whole.state_dict(), a.state_dict()
    for key in sw:
        if sw[key].is_floating_point() and "sum" in key:
            assert torch.allclose(sw[key], sa[key], rtol=1e-12), key
        else:
            assert torch.equal(sw[key].nan_to_num(), sa[key].nan_to_num()), key
    moved = a.shifted(1000, 10)
    assert moved.moe and torch.equal(moved.neuron_n(), a.neuron_n())
    assert torch.equal(moved.top.index, torch.where(a.top.index >= 0, a.top.index + 1000, -1))


@pytest.mark.parametrize("sync_free", [False, True])
def test_context_windows_of_an_moe_layer(sync_free):
    """The shown examples' windows hold the expert's raw m over the row, 0 at tokens not routed to it."""
    from kvmem.stats import ContextWindows

    st = make_moe_stream(seed=8, n=320, max_pos=32)
    st.ti = torch.arange(320)  # rows of 32 consecutive tokens, each row in one update
    st.bounds = [0, 64, 160, 320]
    ctx = ContextWindows(D, before=3, after=2, n_top=4, n_docs=2, n_bottom=2, dtype=torch.float32)
    s = st.feed(LayerStats(D, k=6, max_pos=32, n_experts=E, expert_of=EXPERT_OF, context=ctx, sync_free=sync_free))
    top = s.top
    j = 1  # a neuron of routed expert 0: its windows cross tokens not routed to it
    assert not st.active[:, j].all() and (top.index[j] >= 0).all()
    for slot in range(4):
        i = int(top.index[j, slot])
        if i < 0:
            continue
        win = s.context.lookup(torch.tensor([j]), torch.tensor([i]))[0]
        for w, t in enumerate(range(i - 3, i + 3)):
            same_row = 0 <= t < 320 and t // 32 == i // 32
            if same_row:
                assert float(win[w]) == float(st.m[t, j]) * float(st.active[t, j]), (slot, w)
            else:
                assert torch.isnan(win[w])
