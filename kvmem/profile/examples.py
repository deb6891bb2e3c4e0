"""A neuron's stored examples, shown with their context from the token store.

Kinds: ``top`` (highest m per token), ``bottom`` (most negative m), ``top_docs`` (one per document,
its max), ``sample`` (a uniform sample of activating tokens, for quantile bands).
"""

from __future__ import annotations

import pandas as pd
import torch

from kvmem.profile.run import STORES, Run, slots

KINDS = STORES


def examples(run: Run, layer: int, neuron: int, kind: str = "top", *, before: int = 12, after: int = 4
             ) -> pd.DataFrame:
    """One row per stored example, best first: value, index, doc, token, context tokens, marked text."""
    store_slots = slots(run.layer_stats(layer), kind)
    v, idx = store_slots.value[neuron], store_slots.index[neuron]
    keep = idx >= 0
    v, idx = v[keep].tolist(), idx[keep].tolist()
    store, vocab = run.tokens, run.vocab
    rows = []
    for rank, (value, i) in enumerate(zip(v, idx)):  # at most top_k rows: not a hot path
        ids, at = store.context(i, before, after)
        tokens = [vocab[t] for t in ids]
        at_index = torch.tensor([i])
        doc, start = int(store.doc_of(at_index)[0]), int(store.doc_start(at_index)[0])
        rows.append({
            "rank": rank, "value": value, "index": i, "doc": doc, "position": i - start,
            "token": tokens[at], "context": tokens, "at": at,
            "text": "".join(tokens[:at]) + "⟦" + tokens[at] + "⟧" + "".join(tokens[at + 1:]),
        })
    return pd.DataFrame(rows, columns=["rank", "value", "index", "doc", "position", "token", "context", "at", "text"])
