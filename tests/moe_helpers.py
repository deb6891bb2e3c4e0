"""Tiny random MoE models of every MoE family (no download), and a brute force of their blocks.

The brute force reads the HF modules' own weights and loops over tokens and their chosen experts in plain
per-token arithmetic, re-deriving each family's routing from its modeling code: independent of kvmem's
MoELayer (no shared code path).
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

VOCAB, D, H, L = 384, 32, 4, 3
E, K, I = 4, 2, 16  # experts, top_k, expert width


def _configs():
    import transformers as T

    common = dict(num_hidden_layers=L, hidden_size=D, num_attention_heads=H, num_key_value_heads=2,
                  vocab_size=VOCAB, max_position_embeddings=128, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return {
        "mixtral": lambda: T.MixtralConfig(**common, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K),
        "qwen2_moe": lambda: T.Qwen2MoeConfig(**common, intermediate_size=40, moe_intermediate_size=I, num_experts=E,
                                              num_experts_per_tok=K, shared_expert_intermediate_size=24,
                                              norm_topk_prob=False, mlp_only_layers=[1]),
        "qwen3_moe": lambda: T.Qwen3MoeConfig(**common, intermediate_size=40, moe_intermediate_size=I,
                                              num_local_experts=E, num_experts_per_tok=K, norm_topk_prob=True,
                                              head_dim=8),
        "olmoe": lambda: T.OlmoeConfig(**common, intermediate_size=I, num_experts=E, num_experts_per_tok=K),
        "deepseek_v3": lambda: T.DeepseekV3Config(**(common | {"num_key_value_heads": H}), intermediate_size=40, moe_intermediate_size=I,
                                                  n_routed_experts=E, n_shared_experts=2, num_experts_per_tok=K,
                                                  n_group=2, topk_group=1, first_k_dense_replace=1,
                                                  routed_scaling_factor=2.5, norm_topk_prob=True, kv_lora_rank=8,
                                                  q_lora_rank=16, qk_rope_head_dim=4, v_head_dim=8,
                                                  qk_nope_head_dim=4),
        "gpt_oss": lambda: T.GptOssConfig(**common, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K,
                                          head_dim=8, sliding_window=8, swiglu_limit=1.5,
                                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    }


MOE_CONFIGS = _configs()
MOE_FAMILIES = list(MOE_CONFIGS)


def make_tiny_moe(name: str, seed: int = 0):
    """A random-init HF causal LM of an MoE family (float32, eval mode); weights scaled up, biases, norm
    gains and DeepSeek's e_score_correction_bias randomized so no convention hides behind zeros or ones."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(MOE_CONFIGS[name]())
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
            elif "norm" in pname:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.1)
        for bname, b in model.named_buffers():
            if bname.endswith("e_score_correction_bias"):
                b.normal_(0, 0.2)
    return model.eval()


def moe_blocks(model) -> dict[int, torch.nn.Module]:
    """layer -> its sparse-MoE module (dense layers left out)."""
    return {i: blk.mlp for i, blk in enumerate(model.model.layers) if hasattr(blk.mlp, "experts")}


def brute_route(name: str, block, x: torch.Tensor, mask: int | None = None) -> tuple[list[int], list[float]]:
    """One token x [d_model]: (chosen experts, their weights) by the family's rule, re-derived in plain code.
    ``mask``: an expert removed from the choice (whole-expert ablation)."""
    cfg = block.experts.config if hasattr(block.experts, "config") else None
    router = block.router if name == "gpt_oss" else block.gate
    logits = [float(router.weight[e].double() @ x.double()) + (float(router.bias[e]) if name == "gpt_oss" else 0.0)
              for e in range(router.weight.shape[0])]
    n = len(logits)
    allowed = [e for e in range(n) if e != mask]
    if name == "gpt_oss":
        top = sorted(allowed, key=lambda e: -logits[e])[:K]
        z = [torch.tensor(logits[e]).exp().item() for e in top]
        return top, [v / sum(z) for v in z]
    if name == "deepseek_v3":
        s = {e: 1 / (1 + torch.tensor(-logits[e]).exp().item()) for e in range(n)}
        ch = {e: s[e] + float(router.e_score_correction_bias[e]) for e in allowed}
        g = cfg.n_group
        size = n // g
        gscore = {gi: sum(sorted([ch.get(e, float("-inf")) for e in range(gi * size, (gi + 1) * size)])[-2:])
                  for gi in range(g)}
        groups = sorted(gscore, key=lambda gi: -gscore[gi])[:cfg.topk_group]
        cand = [e for e in allowed if e // size in groups]
        top = sorted(cand, key=lambda e: -ch[e])[:K]
        w = [s[e] for e in top]
        if cfg.norm_topk_prob:
            w = [v / (sum(w) + 1e-20) for v in w]
        return top, [v * cfg.routed_scaling_factor for v in w]
    z = {e: torch.tensor(logits[e]).exp().item() for e in allowed}
    tot = sum(torch.tensor(v).exp().item() for v in logits) if mask is None else None
    probs = {e: z[e] / (tot if tot is not None else sum(z.values())) for e in allowed}
    if mask is not None:  # softmax with the masked logit at -inf: the others renormalised among themselves
        probs = {e: z[e] / sum(z.values()) for e in allowed}
    top = sorted(allowed, key=lambda e: -probs[e])[:K]
    w = [probs[e] for e in top]
    norm = True if name == "mixtral" else cfg.norm_topk_prob
    if norm:
        w = [v / sum(w) for v in w]
    return top, w


def brute_expert(name: str, block, e: int, x: torch.Tensor) -> torch.Tensor:
    """Raw m [I] of routed expert e on one token x [d_model], from the experts' 3-D weights."""
    ex = block.experts
    x = x.double()
    if name == "gpt_oss":
        gu = x @ ex.gate_up_proj[e].double() + ex.gate_up_proj_bias[e].double()
        g, u = gu[0::2], gu[1::2]
        lim, alpha = ex.limit, ex.alpha
        g = g.clamp(max=lim)
        u = u.clamp(-lim, lim)
        return (u + 1) * g * torch.sigmoid(alpha * g)
    W = ex.gate_up_proj[e].double()  # [2I, d_model]: gate rows first
    i = W.shape[0] // 2
    g, u = W[:i] @ x, W[i:] @ x
    return torch.nn.functional.silu(g) * u


def brute_down(name: str, block, e: int, m: torch.Tensor) -> torch.Tensor:
    ex = block.experts
    if name == "gpt_oss":
        return m @ ex.down_proj[e].double() + ex.down_proj_bias[e].double()
    return ex.down_proj[e].double() @ m  # [d_model, I] @ [I]


def brute_shared(name: str, block, x: torch.Tensor):
    """(m [d_shared·n_shared], weight, output [d_model]) of the shared experts on one token, or None."""
    mlp = getattr(block, "shared_expert", None) or getattr(block, "shared_experts", None)
    if mlp is None:
        return None
    x = x.double()
    m = torch.nn.functional.silu(mlp.gate_proj.weight.double() @ x) * (mlp.up_proj.weight.double() @ x)
    w = 1.0
    if name == "qwen2_moe":
        w = torch.sigmoid(block.shared_expert_gate.weight.double() @ x).item()
    return m, w, mlp.down_proj.weight.double() @ m


def brute_block(name: str, block, x: torch.Tensor, mask: int | None = None) -> torch.Tensor:
    """The block's output on one token x [d_model] (float64), by the brute force."""
    top, w = brute_route(name, block, x, mask)
    y = torch.zeros(x.shape[-1], dtype=torch.float64)
    for e, we in zip(top, w):
        y += we * brute_down(name, block, e, brute_expert(name, block, e, x))
    sh = brute_shared(name, block, x)
    if sh is not None:
        y += sh[1] * sh[2]
    return y
