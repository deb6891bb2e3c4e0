"""The mutation test of Geva et al. 2021 (section 3, Fig. 3): how much of a key's activation on its top trigger
examples survives removing the first, the last, or a random token of the trigger's prefix?

An example is a stored top trigger (global token index); its *prefix* is what the model saw in that token's input
row up to and including the token (kvmem.analysis.prefixes.layout_of(run).prefix: the row's BOS first where the
layout prepends one; a row never spans two documents in document-aligned layouts). With the prefix's real tokens
t_1..t_n (n >= 3, the BOS kept in front of every variant):
  first    t_2..t_n              (the earliest context token removed)
  last     t_1..t_{n-1}          (the trigger token itself removed; m is read at t_{n-1}, the new last token)
  random   t_1..t_n without t_j, j uniform in 2..n-1 (seeded; ``removed`` = j - 1, 0-based among the real tokens)
Each variant runs alone (right-padded batches with an attention mask, stopped after the layer); m_orig is the
unmutated prefix run the same way (compare with m_stored, the run's value). kept_kind = m_kind / m_orig, counted
where m_orig > 0 (top triggers are the largest m: positive for every neuron that fires). A key driven by the
trigger token keeps little when ``last`` is removed; one driven by earlier context loses more from ``first``.

Tables: ``layers`` (per layer and kind: kept_kind (mean), kept_kind_lo/_hi (95% cluster bootstrap over the
examples' documents, kvmem.analysis.ci), n_kept_kind, kept_kind_median; n_neurons sampled; n_docs: the bootstrap
clusters), ``units`` (one row per
example: layer, neuron, index, doc, n_prefix, removed, m_stored, m_orig, m_first, m_last, m_random, kept_first,
kept_last, kept_random).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from kvmem.analysis import ci
from kvmem.analysis.prefixes import last_coef, layout_of, n_bos
from kvmem.analysis.result import AnalysisResult
from kvmem.errors import KvmemError
from kvmem.profile.run import Run

if TYPE_CHECKING:
    from kvmem.models.kvmodel import KVModel

KINDS = ("first", "last", "random")
MIN_PREFIX = 3  # real tokens a prefix needs so that first, last and an interior token are three different tokens
STORES = ("top", "top_docs")


def mutants(real: list[int], j: int) -> dict[str, list[int]]:
    """The three mutated token lists of ``real`` (the prefix's tokens without BOS); ``j`` is the 0-based
    interior token to drop for ``random`` (1 <= j <= len(real) - 2)."""
    return {"first": real[1:], "last": real[:-1], "random": real[:j] + real[j + 1:]}


def mutation(model: KVModel, run: Run, *, n_neurons: int = 32, n_examples: int = 5, store: str = "top", seed: int = 0,
             layers=None, tokens_per_batch: int = 4096, n_boot: int = ci.N_BOOT, progress=None) -> AnalysisResult:
    """Share of activation kept after each removal, by layer (module docstring). ``n_neurons`` sampled per layer
    (seeded, among neurons whose top example has m > 0), their top ``n_examples`` triggers from ``store`` (top:
    per token, as the paper's trigger examples; top_docs: one per document). ``progress(label)`` is called after each
    layer."""
    if n_neurons < 1 or n_examples < 1:
        raise KvmemError(f"n_neurons and n_examples must be at least 1, got {n_neurons} and {n_examples}")
    if store not in STORES:
        raise KvmemError(f"store must be one of {', '.join(STORES)}, got {store!r}")
    tokens = run.tokens
    layout = layout_of(run)
    nb = n_bos(layout)
    layers = run.profiled_layers if layers is None else list(layers)
    gen = torch.Generator().manual_seed(seed)
    units = []
    for layer in layers:
        s = run.slots(layer, store)
        values, index = s.value.cpu()[:, :n_examples], s.index.cpu().long()[:, :n_examples]
        cand = torch.nonzero((index[:, 0] >= 0) & (values[:, 0] > 0)).flatten()
        pick = cand[torch.randperm(cand.numel(), generator=gen)[:n_neurons]].sort().values
        rows = []  # (neuron, index, m_stored, prefix, j)
        for neuron in pick.tolist():
            for i, v in zip(index[neuron].tolist(), values[neuron].tolist()):
                if i < 0 or not v > 0:
                    continue
                prefix = layout.prefix(tokens, i)
                n = len(prefix) - nb
                if n < MIN_PREFIX:
                    continue
                j = int(torch.randint(1, n - 1, (1,), generator=gen))
                rows.append((neuron, i, v, prefix, j))
        if not rows:
            if progress is not None:
                progress(f"mutation layer {layer}")
            continue
        seqs, neurons = [], []
        for neuron, _, _, prefix, j in rows:
            bos, real = prefix[:nb], prefix[nb:]
            seqs.append(prefix)
            seqs += [bos + m for m in mutants(real, j).values()]
            neurons += [neuron] * (1 + len(KINDS))
        m = last_coef(model, layer, seqs, torch.tensor(neurons), tokens_per_batch).view(len(rows), 1 + len(KINDS))
        idx = torch.tensor([r[1] for r in rows])
        doc = tokens.doc_of(idx).numpy()
        u = {"layer": layer, "neuron": [r[0] for r in rows], "index": idx.numpy(), "doc": doc,
             "n_prefix": [len(r[3]) - nb for r in rows], "removed": [r[4] for r in rows],
             "m_stored": [r[2] for r in rows], "m_orig": m[:, 0].numpy()}
        orig = m[:, 0].double()
        for c, kind in enumerate(KINDS, start=1):
            u[f"m_{kind}"] = m[:, c].numpy()
            u[f"kept_{kind}"] = torch.where(orig > 0, m[:, c].double() / orig, torch.tensor(float("nan"))).numpy()
        units.append(pd.DataFrame(u))
        if progress is not None:
            progress(f"mutation layer {layer}")
    cols = [f"kept_{k}" for k in KINDS]
    units = pd.concat(units, ignore_index=True) if units else pd.DataFrame(
        columns=["layer", "neuron", "index", "doc", "n_prefix", "removed", "m_stored", "m_orig"]
        + [f"m_{k}" for k in KINDS] + cols)
    out = []
    for layer in layers:
        u = units[units.layer == layer]
        row = {"layer": layer, "n_neurons": int(u.neuron.nunique()), "n_examples": int(len(u)),
               "n_docs": int(u.doc.nunique())}
        if len(u):
            b = ci.bootstrap(u, cols, cluster="doc", n_boot=n_boot, seed=seed).iloc[0].to_dict()
            row.update({c: v for c, v in b.items() if c not in ("n_units", "n_clusters")})
        for c in cols:
            row.setdefault(c, float("nan"))
            row.setdefault(f"{c}_lo", float("nan"))
            row.setdefault(f"{c}_hi", float("nan"))
            row.setdefault(f"n_{c}", 0)
            row[f"{c}_median"] = float(np.nanmedian(u[c])) if len(u) and u[c].notna().any() else float("nan")
        out.append(row)
    meta = {"section": "Geva et al. 2021 section 3, Fig. 3 (mutation test)", "n_neurons": n_neurons,
            "n_examples": n_examples, "store": store, "seed": seed, "min_prefix": MIN_PREFIX, "n_boot": n_boot,
            "level": ci.LEVEL, "n_tokens": tokens.n_tokens,
            "prefix": "the example's model row up to and including it" + (" (BOS kept in front of every variant)"
                                                                          if nb else " (the run's rows have no BOS)"),
            "kinds": {"first": "first real token removed", "last": "the trigger token removed (m read at the token "
                      "before it)", "random": "a uniformly random interior token removed (never the first or last)"},
            "kept": "m_mutated / m_orig (m_orig recomputed on the unmutated prefix; counted where m_orig > 0)",
            "intervals": "95% cluster bootstrap over the examples' global documents"}
    return AnalysisResult("mutation", {"layers": pd.DataFrame(out), "units": units}, meta)
