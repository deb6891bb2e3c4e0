"""Adapters registered by ``config.model_type``; an unknown family is an error, never a guess."""

from __future__ import annotations

from torch import nn

from kvmem.errors import KvmemError

_ADAPTERS: dict[str, type] = {}
_MOE = "its FFNs are mixtures of experts of a kind kvmem's MoE adapters do not cover yet"
# Families kvmem knows it cannot represent exactly (yet), with the reason given when one is loaded.
REFUSED = {
    "gemma3": "the multimodal Gemma 3 wrapper; load its text model (model_type 'gemma3_text', Gemma3ForCausalLM)",
    "gemma3n": "Gemma 3n's AltUp and per-layer inputs mix several streams: a neuron's write is not one vector",
    "falcon_h1": "a hybrid of attention and Mamba blocks; its FFN view is not implemented",
    "granitemoe": _MOE, "phimoe": _MOE,
}


def register(cls):
    for model_type in cls.model_types:
        if model_type in _ADAPTERS and _ADAPTERS[model_type] is not cls:
            raise KvmemError(f"model_type {model_type!r} registered twice "
                             f"({_ADAPTERS[model_type].__name__}, {cls.__name__})")
        _ADAPTERS[model_type] = cls
    return cls


def adapters() -> dict[str, type]:
    """model_type -> adapter class, for every registered adapter (sorted by model_type)."""
    _load_families()
    return dict(sorted(_ADAPTERS.items()))


def supported() -> dict[str, str]:
    """model_type -> family name, for every registered adapter."""
    _load_families()
    return {mt: cls.family for mt, cls in sorted(_ADAPTERS.items())}


def adapter_for(model: nn.Module):
    _load_families()
    model_type = getattr(model.config, "model_type", None)
    cls = _ADAPTERS.get(model_type)
    if cls is None and model_type in REFUSED:
        raise KvmemError(f"unsupported architecture {model_type!r}: {REFUSED[model_type]}")
    if cls is None:
        raise KvmemError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(_ADAPTERS))}"
        )
    return cls(model)


def _load_families() -> None:
    from kvmem.models import (cohere, deepseek_v3, falcon, gemma, gemma2, gpt2, gpt_oss, gptj, granite,  # noqa: F401
                              llama, mixtral, neox, olmo2, olmoe, opt, phi3, qwen3, qwen_moe, smollm3,
                              starcoder2)  # (registration)
