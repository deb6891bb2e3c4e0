"""Llama-style SwiGLU FFNs, m = SiLU(x·W_gate) ⊙ (x·W_up): Llama, SmolLM2, Mistral, Qwen2
(and, in their own files, Qwen3, SmolLM3, Granite, Cohere, OLMo 2).

All share gate_proj / up_proj / down_proj under model.model.layers[i].mlp, pre-norm blocks and a final
model.model.norm; they differ only in attention (ignored by the FFN view).
"""

from kvmem.models.base import Adapter, FFNLayer
from kvmem.models.fields import ANY, ATTENTION, POSITIVE
from kvmem.models.registry import register

LLAMA_HANDLED = {
    "hidden_act": ("silu",), "hidden_size": POSITIVE, "intermediate_size": POSITIVE,
    "num_hidden_layers": POSITIVE, "rms_norm_eps": ANY, "mlp_bias": (False, True),
}
LLAMA_IGNORED = ATTENTION | {"pretraining_tp"}  # pretraining_tp: unused by transformers 5's Llama


@register
class LlamaAdapter(Adapter):
    model_types = ("llama", "mistral", "qwen2")
    family = "llama"
    gated = True
    handled = LLAMA_HANDLED
    ignored = LLAMA_IGNORED

    def blocks(self):
        return self.model.model.layers

    def layer(self, i: int) -> FFNLayer:
        mlp = self.blocks()[i].mlp
        return FFNLayer(i, mlp.up_proj, mlp.gate_proj, mlp.down_proj, mlp.act_fn, mlp)

    def embed(self):
        return self.model.model.embed_tokens

    def final_norm(self):
        return self.model.model.norm
