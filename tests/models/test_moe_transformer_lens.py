"""TransformerLens 4 (TransformerBridge over the same HF weights) agrees with kvmem's MoE view.

TL's bridge exposes, per MoE block, the router output (``mlp.gate.hook_out`` / ``mlp.router.hook_out``: the
router logits), the chosen experts (``mlp.hook_expert_indices``, not in its DeepSeek-V3 bridge), the shared
experts' activation (``mlp.shared_expert(s).hook_post``) and the block output (``mlp.hook_out``); it has no per-expert
activation (transformers fuses the routed experts into 3-D weights), so kvmem's routed m is checked against
the brute force in test_moe.py instead. Eager vs sdpa attention: agreement to ~1e-5, not bit for bit.
"""

import pytest
import torch

import kvmem
from kvmem.hooks import hooks, record, routing
from tests.moe_helpers import MOE_FAMILIES, make_tiny_moe, moe_blocks

IDS = torch.tensor([[3, 17, 250, 9, 41, 77, 120, 5]])


@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_transformer_lens_routing_and_shared_experts_equal_kvmem(name, tmp_path, tiny_tokenizer):
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tl_copy = make_tiny_moe(name)
    tl_copy.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    bridge = TransformerBridge.boot_transformers(str(tmp_path), hf_model=tl_copy,
                                                 tokenizer=AutoTokenizer.from_pretrained(tmp_path))
    with torch.no_grad():
        _, cache = bridge.run_with_cache(IDS)
    model = kvmem.from_hf(make_tiny_moe(name), None)
    layers = list(moe_blocks(model.hf))
    seen = {}
    with torch.no_grad(), hooks(model, record([(p, i) for i in layers
                                               for p in ("ffn.x", "moe.router", "moe.expert.coef", "ffn.out")], seen)):
        model.hf(input_ids=IDS, use_cache=False)
    router = "router" if name == "gpt_oss" else "gate"
    for i in layers:
        lay = model.layers[i]
        logits = seen[("moe.router", i)][0]
        tl_logits = cache[f"blocks.{i}.mlp.{router}.hook_out"].reshape(logits.shape)
        torch.testing.assert_close(tl_logits.float(), logits.float(), atol=1e-4, rtol=1e-4)
        idx, _ = routing(model, i, seen[("moe.router", i)], seen[("ffn.x", i)])
        key = f"blocks.{i}.mlp.hook_expert_indices"  # TL's DeepSeek-V3 bridge has no such hook
        assert (key in cache) == (name != "deepseek_v3")
        if key in cache:
            assert torch.equal(cache[key].reshape(idx.shape[1:]).sort(-1).values, idx[0].sort(-1).values)
        torch.testing.assert_close(cache[f"blocks.{i}.mlp.hook_out"], seen[("ffn.out", i)], atol=1e-4, rtol=1e-4)
        shared = [k for k in (f"blocks.{i}.mlp.shared_expert.hook_post", f"blocks.{i}.mlp.shared_experts.hook_post")
                  if k in cache]
        assert bool(shared) == (lay.layout.n_shared > 0)
        for k in shared:
            mine = seen[("moe.expert.coef", i)][..., lay.layout.d_routed:]
            torch.testing.assert_close(cache[k].reshape(mine.shape), mine,
                                       atol=1e-4, rtol=1e-4)
