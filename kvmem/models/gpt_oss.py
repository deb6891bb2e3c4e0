"""GPT-OSS: every FFN a sparse-MoE block of experts with a clamped SwiGLU and biases.

Expert e on a token x (GptOssExperts): [g | u] interleaved = x·W_gu[e] + b_gu[e] (gate at even columns, up at
odd), g' = min(g, limit), u' = clamp(u, -limit, limit), m = (u' + 1)·g'·sigmoid(alpha·g'), out = m·W_down[e] +
b_down[e]. m is the input of the expert's down projection, so the key-value view is exact: c = w·m and the
block output is Σ_e c_e·W_down[e] + Σ_e w_e·b_down[e] (``MoELayer.output(c, gates)``; the second term depends
on the routing, not on any neuron). Routing (GptOssTopKRouter): logits = x·W_router + b_router, the top k
logits, softmax over those k. ``hidden_act`` is not read by GPT-OSS's experts (the clamped SwiGLU is fixed):
ignored; ``swiglu_alpha`` / ``swiglu_limit`` are read by the experts module itself.
"""

from kvmem.models.fields import ANY, POSITIVE
from kvmem.models.moe import MoELayout
from kvmem.models.routing import topk_softmax
from kvmem.models.moe_adapter import MOE_IGNORED, MoEAdapter
from kvmem.models.registry import register


@register
class GptOssAdapter(MoEAdapter):
    model_types = ("gpt_oss",)
    family = "gpt_oss"
    moe_block = "GptOssMLP"
    moe = "experts: top-k logits then softmax; clamped SwiGLU with biases"
    router_attr = "router"
    act_field = "swiglu_limit"
    handled = {"hidden_size": POSITIVE, "intermediate_size": POSITIVE, "num_hidden_layers": POSITIVE,
               "rms_norm_eps": ANY, "num_local_experts": POSITIVE, "num_experts_per_tok": POSITIVE,
               "swiglu_alpha": ANY, "swiglu_limit": POSITIVE}
    ignored = MOE_IGNORED | {"hidden_act"}

    @classmethod
    def activations(cls) -> tuple[str, ...]:
        return ("clamped swiglu",)

    @property
    def activation(self) -> str:
        c = self.config
        return f"clamped swiglu (alpha {c.swiglu_alpha}, limit {c.swiglu_limit})"

    def moe_layer(self, i, block):
        c = self.config
        layout = MoELayout(c.num_local_experts, c.intermediate_size, c.num_experts_per_tok)
        return self.make_layer(i, block, layout, topk_softmax(c.num_experts_per_tok), storage="interleaved")
