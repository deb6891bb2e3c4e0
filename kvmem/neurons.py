"""Neuron ids written ``layer.neuron`` (0-based), parsed and checked against a model."""

from __future__ import annotations

import re

from kvmem.errors import KvmemError

_NEURON = re.compile(r"^\s*(\d+)\.(\d+)\s*$")


def parse_neuron(text: str, n_layers: int | None = None, d_mlp: int | None = None) -> tuple[int, int]:
    """'17.1234' -> (17, 1234); a malformed id or one out of range is a KvmemError."""
    match = _NEURON.match(text)
    if not match:
        raise KvmemError(f"malformed neuron {text!r}: write it as LAYER.NEURON, e.g. 17.1234")
    layer, neuron = int(match[1]), int(match[2])
    if n_layers is not None and layer >= n_layers:
        raise KvmemError(f"neuron {text}: layer {layer} out of range (the model has layers 0..{n_layers - 1})")
    if d_mlp is not None and neuron >= d_mlp:
        raise KvmemError(f"neuron {text}: index {neuron} out of range (layers have neurons 0..{d_mlp - 1})")
    return layer, neuron


def parse_layers(text: str | None, n_layers: int) -> list[int] | None:
    """'0-3,7,-1' -> [0, 1, 2, 3, 7, n_layers-1]; None or '' -> None (all layers)."""
    if text is None or not text.strip():
        return None
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(-?\d+)(?:-(\d+))?", part)
        if not m:
            raise KvmemError(f"malformed layer list {text!r}: use e.g. 0-3,7")
        lo = int(m[1])
        lo = lo + n_layers if lo < 0 else lo
        hi = int(m[2]) if m[2] is not None else lo
        for layer in (lo, hi):
            if not 0 <= layer < n_layers:
                raise KvmemError(f"layer {layer} out of range: the model has layers 0..{n_layers - 1}")
        out.update(range(lo, hi + 1))
    return sorted(out)


def neuron_id(layer: int, neuron: int) -> str:
    return f"{layer}.{neuron}"
