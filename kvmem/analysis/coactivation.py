"""Co-activation: the neurons that fire together with a given neuron, over a token sample.

A neuron *fires* at a token when |m| > rel · (its max |m| over the sample, or the given maxima): magnitude,
not sign (a SwiGLU neuron at m = -5 fires); a neuron whose max |m| is 0 never fires. Only the sample's
counted tokens take part (no BOS, padding or skipped position 0). For query neurons Q and every neuron j of
the searched layers, accumulated on the device per batch as one matrix product F_Q^T F [q, n_layers·d_mlp]
of boolean firing matrices:
  co        tokens where both fire            n_query, n_partner   tokens where each fires
  jaccard   co / (n_query + n_partner - co)   (the ranking)
  p_given   co / n_query                      P(partner fires | query fires); p_given_lo/_hi: Wilson 95%
  lift      co · N / (n_query · n_partner)    1.0 = independent firing (the baseline)
Partners that never fire together with the query are left out (a query that never fires has no rows);
small ``co`` counts are noisy: read lift together with co.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd
import torch

from kvmem.analysis.ci import wilson
from kvmem.analysis.common import Sample, forward, row_batches
from kvmem.analysis.result import AnalysisResult
from kvmem.capture import capture, check_layers
from kvmem.errors import KvmemError

if TYPE_CHECKING:
    from kvmem.models.kvmodel import KVModel


@torch.inference_mode()
def coactivation(model: KVModel, sample: Sample, neurons, *, layers=None, top: int = 10, rel: float = 0.25,
                 maxima: dict | None = None, tokens_per_batch: int = 2048) -> AnalysisResult:
    """For each query neuron (layer, neuron), its ``top`` partners by Jaccard similarity of firing.
    ``maxima`` {layer: [d_mlp]} max |m| per neuron (default: the sample's own)."""
    from kvmem.analysis.neurons import maxima_of
    from kvmem.analysis.sparsity import neuron_stats
    from kvmem.vocab import parse_neurons

    queries = parse_neurons(model, neurons)
    layers = check_layers(model, layers)
    if not 0 < rel <= 1:
        raise KvmemError("rel: the firing threshold must be a fraction of the max |m| in (0, 1]")
    need = sorted(set(layers) | {q[0] for q in queries})
    maxima_source = "given max |m| per neuron"
    if maxima is None:
        maxima = maxima_of(neuron_stats(model, sample, need, tokens_per_batch, rates=False))
        maxima_source = "the sample's own max |m| per neuron"
    missing = [layer for layer in need if layer not in maxima]
    if missing:
        raise KvmemError(f"maxima: no max |m| for layer {missing[0]}")
    d = model.d_mlp
    thr = {}
    for layer in need:
        mx = maxima[layer].float().abs()
        thr[layer] = torch.where(mx > 0, rel * mx, torch.tensor(torch.inf)).to(model.device)
    col = {layer: i for i, layer in enumerate(layers)}
    co = torch.zeros(len(queries), len(layers) * d, dtype=torch.float64, device=model.device)
    count = torch.zeros(len(layers) * d, dtype=torch.float64, device=model.device)
    q_count = torch.zeros(len(queries), dtype=torch.float64, device=model.device)
    n = 0
    for part in row_batches(sample, model.device, tokens_per_batch):
        fired = {}

        def on_layer(layer, t, keep=part.counted):
            fired[layer] = (t["coef"][keep].float().abs() > thr[layer]).float()

        with capture(model, need, ("coef",), stop=True, on_layer=on_layer):
            forward(model, part)
        F = torch.cat([fired[layer] for layer in layers], 1)  # [N, L·d]
        Fq = torch.stack([fired[a][:, b] for a, b in queries], 1)  # [N, q]
        co += (Fq.T @ F).double()
        count += F.sum(0).double()
        q_count += Fq.sum(0).double()
        n += F.shape[0]
    out = []
    for qi, (a, b) in enumerate(queries):  # one small table per query neuron
        union = q_count[qi] + count - co[qi]
        jac = torch.where(union > 0, co[qi] / union.clamp(min=1), torch.zeros_like(union))
        if a in col:
            jac[col[a] * d + b] = -1  # never the neuron itself
        k = min(top, jac.numel() - 1)
        best = jac.topk(k).indices
        for rank, j in enumerate(j for j in best.tolist() if co[qi, j] > 0):  # never-co-firing pairs are left out
            layer, neuron = layers[j // d], j % d
            c, cq, cp = float(co[qi, j]), float(q_count[qi]), float(count[j])
            lo, hi = wilson(c, cq)
            out.append({"query": f"{a}.{b}", "rank": rank, "partner": f"{layer}.{neuron}",
                        "layer": layer, "neuron": neuron, "co": c, "n_query": cq, "n_partner": cp,
                        "jaccard": float(jac[j]), "p_given": c / cq if cq else 0.0, "p_given_lo": lo,
                        "p_given_hi": hi, "lift": c * n / (cq * cp) if cq and cp else 0.0, "n_tokens": n})
    meta = {"n_tokens": n, "sample": sample.source, "rel_threshold": rel, "maxima": maxima_source,
            "firing": f"|m| > {rel:g} x the neuron's max |m| (magnitude, either sign)",
            "baseline": "lift = 1 means independent firing", "interval": "p_given: Wilson 95% over the query's firing tokens (tokens treated as independent)",
            "layers_searched": layers}
    return AnalysisResult("coactivation", {"partners": pd.DataFrame(out)}, meta)
