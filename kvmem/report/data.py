"""What the report shows, pulled out of a run (and optionally a model) as JSON-able dicts.

Per layer the neuron page needs, for each neuron: its stored examples (top, per-document, bottom,
a few from quantile bands of the uniform sample) as token windows, its activation histogram, its
gate/up sign counts (gated FFNs) and its value vector's top and bottom vocabulary tokens. All of it
is built with tensor ops over the layer ([d_mlp, k] stores, [d_mlp, k, W] windows); Python only
walks the neurons once to trim padding while serialising.

Token windows are ids into the report's vocabulary, ``before`` tokens before and ``after`` after
the activating token (always at slot ``before``), -1 outside the token's document. Each layer stores
every distinct window once (``win``, with its document in ``wdoc``); an example is [value, window
number] (+ its shading): neurons of one layer share many examples (3-4x fewer windows on SmolLM2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from kvmem.profile.run import Run, slots
from kvmem.profile.tokens import TokenStore

if TYPE_CHECKING:
    from kvmem.stats import LayerStats

KINDS = ("top", "top_docs", "bottom", "bands", "quad")


@dataclass(frozen=True)
class ReportOptions:
    n_top: int = 10  # top examples shown with context (the per-token list uses the whole top store)
    n_docs: int = 5  # per-document examples
    n_bottom: int = 5  # most negative examples
    per_band: int = 2  # examples per quartile band of the activating sample
    before: int = 10  # context tokens before the activating token
    after: int = 4  # and after
    n_vocab: int = 10  # value-side tokens, top and bottom
    rerun_tokens: int = 100_000  # with a model: re-run at most this many corpus tokens to shade the contexts
    # the run's context windows do not cover (runs of older kvmem, more examples or context than profiled)


def safe_json(obj) -> str:
    """JSON that is safe inside <script>: no '<', '>', '&' (so no '</script>' or '<!--'), no U+2028/9."""
    s = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return (s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def packed(obj) -> str:
    """gzip-compressed JSON as base64 (only [A-Za-z0-9+/=]: safe anywhere in a script); the page
    inflates it with the browser's DecompressionStream. Deterministic (no gzip timestamp)."""
    import base64
    import gzip

    raw = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    return base64.b64encode(gzip.compress(raw, compresslevel=6, mtime=0)).decode("ascii")


def unpacked(text: str):
    """The inverse of packed (for tests and tools)."""
    import base64
    import gzip

    return json.loads(gzip.decompress(base64.b64decode(text)).decode("utf-8"))


def windows(store: TokenStore, index: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """Token ids around each global index [...] -> [..., before + 1 + after] int64; -1 outside the
    index's document or where index < 0."""
    flat = index.reshape(-1).long()
    valid = flat >= 0
    local = (flat - store.offset).clamp(0, max(store.n_tokens - 1, 0))
    doc = store.local_doc_of(local)
    start, end = store.doc_offsets[doc], store.doc_offsets[doc + 1]
    pos = local[:, None] + torch.arange(-before, after + 1)
    inside = (pos >= start[:, None]) & (pos < end[:, None]) & valid[:, None]
    ids = store.ids.long()[pos.clamp(0, store.n_tokens - 1)]
    return torch.where(inside, ids, torch.full_like(ids, -1)).reshape(*index.shape, -1)


def token_at(store: TokenStore, index: torch.Tensor) -> torch.Tensor:
    """Token id at each global index [...] (-1 where index < 0)."""
    local = (index.long() - store.offset).clamp(0, max(store.n_tokens - 1, 0))
    return torch.where(index >= 0, store.ids.long()[local], torch.full_like(index.long(), -1))


def band_picks(values: torch.Tensor, index: torch.Tensor, per_band: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From a uniform sample [d_mlp, k] of activating tokens, ``per_band`` examples from each quartile
    band (by rank within the neuron's sample), lowest band first: values, index [d_mlp, 4 * per_band]."""
    key = torch.where(index >= 0, values.float(), torch.full_like(values, float("inf"), dtype=torch.float32))
    order = key.argsort(dim=1)
    v, i = values.float().gather(1, order), index.gather(1, order)
    n = (index >= 0).sum(1, keepdim=True)  # [d_mlp, 1]
    frac = torch.tensor([(b + (j + 0.5) / per_band) / 4 for b in range(4) for j in range(per_band)])
    slot = (frac[None, :] * n).floor().long().clamp(max=values.shape[1] - 1)
    pick_i = i.gather(1, slot)
    pick_i = torch.where(slot < n, pick_i, torch.full_like(pick_i, -1))
    return v.gather(1, slot), pick_i


def _round(x: torch.Tensor, digits: int = 4) -> list:
    """Floats to ``digits`` significant digits, as nested lists."""
    x = x.double()
    mag = torch.where(x == 0, torch.zeros_like(x), x.abs().log10().floor())
    scale = 10.0 ** (digits - 1 - mag)
    return (torch.round(x * scale) / scale).tolist()


def layer_examples(stats: LayerStats, store: TokenStore, opts: ReportOptions
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per kind: (values [d_mlp, n], global index [d_mlp, n]) of the examples the page shows."""
    out = {}
    for kind, n in (("top", opts.n_top), ("top_docs", opts.n_docs), ("bottom", opts.n_bottom)):
        v, i = shown_slots(stats, kind)
        out[kind] = (v[:, :n].float(), i[:, :n].long())
    v, i = shown_slots(stats, "sample")
    out["bands"] = band_picks(v, i.long(), opts.per_band)
    q = stats.quadrants  # None unless the layer is gated
    if q is not None:
        out["quad"] = (torch.nan_to_num(q.value.float().cpu(), nan=0.0), q.index.long().cpu())
    return out


def shown_slots(stats: LayerStats, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A store as the page shows it (kvmem.profile.run.slots, on the CPU): value [d_mlp, k] float32 with 0
    in empty slots, index [d_mlp, k] int64, -1 empty."""
    s = slots(stats, kind)
    return torch.nan_to_num(s.value.float().cpu(), nan=0.0), s.index.long().cpu()


def layer_payload(layer: int, stats: LayerStats, store: TokenStore, opts: ReportOptions, *,
                  vocab_side: dict | None = None, shading: dict | None = None) -> dict:
    """The neuron-page data of one layer (see the module docstring)."""

    ex = layer_examples(stats, store, opts)
    top_v, top_i = shown_slots(stats, "top")
    top_tok = token_at(store, top_i)
    hist = stats.hist.long().cpu()  # [d_mlp, N_BINS] activation histogram counts
    nz = hist > 0
    any_nz = nz.any(1)
    first = torch.where(any_nz, nz.float().argmax(1), torch.zeros_like(any_nz, dtype=torch.long))
    last = torch.where(any_nz, hist.shape[1] - 1 - nz.flip(1).float().argmax(1), torch.full_like(first, -1))
    # gated layers: tokens per sign combination [d_mlp, 4] (order of figures.QUADRANTS)
    q = stats.quadrants
    quad = None if q is None else q.count.long().cpu().tolist()
    maxima, minima = stats.max.float().cpu(), stats.min.float().cpu()
    # the layer's windows, once each: examples of different neurons often share a token
    every = torch.cat([i.flatten() for _, i in ex.values()])
    uniq = every[every >= 0].unique()  # sorted global indices [n_windows]
    win = windows(store, uniq, opts.before, opts.after).tolist()
    wdoc = store.doc_of(uniq).tolist() if uniq.numel() else []
    kinds = {}
    for kind, (v, i) in ex.items():
        ref = torch.searchsorted(uniq, i.clamp(min=store.offset)) if uniq.numel() else torch.zeros_like(i)
        kinds[kind] = {"v": _round(v), "r": torch.where(i >= 0, ref, torch.full_like(ref, -1)).tolist(),
                       "s": shading.get(kind) if shading else None}
    neurons = []
    hist_l = hist.tolist()
    top_vl, top_tl, top_ok = _round(top_v.float()), top_tok.tolist(), (top_i >= 0).tolist()
    for n in range(stats.d_mlp):  # serialising: one pass over the neurons, trimming padding
        item = {"h": [int(first[n]), hist_l[n][int(first[n]):int(last[n]) + 1]],
                "t": [[tok, val] for tok, val, ok in zip(top_tl[n], top_vl[n], top_ok[n]) if ok]}
        for kind, d in kinds.items():
            refs = d["r"][n]
            keep = [j for j, r in enumerate(refs) if r >= 0 or kind == "quad"]
            item[kind] = [[d["v"][n][j], refs[j]] + ([d["s"][n][j]] if d["s"] else []) for j in keep]
        if quad is not None:
            item["q"] = quad[n]
        if vocab_side is not None:
            item["vt"] = vocab_side["top"][n]
            item["vb"] = vocab_side["bottom"][n]
        neurons.append(item)
    return {"layer": layer, "before": opts.before, "max": _round(torch.nan_to_num(maxima)),
            "min": _round(torch.nan_to_num(minima)), "rate": _round(torch.nan_to_num(stats.firing_rate().cpu())),
            "shaded": shading is not None, "win": win, "wdoc": wdoc, "neurons": neurons}


def vocab_side(projection, layer: int, n: int) -> dict:
    """Top and bottom value tokens [[id, logit], ...] per neuron of one layer, from a ValueProjection."""
    out, w = {}, projection.width(layer)  # a narrower layer's padded slots left out
    for side in ("top", "bottom"):
        ids = projection[f"{side}_ids"][layer, :w, :n].tolist()
        logits = _round(projection[f"{side}_logits"][layer, :w, :n].float())
        out[side] = [[[i, v] for i, v in zip(a, b)] for a, b in zip(ids, logits)]
    return out


def neuron_index(run: Run, projection=None, n_value_tokens: int = 3) -> dict:
    """The overview table, columnar: layer, neuron, firing rate, max, top trigger token id, top value
    token ids (one list per neuron, empty without a projection)."""
    df = run.neurons
    store = run.tokens
    idx = torch.tensor(df["top_index"].to_numpy(), dtype=torch.long)
    trig = token_at(store, idx)
    cols = {"layer": df["layer"].astype(int).tolist(), "neuron": df["neuron"].astype(int).tolist(),
            # NaN (an MoE expert no token was routed to) shows as 0
            "rate": _round(torch.tensor(df["firing_rate"].to_numpy(dtype=np.float64)).nan_to_num(0.0), 3),
            "max": _round(torch.tensor(df["max"].to_numpy(dtype=np.float64)).nan_to_num(0.0), 3),
            "trig": trig.tolist()}
    if projection is not None:
        ids = projection["top_ids"][:, :, :n_value_tokens]  # [n_layers, d_mlp, n]
        cols["val"] = ids[torch.as_tensor(cols["layer"]), torch.as_tensor(cols["neuron"])].tolist()
    return cols


def l0_hists(run: Run) -> dict[int, np.ndarray]:
    """Per layer, tokens by their L0 (neurons with m > 0) [d_mlp + 1]."""
    return {layer: s.l0_hist.double().cpu().numpy() for layer, s in run.stats.items()}
