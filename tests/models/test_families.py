"""Parity of every new dense family's view with the HF modules' own computation (tiny random models).

Independent references, per layer of a real forward pass:
  - the FFN module's own output y (forward hook) against m·W_out + b_out from the view, and m against
    act(x·W_gate)·(x·W_in) from the view's weights (fused Phi-3 weights split by the view);
  - what the layer writes into the residual stream: resid.post minus resid.post with that layer's FFN
    output replaced by zeros (everything upstream identical, attention in parallel blocks unchanged), against
    FFNLayer.write(m) (post-norm gains, token scales, Granite's residual multiplier). Under OPT's post-LN the
    norm reads r + y, so the write is the new stream itself: compared with resid.post directly;
  - logits: the model's own logits against logit_transform(final_norm(h_L)·W_U + b_U), h_L the last block's
    output (Gemma soft-capping, Cohere / Granite logit scales, OPT's project_out);
  - embeddings: block 0's input against embedding_scale·W_E[ids] (families without position embeddings).
"""

import pytest
import torch

import kvmem
from kvmem.capture import capture
from kvmem.errors import KvmemError
from tests.conftest import NEW_FAMILIES, NEW_FAMILY_CONFIGS, make_tiny_new

torch.set_grad_enabled(False)
IDS = torch.tensor([[3, 17, 250, 9, 41, 77, 120, 5, 300, 64, 11, 2]])


@pytest.fixture(scope="module")
def models():
    return {name: kvmem.from_hf(make_tiny_new(name), None) for name in NEW_FAMILIES}


def _tensor(out):
    return out[0] if isinstance(out, tuple) else out


def _forward(model, zero_layer=None):
    """One pass; per layer the FFN input x, coefficients m, FFN output y (cloned), block input and output.
    ``zero_layer``: that layer's FFN output is replaced by zeros."""
    rec, handles = {}, []
    for lay in model.layers:
        i = lay.index
        keep = rec.__setitem__
        handles.append(lay.in_module.register_forward_pre_hook(lambda m, a, i=i: keep(("x", i), a[0].clone())))
        handles.append(lay.out_module.register_forward_pre_hook(lambda m, a, i=i: keep(("m", i), a[0].clone())))

        def after(mod, a, o, i=i):
            rec[("y", i)] = o.clone()  # Falcon edits this tensor in place later: clone it
            if i == zero_layer:
                return torch.zeros_like(o)

        handles.append(lay.ffn_module.register_forward_hook(after))
        block = model.adapter.blocks()[i]
        handles.append(block.register_forward_pre_hook(
            lambda m, a, kw, i=i: rec.__setitem__(("pre", i), (a[0] if a else kw["hidden_states"]).clone()),
            with_kwargs=True))
        handles.append(block.register_forward_hook(lambda m, a, o, i=i: keep(("post", i), _tensor(o).clone())))
    try:
        logits = model.hf(input_ids=IDS, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    shape = IDS.shape
    return logits, {k: v.view(*shape, v.shape[-1]) for k, v in rec.items()}  # OPT flattens [batch*pos]


@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_view_reconstructs_the_ffn(models, name):
    model = models[name]
    _, rec = _forward(model)
    for lay in model.layers:
        x, m, y = rec[("x", lay.index)], rec[("m", lay.index)], rec[("y", lay.index)]
        assert m.shape == (*IDS.shape, model.d_mlp)
        torch.testing.assert_close(lay.coefficients(x), m, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lay.output(m), y, atol=1e-5, rtol=1e-5)
    assert (m > 0).any() and ((m == 0).any() if model.activation == "relu" else (m < 0).any())
    assert lay.W_in.shape == lay.W_gate.shape if lay.gated else lay.W_gate is None


@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_what_a_layer_writes_matches_the_model(models, name):
    model = models[name]
    _, rec = _forward(model)
    for lay in model.layers:
        m, y, post = rec[("m", lay.index)], rec[("y", lay.index)], rec[("post", lay.index)]
        if lay.post_norm_reads_residual:  # OPT post-LN: the norm of r + y is the new stream; r = the FFN input
            want = post
            got = lay.write(m, y, resid=rec[("x", lay.index)])
        else:
            _, ablated = _forward(model, zero_layer=lay.index)
            want = post - ablated[("post", lay.index)]
            got = lay.write(m, y)
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
        # the neurons' terms plus the rest add up to the write, neuron by neuron
        s = lay.norm_scale(y, rec[("x", lay.index)]) if lay.post_norm is not None else None
        w = lay.value_vectors_written()
        per_neuron = m[..., :, None].float() * w * (1.0 if s is None else s[..., None])  # [b, p, d_mlp, d_model]
        torch.testing.assert_close(per_neuron.sum(-2) + lay.written_rest(s, rec[("x", lay.index)]), got,
                                   atol=1e-4, rtol=1e-4)
        # a set of neurons and its complement, each with the token's own scale, add up to the neurons' part
        subset = torch.randperm(model.d_mlp, generator=torch.Generator().manual_seed(lay.index))[:model.d_mlp // 3]
        rest = torch.ones(model.d_mlp, dtype=torch.bool)
        rest[subset] = False
        r = rec[("x", lay.index)]
        part = lay.written_by(m, subset, y, r)
        torch.testing.assert_close(part + lay.written_by(m, rest, y, r), per_neuron.sum(-2), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(part, per_neuron[..., subset, :].sum(-2), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_logits_and_embeddings_through_the_adapter(models, name):
    model, ad = models[name], models[name].adapter
    logits, rec = _forward(model)
    h = rec[("post", model.n_layers - 1)]
    lin = ad.final_norm()(h) @ ad.W_U + (ad.b_U if ad.b_U is not None else 0)
    torch.testing.assert_close(ad.logit_transform(lin), logits, atol=1e-4, rtol=1e-4)
    assert ad.W_U.shape == (model.d_model, model.d_vocab) and ad.W_E.shape[1] == model.d_model
    if name not in ("gpt_bigcode", "opt_postln", "opt_proj"):  # these two add position embeddings to block 0's input
        torch.testing.assert_close(ad.embedding_scale * ad.W_E[IDS[0]], rec[("pre", 0)][0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_capture_leaves_logits_unchanged(models, name):
    model = models[name]
    plain, rec = _forward(model)
    with capture(model, what=("coef",), stop=False) as cap:
        hooked = model.hf(input_ids=IDS, use_cache=False).logits
    torch.testing.assert_close(hooked, plain, atol=0, rtol=0)
    for layer, m in cap.coef.items():
        torch.testing.assert_close(m, rec[("m", layer)], atol=0, rtol=0)


def test_model_level_scales_are_the_families():
    cases = {"granite": (1 / 8.0, None, 12.0), "cohere": (0.0625, None, 1.0), "gemma2": (1.0, 30.0, 32 ** 0.5),
             "qwen3": (1.0, None, 1.0)}
    for name, (scale, cap, emb) in cases.items():
        ad = kvmem.from_hf(make_tiny_new(name), None).adapter
        assert ad.logit_scale == pytest.approx(scale) and ad.logit_softcap == cap
        assert ad.embedding_scale == pytest.approx(emb)
    lay = kvmem.from_hf(make_tiny_new("granite"), None).layers[0]
    assert lay.write_scale == pytest.approx(0.22)


def test_phi3_split_follows_the_fused_chunk_order():
    model = kvmem.from_hf(make_tiny_new("phi3"), None)
    lay = model.layers[1]
    W = lay.in_module.weight  # [2·d_mlp, d_model]: gate rows first (transformers' Phi3MLP chunk order)
    torch.testing.assert_close(lay.W_gate, W[:model.d_mlp].T)
    torch.testing.assert_close(lay.W_in, W[model.d_mlp:].T)
    fused = torch.randn(2, 3, 2 * model.d_mlp)
    assert torch.equal(lay.gate_of(fused), fused[..., :model.d_mlp])
    assert torch.equal(lay.pre_of(fused), fused[..., model.d_mlp:])


@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_an_unknown_config_field_is_refused_by_name(name):
    config = NEW_FAMILY_CONFIGS[name]()
    config.kvmem_unknown_switch = 1
    hf = make_tiny_new(name)
    hf.config = config
    with pytest.raises(KvmemError, match="kvmem_unknown_switch"):
        kvmem.from_hf(hf, None)


@pytest.mark.parametrize("name, field, value", [
    ("gemma2", "hidden_activation", "silu"),
    ("granite", "logits_scaling", 0.0),
    ("falcon", "num_ln_in_parallel_attn", 3),
    ("qwen3", "hidden_act", "gelu"),
    ("opt_postln", "activation_function", "silu"),
    ("gemma3_text", "use_bidirectional_attention", True),
])
def test_an_unsupported_value_is_refused_by_name(name, field, value):
    hf = make_tiny_new(name)
    setattr(hf.config, field, value)
    with pytest.raises(KvmemError, match=f"config.{field}="):
        kvmem.from_hf(hf, None)


@pytest.mark.parametrize("name, changes", [
    ("starcoder2", {"use_bias": False}),
    ("gemma3_text", {"final_logit_softcapping": None}),
    ("falcon_new", {"num_ln_in_parallel_attn": 1}),
    ("opt_postln", {"enable_bias": False, "layer_norm_elementwise_affine": False}),
    ("granite", {"residual_multiplier": 1.0, "embedding_multiplier": 1.0}),
    # legacy keys that released checkpoints' config.json files carry (kept by transformers 5's configs)
    ("starcoder2", {"mlp_type": "default", "norm_type": "layer_norm"}),
    ("falcon", {"apply_residual_connection_post_layernorm": False}),
    ("gemma2", {"hidden_act": "gelu_pytorch_tanh", "cache_implementation": "hybrid"}),
    ("gemma3_text", {"sliding_window_pattern": 6}),
    ("gptj", {"rotary": True, "tokenizer_class": "GPT2Tokenizer"}),
    ("opt_postln", {"activation_dropout": 0.0, "prefix": "</s>"}),
])
def test_supported_variations_pass(name, changes):
    from transformers import AutoModelForCausalLM

    config = NEW_FAMILY_CONFIGS[name]()
    for k, v in changes.items():
        setattr(config, k, v)
    model = kvmem.from_hf(AutoModelForCausalLM.from_config(config).eval(), None)
    _, rec = _forward(model)
    lay = model.layers[-1]
    torch.testing.assert_close(lay.output(rec[("m", lay.index)]), rec[("y", lay.index)], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["gemma2", "olmo2", "granite", "qwen3"])
def test_value_logits_project_what_the_neuron_writes(models, name):
    """Behind a post-norm neuron i moves the stream along γ⊙v_i (times s > 0), so the vocabulary projection is
    of γ⊙v_i: checked against the model's own post-norm applied to one neuron's y = v_i (s cancels in the
    direction), and the LM head applied to it."""
    model = models[name]
    lay = model.layers[1]
    neurons = [(1, 0), (1, 5), (1, 47)]
    got = model.value_logits(neurons)
    for row, (_, i) in zip(got, neurons):
        v = lay.W_out[i]
        written = lay.post_norm(v) if lay.post_norm is not None else v * lay.write_scale  # HF's own module
        direct = model.hf.get_output_embeddings()(written)
        cos = torch.nn.functional.cosine_similarity(row, direct, dim=0)
        assert cos > 1 - 1e-5
        assert torch.equal(row.argsort(descending=True)[:5], direct.argsort(descending=True)[:5])
    norms = model.value_norms(1)
    want = got.new_tensor([lay.value_vectors_written()[i].norm() for _, i in neurons])
    torch.testing.assert_close(norms[[0, 5, 47]], want)


def test_info_states_placement_and_model_level_scales(models):
    info = models["gemma2"].info()
    assert info["norm_placement"] == "post-ffn" and info["logit_softcap"] == 30.0
    assert info["embedding_scale"] == pytest.approx(32 ** 0.5)
    info = models["granite"].info()
    assert info["write_scale"] == pytest.approx(0.22) and info["logit_scale"] == pytest.approx(1 / 8)
    assert models["opt_postln"].info()["norm_placement"] == "post-residual"
    assert models["falcon_seq"].info()["norm_placement"] == "pre"
    assert models["falcon"].info()["norm_placement"] == "parallel"


@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_a_saved_folder_loads_through_kvmem_load(name, tmp_path, tiny_tokenizer):
    """The user's path: config.json written by save_pretrained (with the keys transformers adds) passes the
    field check, and the loaded weights give the same coefficients as the in-memory model."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf = make_tiny_new(name)
    hf.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    model = kvmem.load(str(tmp_path), device="cpu", dtype="float32")
    assert model.hf.config.model_type == hf.config.model_type
    _, rec = _forward(kvmem.from_hf(hf, None))
    cap = kvmem.run_capture(model, IDS, stop=False)
    for layer, m in cap.coef.items():
        torch.testing.assert_close(m, rec[("m", layer)], atol=1e-6, rtol=1e-6)
