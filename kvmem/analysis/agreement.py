"""Key-value agreement (Geva et al. 2021, section 4, Figs. 4-6): does a neuron's value predict the token that
follows its key's top trigger?

Triggers are the run's per-document store (``top_docs``: each document once, by its max m; position-0 and other
uncounted positions are already excluded by the profiler). A trigger's *next token* is the token after it in its
document (kvmem.analysis.prefixes.next_in_doc); a trigger that ends its document has none and is EXCLUDED from the
rate (not a miss). The value's vocabulary distribution is v_i·W_U in float32 over the tokenizer's defined ids
(``n_defined``; padded unembedding ids are masked), raw (no final norm, no LM-head bias).

Per neuron (the ``units`` table, one row per (layer, neuron); NaN = not counted):
  ex1          1 if the value's top-1 token is the next token of the neuron's top-1 trigger (the paper's measure,
               the headline), counted where that trigger has a next token
  docs_any     1 if the value's top-1 token is the next token of any of the top-n triggers (n documents)
  topk         1 if any of the value's top-k tokens is the next token of any of the top-n triggers
  next_rank    rank (1 = the value's top token) of the top-1 trigger's next token in the value's distribution
               (ties to the lower id), Fig. 5; next_top10 = next_rank <= 10
  next_prob    probability of that next token under softmax(v_i·W_U) over the defined ids, Fig. 6
  neg_any      gated FFNs (m < 0 writes -v_i): 1 if the value's most suppressed token (argmin) is the next token of
               any of the neuron's top-n bottom examples (most negative m, per token)
  ex1_abs      gated FFNs, sign-aware top-1 (SwiGLU coefficients are sign-symmetric): the neuron's trigger of largest
               |m| -- top_docs slot 0 (m > 0) or bottom slot 0 (m < 0, when -m exceeds it; abs_neg = 1) -- against the
               token that write promotes (value top-1 for m > 0, value argmin for m < 0); cluster abs_doc
  doc          global document id of the top-1 trigger (the bootstrap cluster); neg_doc: of the first bottom example
Per layer (the ``layers`` table): for each rate r of ex1, docs_any, topk, next_top10, next_prob, neg_any: r, r_lo,
r_hi (95% cluster bootstrap over documents, kvmem.analysis.ci), n_r (neurons counted); base_r and p_r for ex1,
docs_any, topk, neg_any, ex1_abs: the derangement baseline (neuron i's value against the triggers of neuron pi(i), pi a
random derangement of the layer's neurons; mean of ``n_perm`` draws) and its one-sided permutation p-value;
uniform_r: the rate a uniformly random defined token (or k distinct ones) would get, 1/|V| for ex1 (the paper
quotes 0.0004%); next_rank_median, next_prob_median; n_neurons (the layer's d_mlp); n_docs_ex1 (documents the
ex1 units come from: the number of bootstrap clusters).
``null``: one row per (layer, draw) with each baseline rate and its count (to pool layers per draw);
``pairs``: the derangements of the first ``keep_pairs`` draws (layer, draw, neuron, partner).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from kvmem.analysis import ci
from kvmem.analysis.common import derangement
from kvmem.analysis.prefixes import next_in_doc
from kvmem.analysis.result import AnalysisResult
from kvmem.errors import KvmemError
from kvmem.profile.run import Run
from kvmem.vocab import value_matrix, vocab_mask

if TYPE_CHECKING:
    from kvmem.models.kvmodel import KVModel

RATES = ("ex1", "docs_any", "topk", "next_top10", "next_prob", "neg_any", "ex1_abs")  # the per-neuron rates
OWN_CLUSTER = {"neg_any": "neg_doc", "ex1_abs": "abs_doc"}  # rates clustered on another trigger's document
TOP10 = 10


def n_defined(model: KVModel) -> int:
    """Vocabulary ids the tokenizer defines (kvmem.vocab.vocab_mask; the rest pad the unembedding)."""
    return int(vocab_mask(model).sum())


@torch.inference_mode()
def value_logits(model: KVModel, layer: int, rows: slice, W_U: torch.Tensor | None = None) -> torch.Tensor:
    """v_i·W_U for the neurons ``rows`` of ``layer``: float32 [c, d_vocab] on the CPU (kvmem.vocab.value_matrix,
    raw: no final norm, no bias), -inf at the ids the tokenizer does not define. ``W_U``: a float32 copy of the
    unembedding to reuse across calls."""
    W_U = model.W_U.to(torch.float32) if W_U is None else W_U
    logits = (value_matrix(model, layer, False, rows).to(W_U.device) @ W_U).cpu()
    return logits.masked_fill_(~vocab_mask(model), float("-inf"))


def match_table(value_ids: torch.Tensor, nxt: torch.Tensor) -> dict[str, torch.Tensor]:
    """value_ids [d, k] (the value's tokens, best first), nxt [d, n] (next tokens of the triggers, best first,
    -1 = none) -> float [d] per neuron, NaN where not counted: ex1 (value top-1 vs trigger 1), any (value top-1 vs
    any trigger), topk (any of k vs any trigger)."""
    valid = nxt >= 0
    match = (value_ids[:, :, None] == nxt[:, None, :]) & valid[:, None, :]  # [d, k, n]
    nan = torch.tensor(float("nan"))
    has = valid.any(1)
    return {"ex1": torch.where(valid[:, 0], match[:, 0, 0].float(), nan),
            "any": torch.where(has, match[:, 0, :].any(1).float(), nan),
            "topk": torch.where(has, match.any(2).any(1).float(), nan)}


def uniform_any(nxt: torch.Tensor, k: int, n_vocab: int) -> torch.Tensor:
    """[d] probability that k distinct uniformly random defined tokens include one of the row's distinct valid
    next tokens (NaN where the row has none): 1 - C(V - s, k) / C(V, k)."""
    out = torch.full((nxt.shape[0],), float("nan"), dtype=torch.float64)
    for i, row in enumerate(nxt.tolist()):
        s = len({t for t in row if t >= 0})
        if s:
            miss = 0.0 if n_vocab - s < k else math.exp(math.lgamma(n_vocab - s + 1) - math.lgamma(n_vocab - s - k + 1)
                                                       - math.lgamma(n_vocab + 1) + math.lgamma(n_vocab - k + 1))
            out[i] = 1 - miss
    return out


def null_rates(value_ids: torch.Tensor, nxt: torch.Tensor, perms: list[torch.Tensor],
               chunk: int = 16) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The rates of ``match_table`` when neuron i's value meets the triggers of neuron perm[i], for each of the
    permutations ``perms`` (P of them, each [d]): {ex1, docs_any, topk: (rate [P] float, NaN where none counted;
    count [P] int)}. ``chunk`` permutations at a time ([chunk, d, k, n] booleans)."""
    out = {r: ([], []) for r in ("ex1", "docs_any", "topk")}
    for start in range(0, len(perms), chunk):
        nx = nxt[torch.stack(perms[start:start + chunk])]  # [p, d, n]
        valid = nx >= 0
        match = (value_ids[None, :, :, None] == nx[:, :, None, :]) & valid[:, :, None, :]  # [p, d, k, n]
        has = valid.any(2)  # [p, d]
        for r, hit, counted in (("ex1", match[:, :, 0, 0], valid[:, :, 0]), ("docs_any", match[:, :, 0, :].any(2), has),
                                ("topk", match.any(3).any(2), has)):
            n = counted.sum(1)
            h = (hit & counted).sum(1)
            nan = torch.tensor(float("nan"), dtype=torch.float64)
            out[r][0].append(torch.where(n > 0, h.double() / n.clamp(min=1), nan))
            out[r][1].append(n)
    return {r: (torch.cat(a).numpy(), torch.cat(b).numpy()) for r, (a, b) in out.items()}


def agreement(model: KVModel, run: Run, *, n_examples: int | None = None, k: int = 10, n_perm: int = 100, seed: int = 0,
              layers=None, chunk: int = 256, keep_pairs: int = 5, n_boot: int = ci.N_BOOT,
              progress=None) -> AnalysisResult:
    """Per-layer agreement (module docstring) of ``model``'s values with ``run``'s per-document triggers.
    ``n_examples``: triggers per neuron for docs_any/topk (default: all the store holds); ``k``: value tokens for
    topk; ``n_perm``: derangement draws; ``chunk``: neurons per projection matmul; ``progress(label)`` is called
    after each layer."""
    store = run.tokens
    layers = run.profiled_layers if layers is None else list(layers)
    V = n_defined(model)
    if not 1 <= k <= V:
        raise KvmemError(f"k must be between 1 and the number of defined vocabulary ids {V}, got {k}")
    if n_perm < 1:
        raise KvmemError(f"n_perm must be at least 1, got {n_perm}")
    if n_examples is not None and n_examples < 1:
        raise KvmemError(f"n_examples must be at least 1, got {n_examples}")
    gated = run.gated
    gen = torch.Generator().manual_seed(seed)
    W_U = model.W_U.to(torch.float32)
    undefined = ~vocab_mask(model)
    rows, units, nulls, pairs = [], [], [], []
    for layer in layers:
        docs = run.slots(layer, "top_docs")
        index = docs.index.cpu().long()[:, :n_examples]  # [d, n] global token index, -1 empty
        d = index.shape[0]
        nxt = next_in_doc(store, index)  # [d, n]
        first = nxt[:, 0]
        top_ids, bottom_id = [], []
        rank = torch.full((d,), float("nan"), dtype=torch.float64)
        prob = rank.clone()
        for start in range(0, d, chunk):
            sl = slice(start, min(d, start + chunk))
            logits = value_logits(model, layer, sl, W_U)  # [c, d_vocab], -inf at undefined ids
            top_ids.append(logits.topk(k, dim=1).indices)
            bottom_id.append(logits.masked_fill(undefined, float("inf")).argmin(1, keepdim=True))
            t = first[sl]
            ok = t >= 0
            if bool(ok.any()):
                lg, tt = logits[ok], t[ok]
                own = lg.gather(1, tt[:, None])  # [c', 1]
                r = (lg > own).sum(1) + 1
                tied = ((lg == own).sum(1) > 1).nonzero().flatten()  # rare: ties go to the lower defined id
                for t_row in tied.tolist():
                    same = (lg[t_row] == own[t_row]) & ~undefined
                    r[t_row] += int(same[:int(tt[t_row])].sum())
                p = (own.squeeze(1).double() - torch.logsumexp(lg, dim=1).double()).exp()  # softmax at the token
                rank[torch.arange(sl.start, sl.stop)[ok]] = r.double()
                prob[torch.arange(sl.start, sl.stop)[ok]] = p
        vals = torch.cat(top_ids)  # [d, k]
        own = match_table(vals, nxt)
        unit = {"layer": layer, "neuron": np.arange(d), "doc": _docs(store, index[:, 0]),
                "ex1": own["ex1"].numpy(), "docs_any": own["any"].numpy(), "topk": own["topk"].numpy(),
                "next_rank": rank.numpy(),
                "next_top10": torch.where(torch.isnan(rank), rank, (rank <= TOP10).double()).numpy(),
                "next_prob": prob.numpy()}
        neg = None
        if gated:
            bindex = run.slots(layer, "bottom").index.cpu().long()[:, :n_examples]
            bnxt = next_in_doc(store, bindex)
            bvals = torch.cat(bottom_id)  # [d, 1]
            neg = (bvals, bnxt)
            unit["neg_any"] = match_table(bvals, bnxt)["any"].numpy()
            unit["neg_doc"] = _docs(store, bindex[:, 0])
            # sign-aware top-1: the trigger of largest |m| (top_docs slot 0 or bottom slot 0) against the token its
            # write promotes (the value's top-1 for m > 0, its argmin for m < 0)
            bval = run.slots(layer, "bottom").value.cpu()[:, 0]
            tval = torch.nan_to_num(docs.value.cpu()[:, 0].float(), nan=float("-inf"))
            use_neg = (bindex[:, 0] >= 0) & (-bval > tval)
            abs_pred = torch.where(use_neg, bvals[:, 0], vals[:, 0])[:, None]  # [d, 1]
            abs_next = torch.where(use_neg, bnxt[:, 0], first)[:, None]  # [d, 1]
            unit["ex1_abs"] = match_table(abs_pred, abs_next)["ex1"].numpy()
            unit["abs_neg"] = use_neg.numpy()
            unit["abs_doc"] = _docs(store, torch.where(use_neg, bindex[:, 0], index[:, 0]))
            neg = (bvals, bnxt, abs_pred, abs_next)
        u = pd.DataFrame(unit)
        units.append(u)
        row = {"layer": layer, "n_neurons": d, "n_examples": int(index.shape[1]), "k": k, "n_vocab": V,
               "n_docs_ex1": int(u.doc[u.ex1.notna()].nunique())}
        row.update(_intervals(u, [r for r in RATES if r in u and r not in OWN_CLUSTER], "doc", n_boot, seed))
        if neg is not None:
            for r, cluster in OWN_CLUSTER.items():
                row.update(_intervals(u, [r], cluster, n_boot, seed))
        row["next_rank_median"] = float(np.nanmedian(u.next_rank)) if u.next_rank.notna().any() else float("nan")
        row["next_prob_median"] = float(np.nanmedian(u.next_prob)) if u.next_prob.notna().any() else float("nan")
        # derangement null: neuron i's value against the triggers of neuron pi(i)
        perms = [derangement(d, gen) for _ in range(n_perm)]
        draws = null_rates(vals, nxt, perms)
        if neg is not None:
            draws["neg_any"] = null_rates(neg[0], neg[1], perms)["docs_any"]
            draws["ex1_abs"] = null_rates(neg[2], neg[3], perms)["ex1"]
        for draw, perm in enumerate(perms):
            nulls.append({"layer": layer, "draw": draw, **{r: float(v[0][draw]) for r, v in draws.items()},
                          **{f"n_{r}": int(v[1][draw]) for r, v in draws.items()}})
            if draw < keep_pairs:
                pairs.append(pd.DataFrame({"layer": layer, "draw": draw, "neuron": np.arange(d),
                                           "partner": perm.numpy()}))
        draws = {r: v[0] for r, v in draws.items()}
        for r, v in draws.items():
            if len(v):
                row[f"base_{r}"] = float(np.nanmean(v)) if not np.isnan(v).all() else float("nan")
                row[f"p_{r}"] = ci.perm_pvalue(row[r], v)
        row["uniform_ex1"] = 1 / V
        row["uniform_docs_any"] = float(np.nanmean(uniform_any(nxt, 1, V))) if bool((nxt >= 0).any()) else float("nan")
        row["uniform_topk"] = float(np.nanmean(uniform_any(nxt, k, V))) if bool((nxt >= 0).any()) else float("nan")
        row["uniform_next_top10"] = min(TOP10, V) / V
        row["uniform_next_prob"] = 1 / V
        if neg is not None:
            row["uniform_ex1_abs"] = 1 / V
            row["uniform_neg_any"] = float(np.nanmean(uniform_any(neg[1], 1, V))) if bool((neg[1] >= 0).any()) \
                else float("nan")
        rows.append(row)
        if progress is not None:
            progress(f"agreement layer {layer}")
    meta = {"section": "Geva et al. 2021 section 4 (Figs. 4-6)", "n_tokens": store.n_tokens, "k": k, "n_perm": n_perm,
            "seed": seed, "n_examples": n_examples, "n_vocab": V, "top10": TOP10, "n_boot": n_boot, "level": ci.LEVEL,
            "headline": "ex1: value top-1 token == next token of the key's top-1 trigger (one trigger per document)",
            "triggers": "the run's per-document store top_docs (each document once, by its max m)",
            "next_token": "the token after the trigger in its document; a trigger ending its document is excluded",
            "value_tokens": "v_i W_U in float32 over the tokenizer's defined ids (raw: no final norm, no bias)",
            "baseline": f"derangement: values paired with the triggers of another neuron of the same layer "
                        f"(mean of {n_perm} draws; p = one-sided permutation p-value); uniform: a uniformly random "
                        f"defined token (1/|V| for ex1)",
            "intervals": "95% cluster bootstrap over the global document of each neuron's top-1 trigger (neg_any: of "
                         "its first bottom example)",
            "negative": "gated FFNs only: value argmin vs next tokens of the bottom store (per-token, most negative m)"}
    return AnalysisResult("agreement", {"layers": pd.DataFrame(rows), "units": pd.concat(units, ignore_index=True),
                                        "null": pd.DataFrame(nulls),
                                        "pairs": pd.concat(pairs, ignore_index=True)}, meta)


def _docs(store, index: torch.Tensor) -> np.ndarray:
    """Global document id of each global index [d] (-1 where the index is -1)."""
    doc = store.doc_of(index.clamp(min=store.offset))
    return torch.where(index >= 0, doc, torch.full_like(doc, -1)).numpy()


def _intervals(units: pd.DataFrame, cols: list[str], cluster: str, n_boot: int, seed: int) -> dict:
    """{r, r_lo, r_hi, n_r} of each rate column over the units (cluster bootstrap over ``cluster``)."""
    out = ci.bootstrap(units, cols, cluster=cluster, n_boot=n_boot, seed=seed).iloc[0].to_dict()
    return {c: v for c, v in out.items() if c not in ("n_units", "n_clusters")}
