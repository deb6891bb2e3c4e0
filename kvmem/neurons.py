"""Neuron ids, parsed and formatted through one type, ``NeuronId`` (all indices 0-based):

  "12.345"      neuron 345 of layer 12's FFN (dense)
  "12.e3.45"    neuron 45 of routed expert 3 of layer 12 (mixture of experts)
  "12.s0.45"    neuron 45 of shared expert 0 of layer 12
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvmem.errors import KvmemError

if TYPE_CHECKING:
    from kvmem.models.kvmodel import KVModel

_ID = re.compile(r"^\s*(\d+)\.(?:([es])(\d+)\.)?(\d+)\s*$")
_FORMS = "LAYER.NEURON (e.g. 17.1234), or LAYER.eEXPERT.NEURON / LAYER.sSHARED.NEURON for experts (e.g. 12.e3.45)"


@dataclass(frozen=True, order=True)
class NeuronId:
    """One FFN neuron: ``layer``, ``neuron`` (its index in the layer's, or the expert's, d_mlp), ``expert``
    (None for a dense FFN) and ``shared`` (True: ``expert`` indexes the layer's shared experts)."""

    layer: int
    neuron: int
    expert: int | None = None
    shared: bool = False

    def __post_init__(self):
        if self.layer < 0 or self.neuron < 0 or (self.expert is not None and self.expert < 0):
            raise KvmemError(f"neuron id fields must be >= 0, got {self!r}")
        if self.shared and self.expert is None:
            raise KvmemError("a shared-expert neuron needs its expert index")

    @classmethod
    def parse(cls, text: str) -> NeuronId:
        """'12.345', '12.e3.45' or '12.s0.45'; anything else is a KvmemError."""
        match = _ID.match(text) if isinstance(text, str) else None
        if not match:
            raise KvmemError(f"malformed neuron {text!r}: write it as {_FORMS}")
        layer, kind, expert, neuron = match.groups()
        return cls(int(layer), int(neuron), None if kind is None else int(expert), kind == "s")

    @property
    def dense(self) -> bool:
        return self.expert is None

    def __str__(self) -> str:
        if self.expert is None:
            return f"{self.layer}.{self.neuron}"
        return f"{self.layer}.{'s' if self.shared else 'e'}{self.expert}.{self.neuron}"

    def check(self, n_layers: int | None = None, d_mlp: int | None = None) -> NeuronId:
        """This id, after checking it against a model's shape (a KvmemError names what is out of range)."""
        if n_layers is not None and self.layer >= n_layers:
            raise KvmemError(f"neuron {self}: layer {self.layer} out of range (the model has layers 0..{n_layers - 1})")
        if d_mlp is not None and self.neuron >= d_mlp:
            raise KvmemError(f"neuron {self}: index {self.neuron} out of range (layers have neurons 0..{d_mlp - 1})")
        return self


def parse_neuron(text: str, n_layers: int | None = None, d_mlp: int | None = None) -> tuple[int, int]:
    """'17.1234' -> (17, 1234) for a dense model; a malformed id, one out of range, or an expert id (this
    function serves dense FFNs) is a KvmemError."""
    nid = NeuronId.parse(text)
    if not nid.dense:
        raise KvmemError(f"neuron {nid}: an expert neuron, but this command reads dense FFN neurons "
                         "(LAYER.NEURON)")
    layer, neuron = nid.layer, nid.neuron
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


def neuron_id(layer: int, neuron: int, expert: int | None = None, shared: bool = False) -> str:
    """The written form of a neuron id ('17.1234', '12.e3.45', '12.s0.45')."""
    return str(NeuronId(layer, neuron, expert, shared))


def parse_model_neuron(model: KVModel, neuron) -> tuple[int, int]:
    """A neuron of ``model`` (a KVModel) -> (layer, index into that layer's d_mlp). ``neuron``: 'L.N' at a
    dense layer, 'L.eE.N' / 'L.sS.N' at a mixture-of-experts layer (the index is then the flat one of
    kvmem.models.moe.MoELayout), or a (layer, index) pair. Malformed or out-of-range ids are KvmemErrors."""
    if isinstance(neuron, str):
        nid = NeuronId.parse(neuron)
    else:
        layer, index = (int(v) for v in neuron)
        nid = NeuronId(layer, index)
    nid.check(model.n_layers)
    lay = model.layers[nid.layer]
    layout = getattr(lay, "layout", None)
    if layout is None:
        if not nid.dense:
            raise KvmemError(f"neuron {nid}: layer {nid.layer} is a dense FFN; write its neurons as LAYER.NEURON")
        if nid.neuron >= lay.d_mlp:
            raise KvmemError(f"neuron {nid}: index {nid.neuron} out of range (layer {nid.layer} has neurons "
                             f"0..{lay.d_mlp - 1})")
        return nid.layer, nid.neuron
    if nid.dense and isinstance(neuron, str):
        raise KvmemError(f"neuron {nid}: layer {nid.layer} is a mixture of experts; write its neurons as "
                         f"{nid.layer}.eEXPERT.NEURON or {nid.layer}.sSHARED.NEURON "
                         f"(e.g. {layout.neuron_id(nid.layer, 0)})")
    return nid.layer, layout.flat(nid)


def neuron_name(model: KVModel, layer: int, index: int) -> str:
    """The printed id of neuron ``index`` of layer ``layer`` of ``model``: 'L.N', or 'L.eE.N' / 'L.sS.N' at a
    mixture-of-experts layer (``index`` the flat one)."""
    layout = getattr(model.layers[layer], "layout", None)
    return f"{layer}.{index}" if layout is None else str(layout.neuron_id(layer, index))


def parse_expert(text: str):
    """'12.e3' -> (12, 3), a whole routed expert; anything else -> None."""
    match = re.fullmatch(r"\s*(\d+)\.e(\d+)\s*", text) if isinstance(text, str) else None
    return None if match is None else (int(match[1]), int(match[2]))
