"""The host-sync guard (kvmem.stats.syncguard), then LayerStats' sync-free update under it, against brute force.

The guard is checked kind by kind: each call it claims to catch raises inside ``no_host_sync()`` and runs
outside it; calls that do not synchronise pass."""

import pytest
import torch

from kvmem.stats.syncguard import HostSync, allow, no_host_sync

T = torch.arange(6, dtype=torch.float32)
I = torch.tensor([3, 1, 2])
MASK = T > 2

SYNCS = {
    "item": lambda: T[0].item(),
    "tolist": lambda: T.tolist(),
    "bool": lambda: bool(T[1]),
    "if any": lambda: 1 if (T > 3).any() else 0,
    "int": lambda: int(T[1]),
    "float": lambda: float(T[1]),
    "index": lambda: [0, 1, 2][I[1]],
    "numpy": lambda: T.numpy(),
    "cpu": lambda: T.cpu(),
    "repr": lambda: repr(T),
    "nonzero": lambda: T.nonzero(),
    "torch.nonzero": lambda: torch.nonzero(T),
    "argwhere": lambda: torch.argwhere(T),
    "where1": lambda: torch.where(MASK),
    "unique": lambda: torch.unique(I),
    "unique_consecutive": lambda: torch.unique_consecutive(I),
    "masked_select": lambda: torch.masked_select(T, MASK),
    "bincount": lambda: torch.bincount(I),
    "repeat_interleave": lambda: torch.repeat_interleave(T[:3], I),
    "tensor_split": lambda: torch.tensor_split(T, torch.tensor([2])),
    "mask index": lambda: T[MASK],
    "mask setitem": lambda: T.clone().__setitem__(MASK, 0.0),
    "mask index_put_": lambda: T.clone().index_put_((MASK,), torch.tensor(0.0)),
    "equal": lambda: torch.equal(T, T),
    "allclose": lambda: torch.allclose(T, T),
    "is_nonzero": lambda: T[1].is_nonzero(),
    "cuda.synchronize": lambda: torch.cuda.synchronize(),
}

FREE = {
    "arith": lambda: (T * 2 + 1).sum(),
    "int index": lambda: T[I],
    "slice": lambda: T[1:3],
    "where3": lambda: torch.where(MASK, T, 0.0),
    "topk": lambda: torch.topk(T, 2),
    "repeat_interleave output_size": lambda: torch.repeat_interleave(T[:3], I, output_size=6),
    "repeat_interleave int": lambda: torch.repeat_interleave(T, 2),
    "to cpu from cpu": lambda: T.to("cpu"),
    "any (kept on device)": lambda: (T > 3).any(),
    "scatter_add": lambda: torch.zeros(4).index_add_(0, I, torch.ones(3)),
}


@pytest.mark.parametrize("kind", list(SYNCS))
def test_guard_catches(kind):
    if kind == "cuda.synchronize" and not torch.cuda.is_available():
        with no_host_sync(), pytest.raises(HostSync):
            SYNCS[kind]()
        return
    SYNCS[kind]()  # fine outside the guard
    with no_host_sync(), pytest.raises(HostSync, match="host synchronisation"):
        SYNCS[kind]()


@pytest.mark.parametrize("kind", list(FREE))
def test_guard_lets_pass(kind):
    with no_host_sync():
        FREE[kind]()


def test_allow_lifts_the_guard_for_a_block():
    with no_host_sync():
        with allow():
            assert T[1].item() == 1.0
        with pytest.raises(HostSync):
            T[1].item()
    assert T[1].item() == 1.0  # and nothing is left behind


# ---------------------------------------------------------------------- LayerStats(sync_free=True)
from stats_reference import make_stream  # noqa: E402
from test_layer import check  # noqa: E402

from kvmem.stats import LayerStats  # noqa: E402


def feed(s: LayerStats, st, cuts) -> None:
    for a, b in zip(cuts[:-1], cuts[1:]):
        g = (st.gate[a:b], st.up[a:b]) if st.gate is not None else (None, None)
        s.update(st.m[a:b], st.ti[a:b], st.doc[a:b], st.pos[a:b], gate=g[0], up=g[1])


@pytest.mark.parametrize("gated", [False, True])
def test_sync_free_update_matches_brute_force_under_the_guard(gated):
    st = make_stream(seed=3, n=1500, d=10, gated=gated)
    s = LayerStats(st.m.shape[1], k=5, gated=gated, max_pos=64, backend="torch", sync_free=True,
                   value_norm=torch.rand(st.m.shape[1]) + 0.5)
    cuts = [0, 3, 40, 41, 400, 1100, 1500]  # batches smaller and larger than k, one of one token
    with no_host_sync():
        feed(s, st, cuts)
    assert s._paths["dense"] == "fixed" and s._paths["top"] == "fixed"
    check(s, st)
    ref = LayerStats(st.m.shape[1], k=5, gated=gated, max_pos=64, backend="torch", sync_free=False,
                     value_norm=s.spec.value_norm)
    feed(ref, st, cuts)
    a, b = s.state_dict(), ref.state_dict()
    assert a.keys() == b.keys()
    for name in a:  # the mass counts too (not in check): the same state as the sparse torch path
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, equal_nan=True, msg=name)


def test_sync_free_input_checks_raise_at_the_boundary():
    st = make_stream(seed=1, n=50, d=8)
    s = LayerStats(8, k=3, max_pos=64, sync_free=True)
    with no_host_sync():
        s.update(st.m[:20], st.ti[:20].flip(0), st.doc[:20], st.pos[:20])  # decreasing indices: no sync here
    with pytest.raises(ValueError, match="token_index"):
        s.state_dict()
    s = LayerStats(8, k=3, max_pos=8, sync_free=True)
    s.update(st.m[:20], st.ti[:20], st.doc[:20], st.pos[:20] + 100)
    with pytest.raises(ValueError, match="pos_in_seq"):
        s.check()
    s.check()  # cleared


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("every", [True, False])  # the windows read after every batch, or only at the end
def test_sync_free_context_windows_match_the_stream(gated, every):
    """The slot-aligned windows (kvmem.stats.context_fixed) under the guard, against the stream itself
    (tests/stats/test_context.py's reference), and the same state as the sorted torch path bit for bit."""
    from test_context import AFTER, BEFORE, K, N_BOTTOM, N_DOCS, N_TOP, contiguous_stream, expected, segments

    from kvmem.stats.context import ContextWindows

    def build(sync_free):
        ctx = ContextWindows(st.m.shape[1], before=BEFORE, after=AFTER, n_top=N_TOP, n_docs=N_DOCS,
                             n_bottom=N_BOTTOM, dtype=torch.bfloat16)
        return LayerStats(st.m.shape[1], k=K, gated=gated, max_pos=64, context=ctx, backend="torch",
                          sync_free=sync_free)

    st = contiguous_stream(seed=3, gated=gated, offset=7)
    s, ref = build(True), build(False)
    seg = segments(st.pos, st.bounds)
    for m, ti, doc, pos, g, u in st.batches():
        with no_host_sync():
            s.update(m, ti, doc, pos, gate=g, up=u)
        ref.update(m, ti, doc, pos, gate=g, up=u)
        if every:
            ctx = s.context
            want = expected(st.m, 7, int(ti[-1]) + 1, ctx.neuron, ctx.index, torch.bfloat16, seg)
            torch.testing.assert_close(ctx.window.float(), want.float(), rtol=0, atol=0, equal_nan=True)
    assert s.context._fixed is not None or every
    a, b = s.state_dict(), ref.state_dict()
    assert a.keys() == b.keys()
    for name in b:  # bit for bit, NaNs included
        assert torch.equal(a[name].reshape(-1).view(torch.uint8), b[name].reshape(-1).view(torch.uint8)), name


def test_compiled_update_keeps_the_eager_state():
    """LayerStats(compile=True): the components' sync-free updates through torch.compile give the eager
    state bit for bit (kept small: the top store and the histogram; compilation dominates the time)."""
    st = make_stream(seed=5, n=600, d=10)
    a = LayerStats(10, k=5, max_pos=64, sync_free=True, components=["top", "hist"])
    b = LayerStats(10, k=5, max_pos=64, compile=True, components=["top", "hist"])
    assert b.sync_free
    cuts = [0, 200, 400, 600]  # one shape: one compilation
    feed(a, st, cuts)
    feed(b, st, cuts)
    assert b._paths["dense"] == "compiled"
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and {"top.value", "hist.count"} <= set(sa)
    for name in sa:
        assert torch.equal(sa[name].reshape(-1).view(torch.uint8), sb[name].reshape(-1).view(torch.uint8)), name
