"""Gemma (v1): GeGLU FFNs, m = GELU_tanh(x·W_gate) ⊙ (x·W_up); final RMSNorm scales by (1 + w)."""

from kvmem.models.base import Adapter, FFNLayer
from kvmem.models.registry import register


@register
class GemmaAdapter(Adapter):
    model_types = ("gemma",)
    family = "gemma"
    gated = True

    def check_config(self, config) -> None:
        self.require(config, "hidden_act", ("gelu_pytorch_tanh", "gelu"), self.family)

    def blocks(self):
        return self.model.model.layers

    def layer(self, i: int) -> FFNLayer:
        mlp = self.blocks()[i].mlp
        return FFNLayer(i, mlp.up_proj, mlp.gate_proj, mlp.down_proj, mlp.act_fn, mlp)

    def embed(self):
        return self.model.model.embed_tokens

    def final_norm(self):
        return self.model.model.norm
