"""Llama-style SwiGLU FFNs (Llama, SmolLM, Mistral, Qwen2): m = SiLU(x·W_gate) ⊙ (x·W_up)."""

from kvmem.models.base import Adapter, FFNLayer
from kvmem.models.registry import register


@register
class LlamaAdapter(Adapter):
    model_types = ("llama", "mistral", "qwen2")
    family = "llama"
    gated = True

    def check_config(self, config) -> None:
        self.require(config, "hidden_act", ("silu",), self.family)

    def blocks(self):
        return self.model.model.layers

    def layer(self, i: int) -> FFNLayer:
        mlp = self.blocks()[i].mlp
        return FFNLayer(i, mlp.up_proj, mlp.gate_proj, mlp.down_proj, mlp.act_fn, mlp)

    def embed(self):
        return self.model.model.embed_tokens

    def final_norm(self):
        return self.model.model.norm
