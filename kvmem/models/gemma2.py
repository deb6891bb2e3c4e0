"""Gemma 2 and Gemma 3 (text): GeGLU FFN between a pre- and a post-FFN RMSNorm with (1 + w) gains.

  r' = r + N(y),  y = m·W_out,  N(z) = (1 + w) ⊙ z / sqrt(mean(z²) + eps)  (post_feedforward_layernorm)
so neuron i writes m_i·((1+w)⊙v_i)·s with s = 1/rms(y) of the token (FFNLayer.write). The embedding
module multiplies by sqrt(d_model) (Adapter.embedding_scale) and the logits are soft-capped,
c·tanh(logits/c), c = final_logit_softcapping (Adapter.logit_softcap). Gemma 3's multimodal wrapper
(model_type "gemma3") is not a text-only causal LM here: load its text model ("gemma3_text").
"""

from kvmem.models.base import FFNLayer
from kvmem.models.fields import ANY, ATTENTION, FALSY, POSITIVE, POSITIVE_OR_NONE
from kvmem.models.llama import LlamaAdapter
from kvmem.models.registry import register


@register
class Gemma2Adapter(LlamaAdapter):
    model_types = ("gemma2",)
    family = "gemma2"
    placement = "post-ffn"
    act_field = "hidden_activation"
    handled = {"hidden_activation": ("gelu_pytorch_tanh", "gelu"), "hidden_size": POSITIVE,
               "intermediate_size": POSITIVE, "num_hidden_layers": POSITIVE, "rms_norm_eps": ANY,
               "final_logit_softcapping": POSITIVE_OR_NONE, "use_bidirectional_attention": FALSY}
    # hidden_act: Gemma 2/3 checkpoints carry it beside hidden_activation, which is the one transformers reads
    ignored = ATTENTION | {"cache_implementation", "hidden_act"}

    def layer(self, i: int) -> FFNLayer:
        block = self.blocks()[i]
        mlp = block.mlp
        return FFNLayer(i, mlp.up_proj, mlp.gate_proj, mlp.down_proj, mlp.act_fn, mlp,
                        post_norm=block.post_feedforward_layernorm, post_norm_kind="rms1p")

    @property
    def logit_softcap(self) -> float | None:
        cap = self.config.final_logit_softcapping
        return None if cap is None else float(cap)


@register
class Gemma3TextAdapter(Gemma2Adapter):
    model_types = ("gemma3_text",)
    family = "gemma3"
