"""Shallow versus semantic keys (Geva et al. 2021, section 4), measured automatically.

From each neuron's top-n examples in the run (global token indices into the token store):
  same_token    share of the examples whose activating token is the neuron's most frequent one
  same_bigram   the same for (previous token, activating token); the previous token must be in the
                same document (else the pair counts as unique)
  base_*        the same shares for n token positions drawn uniformly from the store (the baseline a
                neuron with no lexical preference would get)
Truncation, for ``n_neurons`` neurons per layer (seeded random choice among neurons with examples) and their
top ``n_trunc`` examples: the example is run again with its context cut to the last L tokens (L = 1: the
activating token alone; L = 2: it and the previous token), and
  retain_L      median over examples of m_truncated / m_stored (m_stored > 0, from the run's top store)
  kept_L        share of examples keeping at least half their activation
Only examples whose profiled context was longer than L (position in its row >= L) are used. A shallow
(lexical) key keeps its activation without context; a semantic one needs the context.
"""

from __future__ import annotations

import pandas as pd
import torch

from kvmem.analysis.common import local_index, run_slots
from kvmem.analysis.result import AnalysisResult
from kvmem.capture import run_capture
from kvmem.profile.run import Run
from kvmem.profile.tokens import TokenStore

LENGTHS = (1, 2)


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
    idx = local_index(index, store).clamp(min=0)
    ids = store.ids.long()
    tok = ids[idx]
    doc_start = store.doc_offsets[torch.searchsorted(store.doc_offsets, idx, right=True) - 1]
    has_prev = valid & (idx - 1 >= doc_start)
    prev = torch.where(has_prev, ids[(idx - 1).clamp(min=0)], -1 - torch.arange(idx.numel()).view_as(idx))
    bigram = tok * (ids.max() + 2) + prev  # unique negative prev keeps pairs without a previous token apart
    return mode_share(tok, valid), mode_share(bigram, valid)


@torch.inference_mode()
def truncation(model, run: Run, layer_examples: dict, tokens_per_batch: int = 4096) -> pd.DataFrame:
    """layer_examples {layer: (neuron [e], global index [e], stored value [e])} -> one row per example and L:
    layer, neuron, index, L, m_stored, m_trunc, retain. One short forward pass per layer and L, stopped
    after that layer: the sequences [e, L] are the last L tokens up to each example."""
    seq_len = run.seq_len
    ids, offset = run.tokens.ids.long(), run.tokens.offset
    out = []
    for L in LENGTHS:
        for layer, (neuron, index, value) in layer_examples.items():
            keep = (index % seq_len) >= L  # the profiled context was longer than L
            neuron, index, value = neuron[keep], index[keep], value[keep]
            if index.numel() == 0:
                continue
            seqs = ids[index[:, None] - offset + torch.arange(-L + 1, 1)]  # [e, L]
            b = max(1, tokens_per_batch // L)
            got = []
            for start in range(0, seqs.shape[0], b):
                cap = run_capture(model, seqs[start:start + b].to(model.device), [layer])
                rows = torch.arange(cap.coef[layer].shape[0], device=model.device)
                got.append(cap.coef[layer][rows, -1, neuron[start:start + b].to(model.device)].float().cpu())
            m = torch.cat(got)
            out.append(pd.DataFrame({"layer": layer, "neuron": neuron.numpy(), "index": index.numpy(), "L": L,
                                     "m_stored": value.numpy(), "m_trunc": m.numpy(), "retain": (m / value).numpy()}))
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame(
        columns=["layer", "neuron", "index", "L", "m_stored", "m_trunc", "retain"])


def lexical(model, run: Run, *, n_examples: int | None = None, n_neurons: int = 128, n_trunc: int = 5, seed: int = 0,
            layers=None, tokens_per_batch: int = 4096) -> AnalysisResult:
    """Per-layer lexical shares (with a random-position baseline) and truncation retention."""
    store = run.tokens
    layers = run.profiled_layers if layers is None else list(layers)
    gen = torch.Generator().manual_seed(seed)
    rows, chosen = [], {}
    for layer in layers:
        values, index = run_slots(run, layer, "top")
        if n_examples is not None:
            values, index = values[:, :n_examples], index[:, :n_examples]
        tok_share, bi_share = _shares(index, store)
        rand = torch.randint(0, store.n_tokens, index.shape, generator=gen) + store.offset  # global indices
        rand = torch.where(index >= 0, rand, torch.full_like(rand, -1))
        b_tok, b_bi = _shares(rand, store)
        has = (index >= 0).any(1)
        rows.append({"layer": layer, "n_neurons": int(has.sum()), "n_examples": int(index.shape[1]),
                     "n_tokens": store.n_tokens,
                     "same_token": float(tok_share[has].mean()), "same_bigram": float(bi_share[has].mean()),
                     "base_same_token": float(b_tok[has].mean()), "base_same_bigram": float(b_bi[has].mean())})
        cand = torch.nonzero(has & (values[:, 0] > 0)).flatten()
        pick = cand[torch.randperm(cand.numel(), generator=gen)[:n_neurons]].sort().values
        v, i = values[pick, :n_trunc], index[pick, :n_trunc]
        ok = (i >= 0) & (v > 0)
        neuron = pick[:, None].expand_as(i)
        chosen[layer] = (neuron[ok], i[ok], v[ok])
    per_layer = pd.DataFrame(rows)
    ex = truncation(model, run, chosen, tokens_per_batch)
    for L in LENGTHS:
        g = ex[ex.L == L].groupby("layer")["retain"]
        per_layer[f"retain_{L}"] = per_layer.layer.map(g.median())
        per_layer[f"kept_{L}"] = per_layer.layer.map(g.apply(lambda r: float((r >= 0.5).mean())))
        per_layer[f"n_trunc_{L}"] = per_layer.layer.map(g.size()).fillna(0).astype(int)
    meta = {"n_tokens": store.n_tokens, "n_neurons_truncated": n_neurons, "n_trunc_examples": n_trunc,
            "lengths": list(LENGTHS), "kept_threshold": 0.5, "seed": seed,
            "baseline": "same_token/same_bigram of uniformly random token positions (base_*); retention 1.0 = "
                        "no context needed",
            "note": "m_stored comes from the run (its dtype and device); m_trunc from this model"}
    return AnalysisResult("lexical", {"layers": per_layer, "truncation": ex}, meta)
