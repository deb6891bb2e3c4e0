"""GPT-2: Conv1D weights stored [in, out]; m = GELU(x·W_in + b_in); tied unembedding."""

from kvmem.models.base import Adapter, FFNLayer
from kvmem.models.fields import ANY, POSITIVE
from kvmem.models.registry import register


@register
class GPT2Adapter(Adapter):
    model_types = ("gpt2",)
    family = "gpt2"
    act_field = "activation_function"
    handled = {
        "activation_function": ("gelu_new", "gelu", "relu", "gelu_pytorch_tanh"),
        "n_embd": POSITIVE, "n_layer": POSITIVE, "n_inner": ANY, "layer_norm_epsilon": ANY,
    }
    ignored = frozenset({
        "n_positions", "n_ctx", "n_head", "resid_pdrop", "embd_pdrop", "attn_pdrop", "scale_attn_weights",
        "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
        # heads for sequence classification / multiple choice, unused by the causal LM
        "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels", "summary_first_dropout",
    })

    def blocks(self):
        return self.model.transformer.h

    def layer(self, i: int) -> FFNLayer:
        mlp = self.blocks()[i].mlp
        return FFNLayer(i, mlp.c_fc, None, mlp.c_proj, mlp.act, mlp)

    def embed(self):
        return self.model.transformer.wte

    def final_norm(self):
        return self.model.transformer.ln_f
