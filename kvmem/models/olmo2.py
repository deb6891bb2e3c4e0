"""OLMo 2: SwiGLU FFN with a post-FFN RMSNorm and no pre-FFN norm.

  r' = r + N(y),  y = m·W_out,  N(z) = w ⊙ z / sqrt(mean(z²) + eps)  (post_feedforward_layernorm)
so neuron i writes m_i·(w⊙v_i)·s with s = 1/rms(y) of the token (FFNLayer.write); the FFN input x
is the raw residual stream.
"""

from kvmem.models.base import FFNLayer
from kvmem.models.fields import ANY, ATTENTION, POSITIVE
from kvmem.models.llama import LlamaAdapter
from kvmem.models.registry import register


@register
class Olmo2Adapter(LlamaAdapter):
    model_types = ("olmo2",)
    family = "olmo2"
    placement = "post-ffn"
    handled = {"hidden_act": ("silu",), "hidden_size": POSITIVE, "intermediate_size": POSITIVE,
               "num_hidden_layers": POSITIVE, "rms_norm_eps": ANY}
    ignored = ATTENTION

    def layer(self, i: int) -> FFNLayer:
        block = self.blocks()[i]
        mlp = block.mlp
        return FFNLayer(i, mlp.up_proj, mlp.gate_proj, mlp.down_proj, mlp.act_fn, mlp,
                        post_norm=block.post_feedforward_layernorm, post_norm_kind="rms")
