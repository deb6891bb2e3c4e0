"""The profiler's view of mixture-of-experts layers (the MoE contract: kvmem.models' MoELayer, kvmem.hooks):
which layers are MoE, their statistics' expert map, and one capture over dense and MoE layers together.

At an MoE layer the profile records raw m (hook point ``moe.expert.coef``: each expert's own activation,
the input of its down projection, [batch, pos, d_mlp_flat], 0 at the tokens not routed to the expert),
the router logits (``moe.router`` [batch, pos, n_experts]) and the block input (``ffn.x``), from which the
family's routing rule gives the chosen experts and their weights (``kvmem.hooks.routing``). The layer's
statistics (kvmem.stats.layer with n_experts / expert_of) then keep the routing (kvmem.stats.routing) and
every neuron statistic relative to the tokens routed to the neuron's expert. Dense layers (also the
leading dense layers of DeepSeek-V3-style models) are captured as kvmem.capture does.

Axes: b rows, L positions, E routed experts, k chosen per token, d flat neurons of the layer.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterable

import torch

from kvmem.hooks import hooks

if TYPE_CHECKING:
    from kvmem.models.kvmodel import KVModel

DENSE_POINT = {"coef": "ffn.coef", "gate": "ffn.gate", "pre": "ffn.pre"}


def layout_of(model: KVModel, layer: int):
    """The MoELayout of an MoE layer (n_experts, d_expert, top_k, n_shared, d_shared), None for a dense one."""
    from kvmem.models.moe import is_moe

    lay = model.layers[layer]
    return lay.layout if is_moe(lay) else None


def moe_layers(model: KVModel, layers: Iterable[int]) -> list[int]:
    """The MoE layers among ``layers``."""
    return [layer for layer in layers if layout_of(model, layer) is not None]


def expert_of(layout) -> torch.Tensor:
    """The expert of each flat neuron [d] int64 (routed e: e, shared s: -1 - s), in the contract's flat order:
    routed expert e's neuron i at e*d_expert + i, shared expert s's at n_experts*d_expert + s*d_shared + i."""
    routed = torch.arange(layout.n_experts).repeat_interleave(layout.d_expert)
    shared = -1 - torch.arange(layout.n_shared).repeat_interleave(layout.d_shared)
    return torch.cat([routed, shared]).to(torch.int64)


def layer_width(model: KVModel, layer: int) -> int:
    """d_mlp of one layer (an MoE layer's flat width; dense layers of MoE models may differ from it)."""
    return int(getattr(model.layers[layer], "d_mlp", model.d_mlp))


def route(model: KVModel, layer: int, logits: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The family's routing of the layer from its router logits [b, L, E] and block input x [b, L, d_model]:
    (idx [b, L, k] int64, weight [b, L, k])."""
    from kvmem import hooks as hook_layer

    return hook_layer.routing(model, layer, logits, x)


@contextmanager
def capture_layers(model: KVModel, layers: list[int], what: tuple[str, ...], *,
                   on_layer: Callable[[int, dict[str, torch.Tensor]], None]):
    """Hand each layer's tensors (detached) to ``on_layer(layer, tensors)`` once its block has run; the pass
    stops after the last layer. Dense layers: ``what`` of coef / gate / pre (their ffn.* points; gate and pre
    only where the layer is gated). MoE layers: coef (raw m at moe.expert.coef), logits (moe.router) and x
    (ffn.x), from which ``route`` gives the routing (the caller does, inside its host-sync guard)."""
    moe = set(moe_layers(model, layers))
    pending: dict[int, dict[str, torch.Tensor]] = {}

    def keep(layer: int, kind: str):
        def fn(t: torch.Tensor) -> None:
            pending.setdefault(layer, {})[kind] = t.detach()
        return fn

    def finish(layer: int):
        def fn(t: torch.Tensor) -> None:
            got = pending.pop(layer, None)
            if got is not None:
                on_layer(layer, got)
        return fn

    fns: dict = {}
    for layer in layers:
        if layer in moe:
            points = {"coef": "moe.expert.coef", "logits": "moe.router", "x": "ffn.x"}
        else:
            gated = model.layers[layer].gated
            points = {kind: DENSE_POINT[kind] for kind in what if gated or kind == "coef"}
        for kind, point in points.items():
            fns.setdefault((point, layer), []).append(keep(layer, kind))
        fns.setdefault(("ffn.out", layer), []).append(finish(layer))
    with hooks(model, fns, stop_after=True) as run:
        yield run
