"""What the explainers and scorers see of one neuron (per sign of m): snippets with exact per-token
coefficients, the seeded explain / score split, random non-activating snippets, and the value side.

Axes: a snippet is a window of one model row of the run's layout (``before`` tokens before the example
token, ``after`` after it, inside the row); its coefficients [len] are recomputed by running the row's
prefix up to the window's end through the profiled model (kvmem.capture, stop after the layer): the
very m the profile saw. For sign "-" (gated FFNs) activations are -m, so "firing" is m < 0.

Examples: sign "+": the run's ``top_docs`` store (one per document, best first) and quantile bands of its
``sample`` store (tokens with m > 0); sign "-": the ``bottom`` store (no bands: the sample holds m > 0
only). The activating examples are shuffled with ``numpy.random.default_rng([seed, layer, neuron, sign])``
and split: the first ``ceil(n/2)`` explain, the rest are scored (the explainer never sees them).
Non-activating snippets: random tokens of the layout's rows (same rng) whose window has max activation
below ``QUIET`` (10%, kvmem.profile.tables.HEADLINE) of the neuron's max |m|.
Value side: sign(m)·w_i·W_U after the final norm (kvmem.vocab.value_rows, through_norm=True; w_i is the
written vector, through the post-FFN norm's gain where the model has one); promoted = top, suppressed
= bottom. The explainer sees the promoted ranks 0, 2, 4, ...; ranks 1, 3, 5, ... are held out for the
value scorer, against as many distractors drawn (same rng) from defined ids outside the top 100.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from kvmem.explain.scorers import scale

if TYPE_CHECKING:
    from kvmem.models.kvmodel import KVModel
    from kvmem.profile.run import Run

QUIET = 0.1


@dataclass
class Snippet:
    tokens: list[str]
    coefs: list[float]  # sign-aware activation per token (m for "+", -m for "-")
    at: int  # the example token's place in ``tokens`` (-1 for random windows)
    doc: int
    index: int = -1  # global token index of the example token in the run's token store

    def acts(self, max_abs: float) -> list[int]:
        return scale(self.coefs, max_abs)


@dataclass
class NeuronData:
    layer: int
    neuron: int
    sign: str
    max_abs: float
    explain: list[Snippet]
    bands: list[tuple[str, list[Snippet]]]
    score: list[Snippet]
    quiet: list[Snippet]
    promoted: list[str]  # shown to the explainer
    suppressed: list[str]
    held_promoted: list[str]  # value scorer's positives
    distractors: list[str]
    seed: int = 0
    trigger_pool: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.layer}.{self.neuron}"


def rng_for(seed: int, layer: int, neuron: int, sign: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(layer), int(neuron), 0 if sign == "+" else 1])


def _windows(run, model, layer: int, neuron: int, indices: list[int], before: int, after: int, sign: str):
    """Snippets (tokens, coefs, at, doc) around global token ``indices`` (exact coefficients, one padded
    forward pass of the rows' prefixes)."""
    from kvmem.capture import run_capture

    if not indices:
        return []
    lay, store, vocab = run.layout, run.tokens, run.vocab
    idx = torch.tensor(indices, dtype=torch.int64)
    rows, pos = lay.row_of(idx), lay.position(idx)
    batch = lay.batch(store, rows)
    first = lay.first
    ends = [min(int(p) + after + 1, int(lay.lengths[int(r)]) + first) for r, p in zip(rows, pos)]
    width = max(ends)
    ids = batch.ids[:, :width].to(model.device)
    mask = torch.zeros_like(ids)
    for b, e in enumerate(ends):
        mask[b, :e] = 1
    cap = run_capture(model, ids, [layer], attention_mask=mask)
    m = cap.data["coef"][layer].float().cpu()  # [b, width, d_mlp]
    docs = store.doc_of(idx).tolist()
    out = []
    s = 1.0 if sign == "+" else -1.0
    for b, (p, e) in enumerate(zip(pos.tolist(), ends)):
        lo = max(first, p - before)
        tok_ids = batch.ids[b, lo:e].tolist()
        out.append(Snippet([vocab[t] for t in tok_ids], (s * m[b, lo:e, neuron]).tolist(), p - lo, int(docs[b]),
                           int(indices[b])))
    return out


def _value_side(model, layer: int, neuron: int, sign: str, k: int, rng, vocab_strings) -> tuple:
    from kvmem.vocab import value_rows, vocab_mask

    logits = value_rows(model, [(layer, neuron)], through_norm=True, sign=[1.0 if sign == "+" else -1.0])[0].cpu()
    defined = vocab_mask(model)
    top = logits.topk(2 * k).indices.tolist()
    bottom = logits.masked_fill(~defined, float("inf")).topk(k, largest=False).indices.tolist()
    far = set(logits.topk(min(100, int(defined.sum()))).indices.tolist())
    pool = [i for i in torch.nonzero(defined).flatten().tolist() if i not in far]
    held = top[1::2]
    dis = rng.choice(pool, size=min(len(held), len(pool)), replace=False).tolist() if pool else []
    s = vocab_strings
    return [s[i] for i in top[0::2]], [s[i] for i in bottom], [s[i] for i in held], [s[i] for i in dis]


def gather(run: Run, model: KVModel, layer: int, neuron: int, sign: str = "+", *, seed: int = 0, n_top: int = 10,
           n_bands: int = 3, per_band: int = 2, before: int = 12, after: int = 4, k_value: int = 10,
           n_quiet: int | None = None) -> NeuronData:
    """The NeuronData of one neuron and sign (see the module docstring)."""
    from kvmem.profile.tables import max_abs
    from kvmem.vocab import vocab_strings

    rng = rng_for(seed, layer, neuron, sign)
    stats = run.layer_stats(layer)
    mx = float(max_abs(stats)[neuron])
    kind = "top_docs" if sign == "+" else "bottom"
    sl = run.slots(layer, kind)
    keep = sl.index[neuron] >= 0
    vals, idx = sl.value[neuron][keep].tolist(), sl.index[neuron][keep].tolist()
    if sign == "-":
        pairs = [(v, i) for v, i in zip(vals, idx) if v < 0][:n_top]
    else:
        pairs = [(v, i) for v, i in zip(vals, idx) if v > 0][:n_top]
    band_idx: list[tuple[str, list[int]]] = []
    if sign == "+" and n_bands > 0:
        ss = run.slots(layer, "sample")
        ok = ss.index[neuron] >= 0
        sv, si = ss.value[neuron][ok].numpy(), ss.index[neuron][ok].numpy()
        taken = {i for _, i in pairs}
        if sv.size:
            order = np.argsort(-sv, kind="stable")
            for b, chunk in enumerate(np.array_split(order, n_bands)):
                cand = [int(si[j]) for j in chunk if int(si[j]) not in taken]
                pick = sorted(rng.choice(cand, size=min(per_band, len(cand)), replace=False).tolist()) if cand else []
                lo_q, hi_q = round(100 * b / n_bands), round(100 * (b + 1) / n_bands)
                band_idx.append((f"quantiles {lo_q}-{hi_q}% of sampled activations from the top", pick))
                taken.update(pick)
    order = rng.permutation(len(pairs)).tolist()
    n_exp = math.ceil(len(pairs) / 2)
    exp_i = sorted(order[:n_exp])  # shown best first
    sco_i = sorted(order[n_exp:])
    # random windows
    lay = run.layout
    n_quiet = n_quiet if n_quiet is not None else max(len(sco_i), 1)
    lengths = lay.lengths.numpy().astype(np.float64)
    rand = []
    if lengths.sum() > 0:
        rows = rng.choice(len(lengths), size=3 * n_quiet, p=lengths / lengths.sum())
        rand = [int(lay.starts[r]) + int(rng.integers(0, int(lengths[r]))) for r in rows]
    all_idx = [pairs[i][1] for i in exp_i] + [pairs[i][1] for i in sco_i] + rand
    for _, b in band_idx:
        all_idx += b
    wins = _windows(run, model, layer, neuron, all_idx, before, after, sign)
    a, b2 = len(exp_i), len(exp_i) + len(sco_i)
    explain, score, rwins = wins[:a], wins[a:b2], wins[b2:b2 + len(rand)]
    rest = wins[b2 + len(rand):]
    bands = []
    for label, b in band_idx:
        bands.append((label, rest[:len(b)]))
        rest = rest[len(b):]
    quiet = []
    for w in rwins:
        if max(w.coefs) < QUIET * mx and len(quiet) < n_quiet:
            w.at = -1
            quiet.append(w)
    promoted, suppressed, held, dis = _value_side(model, layer, neuron, sign, k_value, rng, vocab_strings(model))
    return NeuronData(layer, neuron, sign, mx, explain, bands, score, quiet, promoted, suppressed, held, dis, seed)
