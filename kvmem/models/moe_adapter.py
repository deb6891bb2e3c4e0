"""The adapter base of the mixture-of-experts families (Llama-style blocks whose FFN is a sparse-MoE block).

A layer is MoE where its block's ``mlp`` is the family's sparse-MoE module (a ``MoELayer``), dense otherwise
(DeepSeek-V3's first ``first_k_dense_replace`` layers, Qwen-MoE's ``mlp_only_layers``): the Llama FFNLayer.
Layers may differ in width (d_mlp per layer).
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from kvmem.errors import KvmemError
from kvmem.models.base import FFNLayer
from kvmem.models.fields import ATTENTION
from kvmem.models.llama import LlamaAdapter
from kvmem.models.moe import MoELayer, MoELayout, is_moe

# Training-only settings of every MoE config: auxiliary losses and their outputs.
MOE_IGNORED = ATTENTION | {"output_router_logits", "router_aux_loss_coef"}


class MoEAdapter(LlamaAdapter):
    """Subclasses set ``moe_block`` (the sparse-MoE module's class name) and implement ``moe_layer``."""

    moe: ClassVar[str] = "experts"
    moe_block: ClassVar[str] = ""
    router_attr: ClassVar[str] = "gate"

    def layer(self, i: int) -> FFNLayer:
        mlp = self.blocks()[i].mlp
        if type(mlp).__name__ == self.moe_block:
            return self.moe_layer(i, mlp)
        if not all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj")):
            raise KvmemError(f"{self.family} adapter: layer {i}'s FFN is a {type(mlp).__name__}; refusing to guess")
        return FFNLayer(i, mlp.up_proj, mlp.gate_proj, mlp.down_proj, mlp.act_fn, mlp)

    def moe_layer(self, i: int, block: nn.Module) -> MoELayer:
        raise NotImplementedError

    def make_layer(self, i: int, block: nn.Module, layout: MoELayout, route, **kw) -> MoELayer:
        ex = block.experts
        return MoELayer(i, ex, ex, ex, getattr(ex, "act_fn", None), block, layout=layout,
                        router=getattr(block, self.router_attr), route_fn=route, **kw)

    def check_shapes(self) -> None:
        d_model = self.config.hidden_size
        for lay in self.layers:
            want = (d_model, lay.d_mlp)
            for name, W in (("W_in", lay.W_in), ("W_gate", lay.W_gate), ("W_out", lay.W_out.T)):
                if tuple(W.shape) != want:
                    raise KvmemError(f"{self.family} adapter: layer {lay.index} {name} has shape {tuple(W.shape)}, "
                                     f"expected {want}; refusing to guess")
            if is_moe(lay):
                gu = lay.experts.gate_up_proj
                if gu.shape[0] != lay.layout.n_experts:
                    raise KvmemError(f"{self.family} adapter: layer {lay.index} has {gu.shape[0]} experts, the "
                                     f"config says {lay.layout.n_experts}")
        if tuple(self.W_U.shape[:1]) != (d_model,):
            raise KvmemError(f"{self.family} adapter: W_U shape {tuple(self.W_U.shape)} does not start with d_model")

    def moe_layout(self) -> dict:
        """The MoE layout for ``kvmem info`` / ``kvmem models``: experts, top_k, shared, dense layers."""
        moe = [lay for lay in self.layers if is_moe(lay)]
        lay = moe[0].layout if moe else None
        return {
            "n_experts": lay.n_experts if lay else 0, "top_k": lay.top_k if lay else 0,
            "d_expert": lay.d_expert if lay else 0, "n_shared": lay.n_shared if lay else 0,
            "d_shared": lay.d_shared if lay else 0, "d_mlp": lay.d_flat if lay else 0,  # the flat width
            "dense_layers": [x.index for x in self.layers if not is_moe(x)],
        }
