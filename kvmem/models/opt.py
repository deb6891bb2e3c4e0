"""OPT: m = ReLU(x·W_in + b_in); fc1/fc2 sit in the decoder layer itself (no MLP module).

OPT flattens [batch, pos] before fc1; capture reshapes back. The 350m variant (post-norm,
project_in/out to a smaller embedding) is refused: its unembedding is not W_U·h.
"""

from kvmem.models.base import Adapter, FFNLayer
from kvmem.models.registry import register


@register
class OPTAdapter(Adapter):
    model_types = ("opt",)
    family = "opt"
    act_field = "activation_function"

    def check_config(self, config) -> None:
        self.require(config, "activation_function", ("relu", "gelu"), self.family)
        self.require(config, "do_layer_norm_before", (True,), self.family)
        self.require(config, "word_embed_proj_dim", (config.hidden_size,), self.family)

    def blocks(self):
        return self.model.model.decoder.layers

    def layer(self, i: int) -> FFNLayer:
        block = self.blocks()[i]
        return FFNLayer(i, block.fc1, None, block.fc2, block.activation_fn, block.fc2)

    def embed(self):
        return self.model.model.decoder.embed_tokens

    def final_norm(self):
        return self.model.model.decoder.final_layer_norm
