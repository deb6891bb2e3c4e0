"""Capture FFN coefficients with plain PyTorch hooks, for every family the same way.

What can be recorded per layer (all [batch, pos, ...], detached, in the model's dtype):
  "coef"  m, the input of W_out                       [batch, pos, d_mlp]
  "pre"   x·W_in + b_in (the up projection of gated FFNs,
          the pre-activation of the others)          [batch, pos, d_mlp]
  "gate"  x·W_gate + b_gate (gated FFNs only)         [batch, pos, d_mlp]
  "x"     the FFN input (after the block's norm)      [batch, pos, d_model]
  "out"   the FFN output m·W_out + b_out              [batch, pos, d_model]

``stop=True`` ends the forward pass right after the last requested layer's FFN (no later
layers, no LM head). Hooks are removed on exit, also on error. With ``on_layer`` the
tensors are handed to a callback instead of being kept (streaming statistics).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from kvmem.errors import KvmemError

KINDS = ("coef", "pre", "gate", "x", "out")


class StopForward(Exception):
    """Raised by a hook to end the forward pass early; swallowed by ``capture``."""


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


def check_layers(model, layers: Iterable[int] | None) -> list[int]:
    if layers is None:
        return list(range(model.n_layers))
    out = sorted(set(int(layer) for layer in layers))
    bad = [layer for layer in out if not 0 <= layer < model.n_layers]
    if bad or not out:
        raise KvmemError(f"layer {bad[0] if bad else '(none)'} out of range: the model has layers 0..{model.n_layers - 1}")
    return out


@contextmanager
def capture(model, layers: Iterable[int] | None = None, what: Iterable[str] = ("coef",), *,
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
    shape: list[torch.Size] = [torch.Size()]  # [batch, pos] of the current forward pass
    pending: dict[int, dict[str, torch.Tensor]] = {}
    last = layers[-1]

    def shaped(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        return t.view(*shape[-1], t.shape[-1]) if t.dim() == 2 else t  # OPT flattens [batch*pos]

    def keep(layer: int, kind: str, t: torch.Tensor) -> None:
        if on_layer is None:
            cap.data[kind][layer] = shaped(t)
        else:
            pending.setdefault(layer, {})[kind] = shaped(t)

    def finish(layer: int) -> None:
        if on_layer is not None and layer in pending:
            on_layer(layer, pending.pop(layer))
        if stop and layer == last:
            cap.stopped = True
            raise StopForward

    def record_shape(m, args):
        shape[-1] = args[0].shape[:2]

    handles = [model.adapter.embed().register_forward_pre_hook(record_shape)]
    for layer in layers:
        lay = model.layers[layer]
        if "x" in what:
            handles.append(lay.in_module.register_forward_pre_hook(lambda m, a, i=layer: keep(i, "x", a[0])))
        if "pre" in what:
            handles.append(lay.in_module.register_forward_hook(lambda m, a, o, i=layer: keep(i, "pre", o)))
        if "gate" in what:
            handles.append(lay.gate_module.register_forward_hook(lambda m, a, o, i=layer: keep(i, "gate", o)))
        if "coef" in what:
            handles.append(lay.out_module.register_forward_pre_hook(lambda m, a, i=layer: keep(i, "coef", a[0])))

        def after_ffn(m, a, o, i=layer):
            if "out" in what:
                keep(i, "out", o)
            finish(i)

        handles.append(lay.ffn_module.register_forward_hook(after_ffn))
    try:
        yield cap
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()


def run_capture(model, input_ids: torch.Tensor, layers: Iterable[int] | None = None,
                what: Iterable[str] = ("coef",), *, stop: bool = True,
                attention_mask: torch.Tensor | None = None) -> Captured:
    """One forward pass of ``input_ids`` [batch, pos], returning the captured tensors.
    With ``stop`` (default) nothing after the last requested layer's FFN is computed."""
    with torch.inference_mode(), capture(model, layers, what, stop=stop) as cap:
        model.hf(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return cap
