"""Activation of every context token of the shown examples, by re-running the model.

A run stores only the activating token's value. To shade a whole context window, the model is run
again over the original input rows (row r = tokens [r·seq_len, (r+1)·seq_len) of the token store,
exactly as the profiler batched them), capturing the profiled layers, and m[token, neuron] is gathered
for every window token of every example. Rows are taken in order of need (top examples first) up to a
token budget; an example is shaded only if all its window's rows were re-run. The activating token's
re-computed value is checked against the stored one (``max_rel_error``).

Shading is stored per example as one string with a letter per window token: level = round(10 · m /
max|m|) of that neuron, in [-10, 10], written as chr(ord('K') + level) (so 'A' = -max, 'K' = 0,
'U' = +max): 21 levels are plenty for a background colour and keep the data small.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from kvmem.capture import capture


@dataclass
class Shading:
    per_layer: dict = field(default_factory=dict)  # layer -> kind -> [d_mlp][n] level strings (None: not shaded)
    rows: int = 0  # input rows re-run
    tokens: int = 0  # tokens re-run
    shaded: int = 0  # examples shaded
    total: int = 0  # examples shown
    max_rel_error: float = 0.0  # activating token: |recomputed - stored| / max|m| of the neuron


def shade(model, run, examples: dict, before: int, after: int, budget_tokens: int, batch_rows: int = 8) -> Shading:
    """``examples[layer][kind] = (values [d_mlp, n], index [d_mlp, n])``; returns the shading of each window."""
    seq_len = int(run.manifest["settings"]["seq_len"])
    store = run.tokens
    offset = int(getattr(store, "offset", 0))
    offs = torch.arange(-before, after + 1)
    # windows' global token indices, per (layer, kind): [d_mlp, n, W]; -1 where not a token of the doc
    from kvmem.report.data import windows

    plan = {}
    needed_rows = []
    for layer, kinds in examples.items():
        for kind, (_, index) in kinds.items():
            ok = windows(store, index, before, after) >= 0
            g = torch.where(ok, index[..., None].clamp(min=0) + offs, torch.full_like(ok, -1, dtype=torch.long))
            plan[(layer, kind)] = g
            rows = g[g >= 0] // seq_len
            needed_rows.append(rows.flatten())
    priority = torch.cat(needed_rows) if needed_rows else torch.zeros(0, dtype=torch.long)
    uniq, first = np.unique(priority.numpy(), return_index=True)
    ordered = uniq[np.argsort(first, kind="stable")]
    keep = ordered[: max(0, budget_tokens // seq_len)]
    rows = torch.as_tensor(np.sort(keep), dtype=torch.long)
    result = Shading(rows=int(rows.numel()))
    if rows.numel() == 0:
        return result
    layers = sorted(examples)
    # requests per layer: (global token, neuron) pairs whose row was re-run
    values = {}
    requests = {}
    for layer in layers:
        gs, ns = [], []
        for kind in examples[layer]:
            g = plan[(layer, kind)]
            neuron = torch.arange(g.shape[0])[:, None, None].expand_as(g)
            sel = g >= 0
            gs.append(g[sel])
            ns.append(neuron[sel])
        g, n = torch.cat(gs), torch.cat(ns)
        inrun = torch.isin(g // seq_len, rows)
        requests[layer] = (g[inrun], n[inrun])
        values[layer] = torch.full((int(inrun.sum()),), float("nan"))
    for b in range(0, rows.numel(), batch_rows):
        batch = rows[b:b + batch_rows]
        lens = [min(seq_len, offset + store.n_tokens - int(r) * seq_len) for r in batch]
        for length in sorted(set(lens)):  # the short last row runs on its own
            sub = batch[torch.as_tensor(lens) == length]
            ids = torch.stack([store.ids[int(r) * seq_len - offset:int(r) * seq_len - offset + length]
                               for r in sub]).long()
            result.tokens += ids.numel()

            def on_layer(layer, t, sub=sub, length=length):
                g, n = requests[layer]
                r = g // seq_len
                mine = torch.isin(r, sub)
                if not mine.any():
                    return
                slot = torch.searchsorted(sub, r[mine])  # sub is sorted
                coef = t["coef"].float().cpu()  # [rows, length, d_mlp]
                values[layer][mine] = coef[slot, g[mine] - r[mine] * seq_len, n[mine]]

            with torch.inference_mode(), capture(model, layers, ("coef",), stop=True, on_layer=on_layer):
                model.hf(input_ids=ids.to(model.device), use_cache=False)
    for layer in layers:
        stats = run.stats[layer]
        scale = torch.maximum(stats.max.float().abs(), _min(stats).abs()).clamp(min=1e-12)  # [d_mlp]
        g_req, n_req = requests[layer]
        vals = values[layer]
        # dense map back: one dict keyed by (g, n) would be slow for big layers; sort instead
        key = g_req * stats.d_mlp + n_req
        order = key.argsort()
        key_sorted, val_sorted = key[order], vals[order]
        result.per_layer[layer] = {}
        for kind, (v, index) in examples[layer].items():
            g = plan[(layer, kind)]
            neuron = torch.arange(g.shape[0])[:, None, None].expand_as(g)
            k = g.clamp(min=0) * stats.d_mlp + neuron
            pos = torch.searchsorted(key_sorted, k.flatten()).clamp(max=max(len(key_sorted) - 1, 0)).view_as(k)
            found = (key_sorted[pos] == k) & (g >= 0) if len(key_sorted) else torch.zeros_like(g, dtype=torch.bool)
            m = torch.where(found, val_sorted[pos] if len(key_sorted) else torch.zeros_like(g, dtype=torch.float),
                            torch.full(g.shape, float("nan")))
            complete = ((~torch.isnan(m)) | (g < 0)).all(-1) & (index >= 0)  # [d_mlp, n]
            at = m[..., before]
            err = ((at - v.float()).abs() / scale[:, None])[complete]
            if err.numel():
                result.max_rel_error = max(result.max_rel_error, float(err.max()))
            result.shaded += int(complete.sum())
            result.total += int((index >= 0).sum())
            level = torch.round(10 * torch.nan_to_num(m, nan=0.0) / scale[:, None, None]).clamp(-10, 10).long()
            codes = (level + ord("K")).flatten().tolist()
            W = level.shape[-1]
            flat = [bytes(codes[a:a + W]).decode("ascii") for a in range(0, len(codes), W)]
            n = level.shape[1]
            lists = [flat[a:a + n] for a in range(0, len(flat), n)]
            comp = complete.tolist()
            result.per_layer[layer][kind] = [[row if c else None for row, c in zip(a, b)] for a, b in zip(lists, comp)]
    return result


def _min(stats) -> torch.Tensor:
    m = getattr(stats, "min", None)
    return m.float() if isinstance(m, torch.Tensor) else torch.zeros(stats.d_mlp)
