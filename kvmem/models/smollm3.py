"""SmolLM3: Llama's SwiGLU FFN and pre-norm block; some layers drop rotary embeddings (NoPE, attention only)."""

from kvmem.models.llama import LLAMA_HANDLED, LLAMA_IGNORED, LlamaAdapter
from kvmem.models.registry import register


@register
class SmolLM3Adapter(LlamaAdapter):
    model_types = ("smollm3",)
    family = "smollm3"
    handled = LLAMA_HANDLED
    ignored = LLAMA_IGNORED | {"no_rope_layers", "no_rope_layer_interval"}
