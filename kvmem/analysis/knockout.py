"""Nonlinearity and knock-outs: the next-token loss when one layer's FFN is changed.

Interventions on one layer (hooks only; the weights are never touched):
  remove      the FFN's output is zero (every coefficient zero AND no b_out): a forward hook on ffn_module
  linear      the activation becomes the identity: m = x·W_in + b_in, or (x·W_gate + b_gate)·(x·W_in + b_in)
              for gated FFNs, so the FFN is one linear (bilinear when gated) map
  top_rate    the k neurons with the highest firing rate (m > 0) get m = 0 (pre-hook on out_module)
  top_max     the k neurons with the highest max activation get m = 0
  random      k neurons drawn at random (seeded) get m = 0: the baseline of the two above
Loss: mean cross-entropy of rows[:, 1:] given rows[:, :-1], over every row of the sample;
``delta`` = loss - baseline loss (nats per token). Each intervention is one pass over the sample, from the
intervened layer on: the outputs of the blocks before it are kept from the unmodified pass (``skip_blocks``).
"""

from __future__ import annotations

from contextlib import contextmanager

import pandas as pd
import torch

from kvmem.analysis.common import Sample, batches, next_token_loss
from kvmem.analysis.result import AnalysisResult
from kvmem.capture import check_layers
from kvmem.errors import KvmemError

MODES = ("remove", "linear", "zero")


@contextmanager
def intervene(model, layer: int, mode: str, neurons=None):
    """Change layer ``layer``'s FFN while the context is open: mode remove, linear, or zero (``neurons``)."""
    if mode not in MODES:
        raise KvmemError(f"unknown intervention {mode!r}; choose from {', '.join(MODES)}")
    lay = model.layers[layer]
    handles = []
    if mode == "remove":
        def zero_out(mod, args, out):
            if isinstance(out, tuple):
                return (torch.zeros_like(out[0]),) + out[1:]
            return torch.zeros_like(out)

        handles.append(lay.ffn_module.register_forward_hook(zero_out))
    elif mode == "linear":
        kept = {}
        handles.append(lay.in_module.register_forward_hook(lambda mod, a, o: kept.__setitem__("up", o)))
        if lay.gated:
            handles.append(lay.gate_module.register_forward_hook(lambda mod, a, o: kept.__setitem__("gate", o)))

        def linear_m(mod, args):
            m = kept.pop("up")
            if lay.gated:
                m = kept.pop("gate") * m
            return (m.reshape(args[0].shape),) + tuple(args[1:])

        handles.append(lay.out_module.register_forward_pre_hook(linear_m))
    else:
        idx = torch.as_tensor(list(neurons), dtype=torch.long, device=model.device)

        def zero_m(mod, args):
            m = args[0].clone()
            m[..., idx] = 0
            return (m,) + tuple(args[1:])

        handles.append(lay.out_module.register_forward_pre_hook(zero_m))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _clone(out):
    return tuple(_clone(o) for o in out) if isinstance(out, tuple) else out.clone() if torch.is_tensor(out) else out


@contextmanager
def skip_blocks(model, cached: dict, upto: int):
    """Blocks 0..upto-1 return their outputs ``cached`` from an unmodified pass of the same batch instead of
    computing them (an intervention at layer ``upto`` cannot change them). The instance's own ``forward``
    attribute, if any, is restored on exit."""
    blocks = model.adapter.blocks()
    saved = {}
    for i in range(upto):
        saved[i] = blocks[i].__dict__.get("forward")
        blocks[i].forward = lambda *a, _out=cached[i], **k: _clone(_out)
    try:
        yield
    finally:
        for i, fwd in saved.items():
            if fwd is None:
                del blocks[i].forward
            else:
                blocks[i].forward = fwd


@torch.inference_mode()
def cache_blocks(model, sample: Sample, upto: int, tokens_per_batch: int = 2048) -> list[tuple]:
    """Per batch: (rows, {block: output} for blocks < upto, summed loss, count) of the unmodified model."""
    blocks = model.adapter.blocks()
    out = []
    for rows in batches(sample, model.device, tokens_per_batch):
        kept = {}
        handles = [blocks[i].register_forward_hook(lambda m, a, o, i=i: kept.__setitem__(i, o)) for i in range(upto)]
        try:
            logits = model.hf(input_ids=rows, use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
        out.append((rows, kept, *next_token_loss(logits, rows)))
    return out


@torch.inference_mode()
def sample_loss(model, sample: Sample, tokens_per_batch: int = 2048, cache=None, layer: int = 0) -> tuple[float, int]:
    """Mean next-token cross-entropy over the sample's rows, and the number of predicted tokens.
    With ``cache`` (from ``cache_blocks``) the blocks before ``layer`` are not recomputed."""
    total, count = 0.0, 0
    if cache is None:
        for rows in batches(sample, model.device, tokens_per_batch):
            s, n = next_token_loss(model.hf(input_ids=rows, use_cache=False).logits, rows)
            total, count = total + s, count + n
    else:
        for rows, kept, _, _ in cache:
            with skip_blocks(model, kept, layer):
                s, n = next_token_loss(model.hf(input_ids=rows, use_cache=False).logits, rows)
            total, count = total + s, count + n
    if count == 0:
        raise KvmemError("the sample has rows of one token: no next token to predict (raise --seq-len)")
    return total / count, count


def default_ks(d_mlp: int) -> tuple[int, ...]:
    """1% and 10% of the layer's neurons (at least 1)."""
    return tuple(sorted({max(1, d_mlp // 100), max(1, d_mlp // 10)}))


@torch.inference_mode()
def knockouts(model, sample: Sample, layers=None, *, stats: pd.DataFrame | None = None, ks=None,
              n_random: int = 1, seed: int = 0, tokens_per_batch: int = 2048, progress=None) -> AnalysisResult:
    """Loss increase per layer for removal, linearization, and zeroing top-k / random-k neurons.
    ``stats`` (layer, neuron, firing_rate, max) ranks the neurons (default: measured on the sample)."""
    from kvmem.analysis.sparsity import neuron_stats

    layers = check_layers(model, layers)
    ks = tuple(ks) if ks else default_ks(model.d_mlp)
    if any(not 1 <= k <= model.d_mlp for k in ks):
        raise KvmemError(f"knock-out sizes must be between 1 and d_mlp={model.d_mlp}")
    stats_source = "given"
    if stats is None:
        stats, stats_source = neuron_stats(model, sample, layers, tokens_per_batch), "the sample"
    cache = cache_blocks(model, sample, max(layers), tokens_per_batch)  # blocks before a layer are reused
    n_pred = sum(c[3] for c in cache)
    if n_pred == 0:
        raise KvmemError("the sample has rows of one token: no next token to predict (raise --seq-len)")
    base = sum(c[2] for c in cache) / n_pred
    gen = torch.Generator().manual_seed(seed)
    rows = []

    def measure(layer, kind, k, mode, neurons=None):
        with intervene(model, layer, mode, neurons):
            loss, _ = sample_loss(model, sample, tokens_per_batch, cache=cache, layer=layer)
        rows.append({"layer": layer, "intervention": kind, "k": k, "loss": loss, "delta": loss - base,
                     "baseline_loss": base, "n_tokens": n_pred})

    for layer in layers:
        g = stats[stats.layer == layer].sort_values("neuron")
        rate = torch.tensor(g["firing_rate"].to_numpy())
        mx = torch.tensor(g["max"].to_numpy())
        measure(layer, "remove", 0, "remove")
        measure(layer, "linear", 0, "linear")
        for k in ks:
            measure(layer, "top_rate", k, "zero", rate.topk(k).indices.tolist())
            measure(layer, "top_max", k, "zero", mx.topk(k).indices.tolist())
            for _ in range(n_random):
                measure(layer, "random", k, "zero", torch.randperm(model.d_mlp, generator=gen)[:k].tolist())
        if progress is not None:
            progress(f"knock-outs layer {layer}")
    long = pd.DataFrame(rows)
    long = long.groupby(["layer", "intervention", "k"], as_index=False).agg(
        loss=("loss", "mean"), delta=("delta", "mean"), baseline_loss=("baseline_loss", "first"),
        n_tokens=("n_tokens", "first"), draws=("loss", "size"))
    wide = long.assign(col=[f"{i}_k{k}" if k else i for i, k in zip(long.intervention, long.k)]).pivot(
        index="layer", columns="col", values="delta").reset_index()
    wide.columns.name = None
    wide.insert(1, "baseline_loss", base)
    wide.insert(2, "n_tokens", n_pred)
    meta = {"n_tokens": n_pred, "sample": sample.source, "baseline_loss": base, "ks": list(ks), "n_random": n_random,
            "seed": seed, "ranking_from": stats_source, "loss": "mean next-token cross-entropy (nats)",
            "baseline": "the unmodified model's loss on the same tokens; for top-k zeroing, k random neurons"}
    return AnalysisResult("knockouts", {"long": long, "layers": wide}, meta)
