"""Gemma (v1): GeGLU FFNs, m = GELU_tanh(x·W_gate) ⊙ (x·W_up); RMSNorms scale by (1 + w).

The modules are laid out as in Llama (gate_proj, up_proj, down_proj, model.norm). The embedding
module multiplies by sqrt(d_model) itself (``Adapter.embedding_scale`` reads it).
"""

from kvmem.models.fields import FALSY
from kvmem.models.llama import LLAMA_HANDLED, LLAMA_IGNORED, LlamaAdapter
from kvmem.models.registry import register


@register
class GemmaAdapter(LlamaAdapter):
    model_types = ("gemma",)
    family = "gemma"
    handled = {**LLAMA_HANDLED, "hidden_act": ("gelu_pytorch_tanh", "gelu"),
               "hidden_activation": ("gelu_pytorch_tanh", "gelu", None),
               "use_bidirectional_attention": FALSY}  # bidirectional = an encoder, not a causal LM
    ignored = LLAMA_IGNORED
