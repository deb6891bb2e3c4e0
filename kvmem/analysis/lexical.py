"""Shallow versus semantic keys (Geva et al. 2021, section 3), measured automatically.

From each neuron's top-n examples in the run (the per-token ``top`` store; global token indices):
  same_token    share of the examples whose activating token is the neuron's most frequent one
  same_bigram   the same for (previous token, activating token); the previous token must be in the same
                document (else the pair counts as unique)
  base_*        the same shares for n token positions drawn uniformly from the store (seeded): what a neuron with
                no lexical preference gets; excess_token / excess_bigram = share - base, per neuron
Truncation, for ``n_neurons`` neurons per layer (seeded random choice among neurons with a positive top example)
and their top ``n_trunc`` examples: the example is run again with its context cut to its last L tokens, keeping the
row's BOS where the run's row layout prepends one (kvmem.analysis.prefixes.layout_of), so "the token alone" is
[BOS, token] and never confounds position 0 with no context:
  retain_L      median over examples of m_truncated / m_stored (m_stored > 0, from the run's top store)
  kept_L        share of examples keeping at least ``KEPT`` (half) of their activation
Only examples whose profiled context held more than L real tokens are used. A shallow (lexical) key keeps its
activation without context; a semantic one needs the context.
Tables: ``layers`` (one row per layer: each rate r with r_lo, r_hi, n_r: 95% cluster bootstrap over documents,
kvmem.analysis.ci), ``units`` (kind "neuron": one row per neuron with its shares, doc = its top example's
document; kind "example": one row per truncated example with kept_1/kept_2/retain_1/retain_2, doc = its document;
NaN = not counted), ``truncation`` (one row per example and L). n_docs / n_docs_kept: the documents (bootstrap
clusters) of the neuron units / of the truncated examples.
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
from kvmem.profile.tokens import TokenStore

if TYPE_CHECKING:
    from kvmem.models.kvmodel import KVModel

LENGTHS = (1, 2)
KEPT = 0.5  # an example "keeps" its activation when m_truncated / m_stored >= KEPT
TRUNC_COLUMNS = ["layer", "neuron", "index", "doc", "L", "m_stored", "m_trunc", "retain"]


def mode_share(tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """tokens [d, n] (equal ids = same key), valid [d, n] -> [d] count of the most frequent valid
    token / number of valid entries (NaN where none)."""
    eq = (tokens[:, :, None] == tokens[:, None, :]) & valid[:, None, :] & valid[:, :, None]  # [d, n, n]
    best = eq.sum(2).max(1).values.double()
    n = valid.sum(1).double()
    return torch.where(n > 0, best / n.clamp(min=1), torch.full_like(n, float("nan")))


def _shares(index: torch.Tensor, store: TokenStore) -> tuple[torch.Tensor, torch.Tensor]:
    """same_token and same_bigram shares [d] for global indices [d, n] (-1 empty)."""
    valid = index >= 0
    idx = torch.where(valid, index, torch.full_like(index, store.offset))  # global
    ids = store.ids.long()
    tok = ids[idx - store.offset]
    has_prev = valid & (idx - 1 >= store.doc_start(idx))
    unique = -1 - torch.arange(idx.numel()).view_as(idx)
    prev = torch.where(has_prev, ids[(idx - 1 - store.offset).clamp(min=0)], unique)
    bigram = tok * (ids.max() + 2) + prev  # unique negative prev keeps pairs without a previous token apart
    return mode_share(tok, valid), mode_share(bigram, valid)


def _docs(store: TokenStore, index: torch.Tensor) -> np.ndarray:
    doc = store.doc_of(index.clamp(min=store.offset))
    return torch.where(index >= 0, doc, torch.full_like(doc, -1)).numpy()


@torch.inference_mode()
def truncation(model: KVModel, run: Run, layer_examples: dict, tokens_per_batch: int = 4096,
               progress=None) -> pd.DataFrame:
    """layer_examples {layer: (neuron [e], global index [e], stored value [e])} -> one row per example and L
    (TRUNC_COLUMNS). The truncated input is the row's BOS (if any) + the last L real tokens of the example's
    prefix; examples whose prefix holds L real tokens or fewer are skipped."""
    layout, store = layout_of(run), run.tokens
    nb = n_bos(layout)
    out = []
    for layer, (neuron, index, value) in layer_examples.items():
        prefixes = [layout.prefix(store, int(i)) for i in index.tolist()]
        for L in LENGTHS:
            keep = [r for r, p in enumerate(prefixes) if len(p) - nb > L]
            if not keep:
                continue
            seqs = [prefixes[r][:nb] + prefixes[r][-L:] for r in keep]
            keep_t = torch.tensor(keep, dtype=torch.long)
            m = last_coef(model, layer, seqs, neuron[keep_t], tokens_per_batch)
            v = value[keep_t].float()
            out.append(pd.DataFrame({"layer": layer, "neuron": neuron[keep_t].numpy(), "index": index[keep_t].numpy(),
                                     "doc": _docs(store, index[keep_t]), "L": L, "m_stored": v.numpy(),
                                     "m_trunc": m.numpy(), "retain": (m / v).numpy()}))
        if progress is not None:
            progress(f"lexical layer {layer}")
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=TRUNC_COLUMNS)


def lexical(model: KVModel, run: Run, *, n_examples: int | None = None, n_neurons: int = 128, n_trunc: int = 5,
            seed: int = 0,
            layers=None, tokens_per_batch: int = 4096, n_boot: int = ci.N_BOOT, progress=None) -> AnalysisResult:
    """Per-layer lexical shares (with a random-position baseline) and truncation retention (module docstring);
    ``progress(label)`` is called after each layer's truncation runs."""
    for name, v in (("n_neurons", n_neurons), ("n_trunc", n_trunc)):
        if v < 0:
            raise KvmemError(f"{name} must be at least 0, got {v}")
    if n_examples is not None and n_examples < 1:
        raise KvmemError(f"n_examples must be at least 1, got {n_examples}")
    store = run.tokens
    layers = run.profiled_layers if layers is None else list(layers)
    gen = torch.Generator().manual_seed(seed)
    units, chosen = [], {}
    for layer in layers:
        s = run.slots(layer, "top")
        values, index = s.value.cpu()[:, :n_examples], s.index.cpu().long()[:, :n_examples]
        tok_share, bi_share = _shares(index, store)
        rand = torch.randint(0, store.n_tokens, index.shape, generator=gen) + store.offset  # global indices
        rand = torch.where(index >= 0, rand, torch.full_like(rand, -1))
        b_tok, b_bi = _shares(rand, store)
        units.append(pd.DataFrame({"layer": layer, "kind": "neuron", "neuron": np.arange(index.shape[0]),
                                   "index": index[:, 0].numpy(), "doc": _docs(store, index[:, 0]),
                                   "same_token": tok_share.numpy(), "base_same_token": b_tok.numpy(),
                                   "excess_token": (tok_share - b_tok).numpy(), "same_bigram": bi_share.numpy(),
                                   "base_same_bigram": b_bi.numpy(), "excess_bigram": (bi_share - b_bi).numpy()}))
        has = (index >= 0).any(1)
        cand = torch.nonzero(has & (values[:, 0] > 0)).flatten()
        pick = cand[torch.randperm(cand.numel(), generator=gen)[:n_neurons]].sort().values
        v, i = values[pick, :n_trunc], index[pick, :n_trunc]
        ok = (i >= 0) & (v > 0)
        chosen[layer] = (pick[:, None].expand_as(i)[ok], i[ok], v[ok])
    ex = truncation(model, run, chosen, tokens_per_batch, progress)
    per_ex = _example_units(ex)
    units = pd.concat(units + ([per_ex] if len(per_ex) else []), ignore_index=True)
    rows = []
    rates = ["same_token", "base_same_token", "excess_token", "same_bigram", "base_same_bigram", "excess_bigram"] \
        + [f"kept_{L}" for L in LENGTHS]
    for layer in layers:
        u = units[units.layer == layer]
        row = {"layer": layer, "n_neurons": int((u.kind == "neuron").sum()),
               "n_examples": int(run.slots(layer, "top").index.shape[1] if n_examples is None else n_examples),
               "n_tokens": store.n_tokens, "n_docs": int(u.doc[u.kind == "neuron"].nunique()),
               "n_docs_kept": int(u.doc[u.kind == "example"].nunique())}
        cols = [c for c in rates if c in u and u[c].notna().any()]
        b = ci.bootstrap(u, cols, cluster="doc", n_boot=n_boot, seed=seed).iloc[0].to_dict()
        row.update({c: v for c, v in b.items() if c not in ("n_units", "n_clusters")})
        for L in LENGTHS:
            r = ex.retain[(ex.layer == layer) & (ex.L == L)] if len(ex) else pd.Series(dtype=float)
            row[f"retain_{L}"] = float(r.median()) if len(r) else float("nan")
            row[f"n_trunc_{L}"] = int(len(r))
            for c in (f"kept_{L}", f"kept_{L}_lo", f"kept_{L}_hi"):
                row.setdefault(c, float("nan"))
            row.setdefault(f"n_kept_{L}", 0)
        rows.append(row)
    layout = layout_of(run)
    meta = {"section": "Geva et al. 2021 section 3", "n_tokens": store.n_tokens, "n_neurons_truncated": n_neurons,
            "n_trunc_examples": n_trunc, "lengths": list(LENGTHS), "kept_threshold": KEPT, "seed": seed,
            "n_boot": n_boot, "level": ci.LEVEL,
            "examples": "the run's per-token top store (largest m)",
            "truncation": ("BOS + the last L tokens of the example's row prefix" if layout.bos_id is not None else
                           "the last L tokens of the example's row prefix (the run's rows have no BOS: L = 1 puts the "
                           "token at position 0)"),
            "baseline": "same_token/same_bigram of uniformly random token positions of the store (base_*); "
                        "excess = share - base per neuron; retention 1.0 = no context needed",
            "intervals": "95% cluster bootstrap over documents (a neuron: its top example's document; a truncated "
                         "example: its own)",
            "note": "m_stored comes from the run (its dtype and device); m_trunc from this model"}
    return AnalysisResult("lexical", {"layers": pd.DataFrame(rows), "units": units, "truncation": ex}, meta)


def _example_units(ex: pd.DataFrame) -> pd.DataFrame:
    """One row per truncated example (layer, neuron, index): kept_L (0/1) and retain_L per L, NaN where not run."""
    if not len(ex):
        return pd.DataFrame()
    ex = ex.assign(kept=(ex.retain >= KEPT).astype(float))
    wide = ex.pivot_table(index=["layer", "neuron", "index", "doc"], columns="L", values=["kept", "retain"],
                          aggfunc="first")
    wide.columns = [f"{a}_{L}" for a, L in wide.columns]
    return wide.reset_index().assign(kind="example")
