"""Per-neuron magnitudes from a profiled run, and the default query neurons of the co-activation measure.

Gated (SwiGLU) coefficients are sign-symmetric: m = act(gate)·up is as often large and negative as large
and positive, and m·v_i with m = -5 writes as much as m = +5. So every magnitude here is |m|:

  max_abs       max |m| over the run's tokens = max(max m, -min m) (0 for a neuron never seen)
  active_rate   share of the run's tokens with |m| > ACTIVE_REL · max_abs (ACTIVE_REL = 10%), estimated
                from the run's histogram (LayerStats.count_above + count_below; ``active_rate_bound`` is the
                histogram's error bound on it)
  firing_rate   share of tokens with m > 0 (secondary, sign-blind: meaningful for ReLU/GELU only)
  max, min      the signed extremes
"""

from __future__ import annotations

import pandas as pd
import torch

from kvmem.profile.run import Run

ACTIVE_REL = 0.1  # active: |m| > 10% of the neuron's max |m|


def max_abs(stats) -> torch.Tensor:
    """max |m| per neuron [d] float64 of a LayerStats (NaN-free: 0 before any token)."""
    hi = torch.nan_to_num(stats.max.double().cpu(), nan=0.0)
    lo = torch.nan_to_num(stats.min.double().cpu(), nan=0.0)
    return torch.maximum(hi, -lo).clamp(min=0)


def abs_rate(stats, rel: float = ACTIVE_REL) -> tuple[torch.Tensor, torch.Tensor]:
    """(rate, bound) [d] float64: estimated share of the layer's tokens with |m| > rel · max |m|, from the
    histogram, and its error bound (a neuron whose max |m| is 0 has rate 0)."""
    n = stats.n
    if not n:
        z = torch.zeros(stats.d_mlp, dtype=torch.float64)
        return z, z
    mx = max_abs(stats)
    thr = (rel * mx).float()
    up, b_up = stats.count_above(thr, return_bound=True)
    down, b_down = stats.count_below(thr, return_bound=True)
    rate = ((up.cpu() + down.cpu()) / n).clamp(0, 1)
    bound = (b_up.cpu() + b_down.cpu()) / n
    dead = mx <= 0
    return torch.where(dead, 0.0, rate), torch.where(dead, 0.0, bound)


def run_neuron_stats(run: Run, layers) -> pd.DataFrame:
    """One row per (layer, neuron): max_abs, active_rate (|m| > 10% max |m|, histogram estimate),
    active_rate_bound, firing_rate (m > 0, secondary), max, min, n_tokens: all over the run's counted tokens."""
    frames = []
    for layer in layers:
        s = run.layer_stats(layer)
        rate, bound = abs_rate(s)
        frames.append(pd.DataFrame({
            "layer": int(layer), "neuron": range(s.d_mlp), "max_abs": max_abs(s).numpy(),
            "active_rate": rate.numpy(), "active_rate_bound": bound.numpy(),
            "firing_rate": s.firing_rate().double().cpu().numpy(),
            "max": s.max.double().cpu().numpy(), "min": s.min.double().cpu().numpy(), "n_tokens": s.n}))
    return pd.concat(frames, ignore_index=True)


def maxima_of(stats: pd.DataFrame) -> dict[int, torch.Tensor]:
    """{layer: max |m| per neuron [d_mlp]} from a neuron table (``run_neuron_stats`` / ``neuron_stats``)."""
    return {int(layer): torch.tensor(g.sort_values("neuron")["max_abs"].to_numpy())
            for layer, g in stats.groupby("layer")}


def default_queries(run: Run, layers, stats: pd.DataFrame, rel: float = 0.25, min_rate: float = 0.001) -> list:
    """Per layer, the neuron with the largest max |m| among those estimated (from the run's histogram) to
    exceed ``rel`` x their max |m| in magnitude (|m|) on at least ``min_rate`` of the tokens; the largest
    max |m| overall if none does. Ties go to the lower neuron."""
    out = []
    for layer, g in stats.groupby("layer"):
        g = g.sort_values("neuron")
        score = torch.tensor(g["max_abs"].to_numpy(), dtype=torch.float64)
        rate, _ = abs_rate(run.layer_stats(int(layer)), rel)
        ok = rate >= min_rate
        if bool(ok.any()):
            score = torch.where(ok, score, torch.full_like(score, -torch.inf))
        out.append((int(layer), int(score.argmax())))  # argmax: first (lowest) index among ties
    return out
