"""Mixtral: every FFN a sparse-MoE block of ``num_local_experts`` SwiGLU experts, top ``num_experts_per_tok``.

Routing (MixtralTopKRouter): p = softmax(x·W_router) in float32, the top k, renormalised to sum 1; the
weights stay float32. Experts: gate_up_proj [E, 2I, d_model] (gate rows first), down_proj [E, d_model, I].
router_jitter_noise only acts in training mode (kvmem runs models in eval mode).
"""

from kvmem.models.fields import ANY, POSITIVE
from kvmem.models.moe import MoELayout
from kvmem.models.routing import softmax_topk
from kvmem.models.moe_adapter import MOE_IGNORED, MoEAdapter
from kvmem.models.registry import register


@register
class MixtralAdapter(MoEAdapter):
    model_types = ("mixtral",)
    family = "mixtral"
    moe_block = "MixtralSparseMoeBlock"
    moe = "experts: softmax top-k, renormalised"
    handled = {"hidden_act": ("silu",), "hidden_size": POSITIVE, "intermediate_size": POSITIVE,
               "num_hidden_layers": POSITIVE, "rms_norm_eps": ANY, "num_local_experts": POSITIVE,
               "num_experts_per_tok": POSITIVE, "router_jitter_noise": ANY}
    ignored = MOE_IGNORED

    def moe_layer(self, i, block):
        c = self.config
        layout = MoELayout(c.num_local_experts, c.intermediate_size, c.num_experts_per_tok)
        return self.make_layer(i, block, layout, softmax_topk(c.num_experts_per_tok, True, cast=False))
