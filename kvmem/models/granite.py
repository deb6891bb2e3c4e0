"""Granite (dense): Llama's SwiGLU FFN with multipliers outside it.

  residual_multiplier ρ  the block adds ρ·y (y = m·W_out): neuron i writes ρ·m_i·v_i (FFNLayer.write_scale)
  embedding_multiplier   the embeddings entering block 0 are multiplied by it (Adapter.embedding_scale)
  logits_scaling         logits = (final_norm(h)·W_U) / logits_scaling (Adapter.logit_scale)
  attention_multiplier   the attention's softmax scale (attention only; ignored)
"""

from kvmem.models.base import FFNLayer
from kvmem.models.fields import NUMBER, POSITIVE
from kvmem.models.llama import LLAMA_HANDLED, LLAMA_IGNORED, LlamaAdapter
from kvmem.models.registry import register


@register
class GraniteAdapter(LlamaAdapter):
    model_types = ("granite",)
    family = "granite"
    handled = {**LLAMA_HANDLED, "residual_multiplier": NUMBER, "embedding_multiplier": NUMBER,
               "logits_scaling": POSITIVE}
    ignored = LLAMA_IGNORED | {"attention_multiplier"}

    def layer(self, i: int) -> FFNLayer:
        mlp = self.blocks()[i].mlp
        return FFNLayer(i, mlp.up_proj, mlp.gate_proj, mlp.down_proj, mlp.act_fn, mlp,
                        write_scale=float(self.config.residual_multiplier))

    @property
    def embedding_scale(self) -> float:
        return float(self.config.embedding_multiplier)

    @property
    def logit_scale(self) -> float:
        return 1.0 / float(self.config.logits_scaling)
