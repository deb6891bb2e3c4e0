"""Every family's uniform view against the HF modules' own computation."""

import pytest
import torch
from transformers import AutoModelForCausalLM, BloomConfig, LlamaConfig, OPTConfig

import kvmem
from kvmem.errors import KvmemError
from tests.conftest import FAMILIES

TEXT = "Return the value of the named attribute of object; name must be a string."


@pytest.mark.parametrize("family", FAMILIES)
def test_coefficients_reconstruct_ffn_output(tiny_models, family):
    model = tiny_models[family]
    ids = model.encode(TEXT)
    cap = kvmem.run_capture(model, ids, what=("x", "coef", "out"), stop=False)
    for lay in model.layers:
        x, m, out = cap["x"][lay.index], cap.coef[lay.index], cap["out"][lay.index]
        assert m.shape == (1, ids.shape[1], model.d_mlp)
        # The FFN module's own output equals m·W_out + b_out from the adapter's weights ...
        torch.testing.assert_close(lay.output(m), out, atol=1e-5, rtol=1e-5)
        # ... and W_in / W_gate / act reproduce m from the FFN input.
        torch.testing.assert_close(lay.coefficients(x), m, atol=1e-5, rtol=1e-5)
    # the tiny models exercise both signs (ReLU: zeros instead of negatives)
    assert (m > 0).any() and ((m == 0).any() if model.activation == "relu" else (m < 0).any())


@pytest.mark.parametrize("family", FAMILIES)
def test_orientation_and_shapes(tiny_models, family):
    model = tiny_models[family]
    lay = model.layers[0]
    assert lay.W_in.shape == (model.d_model, model.d_mlp)
    assert lay.W_out.shape == (model.d_mlp, model.d_model)
    assert (lay.W_gate is not None) == model.gated == (family in ("llama", "mistral", "qwen2", "gemma"))
    if model.gated:
        assert lay.W_gate.shape == (model.d_model, model.d_mlp)
    assert model.W_U.shape == (model.d_model, model.d_vocab)
    # final_norm is the module feeding the LM head and W_U is the LM head: norm_out·W_U (+ b) == logits.
    seen = []
    handle = model.final_norm.register_forward_hook(lambda mod, a, out: seen.append(out))
    try:
        with torch.inference_mode():
            logits = model.hf(input_ids=model.encode(TEXT)).logits
    finally:
        handle.remove()
    assert len(seen) == 1
    bias = model.adapter.b_U if model.adapter.b_U is not None else 0
    torch.testing.assert_close(seen[0] @ model.W_U + bias, logits, atol=1e-4, rtol=1e-4)


def test_unknown_architecture_is_refused():
    tiny = AutoModelForCausalLM.from_config(BloomConfig(n_layer=1, hidden_size=16, n_head=2, vocab_size=50))
    with pytest.raises(KvmemError, match="unsupported architecture 'bloom'; supported: .*gpt2.*llama"):
        kvmem.from_hf(tiny, None)


@pytest.mark.parametrize("config, field", [
    (LlamaConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=24, num_attention_heads=2,
                 vocab_size=50, hidden_act="gelu"), "hidden_act"),
    (OPTConfig(num_hidden_layers=1, hidden_size=16, ffn_dim=24, num_attention_heads=2, vocab_size=50,
               activation_function="silu"), "activation_function"),
    # OPT's word_embed_proj_dim != hidden_size and post-LN (do_layer_norm_before=False) are supported now:
    # tests/models/test_families.py checks them; a setting the adapter does not know is refused by name.
    (OPTConfig(num_hidden_layers=1, hidden_size=16, ffn_dim=24, num_attention_heads=2, vocab_size=50,
               some_new_switch=True), "some_new_switch"),
])
def test_configs_the_adapter_does_not_understand_are_refused(config, field):
    with pytest.raises(KvmemError, match=field):
        kvmem.from_hf(AutoModelForCausalLM.from_config(config), None)


def test_info_counts_ffn_parameters(tiny_models):
    model = tiny_models["llama"]
    info = model.info()
    per_layer = 3 * model.d_model * model.d_mlp  # gate, up, down; no biases
    assert info["ffn_params"] == model.n_layers * per_layer
    assert info["n_layers"] == 3 and info["d_mlp"] == 48 and info["gated"] is True


def test_a_known_unrepresentable_family_is_refused_with_its_reason():
    from transformers import GraniteMoeConfig

    tiny = AutoModelForCausalLM.from_config(GraniteMoeConfig(num_hidden_layers=1, hidden_size=16, intermediate_size=24,
                                                             num_attention_heads=2, num_key_value_heads=1,
                                                             num_local_experts=2, vocab_size=50))
    with pytest.raises(KvmemError, match="unsupported architecture 'granitemoe': .*mixtures of experts"):
        kvmem.from_hf(tiny, None)
