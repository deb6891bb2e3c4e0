"""Run a prompt with FFN coefficients changed: ``intervene(model, prompt, ablate=..., scale=..., set_coef=...,
linearize=...)``.

``intervention(model, ...)`` is the context manager underneath; it edits the hook point ``ffn.coef``
(m [batch, pos, d_mlp], kvmem.hooks), and every hook is removed on exit, also on error:
  - linearize: the activation becomes the identity (kvmem.hooks.linearize):
        non-gated  m' = x·W_in + b_in                          (the FFN becomes one linear map)
        gated      m' = (x·W_gate + b_gate) ⊙ (x·W_in + b_in)  (a bilinear map: only act() is removed)
    at every position;
  - ablate / scale: m' = m ⊙ factor, factor [d_mlp] being 1 except 0 (ablated) or s (scaled), on top
    of linearize;
  - set_coef (LM-Debugger's intervention): m'_i = c, whatever m_i was; the FFN output then differs by
    (c − m_i)·v_i. A neuron may be set, or ablated/scaled, not both.
ablate / scale / set_coef apply at every position of the prompt, or only at ``positions``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pandas as pd
import torch

import kvmem.hooks as hk
from kvmem.capture import check_layers
from kvmem.errors import KvmemError
from kvmem.neurons import parse_neuron
from kvmem.query import resolve_position
from kvmem.vocab import vocab_strings

if TYPE_CHECKING:
    from kvmem.models.kvmodel import KVModel


def _parse_assignment(text: str, what: str, value_name: str, n_layers, d_mlp) -> tuple[tuple[int, int], float]:
    neuron, sep, value = text.partition("=")
    if not sep:
        raise KvmemError(f"malformed {what} {text!r}: write it as LAYER.NEURON={value_name}, e.g. 20.99=3.0")
    pair = parse_neuron(neuron, n_layers, d_mlp)
    try:
        number = float(value)
    except ValueError:
        raise KvmemError(f"{what} {text!r}: {value.strip()!r} is not a number") from None
    if not math.isfinite(number):
        raise KvmemError(f"{what} {text!r}: the {value_name.lower()} must be a finite number")
    return pair, number


def parse_scale(text: str, n_layers: int | None = None, d_mlp: int | None = None) -> tuple[tuple[int, int], float]:
    """'20.99=3.0' -> ((20, 99), 3.0): multiply m_99 of layer 20 by 3."""
    return _parse_assignment(text, "scale", "FACTOR", n_layers, d_mlp)


def parse_set(text: str, n_layers: int | None = None, d_mlp: int | None = None) -> tuple[tuple[int, int], float]:
    """'20.99=5' -> ((20, 99), 5.0): set m_99 of layer 20 to 5."""
    return _parse_assignment(text, "set", "VALUE", n_layers, d_mlp)


def _pairs(items, parse, model) -> list[tuple[tuple[int, int], float]]:
    """'L.N=v' strings, a {(layer, neuron): v} dict or ((layer, neuron), v) pairs -> checked pairs."""
    items = list(items.items()) if isinstance(items, dict) else list(items)
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(parse(item, model.n_layers, model.d_mlp))
        else:
            (layer, neuron), v = item
            pair = parse_neuron(f"{int(layer)}.{int(neuron)}", model.n_layers, model.d_mlp)
            if not math.isfinite(float(v)):
                raise KvmemError(f"neuron {layer}.{neuron}: the value must be a finite number")
            out.append((pair, float(v)))
    return out


def _factors(model, ablate, scale) -> dict[int, torch.Tensor]:
    """layer -> factor [d_mlp] (float32, on the model's device); scale is ((layer, neuron), factor) pairs."""
    factors: dict[int, torch.Tensor] = {}
    for (layer, neuron), s in scale:
        factors.setdefault(layer, torch.ones(model.d_mlp, device=model.device))[neuron] *= s
    for layer, neuron in ablate:
        factors.setdefault(layer, torch.ones(model.d_mlp, device=model.device))[neuron] = 0.0
    return factors


@contextmanager
def intervention(model: KVModel, *, ablate=(), scale=(), set_coef=(), linearize=(), positions=None):
    """Install the edits (see the module docstring) for the duration of the block.

    ``ablate``: (layer, neuron) pairs; ``scale`` and ``set_coef``: {(layer, neuron): value} or
    ((layer, neuron), value) pairs; ``linearize``: layers; ``positions``: position indices (default all)."""
    scale = _pairs(scale, parse_scale, model)
    sets = _pairs(set_coef, parse_set, model)
    ablate = [parse_neuron(f"{int(a)}.{int(b)}", model.n_layers, model.d_mlp) for a, b in ablate]
    both = sorted(set(p for p, _ in sets) & (set(ablate) | set(p for p, _ in scale)))
    if both:
        raise KvmemError(f"neuron {both[0][0]}.{both[0][1]} is both set (set_coef) and ablated or scaled: choose one")
    factors = _factors(model, ablate, scale)
    values: dict[int, dict[int, float]] = {}
    for (layer, neuron), c in sets:
        values.setdefault(layer, {})[neuron] = c
    linear = check_layers(model, linearize) if linearize else []
    fns = hk.merge(*(hk.linearize(model, layer) for layer in linear),
                   *(hk.scale_coefs(layer, f, positions) for layer, f in factors.items()),
                   *(hk.set_coefs(layer, v, positions) for layer, v in values.items()))
    with hk.hooks(model, fns):
        yield


@dataclass
class InterventionResult:
    prompt: str
    tokens: list[str]
    position: int
    ablated: list[str]  # neuron ids
    scaled: dict[str, float]  # neuron id -> factor
    set_coef: dict[str, float]  # neuron id -> the value its coefficient was set to
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
            "prompt", "tokens", "position", "ablated", "scaled", "set_coef", "linearized", "positions", "target", "target_id",
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
def intervene(model: KVModel, prompt: str, *, ablate=(), scale=(), set_coef=(), linearize=(), position: int = -1,
              only_position: bool = False, target: str | int | None = None, n_tokens: int = 10) -> InterventionResult:
    """Next-token prediction at ``position`` without and with the intervention.

    ``ablate``: 'L.N' strings or (layer, neuron) pairs; ``scale``: 'L.N=F' strings, or a dict /
    pairs ((layer, neuron), factor); ``set_coef``: 'L.N=C' strings, or a dict / pairs ((layer, neuron),
    value); ``linearize``: layers; ``only_position``: change coefficients at ``position`` only (default:
    at every position of the prompt)."""
    from kvmem.trace import resolve_target

    if n_tokens < 1:
        raise KvmemError("--tokens must be at least 1")
    ablate = [parse_neuron(a, model.n_layers, model.d_mlp) if isinstance(a, str)
              else parse_neuron(f"{int(a[0])}.{int(a[1])}", model.n_layers, model.d_mlp) for a in ablate]
    scale = _pairs(scale, parse_scale, model)
    set_coef = _pairs(set_coef, parse_set, model)
    linearize = check_layers(model, linearize) if linearize else []
    ids = model.encode(prompt)
    pos = resolve_position(position, ids.shape[1])
    before = model.hf(input_ids=ids, use_cache=False).logits[0, pos].float()
    t = resolve_target(model, target, before)
    positions = [pos] if only_position else None
    with intervention(model, ablate=ablate, scale=scale, set_coef=set_coef, linearize=linearize,
                      positions=positions):
        after = model.hf(input_ids=ids, use_cache=False).logits[0, pos].float()
    lp_before, lp_after = before.log_softmax(-1), after.log_softmax(-1)
    return InterventionResult(
        prompt, model.token_strings(ids[0]), pos,
        [f"{a}.{b}" for a, b in ablate], {f"{a}.{b}": f for (a, b), f in scale},
        {f"{a}.{b}": c for (a, b), c in set_coef}, linearize, positions,
        str(vocab_strings(model)[t]), t,
        lp_before[t].exp().item(), lp_after[t].exp().item(), before[t].item(), after[t].item(),
        int((after > after[t]).sum().item()) + 1,
        float((lp_before.exp() * (lp_before - lp_after)).sum().item()),
        _top(model, before, n_tokens), _top(model, after, n_tokens), before.cpu(), after.cpu())
