"""Scorers of neuron descriptions: pure functions of predictions and truths (no model, no run).

A ``Score`` is (value, n, lo, hi, note): the score, the items it rests on, a 95% interval and, where the
value is NaN or some replies failed, why. Intervals:
- balanced accuracy (detection, fuzzing, value): (TPR + TNR) / 2 over n items; interval from the Wilson
  intervals of TPR (n_pos items) and TNR (n_neg items) averaged, (lo_tpr + lo_tnr) / 2 .. (hi_tpr + hi_tnr) / 2
  (conservative: each bound is the mean of the class bounds); an item whose reply failed counts as wrong;
- simulation: Pearson r between predicted and real activations over all tokens of the scored snippets;
  interval by a cluster bootstrap over snippets (kvmem.analysis.ci.cluster bootstrap of the pairs), 1000
  draws, seeded.
OpenAI-style expected value: E[k] = Σ_k p(k)·k over the choices 0..10, p renormalised over the choices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kvmem.analysis.ci import wilson

SCALE = 10  # activations are shown and simulated on an integer scale 0..SCALE


@dataclass(frozen=True)
class Score:
    value: float
    n: int
    lo: float = math.nan
    hi: float = math.nan
    note: str = ""

    def columns(self, name: str) -> dict:
        return {name: float(self.value), f"{name}_n": int(self.n), f"{name}_lo": float(self.lo),
                f"{name}_hi": float(self.hi), f"{name}_note": self.note}


def nan_score(reason: str) -> Score:
    return Score(math.nan, 0, math.nan, math.nan, reason)


def balanced_accuracy(pred, truth, note: str = "") -> Score:
    """Balanced accuracy of boolean predictions ``pred`` (None = failed reply: counted wrong) against
    ``truth``; NaN when either class is empty."""
    truth = [bool(t) for t in truth]
    pred = list(pred)
    if len(pred) != len(truth):
        raise ValueError("pred and truth differ in length")
    pos = [p is not None and bool(p) for p, t in zip(pred, truth) if t]
    neg = [p is not None and not bool(p) for p, t in zip(pred, truth) if not t]
    failed = sum(p is None for p in pred)
    if failed:
        note = (note + "; " if note else "") + f"{failed} failed replies counted wrong"
    if not pos or not neg:
        return Score(math.nan, len(truth), math.nan, math.nan, (note + "; " if note else "") + "one class is empty")
    tpr, tnr = sum(pos) / len(pos), sum(neg) / len(neg)
    lp, hp = wilson(sum(pos), len(pos))
    ln, hn = wilson(sum(neg), len(neg))
    return Score((tpr + tnr) / 2, len(truth), (lp + ln) / 2, (hp + hn) / 2, note)


def pearson(x, y) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 2 or x.std() == 0 or y.std() == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def correlation(pred: list, real: list, seed: int = 0, n_boot: int = 1000, note: str = "") -> Score:
    """Pearson r of predicted vs real activations, pooled over snippets (``pred``/``real``: one list of
    per-token values per snippet; a snippet whose prediction is None failed and is left out, counted in
    the note). Interval: percentile bootstrap over snippets."""
    pairs = [(np.asarray(p, float), np.asarray(r, float)) for p, r in zip(pred, real) if p is not None]
    failed = sum(p is None for p in pred)
    if failed:
        note = (note + "; " if note else "") + f"{failed} snippets failed"
    if not pairs:
        return Score(math.nan, 0, math.nan, math.nan, (note + "; " if note else "") + "nothing simulated")
    P, R = np.concatenate([p for p, _ in pairs]), np.concatenate([r for _, r in pairs])
    r = pearson(P, R)
    if math.isnan(r):
        return Score(r, len(P), math.nan, math.nan, (note + "; " if note else "") + "constant predictions")
    rng = np.random.default_rng(seed)
    reps = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(pairs), len(pairs))
        reps.append(pearson(np.concatenate([pairs[i][0] for i in pick]), np.concatenate([pairs[i][1] for i in pick])))
    reps = np.asarray(reps)
    reps = reps[~np.isnan(reps)]
    lo, hi = (float(np.quantile(reps, 0.025)), float(np.quantile(reps, 0.975))) if reps.size else (math.nan, math.nan)
    return Score(r, len(P), lo, hi, note)


def expected_value(logprobs: dict) -> float:
    """OpenAI's simulator read-out: Σ_k p(k)·k with p the softmax of the log-probs of the choices "0".."10"
    (renormalised over the choices present); NaN if none is present."""
    ks = [(int(k), float(v)) for k, v in logprobs.items() if str(k).strip().isdigit() and 0 <= int(k) <= SCALE]
    if not ks:
        return math.nan
    lp = np.array([v for _, v in ks])
    p = np.exp(lp - lp.max())
    p /= p.sum()
    return float(sum(pi * k for pi, (k, _) in zip(p, ks)))


def scale(values, max_abs: float) -> list[int]:
    """Coefficients on the integer scale 0..SCALE relative to the neuron's max |m|: round(SCALE·x/max_abs) rounding halves up,
    clipped to [0, SCALE] (negative x -> 0)."""
    if not max_abs > 0:
        return [0 for _ in values]
    return [int(min(SCALE, max(0, math.floor(SCALE * float(x) / max_abs + 0.5)))) for x in values]
