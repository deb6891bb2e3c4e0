"""Capture FFN tensors through the hook layer (kvmem.hooks), for every family the same way.

What can be recorded per layer (all [batch, pos, ...], detached, in the model's dtype):
  "coef"  m, the input of W_out                       [batch, pos, d_mlp]
  "pre"   x·W_in + b_in (the up projection of gated FFNs,
          the pre-activation of the others)          [batch, pos, d_mlp]
  "gate"  x·W_gate + b_gate (gated FFNs only)         [batch, pos, d_mlp]
  "x"     the FFN input (after the block's norm)      [batch, pos, d_model]
  "out"   the FFN output m·W_out + b_out              [batch, pos, d_model]
At mixture-of-experts layers "coef" is c = w·m, and also (MoE layers only):
  "router"       the router logits (moe.router)       [batch, pos, n_experts]
  "expert_coef"  raw m of the experts (moe.expert.coef)  [batch, pos, d_mlp]

``stop=True`` ends the forward pass right after the last requested layer's FFN (no later
layers, no LM head). Hooks are removed on exit, also on error. With ``on_layer`` the
tensors are handed to a callback instead of being kept (streaming statistics).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable

import torch

from kvmem.errors import KvmemError
from kvmem.hooks import hooks

if TYPE_CHECKING:
    from kvmem.models.kvmodel import KVModel

KINDS = ("coef", "pre", "gate", "x", "out", "router", "expert_coef")
POINT = {**{kind: f"ffn.{kind}" for kind in KINDS[:5]}, "router": "moe.router",
         "expert_coef": "moe.expert.coef"}  # capture kind -> kvmem.hooks point


@dataclass
class Captured:
    """Recorded tensors: ``captured[kind][layer]`` -> [batch, pos, ...]."""

    layers: list[int]
    what: tuple[str, ...]
    data: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    stopped: bool = False

    def __getitem__(self, kind: str) -> dict[int, torch.Tensor]:
        return self.data[kind]

    @property
    def coef(self) -> dict[int, torch.Tensor]:
        return self.data["coef"]


def check_layers(model: KVModel, layers: Iterable[int] | None) -> list[int]:
    if layers is None:
        return list(range(model.n_layers))
    out = sorted(set(int(layer) for layer in layers))
    bad = [layer for layer in out if not 0 <= layer < model.n_layers]
    if bad or not out:
        raise KvmemError(f"layer {bad[0] if bad else '(none)'} out of range: the model has layers 0..{model.n_layers - 1}")
    return out


@contextmanager
def capture(model: KVModel, layers: Iterable[int] | None = None, what: Iterable[str] = ("coef",), *,
            stop: bool = False, on_layer: Callable[[int, dict[str, torch.Tensor]], None] | None = None):
    """Context manager recording FFN tensors of ``model`` (a KVModel) during forward passes.

    >>> with capture(model, layers=[3, 5], stop=True) as cap:
    ...     model.hf(input_ids)
    >>> cap.coef[5].shape  # [batch, pos, d_mlp]
    """
    layers = check_layers(model, layers)
    what = tuple(what)
    for kind in what:
        if kind not in KINDS:
            raise KvmemError(f"unknown capture kind {kind!r}; choose from {', '.join(KINDS)}")
    if "gate" in what and not model.gated:
        raise KvmemError(f"{model.family} FFNs are not gated: nothing to capture as 'gate'")
    cap = Captured(layers, what, {kind: {} for kind in what})
    pending: dict[int, dict[str, torch.Tensor]] = {}

    def keep(layer: int, kind: str):
        def fn(t: torch.Tensor) -> None:
            if on_layer is None:
                cap.data[kind][layer] = t.detach()
            else:
                pending.setdefault(layer, {})[kind] = t.detach()
        return fn

    def finish(layer: int):
        def fn(t: torch.Tensor) -> None:
            if on_layer is not None and layer in pending:
                on_layer(layer, pending.pop(layer))
        return fn

    fns: dict = {}
    for layer in layers:
        for kind in what:
            fns.setdefault((POINT[kind], layer), []).append(keep(layer, kind))
        fns.setdefault(("ffn.out", layer), []).append(finish(layer))  # the layer's FFN is done
    with hooks(model, fns, stop_after=stop) as run:
        try:
            yield cap
        finally:
            cap.stopped = run.stopped


def run_capture(model: KVModel, input_ids: torch.Tensor, layers: Iterable[int] | None = None,
                what: Iterable[str] = ("coef",), *, stop: bool = True,
                attention_mask: torch.Tensor | None = None) -> Captured:
    """One forward pass of ``input_ids`` [batch, pos], returning the captured tensors.
    With ``stop`` (default) nothing after the last requested layer's FFN is computed."""
    with torch.inference_mode(), capture(model, layers, what, stop=stop) as cap:
        model.hf(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return cap


from kvmem.callable_module import make_callable  # noqa: E402

make_callable(__name__)  # kvmem.capture(...) calls capture(); `import kvmem.capture` stays the module
