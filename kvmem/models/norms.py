"""Reading a norm module as "gain ⊙ (z, centred or not) · s + bias", s the token's scale.

Kinds (the adapter names the kind; the module supplies weight, bias and eps):
  "rms"    w ⊙ z / sqrt(mean(z²) + eps)                      (Llama-style RMSNorm, OLMo 2)
  "rms1p"  (1 + w) ⊙ z / sqrt(mean(z²) + eps)                (Gemma 1-3 RMSNorm: weight stored minus one)
  "layer"  w ⊙ (z − mean z) / sqrt(var(z) + eps) + b          (nn.LayerNorm; w = 1, b = 0 without affine)
All returned tensors are float32; z [..., d_model]; scales [..., 1].
"""

from __future__ import annotations

import torch
from torch import nn

from kvmem.errors import KvmemError

NORM_KINDS = ("rms", "rms1p", "layer")


def norm_eps(module: nn.Module) -> float:
    for name in ("eps", "variance_epsilon", "epsilon"):
        value = getattr(module, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    raise KvmemError(f"cannot find the epsilon of a {type(module).__name__} norm")


def norm_gain(module: nn.Module, kind: str) -> torch.Tensor:
    """The effective per-channel gain γ [d_model] float32."""
    w = getattr(module, "weight", None)
    if kind == "rms1p":
        return 1.0 + w.float()
    if w is None:  # LayerNorm without elementwise affine
        return torch.ones(module.normalized_shape[-1])
    return w.float()


def norm_bias(module: nn.Module) -> torch.Tensor | None:
    b = getattr(module, "bias", None)
    return None if b is None else b.float()


def norm_inv_scale(module: nn.Module, kind: str, z: torch.Tensor) -> torch.Tensor:
    """s = 1/rms(z) or 1/σ(z) per token, [..., 1] float32 (eps included, as the module computes it)."""
    z = z.float()
    if kind == "layer":
        var = z.var(-1, keepdim=True, unbiased=False)
    elif kind in ("rms", "rms1p"):
        var = z.pow(2).mean(-1, keepdim=True)
    else:
        raise KvmemError(f"unknown norm kind {kind!r}; one of {', '.join(NORM_KINDS)}")
    return torch.rsqrt(var + norm_eps(module))
