"""Model loading and the per-family adapters that give every FFN layer one uniform view."""

from kvmem.models.base import Adapter, FFNLayer
from kvmem.models.kvmodel import KVModel, from_hf, load
from kvmem.models.load import DEFAULT_MODEL
from kvmem.models.registry import supported

__all__ = ["Adapter", "FFNLayer", "KVModel", "DEFAULT_MODEL", "from_hf", "load", "supported"]
