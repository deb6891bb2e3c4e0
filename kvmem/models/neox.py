"""GPT-NeoX / Pythia: m = GELU(x·W_in + b_in) with dense_h_to_4h / dense_4h_to_h; untied embed_out.

use_parallel_residual=True (Pythia) adds attention and FFN outputs to the same stream (parallel);
False runs them in sequence. Either way the FFN output is added unchanged.
"""

from kvmem.models.base import Adapter, FFNLayer
from kvmem.models.fields import ANY, ATTENTION, POSITIVE
from kvmem.models.registry import register


@register
class NeoXAdapter(Adapter):
    model_types = ("gpt_neox",)
    family = "gpt_neox"
    placement = "parallel or pre (use_parallel_residual)"
    handled = {
        "hidden_act": ("gelu", "gelu_new", "gelu_fast", "relu", "gelu_pytorch_tanh"),
        "hidden_size": POSITIVE, "intermediate_size": POSITIVE, "num_hidden_layers": POSITIVE,
        "layer_norm_eps": ANY, "use_parallel_residual": (True, False),
    }
    ignored = ATTENTION | {"hidden_dropout", "classifier_dropout", "rotary_pct", "rotary_emb_base"}

    @property
    def norm_placement(self) -> str:
        return "parallel" if self.config.use_parallel_residual else "pre"

    def blocks(self):
        return self.model.gpt_neox.layers

    def layer(self, i: int) -> FFNLayer:
        mlp = self.blocks()[i].mlp
        return FFNLayer(i, mlp.dense_h_to_4h, None, mlp.dense_4h_to_h, mlp.act, mlp)

    def embed(self):
        return self.model.gpt_neox.embed_in

    def final_norm(self):
        return self.model.gpt_neox.final_layer_norm
