"""Key-value agreement (Geva et al. 2021, section 5): does a neuron's value predict what follows its keys?

Per neuron i of a layer: the next tokens after its top-n activating examples (the token following each
example's global index in the token store, if it lies in the same document), and its value's top-k tokens
(argsort of v_i·W_U, raw, no final norm). Per layer, over neurons with at least one valid example:
  agree_ex1    share of neurons whose value top-1 token is the next token of their single top example
  agree_top1   share whose value top-1 token is the next token of any of their top-n examples
  agree_topk   share where any of the value's top-k tokens is the next token of any top-n example
Baseline (same columns, ``base_*``): neuron i's value is compared with the examples of neuron π(i), π a
random derangement of the layer's neurons (no neuron keeps its own examples), averaged over ``n_perm``
derangements. The pairs used are returned in the ``pairs`` table.
With ``value_bottom_ids`` (gated FFNs, where m < 0 writes -v_i): ``neg_top1`` / ``base_neg_top1`` compare the
value's most suppressed token (argmin of v_i·W_U) with the next tokens of the neuron's bottom examples (most
negative m), with the same derangements.
"""

from __future__ import annotations

import pandas as pd
import torch

from kvmem.analysis.common import derangement, local_index, run_slots
from kvmem.analysis.result import AnalysisResult
from kvmem.errors import KvmemError
from kvmem.profile.run import Run


def next_tokens(index: torch.Tensor, ids: torch.Tensor, doc_offsets: torch.Tensor) -> torch.Tensor:
    """Token id following each index [...] into ``ids`` in the same document (``doc_offsets`` into the same
    ``ids``); -1 where there is none or index < 0."""
    valid = index >= 0
    idx = index.clamp(min=0)
    doc = torch.searchsorted(doc_offsets, idx, right=True) - 1
    nxt = idx + 1
    ok = valid & (nxt < doc_offsets[(doc + 1).clamp(max=doc_offsets.numel() - 1)])
    out = ids.long()[nxt.clamp(max=ids.numel() - 1)]
    return torch.where(ok, out, torch.full_like(out, -1))


def agreement_table(value_ids: torch.Tensor, nxt: torch.Tensor) -> dict[str, torch.Tensor]:
    """value_ids [d, k] (value top-k, best first), nxt [d, n] (-1 invalid) -> per-neuron booleans [d]:
    ex1, top1, topk, and has (at least one valid next token)."""
    valid = nxt >= 0
    match = (value_ids[:, :, None] == nxt[:, None, :]) & valid[:, None, :]  # [d, k, n]
    return {"ex1": match[:, 0, 0], "top1": match[:, 0, :].any(1), "topk": match.any(2).any(1), "has": valid.any(1)}


def agreement(run: Run, value_top_ids: torch.Tensor, *, n_examples: int | None = None, k: int = 10, n_perm: int = 5,
              seed: int = 0, layers=None, value_bottom_ids: torch.Tensor | None = None) -> AnalysisResult:
    """Per-layer agreement and its derangement baseline. ``value_top_ids`` [n_layers, d_mlp, >= k] are the
    value vectors' top token ids (e.g. kvmem.vocab.project_values(model)['top_ids'])."""
    store = run.tokens
    layers = run.profiled_layers if layers is None else list(layers)
    if value_top_ids.shape[-1] < k:
        raise KvmemError(f"agreement needs the value vectors' top {k} tokens, got {value_top_ids.shape[-1]}")
    gen = torch.Generator().manual_seed(seed)
    rows, pairs = [], []
    for layer in layers:
        _, index = run_slots(run, layer, "top")
        if n_examples is not None:
            index = index[:, :n_examples]
        nxt = next_tokens(local_index(index, store), store.ids, store.doc_offsets)  # [d, n]
        vals = value_top_ids[layer, :, :k].long().cpu()
        own = agreement_table(vals, nxt)
        neg = None
        if value_bottom_ids is not None:
            _, bindex = run_slots(run, layer, "bottom")
            bindex = bindex[:, :n_examples] if n_examples else bindex
            bnxt = next_tokens(local_index(bindex, store), store.ids, store.doc_offsets)
            bvals = value_bottom_ids[layer, :, :1].long().cpu()
            neg = (bvals, bnxt, agreement_table(bvals, bnxt))
        has = own["has"]
        n_has = int(has.sum())
        row = {"layer": layer, "n_neurons": n_has, "n_examples": int(index.shape[1]), "k": k,
               "n_tokens": run.tokens.n_tokens}
        for name in ("ex1", "top1", "topk"):
            row[f"agree_{name}"] = float(own[name][has].float().mean()) if n_has else float("nan")
        if neg is not None:
            row["agree_neg_top1"] = float(neg[2]["top1"][neg[2]["has"]].float().mean()) if bool(neg[2]["has"].any()) \
                else float("nan")
        base = {name: [] for name in ("ex1", "top1", "topk", "neg_top1")}
        for draw in range(n_perm):
            perm = derangement(vals.shape[0], gen)
            other = agreement_table(vals, nxt[perm])
            ok = other["has"]
            for name in ("ex1", "top1", "topk"):
                base[name].append(float(other[name][ok].float().mean()) if bool(ok.any()) else float("nan"))
            if neg is not None:
                o = agreement_table(neg[0], neg[1][perm])
                base["neg_top1"].append(float(o["top1"][o["has"]].float().mean()) if bool(o["has"].any())
                                        else float("nan"))
            pairs.append(pd.DataFrame({"layer": layer, "draw": draw, "neuron": range(vals.shape[0]),
                                       "partner": perm.numpy()}))
        for name, v in base.items():
            if v:
                row[f"base_{name}"] = float(torch.tensor(v).mean())
        row["lift_top1"] = row["agree_top1"] / row["base_top1"] if row["base_top1"] > 0 else float("nan")
        rows.append(row)
    meta = {"n_tokens": run.tokens.n_tokens, "k": k, "n_perm": n_perm, "seed": seed,
            "examples": "the run's top store (largest m)", "value_tokens": "top-k of v_i W_U (raw, no final norm)",
            "baseline": f"values paired with the examples of another neuron of the same layer (random derangement, "
                        f"mean of {n_perm} draws)"}
    return AnalysisResult("agreement", {"layers": pd.DataFrame(rows), "pairs": pd.concat(pairs, ignore_index=True)},
                          meta)
