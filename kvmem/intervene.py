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
from kvmem.neurons import neuron_name, parse_expert, parse_model_neuron, parse_neuron
from kvmem.query import resolve_position
from kvmem.vocab import vocab_strings

if TYPE_CHECKING:
    from kvmem.models.kvmodel import KVModel


def _parse_assignment(text: str, what: str, value_name: str, n_layers, d_mlp, model) -> tuple[tuple[int, int], float]:
    neuron, sep, value = text.partition("=")
    if not sep:
        raise KvmemError(f"malformed {what} {text!r}: write it as LAYER.NEURON={value_name}, e.g. 20.99=3.0")
    pair = parse_model_neuron(model, neuron) if model is not None else parse_neuron(neuron, n_layers, d_mlp)
    try:
        number = float(value)
    except ValueError:
        raise KvmemError(f"{what} {text!r}: {value.strip()!r} is not a number") from None
    if not math.isfinite(number):
        raise KvmemError(f"{what} {text!r}: the {value_name.lower()} must be a finite number")
    return pair, number


def parse_scale(text: str, n_layers: int | None = None, d_mlp: int | None = None, *,
                model: KVModel | None = None) -> tuple[tuple[int, int], float]:
    """'20.99=3.0' -> ((20, 99), 3.0): multiply m_99 of layer 20 by 3. With ``model``, ids are checked against
    it and expert ids 'L.eE.N' at its MoE layers give their flat index."""
    return _parse_assignment(text, "scale", "FACTOR", n_layers, d_mlp, model)


def parse_set(text: str, n_layers: int | None = None, d_mlp: int | None = None, *,
              model: KVModel | None = None) -> tuple[tuple[int, int], float]:
    """'20.99=5' -> ((20, 99), 5.0): set m_99 of layer 20 to 5 (at an MoE layer: c = w·m of that neuron)."""
    return _parse_assignment(text, "set", "VALUE", n_layers, d_mlp, model)


def _pairs(items, parse, model) -> list[tuple[tuple[int, int], float]]:
    """'L.N=v' strings, a {(layer, neuron): v} dict or ((layer, neuron), v) pairs -> checked pairs."""
    items = list(items.items()) if isinstance(items, dict) else list(items)
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(parse(item, model=model))
        else:
            (layer, neuron), v = item
            pair = parse_model_neuron(model, neuron if isinstance(neuron, str) else (layer, neuron))
            if not math.isfinite(float(v)):
                raise KvmemError(f"neuron {layer}.{neuron}: the value must be a finite number")
            out.append((pair, float(v)))
    return out


def _factors(model, ablate, scale) -> dict[int, torch.Tensor]:
    """layer -> factor [d_mlp] (float32, on the model's device); scale is ((layer, neuron), factor) pairs."""
    factors: dict[int, torch.Tensor] = {}
    for (layer, neuron), s in scale:
        factors.setdefault(layer, torch.ones(model.layers[layer].d_mlp, device=model.device))[neuron] *= s
    for layer, neuron in ablate:
        factors.setdefault(layer, torch.ones(model.layers[layer].d_mlp, device=model.device))[neuron] = 0.0
    return factors


@contextmanager
def intervention(model: KVModel, *, ablate=(), scale=(), set_coef=(), linearize=(), positions=None,
                 experts=()):
    """Install the edits (see the module docstring) for the duration of the block.

    ``ablate``: (layer, neuron) pairs (neuron: the index in the layer's d_mlp, flat at MoE layers); ``scale``
    and ``set_coef``: {(layer, neuron): value} or ((layer, neuron), value) pairs; ``linearize``: layers;
    ``experts``: (layer, expert) pairs dropped from the routing (kvmem.hooks.ablate_experts); ``positions``:
    position indices (default all)."""
    scale = _pairs(scale, parse_scale, model)
    sets = _pairs(set_coef, parse_set, model)
    ablate = [parse_model_neuron(model, (a, b)) for a, b in ablate]
    experts = [_check_expert(model, layer, e) for layer, e in experts]
    both = sorted(set(p for p, _ in sets) & (set(ablate) | set(p for p, _ in scale)))
    if both:
        raise KvmemError(f"neuron {neuron_name(model, *both[0])} is both set (set_coef) and ablated or scaled: "
                         "choose one")
    factors = _factors(model, ablate, scale)
    values: dict[int, dict[int, float]] = {}
    for (layer, neuron), c in sets:
        values.setdefault(layer, {})[neuron] = c
    linear = check_layers(model, linearize) if linearize else []
    fns = hk.merge(*(hk.ablate_experts(layer, [e], positions) for layer, e in experts),
                   *(hk.linearize(model, layer) for layer in linear),
                   *(hk.scale_coefs(layer, f, positions) for layer, f in factors.items()),
                   *(hk.set_coefs(layer, v, positions) for layer, v in values.items()))
    with hk.hooks(model, fns):
        yield


def _check_expert(model, layer: int, expert: int) -> tuple[int, int]:
    if not 0 <= layer < model.n_layers:
        raise KvmemError(f"expert {layer}.e{expert}: layer {layer} out of range (the model has layers "
                         f"0..{model.n_layers - 1})")
    layout = getattr(model.layers[layer], "layout", None)
    if layout is None:
        raise KvmemError(f"expert {layer}.e{expert}: layer {layer} is not a mixture of experts")
    layout.expert_range(expert)  # raises when out of range
    return layer, expert


@dataclass
class InterventionResult:
    prompt: str
    tokens: list[str]
    position: int
    ablated: list[str]  # neuron ids, and whole experts 'L.eE' (dropped from the routing)
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

    ``ablate``: 'L.N' / 'L.eE.N' strings or (layer, neuron) pairs, or whole experts 'L.eE' (dropped from the
    routing: its router logit -inf, the token goes to its next experts); ``scale``: 'L.N=F' strings, or a dict /
    pairs ((layer, neuron), factor); ``set_coef``: 'L.N=C' strings, or a dict / pairs ((layer, neuron),
    value); ``linearize``: layers; ``only_position``: change coefficients at ``position`` only (default:
    at every position of the prompt)."""
    from kvmem.trace import resolve_target

    if n_tokens < 1:
        raise KvmemError("--tokens must be at least 1")
    experts = [_check_expert(model, *parse_expert(a)) for a in ablate if parse_expert(a) is not None]
    ablate = [parse_model_neuron(model, a) for a in ablate if parse_expert(a) is None]
    scale = _pairs(scale, parse_scale, model)
    set_coef = _pairs(set_coef, parse_set, model)
    linearize = check_layers(model, linearize) if linearize else []
    ids = model.encode(prompt)
    pos = resolve_position(position, ids.shape[1])
    before = model.hf(input_ids=ids, use_cache=False).logits[0, pos].float()
    t = resolve_target(model, target, before)
    positions = [pos] if only_position else None
    with intervention(model, ablate=ablate, scale=scale, set_coef=set_coef, linearize=linearize,
                      positions=positions, experts=experts):
        after = model.hf(input_ids=ids, use_cache=False).logits[0, pos].float()
    lp_before, lp_after = before.log_softmax(-1), after.log_softmax(-1)
    return InterventionResult(
        prompt, model.token_strings(ids[0]), pos,
        [neuron_name(model, a, b) for a, b in ablate] + [f"{a}.e{e}" for a, e in experts],
        {neuron_name(model, a, b): f for (a, b), f in scale},
        {neuron_name(model, a, b): c for (a, b), c in set_coef}, linearize, positions,
        str(vocab_strings(model)[t]), t,
        lp_before[t].exp().item(), lp_after[t].exp().item(), before[t].item(), after[t].item(),
        int((after > after[t]).sum().item()) + 1,
        float((lp_before.exp() * (lp_before - lp_after)).sum().item()),
        _top(model, before, n_tokens), _top(model, after, n_tokens), before.cpu(), after.cpu())


from kvmem.callable_module import make_callable  # noqa: E402

make_callable(__name__)  # kvmem.intervene(...) calls intervene(); `import kvmem.intervene` stays the module
