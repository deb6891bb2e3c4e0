"""Qwen2-MoE and Qwen3-MoE: sparse-MoE blocks of SwiGLU experts (Qwen2-MoE: plus one shared expert).

Routing (Qwen2MoeTopKRouter / Qwen3MoeTopKRouter): softmax over all experts in float32, the top k,
renormalised only when ``norm_topk_prob``, cast to the logits' dtype. Qwen2-MoE's shared expert (an MLP of
width ``shared_expert_intermediate_size``) runs on every token, weighted by sigmoid(shared_expert_gate(x)):
that sigmoid is its routing weight w, so its c = w·m. Layers listed in ``mlp_only_layers`` or off the
``decoder_sparse_step`` grid are dense (the Llama FFN of width ``intermediate_size``).
"""

from kvmem.models.fields import ANY, POSITIVE, Rule
from kvmem.models.moe import MoELayout
from kvmem.models.routing import softmax_topk
from kvmem.models.moe_adapter import MOE_IGNORED, MoEAdapter
from kvmem.models.registry import register

LAYER_LIST = Rule(lambda v: isinstance(v, (list, tuple)) and all(isinstance(i, int) for i in v), "a list of layers")
QWEN_MOE_HANDLED = {
    "hidden_act": ("silu",), "hidden_size": POSITIVE, "intermediate_size": POSITIVE, "num_hidden_layers": POSITIVE,
    "rms_norm_eps": ANY, "moe_intermediate_size": POSITIVE, "num_experts_per_tok": POSITIVE,
    "norm_topk_prob": (True, False), "decoder_sparse_step": POSITIVE, "mlp_only_layers": LAYER_LIST,
}


@register
class Qwen2MoeAdapter(MoEAdapter):
    model_types = ("qwen2_moe",)
    family = "qwen2_moe"
    moe_block = "Qwen2MoeSparseMoeBlock"
    moe = "experts: softmax top-k (norm_topk_prob) + 1 shared (sigmoid gate); dense mlp_only_layers"
    handled = {**QWEN_MOE_HANDLED, "num_experts": POSITIVE, "shared_expert_intermediate_size": POSITIVE}
    ignored = MOE_IGNORED | {"qkv_bias"}

    def moe_layer(self, i, block):
        c = self.config
        layout = MoELayout(c.num_experts, c.moe_intermediate_size, c.num_experts_per_tok,
                           1, c.shared_expert_intermediate_size)
        return self.make_layer(i, block, layout, softmax_topk(c.num_experts_per_tok, c.norm_topk_prob, cast=True),
                               shared=block.shared_expert, shared_gate=block.shared_expert_gate)


@register
class Qwen3MoeAdapter(MoEAdapter):
    model_types = ("qwen3_moe",)
    family = "qwen3_moe"
    moe_block = "Qwen3MoeSparseMoeBlock"
    moe = "experts: softmax top-k (norm_topk_prob); dense mlp_only_layers"
    handled = {**QWEN_MOE_HANDLED, "num_local_experts": POSITIVE}
    ignored = MOE_IGNORED

    def moe_layer(self, i, block):
        c = self.config
        layout = MoELayout(c.num_experts, c.moe_intermediate_size, c.num_experts_per_tok)
        return self.make_layer(i, block, layout, softmax_topk(c.num_experts_per_tok, c.norm_topk_prob, cast=True))
