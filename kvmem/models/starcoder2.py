"""StarCoder2 and GPT-BigCode (StarCoder 1, SantaCoder): pre-LayerNorm blocks with a non-gated GELU FFN
c_fc / c_proj (nn.Linear, biases: StarCoder2's use_bias, always for GPT-BigCode), m = GELU(x·W_in + b_in)."""

from kvmem.models.base import Adapter, FFNLayer
from kvmem.models.fields import ANY, ATTENTION, POSITIVE
from kvmem.models.registry import register

GELUS = ("gelu_pytorch_tanh", "gelu", "gelu_new", "gelu_fast", "relu")


@register
class Starcoder2Adapter(Adapter):
    model_types = ("starcoder2",)
    family = "starcoder2"
    handled = {"hidden_act": GELUS, "hidden_size": POSITIVE, "intermediate_size": POSITIVE,
               "num_hidden_layers": POSITIVE, "norm_epsilon": ANY, "use_bias": (True, False),
               "mlp_type": ("default",), "norm_type": ("layer_norm",)}  # in released checkpoints' configs
    ignored = ATTENTION | {"residual_dropout", "embedding_dropout"}

    def blocks(self):
        return self.model.model.layers

    def layer(self, i: int) -> FFNLayer:
        mlp = self.blocks()[i].mlp
        return FFNLayer(i, mlp.c_fc, None, mlp.c_proj, mlp.act, mlp)

    def embed(self):
        return self.model.model.embed_tokens

    def final_norm(self):
        return self.model.model.norm


@register
class GPTBigCodeAdapter(Adapter):
    model_types = ("gpt_bigcode",)
    family = "gpt_bigcode"
    act_field = "activation_function"
    handled = {"activation_function": GELUS, "n_embd": POSITIVE, "n_layer": POSITIVE, "n_inner": ANY,
               "layer_norm_epsilon": ANY}
    ignored = ATTENTION | {"n_positions", "n_head", "resid_pdrop", "embd_pdrop", "attn_pdrop", "scale_attn_weights",
                           "attention_softmax_in_fp32", "scale_attention_softmax_in_fp32", "multi_query", "n_ctx",
                           # serving settings in StarCoder 1 / SantaCoder configs
                           "inference_runner", "max_batch_size", "max_sequence_length", "pad_key_length",
                           "pre_allocate_kv_cache", "validate_runner_input"}

    def blocks(self):
        return self.model.transformer.h

    def layer(self, i: int) -> FFNLayer:
        mlp = self.blocks()[i].mlp
        return FFNLayer(i, mlp.c_fc, None, mlp.c_proj, mlp.act, mlp)

    def embed(self):
        return self.model.transformer.wte

    def final_norm(self):
        return self.model.transformer.ln_f
