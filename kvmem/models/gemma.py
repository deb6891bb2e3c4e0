"""Gemma (v1): GeGLU FFNs, m = GELU_tanh(x·W_gate) ⊙ (x·W_up); final RMSNorm scales by (1 + w).

The modules are laid out as in Llama (gate_proj, up_proj, down_proj, model.norm), so only the
accepted activation differs.
"""

from kvmem.models.llama import LlamaAdapter
from kvmem.models.registry import register


@register
class GemmaAdapter(LlamaAdapter):
    model_types = ("gemma",)
    family = "gemma"

    def check_config(self, config) -> None:
        self.require(config, "hidden_act", ("gelu_pytorch_tanh", "gelu"), self.family)
