"""Sparsity stated with its thresholds: how many neurons are active per token, and how many carry the output.

Per layer, over the token sample (every token of every row), for the coefficients m [tokens, d_mlp]:
  active_gt0              share of neurons with m > 0 exactly (mean over tokens)
  active_gt{1,10}pct_max  share with m > 1% / 10% of that neuron's max over the sample
                          (a neuron whose max is <= 0 never counts)
  abs_gt_{1,10}x_mean     share with |m_i| > 1x / 10x the token's mean |m| over the layer's neurons
  carry{50,90}_*          the fewest neurons whose contribution norms |m_i|·‖v_i‖ sum to 50% / 90% of
                          sum_i |m_i|·‖v_i‖ at that token (the triangle-inequality bound on ‖m·W_out‖;
                          mean, median and 90th percentile over tokens, and mean as a share of d_mlp)
  q_{gate}{up}            gated FFNs: share of (token, neuron) pairs in each sign quadrant of
                          gate = x·W_gate + b_gate and up = x·W_in + b_in (pp, pn, np, nn)
``neuron_stats`` (the first pass) gives each neuron's firing rate (m > 0), max and mean |m| over the sample.
"""

from __future__ import annotations

import pandas as pd
import torch

from kvmem.analysis.common import Sample, batches
from kvmem.analysis.result import AnalysisResult
from kvmem.capture import capture, check_layers

MAX_FRACTIONS = (0.01, 0.1)
MEAN_MULTIPLES = (1.0, 10.0)
CARRY = (0.5, 0.9)


@torch.inference_mode()
def neuron_stats(model, sample: Sample, layers=None, tokens_per_batch: int = 2048) -> pd.DataFrame:
    """One row per (layer, neuron): firing_rate (m > 0), max m, mean |m| over the sample; n_tokens."""
    layers = check_layers(model, layers)
    d = model.d_mlp
    acc = {layer: [torch.zeros(d, dtype=torch.float64, device=model.device),
                   torch.full((d,), -torch.inf, device=model.device),
                   torch.zeros(d, dtype=torch.float64, device=model.device)] for layer in layers}

    def on_layer(layer, t):
        m = t["coef"].reshape(-1, d).float()
        a = acc[layer]
        a[0] += (m > 0).sum(0)
        a[1] = torch.maximum(a[1], m.max(0).values)
        a[2] += m.abs().sum(0, dtype=torch.float64)

    for rows in batches(sample, model.device, tokens_per_batch):
        with capture(model, layers, ("coef",), stop=True, on_layer=on_layer):
            model.hf(input_ids=rows, use_cache=False)
    n = sample.n_tokens
    frames = [pd.DataFrame({"layer": layer, "neuron": range(d), "firing_rate": (a[0] / n).cpu().numpy(),
                            "max": a[1].cpu().numpy(), "mean_abs": (a[2] / n).cpu().numpy(), "n_tokens": n})
              for layer, a in acc.items()]
    return pd.concat(frames, ignore_index=True)


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
def sparsity(model, sample: Sample, layers=None, *, maxima: dict | None = None, tokens_per_batch: int = 2048,
             stats: pd.DataFrame | None = None) -> AnalysisResult:
    """Per-layer sparsity at explicit thresholds (see the module docstring). ``maxima`` {layer: [d_mlp]}
    (e.g. the run's) sets the "% of the neuron's max" thresholds; by default the sample's own max."""
    layers = check_layers(model, layers)
    d = model.d_mlp
    maxima_source = "given (e.g. the run's per-neuron max)"
    if maxima is None:
        maxima_source = "the sample's own per-neuron max"
        if stats is None:
            stats = neuron_stats(model, sample, layers, tokens_per_batch)
        maxima = {layer: torch.tensor(g["max"].to_numpy()) for layer, g in stats.groupby("layer")}
    mx = {layer: maxima[layer].float().to(model.device) for layer in layers}
    norms = {layer: model.value_norms(layer).to(model.device) for layer in layers}
    keys = (["gt0"] + [f"gt{round(f * 100)}pct_max" for f in MAX_FRACTIONS]
            + [f"abs_gt_{c:g}x_mean" for c in MEAN_MULTIPLES])
    sums = {layer: dict.fromkeys(keys, 0.0) for layer in layers}
    hists = {layer: {p: torch.zeros(d + 1, dtype=torch.float64, device=model.device) for p in CARRY} for layer in layers}
    quads = {layer: torch.zeros(4, dtype=torch.float64, device=model.device) for layer in layers}
    what = ("coef", "gate", "pre") if model.gated else ("coef",)

    def on_layer(layer, t):
        m = t["coef"].reshape(-1, d).float()
        s = sums[layer]
        s["gt0"] += float((m > 0).float().mean(1).sum())
        for f in MAX_FRACTIONS:
            thr = torch.where(mx[layer] > 0, f * mx[layer], torch.full_like(mx[layer], torch.inf))
            s[f"gt{round(f * 100)}pct_max"] += float((m > thr).float().mean(1).sum())
        a = m.abs()
        mean_abs = a.mean(1, keepdim=True)
        for c in MEAN_MULTIPLES:
            s[f"abs_gt_{c:g}x_mean"] += float((a > c * mean_abs).float().mean(1).sum())
        contrib = a * norms[layer].float()
        for p, counts in zip(CARRY, carry_counts(contrib, CARRY)):
            hists[layer][p] += torch.bincount(counts, minlength=d + 1).double()
        if model.gated:
            g = t["gate"].reshape(-1, d) > 0
            u = t["pre"].reshape(-1, d) > 0
            quads[layer] += torch.stack([(g & u).sum(), (g & ~u).sum(), (~g & u).sum(), (~g & ~u).sum()]).double()

    for rows in batches(sample, model.device, tokens_per_batch):
        with capture(model, layers, what, stop=True, on_layer=on_layer):
            model.hf(input_ids=rows, use_cache=False)
    n = sample.n_tokens
    out = []
    for layer in layers:
        row = {"layer": layer, "n_tokens": n, "d_mlp": d}
        row.update({f"active_{k}" if not k.startswith("abs") else k: v / n for k, v in sums[layer].items()})
        for p in CARRY:
            h = hists[layer][p].cpu()
            counts = torch.arange(d + 1, dtype=torch.float64)
            cdf = h.cumsum(0) / h.sum()
            tag = f"carry{round(p * 100)}"
            row[f"{tag}_mean"] = float((h * counts).sum() / h.sum())
            row[f"{tag}_median"] = int(torch.searchsorted(cdf, torch.tensor([0.5], dtype=torch.float64))[0])
            row[f"{tag}_p90"] = int(torch.searchsorted(cdf, torch.tensor([0.9], dtype=torch.float64))[0])
            row[f"{tag}_share"] = row[f"{tag}_mean"] / d
        if model.gated:
            q = (quads[layer] / quads[layer].sum()).cpu().tolist()
            row.update(q_gate_pos_up_pos=q[0], q_gate_pos_up_neg=q[1], q_gate_neg_up_pos=q[2], q_gate_neg_up_neg=q[3])
        out.append(row)
    per_layer = pd.DataFrame(out)
    summary = per_layer.drop(columns=["layer"]).mean(numeric_only=True).to_frame().T
    summary.insert(0, "layers", len(layers))
    summary["n_tokens"] = n
    meta = {"n_tokens": n, "sample": sample.source, "max_fractions": list(MAX_FRACTIONS),
            "mean_multiples": list(MEAN_MULTIPLES), "carry_shares": list(CARRY),
            "maxima": maxima_source,
            "carry_definition": "fewest neurons whose |m_i|*||v_i|| sum to the share of sum_i |m_i|*||v_i||",
            "baseline": "a dense layer would have every share at 1.0 and carry counts near the share times d_mlp",
            "gated": model.gated, "activation": model.activation}
    return AnalysisResult("sparsity", {"layers": per_layer, "model": summary}, meta)
