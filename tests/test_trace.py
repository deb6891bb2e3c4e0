"""``trace``: residual stream, logit lens and direct logit attribution against HF's own computation."""

import pytest
import torch

from kvmem.errors import KvmemError
from kvmem.intervene import intervene
from kvmem.trace import frozen_norm, lens_logits, run_residuals, trace
from tests.conftest import FAMILIES
from tests.test_vocab import raw_final_norm, raw_value

PROMPT = "Return the value of the named attribute"


def hook_snapshot(hf) -> dict:
    """Every hook on every module (HF installs some of its own, e.g. to record hidden states)."""
    return {name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for name, m in hf.named_modules()}


@pytest.mark.parametrize("family", FAMILIES)
def test_residuals_and_lens_match_hf(tiny_models, family):
    model = tiny_models[family]
    ids = model.encode(PROMPT)
    pos = ids.shape[1] - 2
    hooks = hook_snapshot(model.hf)
    logits, coef, ffn_out, after = run_residuals(model, ids, pos)
    assert hook_snapshot(model.hf) == hooks  # none of ours left behind
    with torch.no_grad():
        out = model.hf(input_ids=ids, output_hidden_states=True, use_cache=False)
    # the block outputs are HF's hidden states (the last one HF may return after the final norm)
    for layer in range(model.n_layers - 1):
        torch.testing.assert_close(after[layer], out.hidden_states[layer + 1][0, pos], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, out.logits[0, pos].float())
    # the logit lens after the last block is the model's own prediction
    torch.testing.assert_close(lens_logits(model, after[-1]), out.logits[0, pos].float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_norm_is_the_linearised_final_norm(tiny_models, family):
    model = tiny_models[family]
    torch.manual_seed(1)
    h, a, b = torch.randn(3, model.d_model) * 3
    f = frozen_norm(model, h)
    norm = raw_final_norm(model.hf, family)
    with torch.no_grad():
        beta = norm.bias if isinstance(norm, torch.nn.LayerNorm) else torch.zeros(model.d_model)
        torch.testing.assert_close(f(h) + beta, norm(h), atol=1e-5, rtol=1e-5)  # exact at h
        torch.testing.assert_close(f(a + b), f(a) + f(b), atol=1e-5, rtol=1e-5)  # linear
        torch.testing.assert_close(f(2 * a), 2 * f(a), atol=1e-5, rtol=1e-5)
        # the explicit formula for each norm type
        if isinstance(norm, torch.nn.LayerNorm):
            expected = norm.weight * (a - a.mean()) / (h.var(correction=0) + norm.eps).sqrt()
        else:
            eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
            w = (1 + norm.weight) if family == "gemma" else norm.weight
            expected = w * a / (h.pow(2).mean() + eps).sqrt()
        torch.testing.assert_close(f(a), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_neuron_dla_sums_to_ffn_dla(tiny_models, family):
    """Per layer, the DLAs of all neurons plus the output bias's equal the FFN output's DLA."""
    model = tiny_models[family]
    res = trace(model, PROMPT, per_layer=model.d_mlp, n_neurons=6)
    ids = model.encode(PROMPT)
    _, coef, ffn_out, after = run_residuals(model, ids, res.position)
    f = frozen_norm(model, after[-1])
    u = model.hf.get_output_embeddings().weight[res.target_id].float()  # W_U[:, t] from HF's head
    for row in res.layers.itertuples():
        b_out = model.layers[row.layer].b_out
        bias_dla = 0.0 if b_out is None else (f(b_out) @ u).item()
        assert sum(row.neuron_dla) + bias_dla == pytest.approx(row.ffn_dla, abs=1e-3)
        assert row.ffn_dla == pytest.approx((f(ffn_out[row.layer]) @ u).item(), abs=1e-4)
    # the overall neuron table: m_i · f(v_i)·u with v_i from HF's storage, sorted
    for n in res.neurons.itertuples():
        v = raw_value(model.hf, family, n.layer, n.neuron).float()
        assert n.coef == pytest.approx(coef[n.layer, n.neuron].item(), abs=1e-5)
        assert n.dla == pytest.approx(n.coef * (f(v) @ u).item(), abs=1e-4)
    assert res.neurons.dla.tolist() == sorted(res.neurons.dla.tolist(), reverse=True)


def test_trace_lens_columns_and_first_top(tiny_models):
    model = tiny_models["llama"]
    res = trace(model, PROMPT, top_n=5)
    assert res.prediction.token[0] == res.target and res.prediction.id[0] == res.target_id
    last = res.layers.iloc[-1]
    assert last.target_rank_after == 1 and last.after_tokens[0] == res.target
    ranks = [r for row in res.layers.itertuples() for r in (row.target_rank_before, row.target_rank_after)]
    first = next(i for i, r in enumerate(ranks) if r <= 5)
    assert res.first_top == {"layer": first // 2, "after": "attention" if first % 2 == 0 else "ffn"}
    stays = min(i for i in range(len(ranks)) if all(r <= 5 for r in ranks[i:]))
    assert res.stays_top == {"layer": stays // 2, "after": "attention" if stays % 2 == 0 else "ffn"}
    # a chosen target, and the lens before/after from HF's hidden states
    other = trace(model, PROMPT, target=" the")
    assert other.target == " the"
    with pytest.raises(KvmemError):
        trace(model, PROMPT, target="Return the value")  # several tokens
    with pytest.raises(KvmemError):
        trace(model, PROMPT, position=99)
    with pytest.raises(KvmemError):
        trace(model, "")


@pytest.mark.slow
def test_smollm2_trace_paris_and_ablation(smollm):
    prompt = "The capital of France is"
    res = trace(smollm, prompt, top_n=5, n_neurons=10)
    assert res.target == " Paris" and res.prediction.token[0] == " Paris"
    # where ' Paris' enters the top 5, checked with HF's own hidden states, norm and head
    ids = smollm.encode(prompt)
    with torch.no_grad():
        hs = smollm.hf(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        lens = [smollm.hf.lm_head(smollm.hf.model.norm(h[0, -1])) for h in hs[1:-1]]
    in_top5 = [res.target_id in row.topk(5).indices.tolist() for row in lens] + [True]
    first_block = in_top5.index(True)
    assert res.first_top is not None
    if res.first_top["after"] == "ffn":
        assert res.first_top["layer"] == first_block
    else:  # entered after attention, before the FFN of that layer
        assert res.first_top["layer"] <= first_block
    assert not any(in_top5[: res.first_top["layer"]])
    # silencing the top contributors found by trace lowers P(' Paris') (measured, not assumed)
    top = res.neurons.id.tolist()
    before = intervene(smollm, prompt, ablate=[])
    after = intervene(smollm, prompt, ablate=top)
    assert after.prob_before == pytest.approx(before.prob_after)
    assert after.prob_after < 0.5 * after.prob_before
    assert after.logit_after < after.logit_before


def _zero_ffn_stream(name, hf, layer, ids, pos):
    """resid.post of ``layer`` with its FFN output replaced by zeros, from HF's own modules (raw hooks)."""
    block = hf.model.layers[layer]
    mlp = block.mlp
    out = {}
    h1 = mlp.register_forward_hook(lambda m, a, o: torch.zeros_like(o))
    h2 = block.register_forward_hook(lambda m, a, o: out.__setitem__("post", o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            hf(input_ids=ids, use_cache=False)
    finally:
        h1.remove()
        h2.remove()
    return out["post"][0, pos]


@pytest.mark.parametrize("name", ["granite", "gemma2", "olmo2", "cohere"])
def test_post_norm_and_scaled_families(tiny_tokenizer, name):
    """The stream before each FFN is the block output with the FFN silenced (a post-FFN RMSNorm maps 0 to 0);
    the lens after the last block is the model's own logits (soft-capping, logit scales); neuron DLAs plus the
    layer's other terms sum to the FFN's DLA; Gemma 2's neuron DLA by hand: m_i·f((1 + w)⊙v_i)/rms(y)·u."""
    from kvmem.models.kvmodel import from_hf
    from kvmem.trace import layer_writes
    from tests.conftest import make_tiny_new

    model = from_hf(make_tiny_new(name), tiny_tokenizer)
    ids = model.encode(PROMPT)
    pos = ids.shape[1] - 1
    logits, coef, ffn_out, after, x = run_residuals(model, ids, pos, with_input=True)
    before, delta, scale = layer_writes(model, coef, ffn_out, after, x)
    for layer in range(model.n_layers):
        torch.testing.assert_close(before[layer], _zero_ffn_stream(name, model.hf, layer, ids, pos), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lens_logits(model, after[-1]), logits, atol=1e-4, rtol=1e-4)
    res = trace(model, PROMPT, per_layer=model.d_mlp, n_neurons=4)
    f = frozen_norm(model, after[-1])
    u = model.hf.get_output_embeddings().weight[res.target_id].float()
    for row in res.layers.itertuples():
        lay = model.layers[row.layer]
        rest = (f(lay.written_rest(scale[row.layer])) @ u).item()
        assert sum(row.neuron_dla) + rest == pytest.approx(row.ffn_dla, abs=1e-3)
    if name == "gemma2":
        for n in res.neurons.itertuples():
            block = model.hf.model.layers[n.layer]
            y = ffn_out[n.layer]
            v = block.mlp.down_proj.weight[:, n.neuron] * (1 + block.post_feedforward_layernorm.weight)
            s = 1 / torch.sqrt(y.pow(2).mean() + block.post_feedforward_layernorm.eps)
            assert n.dla == pytest.approx(n.coef * s.item() * (f(v) @ u).item(), abs=1e-4)


def _new_families():
    from tests.conftest import NEW_FAMILIES

    return NEW_FAMILIES


@pytest.mark.parametrize("name", _new_families())
def test_lens_after_the_last_block_is_the_model_logits_for_every_new_family(tiny_tokenizer, name):
    """Soft-capping, logit scales, OPT's project_out and missing final norm: the lens reads what the model reads;
    and trace runs (its per-layer neuron DLAs add up to the FFN's DLA up to the layer's other terms)."""
    from kvmem.models.kvmodel import from_hf
    from tests.conftest import make_tiny_new

    model = from_hf(make_tiny_new(name), tiny_tokenizer)
    ids = model.encode(PROMPT)
    logits, _, _, after = run_residuals(model, ids, ids.shape[1] - 1)
    torch.testing.assert_close(lens_logits(model, after[-1]), logits, atol=1e-4, rtol=1e-4)
    res = trace(model, PROMPT, n_neurons=3)
    assert len(res.layers) == model.n_layers and len(res.neurons) == 3
