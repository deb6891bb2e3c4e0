"""GPT-NeoX / Pythia: m = GELU(x·W_in + b_in) with dense_h_to_4h / dense_4h_to_h; untied embed_out."""

from kvmem.models.base import Adapter, FFNLayer
from kvmem.models.registry import register


@register
class NeoXAdapter(Adapter):
    model_types = ("gpt_neox",)
    family = "gpt_neox"

    def check_config(self, config) -> None:
        self.require(config, "hidden_act", ("gelu", "gelu_new", "gelu_fast", "relu", "gelu_pytorch_tanh"), self.family)

    def blocks(self):
        return self.model.gpt_neox.layers

    def layer(self, i: int) -> FFNLayer:
        mlp = self.blocks()[i].mlp
        return FFNLayer(i, mlp.dense_h_to_4h, None, mlp.dense_4h_to_h, mlp.act, mlp)

    def embed(self):
        return self.model.gpt_neox.embed_in

    def final_norm(self):
        return self.model.gpt_neox.final_layer_norm
