"""GPT-2: Conv1D weights stored [in, out]; m = GELU(x·W_in + b_in); tied unembedding."""

from kvmem.models.base import Adapter, FFNLayer
from kvmem.models.registry import register


@register
class GPT2Adapter(Adapter):
    model_types = ("gpt2",)
    family = "gpt2"
    act_field = "activation_function"

    def check_config(self, config) -> None:
        self.require(config, "activation_function", ("gelu_new", "gelu", "relu", "gelu_pytorch_tanh"), self.family)
        self.require(config, "add_cross_attention", (False, None), self.family)

    def blocks(self):
        return self.model.transformer.h

    def layer(self, i: int) -> FFNLayer:
        mlp = self.blocks()[i].mlp
        return FFNLayer(i, mlp.c_fc, None, mlp.c_proj, mlp.act, mlp)

    def embed(self):
        return self.model.transformer.wte

    def final_norm(self):
        return self.model.transformer.ln_f
