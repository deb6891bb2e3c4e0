"""Cohere (Command-R): SwiGLU FFN in a parallel block, r' = r + attn(LN(r)) + ffn(LN(r)), one
bias-free LayerNorm per block; logits = logit_scale·(final_norm(h)·W_U) (Adapter.logit_scale)."""

from kvmem.models.fields import ANY, ATTENTION, NUMBER, POSITIVE
from kvmem.models.llama import LlamaAdapter
from kvmem.models.registry import register


@register
class CohereAdapter(LlamaAdapter):
    model_types = ("cohere",)
    family = "cohere"
    placement = "parallel"
    handled = {"hidden_act": ("silu",), "hidden_size": POSITIVE, "intermediate_size": POSITIVE,
               "num_hidden_layers": POSITIVE, "layer_norm_eps": ANY, "logit_scale": NUMBER}
    ignored = ATTENTION

    @property
    def logit_scale(self) -> float:
        return float(self.config.logit_scale)
