"""The statistics a layer keeps, in update order: one line per component (name = its key prefix in a run's
``stats.safetensors``: ``L{layer}.{name}.{key}``; ``module:Class``, imported on first use).

Adding a statistic: its module (a kvmem.stats.base.Stat), its test, and one line here. A component whose
``applies(spec)`` is false for a layer (quadrants of a non-gated FFN; mass without value norms) is not kept.
MoE layers (a spec with n_experts) also keep ``routing`` (load, weights, entropy, co-selection of experts).
The context windows of the report's examples (kvmem.stats.context) are not listed: they read the other
components' stores and have settings of their own, so LayerStats adds them last, under ``context.``.
"""

from __future__ import annotations

import importlib

from kvmem.errors import KvmemError
from kvmem.stats.base import LayerSpec, Stat

COMPONENTS: dict[str, str] = {
    "top": "kvmem.stats.topk:Top",
    "bottom": "kvmem.stats.topk:Bottom",
    "top_docs": "kvmem.stats.topk:TopDocs",
    "sample": "kvmem.stats.sample:Sample",
    "moments": "kvmem.stats.moments:Moments",
    "hist": "kvmem.stats.hist:Histogram",
    "counts": "kvmem.stats.counts:PositiveCounts",
    "quadrants": "kvmem.stats.quadrants:Quadrants",
    "mass": "kvmem.stats.mass:MassCounts",
    "routing": "kvmem.stats.routing:Routing",
}
RESERVED = ("meta", "context")


def component_class(name: str) -> type[Stat]:
    """The class registered under ``name``."""
    if name not in COMPONENTS:
        raise KvmemError(f"unknown statistic {name!r} (known: {', '.join(COMPONENTS)})")
    module, cls = COMPONENTS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build(spec: LayerSpec, names=None) -> dict[str, Stat]:
    """Fresh components for a layer of ``spec``: the registered ones that apply (or just ``names``)."""
    out = {}
    for name in COMPONENTS if names is None else names:
        cls = component_class(name)
        if names is not None or cls.applies(spec):
            stat = cls(spec)
            stat.name = name
            out[name] = stat
    return out


assert not set(COMPONENTS) & set(RESERVED)
