"""Phi-3 (and Phi-4-mini): SwiGLU with gate and up fused in one Linear, gate_up_proj [2·d_mlp, d_model].

transformers' Phi3MLP: gate, up = gate_up_proj(x).chunk(2, -1); m = up ⊙ SiLU(gate). The view splits
the weight: W_gate = its first d_mlp output columns, W_in (up) = the second (FFNLayer.fused_gate_up;
the hook layer reads ffn.gate / ffn.pre as halves of the fused output via FFNLayer.gate_of / pre_of).
"""

from kvmem.models.base import Adapter, FFNLayer
from kvmem.models.fields import ANY, ATTENTION, POSITIVE
from kvmem.models.registry import register


@register
class Phi3Adapter(Adapter):
    model_types = ("phi3",)
    family = "phi3"
    gated = True
    fused_gate_up = True
    handled = {"hidden_act": ("silu",), "hidden_size": POSITIVE, "intermediate_size": POSITIVE,
               "num_hidden_layers": POSITIVE, "rms_norm_eps": ANY}
    ignored = ATTENTION | {"resid_pdrop", "embd_pdrop"}

    def blocks(self):
        return self.model.model.layers

    def layer(self, i: int) -> FFNLayer:
        mlp = self.blocks()[i].mlp
        return FFNLayer(i, mlp.gate_up_proj, mlp.gate_up_proj, mlp.down_proj, mlp.activation_fn, mlp,
                        fused_gate_up=True)

    def embed(self):
        return self.model.model.embed_tokens

    def final_norm(self):
        return self.model.model.norm
