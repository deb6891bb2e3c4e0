"""Capture against TransformerLens 4 (an independent implementation), early stop, hook clean-up."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import kvmem
from kvmem.capture import capture
from kvmem.errors import KvmemError
from tests.conftest import FAMILIES

TEXT = "Built-in functions: abs(x) returns the absolute value of a number."


def _hook_count(model):
    mods = [m for lay in model.layers for m in (lay.in_module, lay.gate_module, lay.out_module, lay.ffn_module) if m]
    mods.append(model.adapter.embed())
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in mods)


@pytest.mark.parametrize("family, tl_name", [("gpt2", "gpt2"), ("llama", "llama")])
def test_coefficients_equal_transformerlens_hook_post(tiny_dirs, family, tl_name):
    from transformer_lens.model_bridge import TransformerBridge

    model = kvmem.load(str(tiny_dirs[family]), device="cpu")
    other = AutoModelForCausalLM.from_pretrained(tiny_dirs[family]).eval()  # a separate copy for TL
    bridge = TransformerBridge.boot_transformers(tl_name, hf_model=other, tokenizer=model.tokenizer)
    ids = torch.cat([model.encode(TEXT), model.encode(TEXT[::-1])[:, : model.encode(TEXT).shape[1]]])
    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids, names_filter=lambda name: name.endswith("mlp.hook_post"))
    cap = kvmem.run_capture(model, ids)
    for layer in range(model.n_layers):
        expected = cache[f"blocks.{layer}.mlp.hook_post"]
        assert expected.shape == cap.coef[layer].shape == (2, ids.shape[1], model.d_mlp)
        # TL runs its own attention path: float32 rounding differs by ~1e-5 on these scaled-up weights
        torch.testing.assert_close(cap.coef[layer], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_stop_after_layer_k_matches_full_pass_and_skips_the_rest(tiny_models, family):
    model = tiny_models[family]
    ids = model.encode(TEXT)
    full = kvmem.run_capture(model, ids, what=("coef", "pre") + (("gate",) if model.gated else ()), stop=False)
    head_calls = []
    handle = model.hf.get_output_embeddings().register_forward_hook(lambda *a: head_calls.append(1))
    try:
        for k in range(model.n_layers):
            part = kvmem.run_capture(model, ids, layers=range(k + 1), what=full.what, stop=True)
            assert part.stopped and sorted(part.coef) == list(range(k + 1))
            for kind in full.what:
                for layer in range(k + 1):
                    assert torch.equal(part[kind][layer], full[kind][layer])
    finally:
        handle.remove()
    assert head_calls == []  # the LM head never ran


def test_gate_and_pre_give_the_coefficients(tiny_models):
    model = tiny_models["llama"]
    cap = kvmem.run_capture(model, model.encode(TEXT), what=("coef", "gate", "pre"))
    for layer in cap.layers:
        recon = torch.nn.functional.silu(cap["gate"][layer]) * cap["pre"][layer]
        torch.testing.assert_close(recon, cap.coef[layer], atol=1e-6, rtol=1e-6)


def test_hooks_removed_on_exit_and_on_error(tiny_models):
    model = tiny_models["gpt2"]
    before = _hook_count(model)
    with capture(model, what=("coef", "x", "out")):
        assert _hook_count(model) > before
    assert _hook_count(model) == before
    with pytest.raises(ValueError):
        with capture(model, what=("coef",)):
            raise ValueError("boom")
    assert _hook_count(model) == before


def test_on_layer_streams_instead_of_storing(tiny_models):
    model = tiny_models["qwen2"]
    seen = {}
    with torch.inference_mode(), capture(model, layers=[0, 2], what=("coef", "gate"), stop=True,
                                         on_layer=lambda layer, t: seen.setdefault(layer, t)) as cap:
        model.hf(input_ids=model.encode(TEXT))
    assert sorted(seen) == [0, 2] and cap.coef == {}
    full = kvmem.run_capture(model, model.encode(TEXT), what=("coef",))
    assert torch.equal(seen[2]["coef"], full.coef[2])


def test_bad_requests(tiny_models):
    model = tiny_models["gpt2"]
    with pytest.raises(KvmemError, match="out of range"):
        kvmem.run_capture(model, model.encode(TEXT), layers=[5])
    with pytest.raises(KvmemError, match="not gated"):
        kvmem.run_capture(model, model.encode(TEXT), what=("gate",))
    with pytest.raises(KvmemError, match="unknown capture kind"):
        kvmem.run_capture(model, model.encode(TEXT), what=("keys",))
