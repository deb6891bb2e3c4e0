"""DeepSeek-V3: leading dense layers, then MoE blocks of routed plus shared SwiGLU experts.

Routing (DeepseekV3TopkRouter, float32): scores = sigmoid(x·W_router); experts are chosen by scores +
e_score_correction_bias within the ``topk_group`` best of ``n_group`` groups (a group's score: the sum of its
two best choice scores); the weights are the chosen experts' plain scores, renormalised when
``norm_topk_prob``, times ``routed_scaling_factor``. The shared experts are one MLP of width
n_shared_experts·moe_intermediate_size, weight 1; kvmem numbers them s0..s{n-1} by consecutive slices.
The first ``first_k_dense_replace`` layers are dense (width ``intermediate_size``). Multi-head latent
attention (q/kv LoRA ranks, rope dims) is attention: ignored. ``num_nextn_predict_layers`` (multi-token
prediction heads) is not part of transformers' causal LM: ignored.
"""

from kvmem.errors import KvmemError
from kvmem.models.fields import ANY, NUMBER, POSITIVE
from kvmem.models.moe import MoELayout
from kvmem.models.routing import grouped_sigmoid
from kvmem.models.moe_adapter import MOE_IGNORED, MoEAdapter
from kvmem.models.registry import register


@register
class DeepseekV3Adapter(MoEAdapter):
    model_types = ("deepseek_v3",)
    family = "deepseek_v3"
    moe_block = "DeepseekV3MoE"
    moe = ("experts: sigmoid + correction bias, group-limited top-k, scaled + shared; leading dense layers")
    handled = {"hidden_act": ("silu",), "hidden_size": POSITIVE, "intermediate_size": POSITIVE,
               "num_hidden_layers": POSITIVE, "rms_norm_eps": ANY, "moe_intermediate_size": POSITIVE,
               "n_routed_experts": POSITIVE, "n_shared_experts": POSITIVE, "num_experts_per_tok": POSITIVE,
               "n_group": POSITIVE, "topk_group": POSITIVE, "norm_topk_prob": (True, False),
               "routed_scaling_factor": NUMBER, "first_k_dense_replace": ANY}
    ignored = MOE_IGNORED | {"kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim",
                             "qk_head_dim", "rope_interleave", "pretraining_tp", "num_nextn_predict_layers"}

    def check_config(self, config) -> None:
        super().check_config(config)
        if config.n_routed_experts % config.n_group or config.n_routed_experts // config.n_group < 2:
            raise KvmemError(f"{self.family} adapter: config.n_group={config.n_group} must split "
                             f"n_routed_experts={config.n_routed_experts} into groups of at least 2")
        heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
        if kv is not None and kv != heads:  # transformers' MLA repeats its per-head keys kv-fold: masked batches fail
            raise KvmemError(f"{self.family} adapter: config.num_key_value_heads={kv} must equal "
                             f"num_attention_heads={heads} (multi-head latent attention has one key per head)")

    def moe_layer(self, i, block):
        c = self.config
        layout = MoELayout(c.n_routed_experts, c.moe_intermediate_size, c.num_experts_per_tok,
                           c.n_shared_experts, c.moe_intermediate_size)
        route = grouped_sigmoid(block.gate, c.num_experts_per_tok, c.n_group, c.topk_group, c.norm_topk_prob,
                                float(c.routed_scaling_factor))
        return self.make_layer(i, block, layout, route, router_fp32=True, shared=block.shared_experts)
