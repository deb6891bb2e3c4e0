"""GPT-J: parallel block r' = r + attn(LN(r)) + ffn(LN(r)); m = GELU(x·W_in + b_in) (fc_in / fc_out,
nn.Linear with biases); the LM head has a bias (Adapter.b_U)."""

from kvmem.models.base import Adapter, FFNLayer
from kvmem.models.fields import ANY, ATTENTION, POSITIVE
from kvmem.models.registry import register


@register
class GPTJAdapter(Adapter):
    model_types = ("gptj",)
    family = "gptj"
    act_field = "activation_function"
    placement = "parallel"
    handled = {"activation_function": ("gelu_new", "gelu", "relu", "gelu_pytorch_tanh"), "n_embd": POSITIVE,
               "n_layer": POSITIVE, "n_inner": ANY, "layer_norm_epsilon": ANY}
    ignored = ATTENTION | {"n_positions", "n_head", "rotary_dim", "rotary", "resid_pdrop", "embd_pdrop", "attn_pdrop"}

    def blocks(self):
        return self.model.transformer.h

    def layer(self, i: int) -> FFNLayer:
        mlp = self.blocks()[i].mlp
        return FFNLayer(i, mlp.fc_in, None, mlp.fc_out, mlp.act, mlp)

    def embed(self):
        return self.model.transformer.wte

    def final_norm(self):
        return self.model.transformer.ln_f
