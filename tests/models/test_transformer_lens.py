"""TransformerLens 4 (TransformerBridge over the same HF weights) agrees with kvmem's coefficients.

TransformerBridge.boot_transformers wraps the HF modules it is given in place, so it gets one copy of a
tiny random model and kvmem an identical second copy (same seed). Its ``blocks.{l}.mlp.hook_post`` is the
input of the down projection, kvmem's m. TL runs eager attention, kvmem the model's default (sdpa): the
two agree to ~1e-5, not bit for bit. Families: gated, fused gated (phi3), post-norm (gemma2, gemma3,
olmo2), multipliers (granite), parallel (gptj, cohere, falcon) and GELU with biases (starcoder2).
"""

import pytest
import torch

import kvmem
from kvmem.capture import run_capture
from tests.conftest import make_tiny_new

TL_FAMILIES = ["qwen3", "phi3", "gemma2", "gemma3_text", "olmo2", "granite", "gptj", "cohere", "falcon", "starcoder2"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("tl_tok")
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("name", TL_FAMILIES)
def test_transformer_lens_hook_post_equals_kvmem_coefficients(name, tmp_path, tokenizer_dir):
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tl_copy = make_tiny_new(name)
    tl_copy.save_pretrained(tmp_path)  # TL reads the config by name; the weights are the ones passed
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.save_pretrained(tmp_path)
    bridge = TransformerBridge.boot_transformers(str(tmp_path), hf_model=tl_copy,
                                                 tokenizer=AutoTokenizer.from_pretrained(tmp_path))
    ids = torch.tensor([[3, 17, 250, 9, 41, 77, 120, 5, 300, 64]])
    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids)
    model = kvmem.from_hf(make_tiny_new(name), tok)
    cap = run_capture(model, ids, stop=False)
    for layer in range(model.n_layers):
        torch.testing.assert_close(cache[f"blocks.{layer}.mlp.hook_post"], cap.coef[layer], atol=1e-4, rtol=1e-4)
