"""Qwen3 (dense): Llama's SwiGLU FFN and pre-norm block; q/k norms inside attention (ignored)."""

from kvmem.models.llama import LLAMA_HANDLED, LLAMA_IGNORED, LlamaAdapter
from kvmem.models.registry import register


@register
class Qwen3Adapter(LlamaAdapter):
    model_types = ("qwen3",)
    family = "qwen3"
    handled = LLAMA_HANDLED
    ignored = LLAMA_IGNORED
