"""OPT: m = ReLU(x·W_in + b_in); fc1/fc2 sit in the decoder layer itself (no MLP module).

OPT flattens [batch, pos] before fc1; the hook layer reshapes back. Two variants:
  pre-LN (125m, 1.3b, ...): y = fc2(m) is added to the stream; final_layer_norm of the decoder ends it.
  post-LN (350m, do_layer_norm_before=False): the block's final_layer_norm reads r + y (r the stream
    after attention) and its output IS the new stream, so neuron i contributes m_i·γ⊙(v_i − mean v_i)·s,
    s = 1/σ(r + y) ("post-residual" placement, exact once s is fixed). There is no final norm.
project_in / project_out (word_embed_proj_dim ≠ hidden_size, as in 350m) map between the embedding
width and d_model: W_E = embed·project_in and W_U = project_out·lm_head [d_model, d_vocab] (computed
products, cached per weight version).
"""

import torch
from torch import nn

from kvmem.models.base import Adapter, FFNLayer
from kvmem.models.fields import ANY, ATTENTION, POSITIVE
from kvmem.models.registry import register


@register
class OPTAdapter(Adapter):
    model_types = ("opt",)
    family = "opt"
    act_field = "activation_function"
    placement = "pre, or post-residual (do_layer_norm_before=False)"
    handled = {
        "activation_function": ("relu", "gelu"), "hidden_size": POSITIVE, "ffn_dim": POSITIVE,
        "num_hidden_layers": POSITIVE, "do_layer_norm_before": (True, False), "_remove_final_layer_norm": (True, False),
        "word_embed_proj_dim": ANY, "enable_bias": (True, False), "layer_norm_elementwise_affine": (True, False),
    }
    ignored = ATTENTION | {"dropout", "layerdrop", "activation_dropout"}

    def __init__(self, model):
        self._cache: dict = {}
        super().__init__(model)

    @property
    def norm_placement(self) -> str:
        return "pre" if self.config.do_layer_norm_before else "post-residual"

    def blocks(self):
        return self.model.model.decoder.layers

    def layer(self, i: int) -> FFNLayer:
        block = self.blocks()[i]
        post = not self.config.do_layer_norm_before
        return FFNLayer(i, block.fc1, None, block.fc2, block.activation_fn, block.fc2,
                        post_norm=block.final_layer_norm if post else None, post_norm_kind="layer" if post else "",
                        post_norm_reads_residual=post)

    def embed(self):
        return self.model.model.decoder.embed_tokens

    def final_norm(self):
        norm = self.model.model.decoder.final_layer_norm
        return norm if norm is not None else nn.Identity()

    def _product(self, key: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        stamp = (a.data_ptr(), a._version, b.data_ptr(), b._version, a.dtype)
        if self._cache.get(key, (None,))[0] != stamp:
            with torch.no_grad():
                self._cache[key] = (stamp, a @ b)
        return self._cache[key][1]

    @property
    def W_E(self) -> torch.Tensor:
        proj = self.model.model.decoder.project_in
        W = self.embed().weight
        return W if proj is None else self._product("W_E", W, proj.weight.T)

    @property
    def W_U(self) -> torch.Tensor:
        proj = self.model.model.decoder.project_out
        W = self.unembed().weight.T
        return W if proj is None else self._product("W_U", proj.weight.T, W)
