"""Nonlinearity and knock-outs: the next-token loss when one layer's FFN is changed.

Interventions on one layer (kvmem.hooks point functions; the weights are never touched), via ``edit_ffn``:
  remove      the FFN's output is zero (every coefficient zero AND no b_out): ffn.out replaced by zeros
  linear      the activation becomes the identity: m = x·W_in + b_in, or (x·W_gate + b_gate)·(x·W_in + b_in)
              for gated FFNs, so the FFN is one linear (bilinear when gated) map
  top_max     the k neurons with the largest max |m| get m = 0 (at ffn.coef; ties: the lower neuron)
  top_rate    the k neurons with the highest |m|-based active rate (|m| > 10% of max |m|) get m = 0
  random      k neurons drawn at random (seeded) get m = 0, ``n_random`` draws (default 5): the baseline of
              the two above; its delta is the mean over draws, ``_sd`` the spread of the draws' deltas
Loss: next-token cross-entropy (nats) at the sample's counted positions t whose next position t+1 is a real
token of the same row (never BOS or padding). ``delta`` = loss - the unmodified model's loss on the same
tokens; the per-token differences are paired, so every delta gets a 95% cluster bootstrap interval over
documents (``_lo``/``_hi``; kvmem.analysis.ci), with the count of predicted tokens (``n_*``). The ``units``
table holds one row per (layer, predicted token): layer, doc, index and each intervention's per-token delta
(the random ones averaged over draws), plus ``top_max_k{k}_excess`` / ``top_rate_k{k}_excess`` = that
top-k delta - the random-k delta per token (paired: its interval says whether the top neurons matter more).
Cost: one full pass per batch for the baseline, then one pass per intervention and batch from the
intervened layer on (the blocks before it return their cached outputs: ``skip_blocks``); ``meta`` states
the number of forward passes.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from kvmem import hooks as H
from kvmem.analysis import ci
from kvmem.analysis.common import Sample, forward, next_token_nll, row_batches
from kvmem.analysis.result import AnalysisResult
from kvmem.capture import check_layers
from kvmem.errors import KvmemError

if TYPE_CHECKING:
    from kvmem.models.kvmodel import KVModel

MODES = ("remove", "linear", "zero")
N_RANDOM = 5


@contextmanager
def edit_ffn(model: KVModel, layer: int, mode: str, neurons=None):
    """Change layer ``layer``'s FFN while the context is open (on kvmem.hooks): mode remove (zero_ffn),
    linear (linearize), or zero (zero_coefs of ``neurons``)."""
    if mode not in MODES:
        raise KvmemError(f"unknown intervention {mode!r}; choose from {', '.join(MODES)}")
    if mode == "remove":
        fns = H.zero_ffn(layer)
    elif mode == "linear":
        fns = H.linearize(model, layer)
    else:
        fns = H.zero_coefs(layer, neurons)
    with H.hooks(model, fns):
        yield


skip_blocks = H.skip_blocks


@torch.inference_mode()
def cache_blocks(model: KVModel, sample: Sample, upto: int, tokens_per_batch: int = 2048) -> list[tuple]:
    """Per batch: (part, {block: output} for blocks < upto, nll [b, L-1], valid [b, L-1]) of the unmodified
    model (see kvmem.analysis.common.next_token_nll)."""
    out = []
    for part in row_batches(sample, model.device, tokens_per_batch):
        kept = {}
        with H.hooks(model, H.record([("resid.post", i) for i in range(upto)], kept)):
            logits = forward(model, part).logits
        out.append((part, {i: kept[("resid.post", i)] for i in range(upto)}, *next_token_nll(logits, part)))
    return out


@torch.inference_mode()
def token_nll(model: KVModel, cache, layer: int = 0) -> torch.Tensor:
    """Next-token nll [n_pred] (CPU float64) at every valid position of the cached batches, in order, with
    the blocks before ``layer`` reused from ``cache`` (``cache_blocks``)."""
    out = []
    for part, kept, _, valid in cache:
        with skip_blocks(model, kept, layer):
            nll, _ = next_token_nll(forward(model, part).logits, part)
        out.append(nll[valid].double().cpu())
    return torch.cat(out)


@torch.inference_mode()
def sample_loss(model: KVModel, sample: Sample, tokens_per_batch: int = 2048) -> tuple[float, int]:
    """Mean next-token cross-entropy over the sample's valid positions, and their number."""
    cache = cache_blocks(model, sample, 0, tokens_per_batch)
    n = sum(int(c[3].sum()) for c in cache)
    if n == 0:
        raise KvmemError("the sample has no next token to predict (raise --seq-len)")
    return float(sum(float(c[2].double().sum()) for c in cache)) / n, n


def default_ks(d_mlp: int) -> tuple[int, ...]:
    """1% and 10% of the layer's neurons (at least 1)."""
    return tuple(sorted({max(1, d_mlp // 100), max(1, d_mlp // 10)}))


def top_neurons(values, k: int) -> list[int]:
    """The k neurons with the largest values [d] (NaN last; ties: the lower neuron)."""
    v = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=-np.inf)
    return np.argsort(-v, kind="stable")[:k].tolist()


@torch.inference_mode()
def knockouts(model: KVModel, sample: Sample, layers=None, *, stats: pd.DataFrame | None = None, ks=None,
              n_random: int = N_RANDOM, seed: int = 0, tokens_per_batch: int = 2048, n_boot: int = ci.N_BOOT,
              progress=None) -> AnalysisResult:
    """Loss increase per layer for removal, linearization, and zeroing top-k / random-k neurons.
    ``stats`` (layer, neuron, max_abs, active_rate: kvmem.analysis.neurons.run_neuron_stats) ranks the
    neurons (default: measured on the sample)."""
    from kvmem.analysis.sparsity import neuron_stats

    layers = check_layers(model, layers)
    ks = tuple(ks) if ks else default_ks(model.d_mlp)
    if any(not 1 <= k <= model.d_mlp for k in ks):
        raise KvmemError(f"ks: knock-out sizes must be between 1 and d_mlp={model.d_mlp}")
    if n_random < 1:
        raise KvmemError("n_random: at least one random draw")
    stats_source = "given"
    if stats is None:
        stats, stats_source = neuron_stats(model, sample, layers, tokens_per_batch), "the sample"
    lacking = [c for c in ("layer", "neuron", "max_abs", "active_rate") if c not in stats.columns]
    if lacking:
        raise KvmemError(f"stats: the neuron table has no {lacking[0]!r} column (kvmem.analysis.neurons)")
    cache = cache_blocks(model, sample, max(layers), tokens_per_batch)  # blocks before a layer are reused
    n_batches = len(cache)
    base_tok = torch.cat([c[2][c[3]].double().cpu() for c in cache])
    if base_tok.numel() == 0:
        raise KvmemError("the sample has no next token to predict (raise --seq-len)")
    doc = torch.cat([c[0].doc[:, :-1][c[3]].cpu() for c in cache]).numpy()
    index = torch.cat([c[0].index[:, :-1][c[3]].cpu() for c in cache]).numpy()
    n_pred, base = int(base_tok.numel()), float(base_tok.mean())
    gen = torch.Generator().manual_seed(seed)
    passes = 0
    long, frames = [], []

    def measure(layer, mode, neurons=None) -> torch.Tensor:
        nonlocal passes
        with edit_ffn(model, layer, mode, neurons):
            delta = token_nll(model, cache, layer) - base_tok
        passes += n_batches
        return delta

    for layer in layers:
        g = stats[stats.layer == layer].sort_values("neuron")
        units = {"remove": measure(layer, "remove"), "linear": measure(layer, "linear")}
        draws = {}
        for k in ks:
            units[f"top_rate_k{k}"] = measure(layer, "zero", top_neurons(g["active_rate"], k))
            units[f"top_max_k{k}"] = measure(layer, "zero", top_neurons(g["max_abs"], k))
            rnd = [measure(layer, "zero", torch.randperm(model.d_mlp, generator=gen)[:k].tolist())
                   for _ in range(n_random)]
            units[f"random_k{k}"] = torch.stack(rnd).mean(0)
            for top in ("top_max", "top_rate"):
                units[f"{top}_k{k}_excess"] = units[f"{top}_k{k}"] - units[f"random_k{k}"]
            draws[f"random_k{k}"] = [float(r.mean()) for r in rnd]
        f = pd.DataFrame({"layer": layer, "doc": doc, "index": index,
                          **{name: d.numpy() for name, d in units.items()}})
        frames.append(f)
        for name, d in units.items():
            if name.endswith("_excess"):
                continue
            kind, _, k = name.rpartition("_k") if "_k" in name else (name, "", "0")
            mean, lo, hi = ci.interval(d.numpy(), doc, n_boot, seed)
            spread = draws.get(name, [])  # the random draws' mean deltas (none for a fixed neuron set)
            sd = float(np.std(spread, ddof=1)) if len(spread) > 1 else np.nan
            long.append({"layer": layer, "intervention": kind, "k": int(k), "loss": base + mean, "delta": mean,
                         "delta_lo": lo, "delta_hi": hi, "delta_sd": sd, "draws": max(1, len(spread)),
                         "baseline_loss": base, "n_tokens": n_pred})
        if progress is not None:
            progress(f"knock-outs layer {layer}")
    units = pd.concat(frames, ignore_index=True)
    cols = [c for c in units.columns if c not in ("layer", "doc", "index")]
    wide = ci.bootstrap(units, cols, by="layer", n_boot=n_boot, seed=seed)
    wide = wide.rename(columns={"n_units": "n_tokens", "n_clusters": "n_docs"})
    wide.insert(1, "baseline_loss", base)
    for k in ks:
        sd = pd.DataFrame(long).query("intervention == 'random' and k == @k").set_index("layer")["delta_sd"]
        wide[f"random_k{k}_sd"] = wide.layer.map(sd)
    units = units.astype({c: np.float32 for c in cols})
    meta = {"n_tokens": n_pred, "n_docs": int(len(np.unique(doc))), "sample": sample.source, "baseline_loss": base,
            "ks": list(ks), "n_random": n_random, "seed": seed, "ranking_from": stats_source,
            "ranking": "top_max: largest max |m|; top_rate: highest share of tokens with |m| > 10% of max |m|; "
                       "ties: the lower neuron",
            "loss": "next-token cross-entropy (nats) at counted positions whose next token is in the same row",
            "interval": f"95% cluster bootstrap over documents of the paired per-token differences "
                        f"({n_boot} draws, seed {seed})",
            "forward_passes": n_batches + passes, "full_passes": n_batches, "partial_passes": passes,
            "tokens_per_batch": tokens_per_batch,
            "baseline": "the unmodified model's loss on the same tokens; for top-k zeroing, k random neurons "
                        f"({n_random} draws)"}
    return AnalysisResult("knockouts", {"long": pd.DataFrame(long), "layers": wide, "units": units}, meta)
