"""Top-k stores per neuron: the k largest m (``top``), the k smallest (``bottom``), the k documents with the
largest max m (``top_docs``, each document once).

State: ``value`` [d, k] float32 (NaN = empty), ``index`` [d, k] int64 global token index (-1 = empty), and for
top_docs ``doc`` [d, k] int64 (-1 = empty). Rows are sorted best first; ties go to the lower token index
(kvmem.stats.keys: a value and its index packed into one int64 key, so a store is keys [d, k] sorted
descending). The bottom store keeps the keys of -m, so its slots hold the most negative m first. A
top_docs entry is the document's max m and the first token holding it; documents continue across batches.

Torch update (any device): while a store has empty slots the batch's own best entries are merged
(kvmem.stats.warmup); once full, only the entries beyond each neuron's k-th value can enter: one mask,
a sparse extraction, and the exact key merge (kvmem.stats.store.merge_entries). The bound is strict when
the batch's token indices all exceed every index seen (``Batch.monotone``: a tie then loses on the index),
else widened by one ulp so ties reach the exact key comparison. The CPU backend (kvmem.stats.fused)
updates the same keys in place in its single pass.

Sync-free update (``update_dense``; LayerStats(sync_free=True), the default on a GPU): fixed shapes only,
no host synchronisation. The batch's keys [N, d] (value and token index, kvmem.stats.keys), the min(k, N)
best per column by one topk along the tokens, merged into the store by one topk along the slots
(kvmem.stats.store.merge_dense). top_docs: each document's best key per column by a scatter amax into N
groups (a document is a run of equal doc ids), its top min(k, N) documents merged with the store keeping
one entry per document. Same state, bit for bit, as ``update``: both keep the k largest unique keys.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kvmem.stats.base import Batch, LayerSpec, Stat
from kvmem.stats.keys import EMPTY, decode_index, decode_value, encode, next_down
from kvmem.stats.store import merge_dense, merge_entries, nonzero_flat, pick, work_buffer
from kvmem.stats.warmup import batch_doc_rows, batch_topk_rows


class Slots(NamedTuple):
    """A per-neuron store: value [d, k] float32, index [d, k] int64 (-1 empty), doc [d, k] (top_docs only)."""

    value: torch.Tensor
    index: torch.Tensor
    doc: torch.Tensor | None = None


def is_full(keys: torch.Tensor) -> bool:
    """Every row of the store keys [d, k] has k entries."""
    return bool((keys[:, -1] != EMPTY).all())


def keys_of(value: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Store keys from (value, index) slots; EMPTY where index < 0."""
    return torch.where(index >= 0, encode(value, index), torch.full_like(index, EMPTY))


def kth_bound(keys: torch.Tensor, monotone: bool) -> torch.Tensor:
    """The value [d] an entry must exceed to enter the full store keys [d, k] (one ulp lower unless monotone)."""
    v = decode_value(keys[:, -1])
    return v if monotone else next_down(v)


class Top(Stat):
    """The k largest m per neuron (see the module docstring). Read-out: ``slots()``, ``best()``."""

    sign = 1  # the store ranks sign * m

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        self.keys = torch.full((spec.d_mlp, spec.k), EMPTY, dtype=torch.int64, device=spec.device)

    def update(self, batch: Batch) -> None:
        m, ti = batch.m, batch.index
        if batch.active is not None:  # MoE layers: pairs not routed to the expert rank last and are dropped
            m = torch.where(batch.active, m, -self.sign * float("inf"))
        full = is_full(self.keys)
        batch.paths[self.name] = "sparse" if full else "dense"
        if not full:
            rows, cols = batch_topk_rows(m, self.spec.k, largest=self.sign > 0)
            if batch.active is not None:
                keep = pick(batch.active, rows, cols)
                rows, cols = rows[keep], cols[keep]
            key = encode(self.sign * pick(m, rows, cols), ti[rows])
        else:
            bound = kth_bound(self.keys, batch.monotone)
            mask = work_buffer("mask_a", tuple(m.shape), torch.bool, m.device)
            if self.sign > 0:
                torch.gt(m, bound, out=mask)
            else:
                torch.lt(m, -bound, out=mask)
            flat = nonzero_flat(mask)
            d = m.shape[1]
            rows, cols = flat // d, flat % d
            key = encode(self.sign * m.view(-1).index_select(0, flat), ti.index_select(0, rows))
            sel = key > self.keys[:, -1].index_select(0, cols)
            cols, key = cols[sel], key[sel]
        self.keys, _ = merge_entries(self.keys, [], [], cols, key, [])

    def update_dense(self, batch: Batch) -> None:
        """update without host synchronisation (module docstring)."""
        key = batch.keys if self.sign > 0 else batch.masked(encode(-batch.m, batch.index[:, None]))  # [N, d]
        cand = torch.topk(key, min(self.spec.k, key.shape[0]), dim=0).values.T  # [d, kk]
        self.keys, _ = merge_dense(self.keys, cand)
        batch.paths[self.name] = "fixed"

    def merge(self, other: "Top") -> None:
        rows, key, _ = entries(other.keys.to(self.spec.device))
        self.keys, _ = merge_entries(self.keys, [], [], rows, key, [])

    def slots(self) -> Slots:
        return Slots(self.sign * decode_value(self.keys) + 0.0, decode_index(self.keys))

    def best(self) -> torch.Tensor:
        """The store's first value per neuron, float32 [d] (NaN before any update): max m (top), min m (bottom)."""
        return self.sign * decode_value(self.keys[:, 0]) + 0.0

    def state_dict(self) -> dict[str, torch.Tensor]:
        s = self.slots()
        return {"value": s.value, "index": s.index}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.keys = keys_of(self.sign * self._get(sd, "value"), self._get(sd, "index"))


class Bottom(Top):
    """The k smallest m per neuron (most negative first)."""

    sign = -1


def entries(keys: torch.Tensor, *payloads: torch.Tensor):
    """The filled slots of a store as flat entries: (rows [C], keys [C], [payload [C] ...])."""
    d, width = keys.shape
    real = (keys != EMPTY).reshape(-1)
    rows = torch.arange(d, device=keys.device).repeat_interleave(width)[real]
    return rows, keys.reshape(-1)[real], [p.reshape(-1)[real] for p in payloads]


class TopDocs(Stat):
    """The k documents with the largest max m per neuron, each document once (module docstring)."""

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        shape = (spec.d_mlp, spec.k)
        self.keys = torch.full(shape, EMPTY, dtype=torch.int64, device=spec.device)
        self.doc = torch.full(shape, -1, dtype=torch.int64, device=spec.device)

    def update(self, batch: Batch) -> None:
        m, ti, doc = batch.m, batch.index, batch.doc
        if batch.active is not None:  # MoE layers: pairs not routed to the expert are never a document's best
            m = torch.where(batch.active, m, float("-inf"))
        full = is_full(self.keys)
        batch.paths[self.name] = "sparse" if full else "dense"
        if not full:
            cols, key, docs = batch_doc_rows(m, ti, doc, self.spec.k)
            if batch.active is not None:  # a document none of whose tokens went to the expert
                keep = decode_value(key) > float("-inf")
                cols, key, docs = cols[keep], key[keep], docs[keep]
        else:
            mask = work_buffer("mask_a", tuple(m.shape), torch.bool, m.device)
            torch.gt(m, kth_bound(self.keys, batch.monotone), out=mask)
            flat = nonzero_flat(mask)
            d = m.shape[1]
            rows, cols = flat // d, flat % d
            key = encode(m.view(-1).index_select(0, flat), ti.index_select(0, rows))
            sel = key > self.keys[:, -1].index_select(0, cols)
            cols, key, docs = cols[sel], key[sel], doc[rows[sel]]
        self.keys, (self.doc,) = merge_entries(self.keys, [self.doc], [-1], cols, key, [docs], dedupe=0)

    def update_dense(self, batch: Batch) -> None:
        """update without host synchronisation (module docstring)."""
        key, doc = batch.keys, batch.doc
        n, d = key.shape
        seg = torch.zeros(n, dtype=torch.int64, device=key.device)  # document run of each token, in [0, n)
        torch.cumsum(doc[1:] != doc[:-1], 0, out=seg[1:])
        best = torch.full((n, d), EMPTY, dtype=torch.int64, device=key.device)
        best.scatter_reduce_(0, seg[:, None].expand(n, d), key, "amax")  # each document's best key
        seg_doc = torch.full((n,), -1, dtype=torch.int64, device=key.device).scatter_(0, seg, doc)
        top = torch.topk(best, min(self.spec.k, n), dim=0)
        cdoc = torch.where(top.values == EMPTY, -1, seg_doc[top.indices])
        self.keys, (self.doc,) = merge_dense(self.keys, top.values.T, [(self.doc, cdoc.T)], dedupe=0)
        batch.paths[self.name] = "fixed"

    def merge(self, other: "TopDocs") -> None:
        dev = self.spec.device
        rows, key, pay = entries(other.keys.to(dev), other.doc.to(dev))
        self.keys, (self.doc,) = merge_entries(self.keys, [self.doc], [-1], rows, key, pay, dedupe=0)

    def slots(self) -> Slots:
        return Slots(decode_value(self.keys), decode_index(self.keys), self.doc.clone())

    def state_dict(self) -> dict[str, torch.Tensor]:
        s = self.slots()
        return {"value": s.value, "index": s.index, "doc": s.doc}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.keys = keys_of(self._get(sd, "value"), self._get(sd, "index"))
        self.doc = self._get(sd, "doc")
