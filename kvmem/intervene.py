"""Run a prompt with FFN coefficients changed: ``intervene(model, prompt, ablate=..., scale=..., linearize=...)``.

``intervention(model, ...)`` is the context manager underneath; every hook it installs is removed
on exit, also on error:
  - ablate / scale: a forward pre-hook on each affected layer's ``out_module`` returns the modified
    coefficients m' = m ⊙ factor, factor [d_mlp] being 1 except 0 (ablated) or s (scaled);
    applied at every position of the prompt, or only at ``positions``.
  - linearize: forward hooks on ``in_module`` (and ``gate_module``) keep their outputs, and the
    out_module pre-hook replaces m by what it would be with the activation replaced by the identity:
        non-gated  m' = x·W_in + b_in                      (the FFN becomes one linear map)
        gated      m' = (x·W_gate + b_gate) ⊙ (x·W_in + b_in)  (a bilinear map: only the
                                                            nonlinearity act() is removed)
    at every position (ablate/scale factors then apply on top).
Coefficients m are [batch, pos, d_mlp] ([batch·pos, d_mlp] for OPT, which flattens; with
``positions`` the prompt must then be a single sequence, as it is for ``intervene``).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import pandas as pd
import torch

from kvmem.capture import check_layers
from kvmem.errors import KvmemError
from kvmem.neurons import parse_neuron
from kvmem.query import resolve_position
from kvmem.vocab import vocab_strings


def parse_scale(text: str, n_layers: int | None = None, d_mlp: int | None = None) -> tuple[tuple[int, int], float]:
    """'20.99=3.0' -> ((20, 99), 3.0)."""
    neuron, sep, value = text.partition("=")
    if not sep:
        raise KvmemError(f"malformed scale {text!r}: write it as LAYER.NEURON=FACTOR, e.g. 20.99=3.0")
    pair = parse_neuron(neuron, n_layers, d_mlp)
    try:
        factor = float(value)
    except ValueError:
        raise KvmemError(f"scale {text!r}: {value.strip()!r} is not a number") from None
    if not math.isfinite(factor):
        raise KvmemError(f"scale {text!r}: the factor must be a finite number")
    return pair, factor


def _factors(model, ablate, scale) -> dict[int, torch.Tensor]:
    """layer -> factor [d_mlp] (float32, on the model's device); scale is ((layer, neuron), factor) pairs."""
    factors: dict[int, torch.Tensor] = {}
    for (layer, neuron), s in scale:
        factors.setdefault(layer, torch.ones(model.d_mlp, device=model.device))[neuron] *= s
    for layer, neuron in ablate:
        factors.setdefault(layer, torch.ones(model.d_mlp, device=model.device))[neuron] = 0.0
    return factors


@contextmanager
def intervention(model, *, ablate=(), scale=(), linearize=(), positions=None):
    """Install the hooks (see the module docstring) for the duration of the block.

    ``ablate``: (layer, neuron) pairs; ``scale``: {(layer, neuron): factor} or ((layer, neuron), factor)
    pairs; ``linearize``: layers; ``positions``: position indices (default all)."""
    scale = list(scale.items()) if isinstance(scale, dict) else [(tuple(p), float(f)) for p, f in scale]
    ablate = [tuple(p) for p in ablate]
    for layer, neuron in ablate + [p for p, _ in scale]:
        parse_neuron(f"{int(layer)}.{int(neuron)}", model.n_layers, model.d_mlp)
    factors = _factors(model, ablate, scale)
    linear = set(check_layers(model, linearize)) if linearize else set()
    kept: dict[tuple[int, str], torch.Tensor] = {}
    handles = []

    def keeper(layer, kind):
        def hook(module, args, output):
            kept[(layer, kind)] = output
        return hook

    def modifier(layer):
        def hook(module, args):
            m = args[0]
            if layer in linear:
                m = kept.pop((layer, "pre"))
                if (layer, "gate") in kept:
                    m = kept.pop((layer, "gate")) * m
            if layer in factors:
                f = factors[layer].to(m.dtype)
                if positions is None:
                    m = m * f
                else:
                    m = m.clone()
                    m[..., positions, :] = m[..., positions, :] * f
            return (m, *args[1:])
        return hook

    try:
        for layer in sorted(set(factors) | linear):
            lay = model.layers[layer]
            if layer in linear:
                handles.append(lay.in_module.register_forward_hook(keeper(layer, "pre")))
                if lay.gate_module is not None:
                    handles.append(lay.gate_module.register_forward_hook(keeper(layer, "gate")))
            handles.append(lay.out_module.register_forward_pre_hook(modifier(layer)))
        yield
    finally:
        for h in handles:
            h.remove()
        kept.clear()


@dataclass
class InterventionResult:
    prompt: str
    tokens: list[str]
    position: int
    ablated: list[str]  # neuron ids
    scaled: dict[str, float]  # neuron id -> factor
    linearized: list[int]  # layers
    positions: list[int] | None  # where coefficients were changed (None: every position)
    target: str  # the tracked token: the original top prediction unless given
    target_id: int
    prob_before: float
    prob_after: float
    logit_before: float
    logit_after: float
    rank_after: int  # of the target after the intervention (1-based)
    kl: float  # KL(before || after) of the next-token distributions, in nats
    before: pd.DataFrame  # token, id, prob, logit: top next tokens without intervention
    after: pd.DataFrame  # the same with it
    logits_before: torch.Tensor = field(repr=False)  # [d_vocab] float32
    logits_after: torch.Tensor = field(repr=False)

    def to_dict(self) -> dict:
        d = {key: getattr(self, key) for key in (
            "prompt", "tokens", "position", "ablated", "scaled", "linearized", "positions", "target", "target_id",
            "prob_before", "prob_after", "logit_before", "logit_after", "rank_after", "kl")}
        d["before"] = self.before.to_dict(orient="records")
        d["after"] = self.after.to_dict(orient="records")
        return d


def _top(model, logits: torch.Tensor, n: int) -> pd.DataFrame:
    p = logits.softmax(-1)
    top = p.topk(min(n, logits.numel()))
    idx = top.indices.cpu()
    return pd.DataFrame({"token": list(vocab_strings(model)[idx.numpy()]), "id": idx.tolist(),
                         "prob": top.values.cpu().tolist(), "logit": logits[top.indices].cpu().tolist()})


@torch.inference_mode()
def intervene(model, prompt: str, *, ablate=(), scale=(), linearize=(), position: int = -1,
              only_position: bool = False, target: str | int | None = None, n_tokens: int = 10) -> InterventionResult:
    """Next-token prediction at ``position`` without and with the intervention.

    ``ablate``: 'L.N' strings or (layer, neuron) pairs; ``scale``: 'L.N=F' strings, or a dict /
    pairs ((layer, neuron), factor); ``linearize``: layers; ``only_position``: change coefficients
    at ``position`` only (default: at every position of the prompt)."""
    from kvmem.trace import resolve_target

    if n_tokens < 1:
        raise KvmemError("--tokens must be at least 1")
    ablate = [parse_neuron(a, model.n_layers, model.d_mlp) if isinstance(a, str) else tuple(a) for a in ablate]
    if isinstance(scale, dict):
        scale = list(scale.items())
    scale = [parse_scale(s, model.n_layers, model.d_mlp) if isinstance(s, str) else (tuple(s[0]), float(s[1]))
             for s in scale]
    linearize = check_layers(model, linearize) if linearize else []
    ids = model.encode(prompt)
    pos = resolve_position(position, ids.shape[1])
    before = model.hf(input_ids=ids, use_cache=False).logits[0, pos].float()
    t = resolve_target(model, target, before)
    positions = [pos] if only_position else None
    with intervention(model, ablate=ablate, scale=scale, linearize=linearize, positions=positions):
        after = model.hf(input_ids=ids, use_cache=False).logits[0, pos].float()
    lp_before, lp_after = before.log_softmax(-1), after.log_softmax(-1)
    return InterventionResult(
        prompt, model.token_strings(ids[0]), pos,
        [f"{a}.{b}" for a, b in ablate], {f"{a}.{b}": f for (a, b), f in scale}, linearize, positions,
        str(vocab_strings(model)[t]), t,
        lp_before[t].exp().item(), lp_after[t].exp().item(), before[t].item(), after[t].item(),
        int((after > after[t]).sum().item()) + 1,
        float((lp_before.exp() * (lp_before - lp_after)).sum().item()),
        _top(model, before, n_tokens), _top(model, after, n_tokens), before.cpu(), after.cpu())
