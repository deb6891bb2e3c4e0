"""The run's tables, built from the statistics: one row per neuron, one row per layer.

Firing means m > 0 (exact count). ``above_{1,10,50}pct_max`` are the shares of tokens whose m
exceeds 1% / 10% / 50% of that neuron's max, estimated from its activation histogram; the true
share lies within ``..._err`` of it (the count of the histogram bin holding the threshold: one
pass cannot count exactly against a max that is only known at the end).
"""

from __future__ import annotations

import pandas as pd
import torch

FRACTIONS = (0.01, 0.1, 0.5)
CONTEXT_BEFORE = 6


def _context_strings(store, index: torch.Tensor, vocab: list[str]) -> tuple[list[str], list[str]]:
    """The activating token and a short marked context for each index [n] (-1: none)."""
    valid = index >= 0
    idx = torch.where(valid, index, store.offset)
    doc_start = store.doc_start(idx)
    window = idx[:, None] + torch.arange(-CONTEXT_BEFORE, 1)  # [n, CONTEXT_BEFORE + 1] global indices
    inside = window >= doc_start[:, None]
    ids = store.ids[(window - store.offset).clamp(min=0)].tolist()
    tokens, contexts = [], []
    for ok, row, mask in zip(valid.tolist(), ids, inside.tolist()):  # one string per neuron, once per run
        if not ok:
            tokens.append("")
            contexts.append("")
            continue
        words = [vocab[t] for t, m in zip(row, mask) if m]
        tokens.append(words[-1])
        contexts.append("".join(words[:-1]) + "⟦" + words[-1] + "⟧")
    return tokens, contexts


def neuron_table(stats: dict, store, vocab: list[str]) -> pd.DataFrame:
    """One row per (layer, neuron): rates, moments, estimated shares above fractions of max, top example."""
    frames = []
    for layer, s in stats.items():
        df = s.to_frame(layer).rename(columns={"neuron_id": "id"})
        maxima = s.max.clamp(min=0).nan_to_num(0.0)
        for f in FRACTIONS:
            est, bound = s.count_above(maxima * f, return_bound=True)
            df[f"above_{round(f * 100)}pct_max"] = (est / max(s.n, 1)).cpu().numpy()
            df[f"above_{round(f * 100)}pct_max_err"] = (bound / max(s.n, 1)).cpu().numpy()
        df["top_token"], df["top_context"] = _context_strings(store, s.top.index[:, 0].cpu(), vocab)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def layer_table(stats: dict) -> pd.DataFrame:
    """One row per layer: firing rate, dead (never > 0) and dense (> 50% of tokens) neurons, L0."""
    rows = []
    for layer, s in stats.items():
        rate = s.firing_rate().cpu()
        hist = s.l0_hist.double().cpu()
        counts = torch.arange(hist.numel(), dtype=torch.float64)
        total = hist.sum().clamp(min=1)
        cdf = hist.cumsum(0) / total
        row = {
            "layer": layer, "d_mlp": int(rate.numel()), "n_tokens": int(s.n),
            "firing_rate": float(rate.mean()), "dead": int((rate == 0).sum()), "dense": int((rate > 0.5).sum()),
            "densest": f"{layer}.{int(rate.argmax())}", "densest_rate": float(rate.max()),
            "l0_mean": float((hist * counts).sum() / total),
            "l0_median": int(torch.searchsorted(cdf, torch.tensor([0.5], dtype=torch.float64))[0]),
            "l0_p90": int(torch.searchsorted(cdf, torch.tensor([0.9], dtype=torch.float64))[0]),
            "max_activation": float(s.max.nan_to_num(float("-inf")).max()),
        }
        if s.gated:
            q = s.quadrant_count.double().sum(0).cpu()
            q = q / q.sum().clamp(min=1)
            row.update(gate_pos_up_pos=float(q[0]), gate_pos_up_neg=float(q[1]),
                       gate_neg_up_pos=float(q[2]), gate_neg_up_neg=float(q[3]))
        rows.append(row)
    return pd.DataFrame(rows)
