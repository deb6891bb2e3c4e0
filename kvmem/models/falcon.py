"""Falcon: m = act(x·W_in + b_in) (dense_h_to_4h / dense_4h_to_h, biases per config.bias).

Blocks: parallel_attn (7B/40B) r' = r + attn(LN(r)) + ffn(LN'(r)), LN' = LN or a second norm ln_mlp
(new_decoder_architecture, num_ln_in_parallel_attn=2); otherwise sequential pre-norm (falcon-rw). In
the parallel forms the block adds the attention output INTO the FFN output tensor in place, so readers of
the FFN output must clone it (FFNLayer.out_mutated).
"""

from kvmem.models.base import Adapter, FFNLayer
from kvmem.models.fields import ANY, ATTENTION, POSITIVE
from kvmem.models.registry import register


@register
class FalconAdapter(Adapter):
    model_types = ("falcon",)
    family = "falcon"
    act_field = "activation"
    placement = "parallel or pre (parallel_attn)"
    handled = {"activation": ("gelu", "relu", "gelu_new", "gelu_pytorch_tanh"), "hidden_size": POSITIVE,
               "ffn_hidden_size": ANY, "num_hidden_layers": POSITIVE, "layer_norm_epsilon": ANY,
               "bias": (True, False), "parallel_attn": (True, False), "new_decoder_architecture": (True, False),
               "num_ln_in_parallel_attn": (None, 1, 2),
               # an old Bloom-era switch transformers' Falcon does not read; kvmem accepts only its usual value
               "apply_residual_connection_post_layernorm": (False,)}
    ignored = ATTENTION | {"hidden_dropout", "alibi", "multi_query", "num_kv_heads"}

    @property
    def _parallel(self) -> bool:
        return bool(self.config.parallel_attn or self.config.new_decoder_architecture)

    @property
    def norm_placement(self) -> str:
        return "parallel" if self._parallel else "pre"

    def blocks(self):
        return self.model.transformer.h

    def layer(self, i: int) -> FFNLayer:
        mlp = self.blocks()[i].mlp
        return FFNLayer(i, mlp.dense_h_to_4h, None, mlp.dense_4h_to_h, mlp.act, mlp, out_mutated=self._parallel)

    def embed(self):
        return self.model.transformer.word_embeddings

    def final_norm(self):
        return self.model.transformer.ln_f
