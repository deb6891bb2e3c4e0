"""Adapters registered by ``config.model_type``; an unknown family is an error, never a guess."""

from __future__ import annotations

from torch import nn

from kvmem.errors import KvmemError

_ADAPTERS: dict[str, type] = {}


def register(cls):
    for model_type in cls.model_types:
        _ADAPTERS[model_type] = cls
    return cls


def supported() -> dict[str, str]:
    """model_type -> family name, for every registered adapter."""
    _load_families()
    return {mt: cls.family for mt, cls in sorted(_ADAPTERS.items())}


def adapter_for(model: nn.Module):
    _load_families()
    model_type = getattr(model.config, "model_type", None)
    cls = _ADAPTERS.get(model_type)
    if cls is None:
        raise KvmemError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(_ADAPTERS))}"
        )
    return cls(model)


def _load_families() -> None:
    from kvmem.models import gemma, gpt2, llama, neox, opt  # noqa: F401  (registration)
