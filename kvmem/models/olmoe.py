"""OLMoE: every FFN a sparse-MoE block of SwiGLU experts; q/k norms and clip_qkv inside attention (ignored).

Routing (OlmoeTopKRouter): softmax in float32, the top k, renormalised when ``norm_topk_prob``, cast to the
logits' dtype. Experts: gate_up_proj [E, 2I, d_model], down_proj [E, d_model, I].
"""

from kvmem.models.fields import ANY, POSITIVE
from kvmem.models.moe import MoELayout
from kvmem.models.routing import softmax_topk
from kvmem.models.moe_adapter import MOE_IGNORED, MoEAdapter
from kvmem.models.registry import register


@register
class OlmoeAdapter(MoEAdapter):
    model_types = ("olmoe",)
    family = "olmoe"
    moe_block = "OlmoeSparseMoeBlock"
    moe = "experts: softmax top-k (norm_topk_prob)"
    handled = {"hidden_act": ("silu",), "hidden_size": POSITIVE, "intermediate_size": POSITIVE,
               "num_hidden_layers": POSITIVE, "rms_norm_eps": ANY, "num_experts": POSITIVE,
               "num_experts_per_tok": POSITIVE, "norm_topk_prob": (True, False)}
    ignored = MOE_IGNORED | {"clip_qkv"}

    def moe_layer(self, i, block):
        c = self.config
        layout = MoELayout(c.num_experts, c.intermediate_size, c.num_experts_per_tok)
        return self.make_layer(i, block, layout, softmax_topk(c.num_experts_per_tok, c.norm_topk_prob, cast=True))
