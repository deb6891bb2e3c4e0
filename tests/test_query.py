"""``query`` against brute force from the HF modules themselves: contributions |m_i|·‖what neuron i writes‖
(raw weights, Granite's residual multiplier, Gemma 2's post-FFN RMSNorm, OPT's post-residual LayerNorm) and
the tokens each selected sub-update promotes."""

import pytest
import torch

from kvmem.models.kvmodel import from_hf
from kvmem.query import contributions, forward_coefficients, query
from tests.conftest import make_tiny_new

PROMPT = "Return the value of the named attribute"


def hf_parts(name, hf, layer):
    """(mlp-like module whose input is x / output is y, down projection Linear, post-norm or None)."""
    if name == "opt_postln":
        block = hf.model.decoder.layers[layer]
        return block.fc1, block.fc2, block.final_layer_norm
    block = hf.model.layers[layer]
    return block.mlp, block.mlp.down_proj, getattr(block, "post_feedforward_layernorm", None)


def brute_force(name, model, ids, pos):
    """Per layer [d_mlp]: the norm of each neuron's sub-update at ``pos``, from raw HF modules and by hand."""
    hf, rec, handles = model.hf, {}, []
    for layer in range(model.n_layers):
        first, down, _ = hf_parts(name, hf, layer)
        handles.append(first.register_forward_pre_hook(lambda m, a, i=layer: rec.__setitem__(("x", i), a[0])))
        handles.append(down.register_forward_pre_hook(lambda m, a, i=layer: rec.__setitem__(("m", i), a[0])))
        handles.append(down.register_forward_hook(lambda m, a, o, i=layer: rec.__setitem__(("y", i), o)))
    try:
        with torch.no_grad():
            hf(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    out = []
    for layer in range(model.n_layers):
        _, down, norm = hf_parts(name, hf, layer)
        shape = ids.shape
        m = rec[("m", layer)].reshape(*shape, -1)[0, pos]
        y = rec[("y", layer)].reshape(*shape, -1)[0, pos]
        V = down.weight.T.detach()  # [d_mlp, d_model], row i = v_i
        if name == "granite":
            W = V * hf.config.residual_multiplier
        elif name == "gemma2":  # RMSNorm(y) = y / sqrt(mean(y²) + eps) · (1 + w): linear in y once y's rms is fixed
            W = V * (1 + norm.weight) / torch.sqrt(y.pow(2).mean() + norm.eps)
        elif name == "opt_postln":  # LayerNorm(r + y) = γ ⊙ (z − mean z) / σ(z) + β, z = r + y, r the FFN input
            z = y + rec[("x", layer)].reshape(*shape, -1)[0, pos]
            W = (V - V.mean(1, keepdim=True)) * norm.weight / torch.sqrt(z.var(unbiased=False) + norm.eps)
        else:
            W = V
        out.append((m[:, None] * W).norm(dim=1))
    return torch.stack(out), rec


@pytest.mark.parametrize("name", ["qwen3", "granite", "gemma2", "opt_postln"])
def test_contributions_equal_the_written_sub_updates(tiny_tokenizer, name):
    model = from_hf(make_tiny_new(name), tiny_tokenizer)
    ids = model.encode(PROMPT)
    pos = ids.shape[1] - 1
    expected, _ = brute_force(name, model, ids, pos)
    layers = list(range(model.n_layers))
    _, m, s = forward_coefficients(model, ids, layers, with_scale=True)
    torch.testing.assert_close(contributions(model, m, layers, s)[pos], expected, atol=1e-5, rtol=1e-4)
    res = query(model, PROMPT, top=6, n_tokens=3)
    flat = expected.flatten().topk(6)
    assert res.neurons["id"].tolist() == [f"{i // model.d_mlp}.{i % model.d_mlp}" for i in flat.indices.tolist()]
    torch.testing.assert_close(torch.tensor(res.neurons["contribution"].tolist()), flat.values, atol=1e-5, rtol=1e-4)


def test_promoted_tokens_of_a_post_norm_neuron(tiny_tokenizer):
    """Gemma 2: the tokens sign(m_i)·(1 + w)⊙v_i promotes through the LM head (float32)."""
    model = from_hf(make_tiny_new("gemma2"), tiny_tokenizer)
    res = query(model, PROMPT, top=3, n_tokens=4)
    for row in res.neurons.itertuples():
        _, down, norm = hf_parts("gemma2", model.hf, row.layer)
        v = down.weight[:, row.neuron].detach() * (1 + norm.weight.detach()) * (1 if row.activation >= 0 else -1)
        logits = model.hf.lm_head.weight.detach() @ v
        assert row.top_tokens == model.token_strings(logits.topk(4).indices)


def test_contributions_refuse_post_norm_layers_without_scales(tiny_tokenizer):
    from kvmem.errors import KvmemError

    model = from_hf(make_tiny_new("gemma2"), tiny_tokenizer)
    _, m = forward_coefficients(model, model.encode(PROMPT), [0])
    with pytest.raises(KvmemError, match="post-FFN norm"):
        contributions(model, m, [0])
