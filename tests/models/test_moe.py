"""Parity of the MoE view with the HF modules and with a brute force (tests/moe_helpers.py), every MoE family.

References: the HF sparse-MoE block's own output (a forward hook of the test's own), and the brute force
that loops over tokens and their chosen experts with the HF expert weights in float64. Tolerances: 2e-5
absolute (float32 sums in a different order) unless stated; read hooks leave logits bit for bit equal.
"""

import pytest
import torch

import kvmem
from kvmem.errors import KvmemError
from kvmem.hooks import ablate_experts, hooks, record, routing
from kvmem.neurons import NeuronId
from tests.moe_helpers import D, MOE_CONFIGS, MOE_FAMILIES, brute_block, brute_expert, brute_route, brute_shared, \
    make_tiny_moe, moe_blocks

torch.set_grad_enabled(False)
IDS = torch.tensor([[3, 17, 250, 9, 41, 77, 120, 5], [300, 64, 11, 2, 8, 99, 140, 33]])
TOL = dict(atol=2e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def models():
    return {name: kvmem.from_hf(make_tiny_moe(name), None) for name in MOE_FAMILIES}


def _block_io(model):
    """layer -> (block input, block output) of every MoE block in one plain forward pass (own hooks)."""
    rec, handles = {}, []
    for i, blk in moe_blocks(model.hf).items():
        def keep(mod, args, out, i=i):
            rec[i] = (args[0].clone(), (out[0] if isinstance(out, tuple) else out).clone())
        handles.append(blk.register_forward_hook(keep))
    try:
        logits = model.hf(input_ids=IDS, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    return logits, rec


def _tokens(x):
    return [(b, p) for b in range(x.shape[0]) for p in range(x.shape[1])]


def _moe_layers(model):
    return [i for i, lay in enumerate(model.layers) if hasattr(lay, "layout")]


@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_reconstructed_output_equals_the_block_and_the_brute_force(models, name):
    model = models[name]
    _, io = _block_io(model)
    assert sorted(io) == _moe_layers(model) and io
    points = [(p, i) for i in io for p in ("ffn.x", "moe.router", "ffn.coef", "ffn.out")]
    seen = {}
    with hooks(model, record(points, seen)):
        model.hf(input_ids=IDS, use_cache=False)
    for i, (x, y) in io.items():
        lay = model.layers[i]
        torch.testing.assert_close(seen[("ffn.x", i)], x, atol=0, rtol=0)
        torch.testing.assert_close(seen[("ffn.out", i)], y, atol=0, rtol=0)
        c = seen[("ffn.coef", i)]
        assert c.shape == (*IDS.shape, lay.layout.d_flat) == (*IDS.shape, lay.d_mlp)
        idx, w = routing(model, i, seen[("moe.router", i)], x)
        gates = lay.gates(idx, w)
        torch.testing.assert_close(lay.output(c, gates), y, **TOL)
        flat = c @ lay.W_out + (gates @ lay.b_down if lay.has_expert_bias else 0)  # Σ c·v over the flat view
        torch.testing.assert_close(flat, y, **TOL)
        torch.testing.assert_close(lay.write(c, gates=gates), y.float(), **TOL)
        brute = torch.stack([brute_block(name, model.hf.model.layers[i].mlp, x[t]) for t in _tokens(x)])
        torch.testing.assert_close(y.reshape(-1, D).double(), brute, atol=3e-5, rtol=1e-5)


@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_raw_and_effective_coefficients_equal_the_brute_force(models, name):
    model = models[name]
    _, io = _block_io(model)
    layers = list(io)
    seen = {}
    with hooks(model, record([(p, i) for i in layers for p in ("moe.expert.coef", "ffn.coef")], seen)):
        model.hf(input_ids=IDS, use_cache=False)
    for i in layers:
        lay, blk, x = model.layers[i], model.hf.model.layers[i].mlp, io[i][0]
        lo = lay.layout
        m, c = seen[("moe.expert.coef", i)], seen[("ffn.coef", i)]
        for t in _tokens(x):
            top, w = brute_route(name, blk, x[t])
            want_m = torch.zeros(lo.d_flat, dtype=torch.float64)
            want_c = torch.zeros(lo.d_flat, dtype=torch.float64)
            for e, we in zip(top, w):
                r = lo.expert_range(e)
                want_m[r.start:r.stop] = brute_expert(name, blk, e, x[t])
                want_c[r.start:r.stop] = we * want_m[r.start:r.stop]
            sh = brute_shared(name, blk, x[t])
            if sh is not None:
                want_m[lo.d_routed:] = sh[0]
                want_c[lo.d_routed:] = sh[1] * sh[0]
            torch.testing.assert_close(m[t].double(), want_m, **TOL)
            torch.testing.assert_close(c[t].double(), want_c, **TOL)
        assert (m == 0).any() and (m != 0).any()  # non-routed experts are zero, routed ones are not
    if name == "gpt_oss":  # the clamps are exercised: some gate pre-activations exceed the limit
        ex = model.hf.model.layers[0].mlp.experts
        gu = io[0][0].reshape(-1, D) @ ex.gate_up_proj[0] + ex.gate_up_proj_bias[0]
        assert (gu[:, ::2] > ex.limit).any() and (gu[:, 1::2].abs() > ex.limit).any()


@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_read_hooks_leave_logits_unchanged(models, name):
    model = models[name]
    plain, _ = _block_io(model)
    from kvmem.hooks import check_points

    points = []
    for i, lay in enumerate(model.layers):
        names = ["resid.pre", "ffn.x", "ffn.coef", "ffn.out", "resid.post"]
        names += ["moe.router", "moe.expert.coef"] if hasattr(lay, "layout") else []
        points += [(n, i) for n in names]
    seen = {}
    with hooks(model, record(check_points(model, points), seen)):
        hooked = model.hf(input_ids=IDS, use_cache=False).logits
    torch.testing.assert_close(hooked, plain, atol=0, rtol=0)
    assert len(seen) == len(points)


@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_zeroing_one_expert_neuron_changes_the_output_by_its_term(models, name):
    model = models[name]
    _, io = _block_io(model)
    i = max(io)
    lay, blk, x = model.layers[i], model.hf.model.layers[i].mlp, io[i][0]
    t = (1, 3)
    top, w = brute_route(name, blk, x[t])
    e, we = top[1], w[1]
    m = brute_expert(name, blk, e, x[t])
    n = int(m.abs().argmax())
    nid = NeuronId(i, n, e)
    flat = lay.layout.flat(nid)
    assert str(lay.layout.neuron_id(i, flat)) == f"{i}.e{e}.{n}"

    def zero(c):
        c = c.clone()
        c[t[0], t[1], flat] = 0
        return c
    seen = {}
    with hooks(model, {("ffn.coef", i): zero, **record([("ffn.out", i)], seen)}):
        model.hf(input_ids=IDS, use_cache=False)
    ex = blk.experts
    v = ex.down_proj[e].double()[n] if name == "gpt_oss" else ex.down_proj[e].double()[:, n]
    delta = seen[("ffn.out", i)] - io[i][1]
    torch.testing.assert_close(delta[t].double(), -we * m[n] * v, atol=2e-5, rtol=1e-4)
    others = torch.ones(IDS.shape, dtype=torch.bool)
    others[t] = False
    assert delta[others].abs().max() < 2e-5  # other tokens unchanged (up to the recomputation's float order)
    assert (-we * m[n] * v).abs().max() > 1e-2  # the term is not negligible


@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_whole_expert_ablation_reroutes(models, name):
    model = models[name]
    _, io = _block_io(model)
    i = min(io)
    blk, x = model.hf.model.layers[i].mlp, io[i][0]
    e = brute_route(name, blk, x[0, 0])[0][0]  # the first token's top expert
    seen = {}
    with hooks(model, {**ablate_experts(i, [e]), **record([("ffn.x", i)], seen)}):
        record_out = {}
        with hooks(model, record([("ffn.out", i), ("moe.expert.coef", i)], record_out)):
            model.hf(input_ids=IDS, use_cache=False)
    xi = seen[("ffn.x", i)]
    torch.testing.assert_close(xi, x, atol=0, rtol=0)  # an edit at layer i leaves its input alone
    brute = torch.stack([brute_block(name, blk, x[t], mask=e) for t in _tokens(x)])
    torch.testing.assert_close(record_out[("ffn.out", i)].reshape(-1, D).double(), brute, atol=3e-5, rtol=1e-5)


@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_edited_block_input_is_recomputed_like_the_block(models, name):
    model = models[name]
    _, io = _block_io(model)
    i = min(io)
    blk = model.hf.model.layers[i].mlp
    seen = {}
    with hooks(model, {("ffn.x", i): lambda x: x * 0.5, **record([("ffn.out", i)], seen)}):
        model.hf(input_ids=IDS, use_cache=False)
    want = blk(io[i][0] * 0.5)
    want = want[0] if isinstance(want, tuple) else want
    torch.testing.assert_close(seen[("ffn.out", i)], want, **TOL)


def test_points_at_moe_layers_early_stop_and_errors(models):
    model = models["deepseek_v3"]  # layer 0 dense, layers 1-2 MoE
    with pytest.raises(KvmemError, match="ffn.pre: layer 1 is a mixture of experts"):
        with hooks(model, {("ffn.pre", 1): lambda t: None}):
            pass
    with pytest.raises(KvmemError, match="moe.router: layer 0 is not a mixture of experts"):
        with hooks(model, {("moe.router", 0): lambda t: None}):
            pass
    ran = []
    with hooks(model, {("moe.router", 1): lambda t: ran.append("router")}, stop_after=("moe.router", 1)) as run:
        with hooks(model, {("ffn.out", 1): lambda t: ran.append("out"), ("resid.pre", 2): lambda t: ran.append(2)}):
            model.hf(input_ids=IDS, use_cache=False)
    assert run.stopped and ran == ["router"]
    blk = model.layers[1].ffn_module

    def boom(t):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        with hooks(model, {("ffn.coef", 1): boom}):
            model.hf(input_ids=IDS, use_cache=False)
    assert not blk._forward_hooks and not model.adapter.blocks()[1]._forward_pre_hooks


def test_layout_ids_round_trip(models):
    lay = models["deepseek_v3"].layers[2]
    lo = lay.layout
    assert (lo.n_experts, lo.d_expert, lo.top_k, lo.n_shared, lo.d_shared) == (4, 16, 2, 2, 16)
    for flat in (0, 15, 16, 63, 64, 79, 80, 95):
        nid = lo.neuron_id(2, flat)
        assert lo.flat(NeuronId.parse(str(nid))) == flat
    assert str(lo.neuron_id(2, 80)) == "2.s1.0" and str(lo.neuron_id(2, 17)) == "2.e1.1"
    with pytest.raises(KvmemError, match="expert 4 out of range"):
        lo.flat(NeuronId.parse("2.e4.0"))
    with pytest.raises(KvmemError, match="index 16 out of range"):
        lo.flat(NeuronId.parse("2.e0.16"))
    assert models["deepseek_v3"].layers[0].d_mlp == 40 and lay.d_mlp == 96


@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_an_unknown_config_field_is_refused_by_name(name):
    hf = make_tiny_moe(name)
    hf.config.kvmem_unknown_switch = 1
    with pytest.raises(KvmemError, match="kvmem_unknown_switch"):
        kvmem.from_hf(hf, None)


@pytest.mark.parametrize("name, field, value", [
    ("mixtral", "hidden_act", "gelu"), ("olmoe", "hidden_act", "relu"), ("deepseek_v3", "n_group", 4),
])
def test_an_unsupported_value_is_refused_by_name(name, field, value):
    hf = make_tiny_moe(name)
    setattr(hf.config, field, value)
    with pytest.raises(KvmemError, match=f"n_group|config.{field}="):
        kvmem.from_hf(hf, None)


def test_configs_are_the_families():
    assert set(MOE_CONFIGS) == {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"}


def test_query_trace_and_vocab_on_layers_of_different_widths(tiny_tokenizer):
    """DeepSeek-V3 with a dense layer 0 (40 neurons) before MoE layers (96): the commands' library calls pad
    the narrower layer (padding is never a neuron) and print dense and expert ids by layer."""
    from kvmem.query import query
    from kvmem.trace import trace
    from kvmem.vocab import neuron_vocab, project_values

    model = kvmem.from_hf(make_tiny_moe("deepseek_v3"), tiny_tokenizer)
    res = query(model, "The value of x is", top=200)
    ids = res.neurons["id"].tolist()
    assert len(ids) == 200 == len(set(ids))
    for nid, layer, n in zip(ids, res.neurons["layer"], res.neurons["neuron"]):
        parsed = NeuronId.parse(nid)
        assert parsed.dense == (layer == 0) and n < model.layers[layer].d_mlp
    assert res.neurons["contribution"].is_monotonic_decreasing
    tr = trace(model, "The value of x is", n_neurons=50)
    assert all(NeuronId.parse(i).dense == (layer == 0) for i, layer in zip(tr.neurons["id"], tr.neurons["layer"]))
    assert neuron_vocab(model, ["0.39", "2.s1.15"], k=3).neurons["id"].tolist() == ["0.39", "2.s1.15"]


def test_whole_model_projection_and_search_on_layers_of_different_widths(tiny_tokenizer):
    """DeepSeek-V3's dense layer 0 (40 neurons) beside MoE layers (96): the whole-model projection lists every real
    neuron once (padding never a row), each row's tokens equal the brute force v·W_U from the HF weights, and
    search ranks dense and expert neurons together exactly like a brute-force ranking over every real neuron."""
    from kvmem.search import search
    from kvmem.vocab import project_values

    hf = make_tiny_moe("deepseek_v3")
    model = kvmem.from_hf(hf, tiny_tokenizer)
    proj = project_values(model, k=3, cache=False)
    assert proj.widths == [40, 96, 96] and len(proj.table) == 40 + 96 + 96
    assert proj.table.groupby("layer").size().tolist() == [40, 96, 96]
    W_U = hf.lm_head.weight.double().T
    values = {}  # id -> the brute-force value vector from the HF modules
    for layer, blk in enumerate(hf.model.layers):
        mlp = blk.mlp
        if layer == 0:
            for i in range(40):
                values[f"0.{i}"] = mlp.down_proj.weight[:, i].double()
            continue
        for e in range(4):
            for i in range(16):
                values[f"{layer}.e{e}.{i}"] = mlp.experts.down_proj[e][:, i].double()
        for s in range(2):
            for i in range(16):
                values[f"{layer}.s{s}.{i}"] = mlp.shared_experts.down_proj.weight[:, s * 16 + i].double()
    assert sorted(proj.table["id"]) == sorted(values)
    table = proj.table.set_index("id")
    for nid in ("0.39", "1.e3.15", "2.s1.15"):
        logits = values[nid] @ W_U
        assert list(table.loc[nid, "top_ids"]) == logits.topk(3).indices.tolist()
        assert list(table.loc[nid, "bottom_ids"]) == (-logits).topk(3).indices.tolist()
        assert table.loc[nid, "std"] == pytest.approx(float(logits.std(unbiased=False)), rel=1e-4)
    res = search(model, " the", top=8, k=3, projection=proj, signs="positive")
    tid = res.token_id
    defined = sorted(set(tiny_tokenizer.get_vocab().values()))
    brute = []
    for nid, v in values.items():  # the token's rank in v's full row, then its z-score over the defined ids
        row = v @ W_U
        z = float((row[tid] - row[defined].mean()) / row[defined].std(unbiased=False))
        brute.append((int((row > row[tid]).sum()) + 1, -z, nid))
    brute.sort()
    assert res.neurons["id"].tolist() == [nid for _, _, nid in brute[:8]]
    assert res.neurons["logit"].tolist() == pytest.approx([float(values[n] @ W_U[:, tid]) for _, _, n in brute[:8]],
                                                          rel=1e-4, abs=1e-6)


def test_deepseek_v3_with_fewer_key_value_heads_is_refused_by_name():
    """transformers' multi-head latent attention breaks on a padded batch when num_key_value_heads differs."""
    hf = make_tiny_moe("deepseek_v3")
    hf.config.num_key_value_heads = 2
    with pytest.raises(KvmemError, match="num_key_value_heads=2"):
        kvmem.from_hf(hf, None)


def test_capture_kinds_and_projection_ids_at_moe_layers(tiny_tokenizer):
    from kvmem.capture import run_capture
    from kvmem.vocab import project_values

    model = kvmem.from_hf(make_tiny_moe("mixtral"), tiny_tokenizer)
    cap = run_capture(model, IDS, what=("coef", "router", "expert_coef"), stop=False)
    seen = {}
    with hooks(model, record([(p, 1) for p in ("moe.router", "moe.expert.coef", "ffn.coef")], seen)):
        model.hf(input_ids=IDS, use_cache=False)
    assert torch.equal(cap["router"][1], seen[("moe.router", 1)]) and cap["router"][1].shape == (*IDS.shape, 4)
    assert torch.equal(cap["expert_coef"][1], seen[("moe.expert.coef", 1)])
    assert torch.equal(cap.coef[1], seen[("ffn.coef", 1)])
    proj = project_values(model, k=3, cache=False)
    row = proj.table.set_index("id").loc["1.e2.3"]
    want = (model.hf.model.layers[1].mlp.experts.down_proj[2][:, 3] @ model.hf.lm_head.weight.T).topk(3).indices
    assert list(row["top_ids"]) == want.tolist() and row["layer"] == 1 and row["neuron"] == 2 * 16 + 3
