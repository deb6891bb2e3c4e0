"""The run's tables, built from the statistics: one row per neuron, one row per layer.

Firing means m > 0 (exact count). ``above_{1,10,50}pct_max`` are the shares of tokens whose m
exceeds 1% / 10% / 50% of that neuron's max, estimated from its activation histogram (the
histogram's straddling bin bounds the error; one pass cannot count them exactly).
"""

from __future__ import annotations

import pandas as pd
import torch

FRACTIONS = (0.01, 0.1, 0.5)
CONTEXT_BEFORE = 6


def _context_strings(store, index: torch.Tensor, vocab: list[str]) -> tuple[list[str], list[str]]:
    """The activating token and a short marked context for each index [n] (-1: none)."""
    valid = index >= 0
    idx = index.clamp(min=0)
    doc_start = store.doc_offsets[store.doc_of(idx)]
    offsets = torch.arange(-CONTEXT_BEFORE, 1)
    window = idx[:, None] + offsets  # [n, CONTEXT_BEFORE + 1]
    inside = window >= doc_start[:, None]
    ids = store.ids[window.clamp(min=0)].tolist()
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
        df = s.to_frame()
        df.insert(0, "layer", layer)
        df.insert(2, "id", [f"{layer}.{n}" for n in df.neuron])
        maxima = s.max.double().cpu()
        for f in FRACTIONS:
            est, _ = s.count_above((maxima * f).clamp(min=0))
            df[f"above_{round(f * 100)}pct_max"] = (est.cpu() / max(s.n_tokens, 1)).numpy()
        values, index = s.store("top")
        df["top_value"] = values[:, 0].cpu().numpy()
        df["top_index"] = index[:, 0].cpu().numpy()
        df["top_token"], df["top_context"] = _context_strings(store, index[:, 0].cpu(), vocab)
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
            "layer": layer, "d_mlp": int(rate.numel()), "n_tokens": int(s.n_tokens),
            "firing_rate": float(rate.mean()), "dead": int((rate == 0).sum()), "dense": int((rate > 0.5).sum()),
            "densest": f"{layer}.{int(rate.argmax())}", "densest_rate": float(rate.max()),
            "l0_mean": float((hist * counts).sum() / total),
            "l0_median": int(torch.searchsorted(cdf, torch.tensor([0.5], dtype=torch.float64))[0]),
            "l0_p90": int(torch.searchsorted(cdf, torch.tensor([0.9], dtype=torch.float64))[0]),
            "max_activation": float(s.max.max()),
        }
        if s.gated:
            q = s.quadrants.double().sum(0).cpu()
            q = q / q.sum().clamp(min=1)
            row.update(gate_pos_up_pos=float(q[0]), gate_pos_up_neg=float(q[1]),
                       gate_neg_up_pos=float(q[2]), gate_neg_up_neg=float(q[3]))
        rows.append(row)
    return pd.DataFrame(rows)
