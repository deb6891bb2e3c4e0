"""Activation of every context token of the shown examples: read from the run, or by re-running the model.

A run profiled by this kvmem keeps, for every example the report can show, the neuron's m over the
example's context window (kvmem.stats.context, ``LayerStats.context``): ``stored`` reads them, and no
model runs. ``context_shading`` (what the report calls) uses them for every example they cover and falls
back on ``shade`` only for the rest (older runs without windows, options asking for more examples or
context than the profile kept), and only when a model is given.

A window is shaded over the positions of the example's own model row (the run's RowLayout,
kvmem.profile.tokens): what the model saw before the token and the row's tokens after it; positions of
the document outside the row (and a row's first token where the statistics skip it) show unshaded.

``shade`` re-runs the model over the original input rows (``run.layout.batch``: the BOS first where the
run had one, padded rows under their attention mask), capturing the profiled layers, and
m[token, neuron] is gathered for every window token of every example. Rows are taken in order of need
(top examples first) up to a token budget; an example is shaded only if its row was re-run. The activating token's
re-computed value is checked against the stored one (``max_rel_error``).

Shading is stored per example as one string with a letter per window token: level = round(10 · m /
max|m|) of that neuron, in [-10, 10], written as chr(ord('K') + level) (so 'A' = -max, 'K' = 0,
'U' = +max): 21 levels are plenty for a background colour and keep the data small.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from kvmem.capture import capture
from kvmem.profile.run import Run

if TYPE_CHECKING:
    from kvmem.models.kvmodel import KVModel
    from kvmem.stats import LayerStats

NO_CONTEXT = ("only the activating token is shaded: the run stores no activations of the context tokens "
              "(profiled by an older kvmem; pass the model to re-run it over the examples)")


@dataclass
class Shading:
    per_layer: dict = field(default_factory=dict)  # layer -> kind -> [d_mlp][n] level strings (None: not shaded)
    rows: int = 0  # input rows re-run
    tokens: int = 0  # tokens re-run
    shaded: int = 0  # examples shaded
    total: int = 0  # examples shown
    max_rel_error: float = 0.0  # activating token: |recomputed - stored| / max|m| of the neuron


def needed(run: Run, index: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """[..., before + 1 + after] bool: the window positions of each global index [...] that lie in its model
    row and enter the statistics (False everywhere for index < 0)."""
    lay = run.layout
    flat = index.reshape(-1).long()
    valid = flat >= 0
    row = lay.row_of(torch.where(valid, flat, lay.starts[:1].expand_as(flat))) if flat.numel() else flat
    start = lay.starts[row]
    t = flat[:, None] + torch.arange(-before, after + 1)
    ok = valid[:, None] & (t >= start[:, None]) & (t < (start + lay.lengths[row])[:, None])
    if lay.skip_first and lay.first == 0:  # no BOS: the row's first token is left out of the statistics
        ok &= t != start[:, None]
    return ok.reshape(*index.shape, -1)


def shade(model: KVModel, run: Run, examples: dict, before: int, after: int, budget_tokens: int, batch_rows: int = 8
          ) -> Shading:
    """``examples[layer][kind] = (values [d_mlp, n], index [d_mlp, n])``; returns the shading of each window."""
    lay = run.layout
    store = run.tokens
    offs = torch.arange(-before, after + 1)
    plan = {}  # (layer, kind) -> global token index of each needed window position [d_mlp, n, W], -1 elsewhere
    needed_rows = []
    for layer, kinds in examples.items():
        for kind, (_, index) in kinds.items():
            ok = needed(run, index, before, after)
            g = torch.where(ok, index[..., None].clamp(min=0) + offs, torch.full_like(ok, -1, dtype=torch.long))
            plan[(layer, kind)] = g
            needed_rows.append(lay.row_of(index[index >= 0]).flatten())
    priority = torch.cat(needed_rows) if needed_rows else torch.zeros(0, dtype=torch.long)
    uniq, first = np.unique(priority.numpy(), return_index=True)
    ordered = torch.as_tensor(uniq[np.argsort(first, kind="stable")], dtype=torch.long)
    cost = torch.cumsum(lay.lengths[ordered] + lay.first, 0) if ordered.numel() else ordered
    rows = torch.sort(ordered[cost <= budget_tokens]).values
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
        row = lay.row_of(g) if g.numel() else g
        inrun = torch.isin(row, rows)
        requests[layer] = (g[inrun], n[inrun], row[inrun], lay.position(g[inrun]) if inrun.any() else g[inrun])
        values[layer] = torch.full((int(inrun.sum()),), float("nan"))
    for b in range(0, rows.numel(), batch_rows):
        sub = rows[b:b + batch_rows]
        batch = lay.batch(store, sub)
        result.tokens += int(batch.mask.sum())

        def on_layer(layer, t, sub=sub):
            g, n, r, p = requests[layer]
            mine = torch.isin(r, sub)
            if not mine.any():
                return
            slot = torch.searchsorted(sub, r[mine])  # sub is sorted
            coef = t["coef"].float().cpu()  # [rows, L, d_mlp]
            values[layer][mine] = coef[slot, p[mine], n[mine]]

        with torch.inference_mode(), capture(model, layers, ("coef",), stop=True, on_layer=on_layer):
            model.hf(input_ids=batch.ids.to(model.device), attention_mask=batch.mask.to(model.device), use_cache=False)
    for layer in layers:
        stats = run.layer_stats(layer)
        scale = _scale(stats)
        g_req, n_req = requests[layer][:2]
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
            result.per_layer[layer][kind] = _encode(result, m, g >= 0, v, index, scale, before)
    return result


def stored(run: Run, examples: dict, before: int, after: int) -> Shading | None:
    """The shading of each window from the run's context windows (``examples`` as for ``shade``); None if
    a layer holds none (a run profiled by an older kvmem). Examples whose window the run does not hold
    whole (the positions of ``needed``) get None, like those ``shade`` leaves out."""
    stats = run.stats
    if any(stats[layer].context is None for layer in examples):
        return None
    result = Shading()
    for layer, kinds in examples.items():
        s = stats[layer]
        ctx, scale = s.context, _scale(s)
        result.per_layer[layer] = {}
        for kind, (v, index) in kinds.items():
            neuron = torch.arange(index.shape[0])[:, None].expand_as(index)
            if before <= ctx.before and after <= ctx.after:
                m = ctx.lookup(neuron, index)[..., ctx.before - before:ctx.before + after + 1].cpu()  # [d, n, W]
            else:  # more context than the profile kept
                m = torch.full((*index.shape, before + 1 + after), float("nan"))
            want = needed(run, index, before, after)
            m = torch.where(want, m, torch.full_like(m, float("nan")))
            result.per_layer[layer][kind] = _encode(result, m, want, v, index, scale, before)
    return result


def context_shading(run: Run, examples: dict, before: int, after: int, model: KVModel | None = None,
                    rerun_tokens: int = 100_000) -> tuple[Shading | None, str]:
    """The report's shading and its note: the stored windows where they cover an example; with ``model``,
    the model re-run (``shade``) over the rows of the other examples only; otherwise those show only the
    activating token."""
    got = stored(run, examples, before, after)
    if got is None:  # a run without context windows
        if model is None:
            return None, NO_CONTEXT
        out = shade(model, run, examples, before, after, rerun_tokens)
        return out, (f"context tokens shaded by m of this neuron, re-computed by re-running the model over "
                     f"{out.tokens:,} corpus tokens ({out.shaded:,} of {out.total:,} examples shaded"
                     f"{_rest(out)}{_check(out)})")
    from_run, reran = got.shaded, ""
    rest = {layer: {kind: (v, torch.where(_unshaded(got.per_layer[layer][kind], index), index, -1))
                    for kind, (v, index) in kinds.items()} for layer, kinds in examples.items()}
    if model is not None and any(bool((i >= 0).any()) for kinds in rest.values() for _, i in kinds.values()):
        more = shade(model, run, rest, before, after, rerun_tokens)
        got.rows, got.tokens, got.shaded = more.rows, more.tokens, got.shaded + more.shaded
        got.max_rel_error = max(got.max_rel_error, more.max_rel_error)
        for layer, kinds in more.per_layer.items():
            for kind, new in kinds.items():
                old = got.per_layer[layer][kind]
                got.per_layer[layer][kind] = [[a if a is not None else b for a, b in zip(x, y)] for x, y in zip(old, new)]
        reran = f"; {more.shaded:,} more by re-running the model over {more.tokens:,} corpus tokens"
    return got, (f"context tokens shaded by m of this neuron, kept by the profile while it ran (no second forward "
                 f"pass): {from_run:,} of {got.total:,} examples{reran}{_rest(got)}{_check(got)}")


def _rest(s: Shading) -> str:
    return "" if s.shaded == s.total else "; the rest show only the activating token"


def _check(s: Shading) -> str:
    return (f"; the m of the activating token is within {s.max_rel_error:.1e} of the stored value, relative to "
            "the neuron's max |m|")


def _unshaded(per_neuron: list, index: torch.Tensor) -> torch.Tensor:
    """[d_mlp, n] bool: examples with an index and no shading string."""
    return torch.tensor([[x is None for x in row] for row in per_neuron], dtype=torch.bool).view_as(index) & (index >= 0)


def _encode(result: Shading, m: torch.Tensor, in_doc: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
            scale: torch.Tensor, before: int) -> list:
    """Level strings [d_mlp][n] (None: not shaded) of windows m [d_mlp, n, W] (NaN: not known; positions
    outside the row, in_doc False, are not needed and show as level 0); counts into ``result``."""
    complete = ((~torch.isnan(m)) | ~in_doc).all(-1) & (index >= 0)  # [d_mlp, n]
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
    return [[row if c else None for row, c in zip(a, b)] for a, b in zip(lists, comp)]


def _scale(stats: LayerStats) -> torch.Tensor:
    """max |m| per neuron [d_mlp] (clamped away from 0): the shading's full scale."""
    return torch.maximum(stats.max.float().abs(), stats.min.float().abs()).clamp(min=1e-12)
