"""ContextWindows: every kept window against m of the whole stream, after every batch (a window holds the
positions of its token's own model row that came in the same batch); its entries are exactly the shown
slots; state round trip, merge of blocks, shifting; end to end on tiny models against each document row
run alone."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from stats_reference import make_stream

from kvmem.errors import KvmemError
from kvmem.stats import ContextWindows, LayerStats

K, BEFORE, AFTER, N_TOP, N_DOCS, N_BOTTOM = 5, 6, 3, 3, 2, 2


def contiguous_stream(seed: int, gated: bool, n: int = 1500, d: int = 10, offset: int = 0):
    """make_stream's activations, documents and uneven batches (sizes 1 to hundreds, cuts inside the long
    document), with contiguous token indices starting at ``offset`` like the profiler's."""
    st = make_stream(seed=seed, n=n, d=d, gated=gated)
    st.ti = torch.arange(n) + offset
    return st


def make(d: int, gated: bool, dtype=torch.bfloat16, backend: str = "auto") -> LayerStats:
    ctx = ContextWindows(d, before=BEFORE, after=AFTER, n_top=N_TOP, n_docs=N_DOCS, n_bottom=N_BOTTOM, dtype=dtype)
    return LayerStats(d, k=K, gated=gated, max_pos=64, context=ctx, backend=backend)


def shown(s: LayerStats) -> set[tuple[int, int]]:
    """(neuron, index) of the slots the report can show, read off the stores slot by slot."""
    parts = [s.top.index[:, :N_TOP], s.top_docs.index[:, :N_DOCS], s.bottom.index[:, :N_BOTTOM], s.sample.index]
    if s.gated:
        parts.append(s.quadrants.index)
    return {(n, i) for p in parts for n, row in enumerate(p.tolist()) for i in row if i >= 0}


def segments(pos: torch.Tensor, bounds) -> torch.Tensor:
    """[N] id of each stream token's (batch, row): a row starts where pos does not continue (pos[t] !=
    pos[t - 1] + 1), a batch at each bound."""
    new = torch.ones(pos.numel(), dtype=torch.bool)
    new[1:] = pos[1:] != pos[:-1] + 1
    new[torch.tensor([b for b in bounds if b < pos.numel()], dtype=torch.long)] = True
    return torch.cumsum(new.long(), 0)


def expected(m: torch.Tensor, first: int, known_end: int, neuron: torch.Tensor, index: torch.Tensor,
             dtype, seg: torch.Tensor) -> torch.Tensor:
    """m of each (neuron, index) over index-BEFORE .. index+AFTER, for tokens [first, known_end) of the
    stream m [N, d] (whose first token is ``first``) in the token's own (batch, row) segment ``seg`` [N],
    NaN elsewhere: [E, W]."""
    t = index[:, None] + torch.arange(-BEFORE, AFTER + 1)
    tc = (t - first).clamp(0, m.shape[0] - 1)
    ok = (t >= first) & (t < known_end) & (seg[tc] == seg[(index - first)[:, None]])
    v = m[tc, neuron[:, None]].to(dtype)
    return torch.where(ok, v, torch.tensor(float("nan"), dtype=dtype))


def assert_windows(ctx: ContextWindows, want: torch.Tensor):
    got = ctx.window
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got.float().numpy(), want.float().numpy())  # NaN == NaN


@pytest.mark.parametrize("backend", ["auto", "torch"])  # auto: the numba pass on CPU; torch: the torch ops
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_windows_match_the_stream_after_every_batch(gated, dtype, backend):
    st = contiguous_stream(seed=3, gated=gated, offset=7)
    s = make(st.m.shape[1], gated, dtype, backend)
    assert (s.context._stores(s, st.m) is not None) == (backend == "auto" and dtype != torch.float16)
    sizes = []
    seg = segments(st.pos, st.bounds)
    for m, ti, doc, pos, g, u in st.batches():
        s.update(m, ti, doc, pos, gate=g, up=u)
        ctx, end = s.context, int(ti[-1]) + 1
        assert {(int(n), int(i)) for n, i in zip(ctx.neuron, ctx.index)} == shown(s)
        assert torch.equal(ctx.key, ctx.key.sort().values)
        # every window knows exactly the positions of its row in its batch, in the stored dtype; float32
        # is exact
        assert_windows(ctx, expected(st.m, 7, end, ctx.neuron, ctx.index, dtype, seg))
        sizes.append(m.shape[0])
    assert min(sizes) < BEFORE and max(sizes) > 100  # tiny and big batches ran
    # lookup: by (neuron, index), NaN rows for pairs not kept
    idx = s.top.index[:, 0]
    got = s.context.lookup(torch.arange(idx.numel()), idx)
    want = expected(st.m, 7, 7 + st.m.shape[0], torch.arange(idx.numel()), idx, dtype, seg).float()
    np.testing.assert_array_equal(got.numpy(), want.numpy())
    assert torch.isnan(s.context.lookup(torch.tensor([0]), torch.tensor([-1]))).all()
    unshown = s.top.index[:, N_TOP]  # a slot not shown (unless another store shows it)
    kept = {(n, int(i)) for n, i in enumerate(unshown.tolist())} & shown(s)
    miss = [n for n in range(idx.numel()) if (n, int(unshown[n])) not in kept]
    assert miss and torch.isnan(s.context.lookup(torch.tensor(miss), unshown[miss])).all()


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[t.dtype])


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_the_numba_pass_and_the_torch_ops_keep_the_same_state_bit_for_bit(gated, dtype):
    """Two ContextWindows over the same LayerStats, one by the CPU pass and one by the torch ops, after every
    batch: the same entries and windows (NaN bits and the rounding of m included: the m they see holds NaN,
    infinities, bfloat16 rounding ties and subnormals); also across a state round trip, a batch left
    out, an update without tokens and a merge. float16 takes the torch ops."""
    st = contiguous_stream(seed=8, gated=gated, n=1200, d=70)
    odd = st.m.clone()  # what the windows see (the stores take st.m)
    for every, value in ((7, 1 + 2**-8), (9, 1 + 3 * 2**-8), (10, -(1 + 3 * 2**-8)), (11, float("inf")),
                         (13, -float("inf")), (15, float("nan")), (17, -float("nan")), (19, 2**-140)):
        odd[every // 2::every, every % 5::3] = value  # ties round to even: down, up, up; bfloat16 subnormal
    d = st.m.shape[1]
    s = LayerStats(d, k=K, gated=gated, max_pos=64)

    def windows():
        return ContextWindows(d, before=BEFORE, after=AFTER, n_top=N_TOP, n_docs=N_DOCS, n_bottom=N_BOTTOM, dtype=dtype)

    def both(m, start):
        ti, pos = torch.arange(start, start + m.shape[0]), st.pos[start:start + m.shape[0]]
        fast.update(s, m, ti, pos)
        s.backend = "torch"  # the torch ops on the same stores
        slow.update(s, m, ti, pos)
        s.backend = "auto"
        assert torch.equal(fast.key, slow.key) and torch.equal(bits(fast.window), bits(slow.window))

    fast, slow = windows(), windows()
    assert (fast._stores(s, st.m) is not None) == (dtype != torch.float16)
    batches = list(st.batches())
    for i, (m, ti, doc, pos, g, u) in enumerate(batches):
        s.update(m, ti, doc, pos, gate=g, up=u)
        a = int(ti[0])
        if i == len(batches) // 3:
            continue  # a batch left out
        if i == len(batches) // 2:
            fast = ContextWindows.from_state_dict(fast.state_dict())
            both(odd[:0], a)
        both(odd[a:a + m.shape[0]], a)
    assert torch.isnan(fast.window).any() and (~torch.isnan(fast.window)).any()
    # merges (torch ops), then the CPU pass again
    other = windows()
    other.update(s, odd[:50], torch.arange(50), st.pos[:50])
    for c in (fast, slow):
        c.merge(other, stats=s)
    both(odd[-40:], odd.shape[0] - 40)
    both(odd[:0], odd.shape[0])


def test_windows_stop_at_the_row_the_batch_and_the_stream_end():
    """A neuron whose top token is the last of the stream (window runs past the end), one whose top token
    is alone in its batch (nothing else of its row came with it) and one whose top token starts a row
    (the row before it, in the same batch, is another row)."""
    n, d = 40, 3
    m = torch.linspace(-1, 1, n * d).view(n, d).sin()
    m[n - 1, 0] = 9.0
    m[20, 1] = 9.0
    m[24, 2] = 9.0
    s = LayerStats(d, k=2, context=ContextWindows(d, before=BEFORE, after=AFTER, n_top=1, n_docs=1, n_bottom=1))
    ti = torch.arange(n)
    for a, b in ((0, 20), (20, 21), (21, n)):
        s.update(m[a:b], ti[a:b], torch.zeros(b - a, dtype=torch.long), ti[a:b] % 8)
    got = s.context.lookup(torch.tensor([0, 1, 2]), torch.tensor([n - 1, 20, 24]))
    want = expected(m, 0, n, torch.tensor([0, 1, 2]), torch.tensor([n - 1, 20, 24]), torch.bfloat16,
                    segments(ti % 8, [0, 20, 21, n])).float()
    np.testing.assert_array_equal(got.numpy(), want.numpy())
    assert torch.isnan(got[0, BEFORE + 1:]).all() and not torch.isnan(got[0, :BEFORE + 1]).any()
    assert torch.isnan(got[1, :BEFORE]).all() and torch.isnan(got[1, BEFORE + 1:]).all()
    assert torch.isnan(got[2, :BEFORE]).all() and not torch.isnan(got[2, BEFORE:]).any()


@pytest.mark.parametrize("gated", [False, True])
def test_state_round_trip_continues_bit_identically(tmp_path, gated):
    st = contiguous_stream(seed=5, gated=gated)
    d = st.m.shape[1]
    whole = st.feed(make(d, gated))
    batches = list(st.batches())
    half = make(d, gated)
    for m, ti, doc, pos, g, u in batches[:len(batches) // 2]:
        half.update(m, ti, doc, pos, gate=g, up=u)
    save_file(half.state_dict(), str(tmp_path / "s.safetensors"))
    resumed = LayerStats.from_state_dict(load_file(str(tmp_path / "s.safetensors")))
    assert resumed.context is not None
    for m, ti, doc, pos, g, u in batches[len(batches) // 2:]:
        resumed.update(m, ti, doc, pos, gate=g, up=u)
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and any(k.startswith("context.") for k in a)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name].nan_to_num(), b[name].nan_to_num()), name


@pytest.mark.parametrize("gated", [False, True])
def test_merge_of_blocks_keeps_what_either_block_knows(gated):
    st = contiguous_stream(seed=11, gated=gated)
    n, d = st.m.shape
    whole = st.feed(make(d, gated))
    cut = int(whole.context.index[whole.context.key.numel() // 2]) + 1  # through a shown window
    parts = []
    for a, b in ((0, cut), (cut, n)):
        s = make(d, gated)
        for m, ti, doc, pos, g, u in st.batches():
            keep = (ti >= a) & (ti < b)
            if keep.any():
                s.update(m[keep], ti[keep], doc[keep], pos[keep], gate=None if g is None else g[keep],
                         up=None if u is None else u[keep])
        parts.append(s)
    merged = parts[0].merge(parts[1])
    ctx, ref = merged.context, whole.context
    assert torch.equal(ctx.key, ref.key)  # the same shown slots
    # known in a block: the positions on the example's side of the cut; the other side stays NaN
    t = ctx.index[:, None] + torch.arange(-BEFORE, AFTER + 1)
    same_side = (t < cut) == (ctx.index[:, None] < cut)
    want = torch.where(same_side, ref.window, torch.tensor(float("nan"), dtype=ref.window.dtype))
    assert_windows(ctx, want)
    crossing = (~same_side & (t >= 0) & (t < n)).any(1)
    assert crossing.any()  # some shown windows do cross the cut
    # the other order gives the same windows
    again = [make(d, gated) for _ in range(2)]
    for s, (a, b) in zip(again, ((0, cut), (cut, n))):
        for m, ti, doc, pos, g, u in st.batches():
            keep = (ti >= a) & (ti < b)
            if keep.any():
                s.update(m[keep], ti[keep], doc[keep], pos[keep], gate=None if g is None else g[keep],
                         up=None if u is None else u[keep])
    other = again[1].merge(again[0]).context
    assert torch.equal(other.key, ctx.key) and torch.equal(other.window.nan_to_num(), ctx.window.nan_to_num())
    assert torch.equal(torch.isnan(other.window), torch.isnan(ctx.window))


def test_shifted_moves_the_windows_with_the_tokens():
    st = contiguous_stream(seed=2, gated=False, n=400)
    s = st.feed(make(st.m.shape[1], False))
    moved = s.shifted(1000, 3)
    assert torch.equal(moved.context.index, s.context.index + 1000)
    assert torch.equal(moved.context.neuron, s.context.neuron)
    assert torch.equal(moved.context.window.nan_to_num(), s.context.window.nan_to_num())
    assert torch.equal(moved.context.carry_index, s.context.carry_index + 1000)
    assert {(int(a), int(b)) for a, b in zip(moved.context.neuron, moved.context.index)} == shown(moved)


def test_refusals():
    d = 4
    with pytest.raises(KvmemError):
        ContextWindows(d, before=-1)
    with pytest.raises(KvmemError):
        LayerStats(d, context=ContextWindows(d + 1))
    s = LayerStats(d, context=ContextWindows(d))
    with pytest.raises(ValueError, match="increasing"):
        s.update(torch.randn(3, d), torch.tensor([0, 5, 1]), torch.zeros(3, dtype=torch.long), torch.arange(3))
    a, b = LayerStats(d, context=ContextWindows(d)), LayerStats(d, context=ContextWindows(d, after=5))
    with pytest.raises(KvmemError):
        a.merge(b)
    assert a.merge(LayerStats(d)).context is None  # a side without windows: the merge keeps none


# ---------------------------------------------------------------------- end to end: kvmem profile
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Short documents around one long one: windows cross rows, batches and documents."""
    path = tmp_path_factory.mktemp("corpus") / "c.txt"
    path.write_text("\n\n".join(["abs returns the absolute value.", "class attributes live in the class. " * 8,
                                 "a for loop iterates.", "names are bound to objects by assignment."]))
    return path


def brute_force_coef(model, store):
    """m [n_tokens, d_mlp] per layer and each token's row [n_tokens]: every document cut into pieces of
    SEQ - 1 tokens, each piece run through the model alone after the tokenizer's BOS."""
    import kvmem

    bos = model.tokenizer.bos_token_id
    coef, rows = {}, []
    for d in range(store.n_docs):
        a, b = int(store.doc_offsets[d]), int(store.doc_offsets[d + 1])
        for s in range(a, b, SEQ - 1):
            piece = store.ids[s:min(s + SEQ - 1, b)].long()
            cap = kvmem.run_capture(model, torch.cat([torch.tensor([bos]), piece])[None], layers=None).coef
            for layer, c in cap.items():
                coef.setdefault(layer, []).append(c[0, 1:].float())
            rows.append(torch.full((piece.numel(),), len(rows)))
    return {layer: torch.cat(v) for layer, v in coef.items()}, torch.cat(rows)


SEQ = 8


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "qwen2", "gemma", "gpt_neox", "opt"])
def test_profiled_windows_match_a_brute_force_forward(tmp_path, corpus, tiny_models, family):
    import kvmem
    from kvmem.profile.runner import ProfileConfig

    model = tiny_models[family]
    # 8-token rows (BOS + 7 tokens): every 15-token window of the defaults is cut by its row
    cfg = ProfileConfig(corpus=str(corpus), seq_len=SEQ, batch_size=2, top_k=6, checkpoint_every=1e9)
    runs = {"whole": kvmem.profile(cfg, tmp_path / "whole", model=model)}
    if family == "llama":  # a shard: its rows are whole rows of the stream
        from dataclasses import replace

        runs["shard"] = kvmem.profile(replace(cfg, shard="1/2"), tmp_path / "shard", model=model)
    for name, run in runs.items():
        store = run.tokens
        assert run.manifest["settings"]["context_before"] == 10 and run.manifest["settings"]["context_top"] == 10
        coef, row = brute_force_coef(model, store)
        first, end = store.offset, store.offset + store.n_tokens
        for layer, s in run.stats.items():
            ctx = s.context
            assert (ctx.before, ctx.after) == (10, 4) and ctx.window.dtype == torch.bfloat16
            assert {(int(a), int(b)) for a, b in zip(ctx.neuron, ctx.index)} == {
                (n, i) for p in [s.top.index, s.top_docs.index[:, :5], s.bottom.index[:, :5], s.sample.index]
                + ([s.quadrants.index] if s.gated else []) for n, row_ in enumerate(p.tolist()) for i in row_ if i >= 0}
            t = ctx.index[:, None] + torch.arange(-10, 5)
            tc = (t - first).clamp(0, end - first - 1)
            ok = (t >= first) & (t < end) & (row[tc] == row[(ctx.index - first)[:, None]])
            want = torch.where(ok, coef[layer][tc, ctx.neuron[:, None]], torch.tensor(float("nan")))
            got = ctx.window.float()
            assert torch.equal(torch.isnan(got), torch.isnan(want))  # the row's positions, nothing else
            # the profiler runs padded batches, the brute force one row alone: m agrees to rounding
            torch.testing.assert_close(got.nan_to_num(), want.nan_to_num(), rtol=2**-7, atol=1e-4)
            # some windows are cut by their row although their document goes on before it
            p = run.layout.position(ctx.index)
            assert ((p < 10) & (ctx.index - store.doc_start(ctx.index) >= p)).any()
        if name == "shard":
            assert store.offset > 0 and store.continues_doc is not None
