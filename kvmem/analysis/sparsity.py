"""Sparsity stated with its thresholds: how many neurons are active per token, and how many carry the output.

Magnitudes, not signs: a gated (SwiGLU) coefficient m = act(gate)·up is sign-symmetric and m = -5 writes as
much as m = +5, so a neuron is *active* at a token when |m_i| > f · (its max |m| over the reference), f = 1%
or 10% (a neuron whose max |m| is 0 is never active). The reference maxima are given (e.g. the run's, from
kvmem.analysis.neurons) or the sample's own.

Per layer, over the sample's counted tokens (no BOS, padding or skipped position 0), for m [tokens, d_mlp]:
  active1, active10       share of neurons with |m| > 1% / 10% of their max |m| (mean over tokens)  [headline]
  active_gt0              share with m > 0 exactly (secondary, sign-blind: meaningful for ReLU/GELU only)
  abs_gt_{1,10}x_mean     share with |m_i| > 1x / 10x the token's mean |m| over the layer's neurons
  carry{50,90}_share      the fewest neurons whose contribution norms |m_i|·‖w_i‖ sum to 50% / 90% of
                          sum_i |m_i|·‖w_i‖ at that token (the triangle-inequality bound on the update's norm;
                          w_i = v_i, or write_scale·γ⊙v_i what the neuron writes through a post-FFN norm),
                          as a share of d_mlp (mean over tokens); carry{50,90}_mean / _median / _p90 as counts
  q_gate_{pos,neg}_up_{pos,neg}  gated FFNs: share of (token, neuron) pairs in each sign quadrant of
                          gate = x·W_gate + b_gate and up = x·W_in + b_in
Every rate r in RATES has r_lo, r_hi (95% cluster bootstrap over documents, kvmem.analysis.ci), n_r (tokens)
and the layer row n_tokens / n_docs (tokens / documents); the ``model`` row pools every layer's tokens
(its intervals from the same bootstrap over documents). The ``units`` table has one row per (layer,
counted token): layer, doc, index and the RATES as floats (the token's share), for pooled depth thirds.
``neuron_stats`` (a pass over the sample) gives each neuron's max |m|, its |m|-based active rate and the
m > 0 firing rate (secondary).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from kvmem.analysis import ci
from kvmem.analysis.common import Sample, forward, row_batches
from kvmem.analysis.neurons import ACTIVE_REL, maxima_of
from kvmem.analysis.result import AnalysisResult
from kvmem.capture import capture, check_layers
from kvmem.errors import KvmemError

if TYPE_CHECKING:
    from kvmem.models.kvmodel import KVModel

MAX_FRACTIONS = (0.01, 0.1)
MEAN_MULTIPLES = (1.0, 10.0)
CARRY = (0.5, 0.9)
# the per-token rates, in the order on_layer stacks them: active1, active10, active_gt0, carry50_share, carry90_share
RATES = (tuple(f"active{round(f * 100)}" for f in MAX_FRACTIONS) + ("active_gt0",)
         + tuple(f"carry{round(p * 100)}_share" for p in CARRY))


@torch.inference_mode()
def neuron_stats(model: KVModel, sample: Sample, layers=None, tokens_per_batch: int = 2048, *, rel: float = ACTIVE_REL,
                 rates: bool = True) -> pd.DataFrame:
    """One row per (layer, neuron) over the sample's counted tokens: max_abs (max |m|), max, min, mean_abs,
    active_rate (share of tokens with |m| > rel · max_abs; a second pass, skipped when ``rates`` is False:
    NaN), firing_rate (m > 0, secondary), n_tokens."""
    layers = check_layers(model, layers)
    d, dev = model.d_mlp, model.device
    acc = {layer: {"pos": torch.zeros(d, dtype=torch.float64, device=dev),
                   "max": torch.full((d,), -torch.inf, device=dev), "min": torch.full((d,), torch.inf, device=dev),
                   "abs": torch.zeros(d, dtype=torch.float64, device=dev),
                   "act": torch.zeros(d, dtype=torch.float64, device=dev)} for layer in layers}
    thr: dict = {}

    def first(layer, t, keep):
        m = t["coef"][keep].float()  # [n, d]: counted tokens only
        a = acc[layer]
        a["pos"] += (m > 0).sum(0)
        if m.shape[0]:
            a["max"] = torch.maximum(a["max"], m.max(0).values)
            a["min"] = torch.minimum(a["min"], m.min(0).values)
        a["abs"] += m.abs().sum(0, dtype=torch.float64)

    def second(layer, t, keep):
        acc[layer]["act"] += (t["coef"][keep].float().abs() > thr[layer]).sum(0)

    def sweep(fn):
        for part in row_batches(sample, dev, tokens_per_batch):
            with capture(model, layers, ("coef",), stop=True, on_layer=lambda i, t: fn(i, t, part.counted)):
                forward(model, part)

    sweep(first)
    mx = {layer: torch.maximum(a["max"], -a["min"]).clamp(min=0) for layer, a in acc.items()}
    if rates:
        thr.update({layer: torch.where(m > 0, rel * m, torch.full_like(m, torch.inf)) for layer, m in mx.items()})
        sweep(second)
    n = sample.n_tokens
    if n == 0:
        raise KvmemError("the sample has no counted tokens")

    def np_(x):
        return x.double().cpu().numpy()

    frames = [pd.DataFrame({"layer": layer, "neuron": range(d), "max_abs": np_(mx[layer]), "max": np_(a["max"]),
                            "min": np_(a["min"]), "mean_abs": np_(a["abs"] / n),
                            "active_rate": np_(a["act"] / n) if rates else np.nan,
                            "firing_rate": np_(a["pos"] / n), "n_tokens": n})
              for layer, a in acc.items()]
    return pd.concat(frames, ignore_index=True)


def written_norms(model: KVModel, layer: int) -> torch.Tensor:
    """‖w_i‖ [d_mlp] float32 of what neuron i writes per unit coefficient (FFNLayer.value_vectors_written:
    write_scale·γ⊙v_i under a post-FFN norm, ‖v_i‖ otherwise). The post-norm's per-token scale multiplies
    every neuron of the token alike, so it leaves the carry counts unchanged."""
    return model.layers[layer].value_vectors_written().norm(dim=1).float()


def carry_counts(contrib: torch.Tensor, shares) -> list[torch.Tensor]:
    """contrib [tokens, d_mlp] >= 0 -> per share, [tokens] the fewest neurons whose contributions sum to
    that share of the token's total (0 where the total is 0). One sort for all shares."""
    cs = contrib.sort(dim=1, descending=True).values.double().cumsum(1)
    total = cs[:, -1:]
    out = []
    for share in shares:
        count = ((cs < share * total).sum(1) + 1).clamp(max=cs.shape[1])
        out.append(torch.where(total[:, 0] > 0, count, torch.zeros_like(count)))
    return out


@torch.inference_mode()
def sparsity(model: KVModel, sample: Sample, layers=None, *, maxima: dict | None = None, tokens_per_batch: int = 2048,
             stats: pd.DataFrame | None = None, n_boot: int = ci.N_BOOT, seed: int = 0) -> AnalysisResult:
    """Per-layer sparsity at explicit |m| thresholds (see the module docstring). ``maxima`` {layer: [d_mlp]}
    max |m| per neuron (e.g. the run's: kvmem.analysis.neurons) sets the "% of the neuron's max |m|"
    thresholds; else ``stats`` (a neuron table with max_abs); else the sample's own."""
    layers = check_layers(model, layers)
    d, dev = model.d_mlp, model.device
    maxima_source = "given max |m| per neuron (e.g. the run's)"
    if maxima is None:
        maxima_source = "max |m| per neuron from the given neuron table"
        if stats is None:
            maxima_source = "the sample's own max |m| per neuron"
            stats = neuron_stats(model, sample, layers, tokens_per_batch, rates=False)
        maxima = maxima_of(stats)
    missing = [layer for layer in layers if layer not in maxima]
    if missing:
        raise KvmemError(f"maxima: no max |m| for layer {missing[0]}")
    mx = {layer: maxima[layer].float().abs().to(dev) for layer in layers}
    norms = {layer: written_norms(model, layer).to(dev) for layer in layers}
    quads = {layer: torch.zeros(4, dtype=torch.float64, device=dev) for layer in layers}
    cols = {layer: [] for layer in layers}  # per batch: [n, RATES + abs_gt_* + carry counts]
    what = ("coef", "gate", "pre") if model.gated else ("coef",)
    docs, index = [], []

    def on_layer(layer, t, keep):
        m = t["coef"][keep].float()  # [n, d] counted tokens
        a = m.abs()
        out = []
        for f in MAX_FRACTIONS:
            thr = torch.where(mx[layer] > 0, f * mx[layer], torch.full_like(mx[layer], torch.inf))
            out.append((a > thr).float().mean(1))
        out.append((m > 0).float().mean(1))
        counts = carry_counts(a * norms[layer], CARRY)
        out += [c.float() / d for c in counts]
        mean_abs = a.mean(1, keepdim=True)
        out += [(a > c * mean_abs).float().mean(1) for c in MEAN_MULTIPLES]
        out += [c.float() for c in counts]
        cols[layer].append(torch.stack(out, 1).cpu())
        if model.gated:
            g = t["gate"][keep] > 0
            u = t["pre"][keep] > 0
            quads[layer] += torch.stack([(g & u).sum(), (g & ~u).sum(), (~g & u).sum(), (~g & ~u).sum()]).double()

    for part in row_batches(sample, dev, tokens_per_batch):
        docs.append(part.doc[part.counted].cpu())
        index.append(part.index[part.counted].cpu())
        with capture(model, layers, what, stop=True, on_layer=lambda i, t, k=part.counted: on_layer(i, t, k)):
            forward(model, part)
    n = sample.n_tokens
    if n == 0:
        raise KvmemError("the sample has no counted tokens")
    doc, idx = torch.cat(docs).numpy(), torch.cat(index).numpy()
    extra = [f"abs_gt_{c:g}x_mean" for c in MEAN_MULTIPLES] + [f"carry{round(p * 100)}_count" for p in CARRY]
    frames = []
    for layer in layers:
        x = torch.cat(cols[layer]).numpy()
        f = pd.DataFrame(x, columns=list(RATES) + extra)
        f.insert(0, "layer", layer)
        f.insert(1, "doc", doc)
        f.insert(2, "index", idx)
        frames.append(f)
    allu = pd.concat(frames, ignore_index=True)
    per_layer = ci.bootstrap(allu, list(RATES), by="layer", n_boot=n_boot, seed=seed)
    per_layer = per_layer.rename(columns={"n_units": "n_tokens", "n_clusters": "n_docs"})
    per_layer.insert(1, "d_mlp", d)
    means = allu.groupby("layer")[extra[:len(MEAN_MULTIPLES)]].mean().reset_index()
    per_layer = per_layer.merge(means, on="layer")
    for p in CARRY:
        tag = f"carry{round(p * 100)}"
        g = allu.groupby("layer")[f"{tag}_count"]
        per_layer[f"{tag}_mean"] = g.mean().to_numpy()
        per_layer[f"{tag}_median"] = g.quantile(0.5, interpolation="lower").to_numpy().astype(int)
        per_layer[f"{tag}_p90"] = g.quantile(0.9, interpolation="lower").to_numpy().astype(int)
    if model.gated:
        q = torch.stack([quads[layer] / quads[layer].sum() for layer in layers]).cpu().numpy()
        for j, name in enumerate(("q_gate_pos_up_pos", "q_gate_pos_up_neg", "q_gate_neg_up_pos", "q_gate_neg_up_neg")):
            per_layer[name] = q[:, j]
    units = allu[["layer", "doc", "index", *RATES]].astype({c: np.float32 for c in RATES})
    # the model row: every rate pooled over the layers' units (intervals from the same bootstrap), other
    # columns the mean over layers
    summary = ci.bootstrap(allu, list(RATES), n_boot=n_boot, seed=seed).drop(columns=["n_units", "n_clusters"])
    rest = [c for c in per_layer.columns if c not in summary.columns and c not in ("layer", "n_tokens", "n_docs")]
    summary = pd.concat([summary, per_layer[rest].mean(numeric_only=True).to_frame().T], axis=1)
    summary.insert(0, "layers", len(layers))
    summary["n_tokens"] = n
    summary["n_docs"] = sample.n_docs
    meta = {"n_tokens": n, "n_docs": sample.n_docs, "sample": sample.source,
            "active": "|m_i| > f x max |m_i| (magnitude: a SwiGLU neuron at m = -5 is active); "
                      "active_gt0 = m > 0 is secondary (sign-blind)",
            "max_fractions": list(MAX_FRACTIONS), "mean_multiples": list(MEAN_MULTIPLES),
            "carry_shares": list(CARRY), "maxima": maxima_source, "rates": list(RATES),
            "carry_definition": "fewest neurons whose |m_i|*||w_i|| sum to the share of sum_i |m_i|*||w_i|| "
                                "(w_i: what neuron i writes per unit m, v_i without a post-FFN norm)",
            "interval": f"95% cluster bootstrap over documents ({n_boot} draws, seed {seed})",
            "units": "one row per (layer, counted token): the token's shares",
            "baseline": "a dense layer would have every share at 1.0 and carry counts near the share times d_mlp",
            "gated": model.gated, "activation": model.activation}
    return AnalysisResult("sparsity", {"layers": per_layer, "model": summary, "units": units}, meta)
