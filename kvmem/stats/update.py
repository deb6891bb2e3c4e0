"""The per-batch update of the top-k stores of a LayerStats on the torch path (GPU; CPU takes
kvmem.stats.fused unless LayerStats(backend="torch")).

Once the stores are full, nothing here runs a top-k over [N, d_mlp]: one mask
``m > hi | m < lo | |m| > q[quadrant]`` with per-neuron bounds (the current k-th values of the top,
top_docs, bottom stores and the example of the token's own sign quadrant) selects the few tokens
that can enter any store; they are extracted sparsely and merged into the stores
(store.merge_entries). The random sample uses the
fact that its priority is (hash(token) + hash(neuron)) mod 2**32: the tokens that can beat a neuron's
k-th priority T form one cyclic interval of token hashes, found by searchsorted on the sorted hashes of
the batch, so the sample costs O(N log N + candidates) and never touches [N, d_mlp].

Thresholds are strict (m > k-th value) when the batch's token indices all exceed every index seen so
far ("monotone": a tie with the k-th value then loses on the token index); otherwise they are widened
by one ulp so ties reach the exact key comparison. Stores that are not full yet (the first batches)
take the batch's own best entries instead (kvmem.stats.warmup), and quadrants seen for the first time
in a neuron take a dense pass over that neuron's column.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kvmem.stats.keys import (
    EMPTY,
    LOW,
    decode_index,
    decode_value,
    encode,
    encode_high,
    key_high,
    next_down,
    next_up,
    sample_key,
    token_hash,
)
from kvmem.stats.store import column_topk, merge_entries, nonzero_flat, pick, work_buffer
from kvmem.stats.warmup import batch_doc_rows, batch_topk_rows, quadrant_best

# The sample's interval path is used while it visits at most this fraction of the batch's
# (token, neuron) pairs; beyond it (the first batches, when T = 0) a dense path is cheaper.
SAMPLE_RANGE_LIMIT = 0.125
# The first try for the sample reads the top SAMPLE_WINDOW * k / (positives in the batch) of each
# neuron's priority range (about SAMPLE_WINDOW * k positives expected; fewer than k: redone).
SAMPLE_WINDOW = 4


def is_full(keys: torch.Tensor) -> torch.Tensor:
    """0-dim bool: every row of the store [d, k] has k entries."""
    return (keys[:, -1] != EMPTY).all()


class Bounds(NamedTuple):
    """Which stores are full, and the per-neuron bounds [d] a value must pass to enter one:
    m > hi or m < lo (top, top_docs / bottom), |m| > q[:, quadrant of (gate, up)] (quadrant examples;
    q [d, 4], columns in the order of LayerStats.quadrants)."""

    full_top: bool
    full_bot: bool
    full_doc: bool
    q_any: bool
    hi: torch.Tensor
    lo: torch.Tensor
    q: torch.Tensor

    @property
    def any(self) -> bool:
        return self.full_top or self.full_bot or self.full_doc or self.q_any


def bounds(s, d: int, dev, monotone: bool) -> Bounds:
    """The entry bounds of LayerStats s (infinite for stores that are not full yet)."""
    flags = [is_full(s._top), is_full(s._bot), is_full(s._doc_key)]
    if s.gated:
        flags.append((s._q_key != EMPTY).any())
    flags = torch.stack(flags).tolist()
    full_top, full_bot, full_doc = flags[:3]
    q_any = s.gated and flags[3]

    def loosen(v: torch.Tensor, down: bool) -> torch.Tensor:
        return v if monotone else (next_down(v) if down else next_up(v))

    inf = torch.full((d,), float("inf"), device=dev)
    hi, lo, q = inf, -inf, inf[:, None].expand(d, 4)
    if full_top:
        hi = torch.minimum(hi, loosen(decode_value(s._top[:, -1]), True))
    if full_doc:
        hi = torch.minimum(hi, loosen(decode_value(s._doc_key[:, -1]), True))
    if full_bot:
        lo = torch.maximum(lo, loosen(-decode_value(s._bot[:, -1]), False))
    if q_any:
        # each token is held to the example of its own (gate, up) sign quadrant (empty quadrants:
        # +inf, their first tokens are taken by the dense pass over fresh quadrants)
        qv = decode_value(s._q_key)  # |m| of the examples, NaN where empty
        q = loosen(torch.where(torch.isnan(qv), torch.full_like(qv, float("inf")), qv), True)
    return Bounds(full_top, full_bot, full_doc, q_any, hi, lo, q.contiguous())


def candidates(m: torch.Tensor, b: Bounds, gate, up) -> torch.Tensor:
    """Flat indices [C] (row * d + column, ascending) of the entries of m [N, d] that pass a bound."""
    n, d = m.shape
    dev = m.device
    mask = work_buffer("mask_a", (n, d), torch.bool, dev)
    mask_lo = work_buffer("mask_b", (n, d), torch.bool, dev)
    torch.gt(m, b.hi, out=mask)
    torch.lt(m, b.lo, out=mask_lo)
    mask.logical_or_(mask_lo)
    if b.q_any:
        g = work_buffer("mask_c", (n, d), torch.bool, dev)
        u = work_buffer("mask_d", (n, d), torch.bool, dev)
        torch.gt(gate, 0, out=g)
        torch.gt(up, 0, out=u)
        bound = work_buffer("f32_q", (n, d), torch.float32, dev)
        side = work_buffer("f32_q2", (n, d), torch.float32, dev)
        torch.where(u, b.q[:, 0], b.q[:, 1], out=bound)  # gate > 0
        torch.where(u, b.q[:, 2], b.q[:, 3], out=side)  # gate <= 0
        torch.where(g, bound, side, out=bound)
        absm = work_buffer("f32_abs", (n, d), torch.float32, dev)
        torch.abs(m, out=absm)
        torch.gt(absm, bound, out=mask_lo)
        mask.logical_or_(mask_lo)
    return nonzero_flat(mask)


def update_values(s, m: torch.Tensor, ti: torch.Tensor, doc: torch.Tensor, b: Bounds, flat, gate, up) -> None:
    """top, bottom, top_docs (and the quadrant counts and examples of gated layers) from m [N, d]
    float32; flat: the candidates (``candidates``), None when no store is full."""
    n, d = m.shape
    paths = s._paths
    paths["values"] = "sparse" if (b.full_top and b.full_bot and b.full_doc) else "dense"
    q_cand = None
    if b.any:
        paths["candidates"] = int(flat.numel())
        rows, cols = flat // d, flat % d
        v = m.view(-1).index_select(0, flat)
        cti = ti.index_select(0, rows)
        if b.full_top or b.full_doc:
            key = encode(v, cti)
            if b.full_top:
                sel = key > s._top[:, -1].index_select(0, cols)
                s._top, _ = merge_entries(s._top, [], [], cols[sel], key[sel], [])
            if b.full_doc:
                sel = key > s._doc_key[:, -1].index_select(0, cols)
                s._doc_key, (s._doc_id,) = merge_entries(
                    s._doc_key, [s._doc_id], [-1], cols[sel], key[sel], [doc[rows[sel]]], dedupe=0
                )
        if b.full_bot:
            key = encode(-v, cti)
            sel = key > s._bot[:, -1].index_select(0, cols)
            s._bot, _ = merge_entries(s._bot, [], [], cols[sel], key[sel], [])
        if b.q_any:
            q_cand = (rows, cols, v, cti)

    if not (b.full_top and b.full_doc and b.full_bot):
        _dense_values(s, m, ti, doc, b.full_top, b.full_bot, b.full_doc)
    if s.gated:
        _update_quadrants(s, m, ti, gate, up, q_cand)


def _dense_values(s, m, ti, doc, full_top, full_bot, full_doc) -> None:
    """Warm-up: the batch's own best entries (kvmem.stats.warmup) for the stores that are not full yet."""
    if not full_top:
        rows, cols = batch_topk_rows(m, s.k)
        s._top, _ = merge_entries(s._top, [], [], cols, encode(pick(m, rows, cols), ti[rows]), [])
    if not full_bot:
        rows, cols = batch_topk_rows(m, s.k, largest=False)
        s._bot, _ = merge_entries(s._bot, [], [], cols, encode(-pick(m, rows, cols), ti[rows]), [])
    if not full_doc:
        cols, key, docs = batch_doc_rows(m, ti, doc, s.k)
        s._doc_key, (s._doc_id,) = merge_entries(s._doc_key, [s._doc_id], [-1], cols, key, [docs], dedupe=0)


def _update_quadrants(s, m, ti, gate, up, q_cand) -> None:
    """Sign-combination counts of (gate, up) and the largest-|m| example per quadrant."""
    d = m.shape[1]
    _count_quadrants(s, gate, up)
    old = s._q_key
    new = old.clone()
    # quadrants seen for the first time: dense over those neurons only (at most 4 times per neuron);
    # a quadrant's example is empty exactly until its count is non-zero
    fresh = ((old == EMPTY) & (s.quadrant_count > 0)).any(1).nonzero().squeeze(1)
    s._paths["quadrant_fresh"] = int(fresh.numel())
    if fresh.numel():
        if fresh.numel() == d:
            best = quadrant_best(m, ti, gate, up)
        else:
            best = quadrant_best(m[:, fresh], ti, gate[:, fresh], up[:, fresh])
        new[fresh] = torch.maximum(new[fresh], best)
    if q_cand is not None:
        rows, cols, v, cti = q_cand
        quad = (pick(gate, rows, cols) <= 0).to(torch.int64) * 2 + (pick(up, rows, cols) <= 0).to(torch.int64)
        slot = cols * 4 + quad
        key = encode(v.abs(), cti)
        sel = key > old.view(-1)[slot]
        new.view(-1).scatter_reduce_(0, slot[sel], key[sel], "amax")
    changed = (new != old).view(-1).nonzero().squeeze(1)
    if changed.numel():
        tok = decode_index(new.view(-1)[changed])
        row = torch.searchsorted(ti, tok)
        s._q_val.view(-1)[changed] = m[row, changed // 4]
    s._q_key = new


def _count_quadrants(s, gate, up) -> None:
    """Add this batch's (gate, up) sign-combination counts [d, 4] (torch path)."""
    n, d = gate.shape
    dev = gate.device
    g = work_buffer("f32_a", (n, d), torch.float32, dev)
    u = work_buffer("f32_b", (n, d), torch.float32, dev)
    torch.gt(gate, 0, out=g)
    torch.gt(up, 0, out=u)
    ones = torch.ones(n, device=dev)
    gs, us = ones @ g, ones @ u  # float sums of 0/1: exact integers below 2**24
    g.mul_(u)
    gus = ones @ g
    counts = torch.stack([gus, gs - gus, us - gus, n - gs - us + gus], 1).to(torch.int64)  # exact: ints < 2**24
    s.quadrant_count += counts


def _hash_ranges(s, T: torch.Tensor, active: torch.Tensor, hs: torch.Tensor):
    """Per neuron the sorted-hash positions whose priority is >= T [d] (unsigned), for active neurons:
    one cyclic interval [start, start + 2**32 - T) of token hashes, i.e. at most two position ranges.
    Returns (a1, c1, cnt): first range start and length, total count per neuron."""
    start = (T - s._neuron_c) & LOW
    end = start + (2**32 - T)
    a1 = torch.searchsorted(hs, start)
    b1 = torch.searchsorted(hs, end.clamp(max=2**32))
    b2 = torch.searchsorted(hs, (end - 2**32).clamp(min=0))
    zero = torch.zeros_like(a1)
    c1 = torch.where(active, b1 - a1, zero)
    return a1, c1, c1 + torch.where(active, b2, zero)


def _expand(a1, c1, cnt, order):
    """(rows, neurons) of all positions described by _hash_ranges (order: sorted position -> row)."""
    total = int(cnt.sum())
    dev = cnt.device
    nrn = torch.repeat_interleave(torch.arange(cnt.numel(), device=dev), cnt, output_size=total)
    j = torch.arange(total, device=dev) - (torch.cumsum(cnt, 0) - cnt)[nrn]
    c1n = c1[nrn]
    return order[torch.where(j < c1n, a1[nrn] + j, j - c1n)], nrn


def update_sample(s, m: torch.Tensor, ti: torch.Tensor, pos_count: torch.Tensor) -> None:
    """The uniform sample of activating tokens: top-k priority among m > 0 per neuron.

    pos_count [d]: number of m > 0 per neuron in this batch (neurons without any are skipped).
    Priorities that can enter lie above the store's k-th (T), and the batch's own top-k lies in the
    top WINDOW * k / pos_count of the priority range whenever that window holds >= k positives (about
    WINDOW * k expected): that narrower window is tried first, neurons where it holds fewer are
    redone with T alone. Only those (token, neuron) pairs are read."""
    n, d = m.shape
    k = s.k
    kth = s._smp_key[:, -1]
    T = torch.where(kth == EMPTY, torch.zeros_like(kth), key_high(kth) + 2**31)  # unsigned priority
    active = pos_count > 0
    window = (2**32 * SAMPLE_WINDOW * k) // pos_count.clamp(min=1) + 1
    Tw = torch.maximum(T, (2**32 - window).clamp(min=0))
    narrowed = Tw > T
    hs, order = torch.sort(token_hash(ti))
    a1, c1, cnt = _hash_ranges(s, Tw, active, hs)
    total = int(cnt.sum())
    if total == 0:
        s._paths["sample"] = "none"
        return
    if total <= SAMPLE_RANGE_LIMIT * n * d:
        s._paths["sample"] = "range"
        rows, nrn = _expand(a1, c1, cnt, order)
        keep = pick(m, rows, nrn) > 0
        found = torch.bincount(nrn[keep], minlength=d)
        redo = narrowed & (found < k)
        if bool(redo.any()):
            keep &= ~redo[nrn]
            a1, c1, cnt = _hash_ranges(s, T, redo, hs)
            rows2, nrn2 = _expand(a1, c1, cnt, order)
            rows, nrn = torch.cat([rows[keep], rows2]), torch.cat([nrn[keep], nrn2])
            keep = pick(m, rows, nrn) > 0
        rows, nrn = rows[keep], nrn[keep]
        key = sample_key(ti[rows], nrn)
        sel = key > kth[nrn]
        cols, key, rows = nrn[sel], key[sel], rows[sel]
    else:
        s._paths["sample"] = "dense"
        prio = (token_hash(ti)[:, None] + s._neuron_c[None, :]) & LOW  # [N, d]
        ok = (m > 0) & (prio >= T[None, :])
        keys = torch.where(ok, encode_high(prio - 2**31, ti[:, None]), torch.full_like(prio, EMPTY))
        del prio, ok
        cols, key, rows = column_topk(keys, k)
    v = pick(m, rows, cols)
    s._smp_key, (s._smp_val,) = merge_entries(s._smp_key, [s._smp_val], [float("nan")], cols, key, [v])
