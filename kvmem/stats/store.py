"""Per-neuron top-k stores of int64 keys: merges, dense column top-k, work buffers.

A store is keys [d, k] int64 sorted descending per row (EMPTY = int64 min pads the tail) plus payload
tensors [d, k] riding along (e.g. the doc id). Candidates are flat entries: neuron [C], key [C],
payloads [C]. ``merge_entries`` is the one merge used by update and by merging shards: optionally it
first keeps one entry per (neuron, doc) (the largest key, across candidates and store), then keeps
the k largest keys per neuron (padded block + topk, or a segmented sort). Keys are unique per neuron
(they contain the token index), so the result does not depend on the order of the candidates.

The sync-free path (LayerStats(sync_free=True), the default on a GPU) takes fixed shapes only:
``merge_dense`` merges a candidate block [d, c] into a store [d, k] by one topk along the rows, and
``bincount_fixed`` counts by index_add_ (torch.bincount reads the maximum back to the host on CUDA).
"""

from __future__ import annotations

import threading

import torch

from kvmem.stats.keys import EMPTY
from kvmem.stats.parallel import run_parallel

_local = threading.local()
# merge_entries pads the candidates per row unless t * (k + cmax) > PAD_FACTOR * (t * k + C) + PAD_SLACK
PAD_FACTOR, PAD_SLACK = 4, 4096


def work_buffer(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable uninitialised buffer. On CPU fresh large tensors cost page faults on every batch,
    so buffers are kept per thread (shared by all LayerStats of that thread) and grown on demand;
    on other devices the caching allocator already recycles memory and a fresh tensor is returned."""
    if torch.device(device).type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    cache = getattr(_local, "buffers", None)
    if cache is None:
        cache = _local.buffers = {}
    numel = 1
    for s in shape:
        numel *= s
    buf = cache.get((name, dtype))
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor: usable inside and outside inference mode
            buf = torch.empty(max(numel, 1), dtype=dtype)
        cache[(name, dtype)] = buf
    return buf[:numel].view(shape)


def release_buffers() -> None:
    """Drop this thread's CPU work buffers (a few [N, d_mlp] tensors shared by all LayerStats), e.g.
    when profiling is done."""
    _local.buffers = {}


def bincount(x: torch.Tensor, minlength: int) -> torch.Tensor:
    """torch.bincount of a flat int tensor; on CPU split over torch's intra-op threads (torch.bincount
    runs on one core there), summing the partial counts. Same counts on every path."""
    threads = torch.get_num_threads()
    parts = min(threads, x.numel() // (1 << 20))
    if x.device.type != "cpu" or parts < 2:
        return torch.bincount(x, minlength=minlength)
    chunks = torch.tensor_split(x, parts)
    counts = run_parallel([lambda c=c: torch.bincount(c, minlength=minlength) for c in chunks])
    out = counts[0]
    for c in counts[1:]:
        out += c
    return out


def bincount_fixed(x: torch.Tensor, minlength: int) -> torch.Tensor:
    """Counts [minlength] int64 of the values of a flat int tensor x, all in [0, minlength) (not checked):
    an index_add_ into a fixed-size tensor, so no host synchronisation (unlike torch.bincount on CUDA)."""
    x = x.reshape(-1)
    out = torch.zeros(minlength, dtype=torch.int64, device=x.device)
    return out.index_add_(0, x, torch.ones(x.shape, dtype=torch.int64, device=x.device))


def merge_dense(keys: torch.Tensor, cand: torch.Tensor, payloads=(), dedupe: int | None = None):
    """The k largest keys per row of the store keys [d, k] and the candidate keys cand [d, c] (EMPTY pads
    both), with payloads riding along: a list of (store [d, k], candidates [d, c]) pairs. Fixed shapes, no
    host synchronisation. dedupe: index into payloads of a group id (the doc id, -1 = none): of the entries
    of a row with the same group only the largest key is kept (the others become EMPTY first); the
    candidates and the store must each hold a group at most once per row. Returns (keys [d, k], [payload
    [d, k] ...]); a payload is read from the slot its key came from (an EMPTY slot may take any EMPTY's)."""
    k = keys.shape[1]
    allk = torch.cat([keys, cand.to(keys.dtype)], 1)
    pays = [torch.cat([p, c.to(p.dtype)], 1) for p, c in payloads]
    if dedupe is not None:
        g = pays[dedupe]
        same = (g[:, :, None] == g[:, None, :]) & (g[:, :, None] >= 0)  # [d, W, W]
        beaten = (same & (allk[:, None, :] > allk[:, :, None])).any(2)
        allk = torch.where(beaten, torch.full_like(allk, EMPTY), allk)
    top = torch.topk(allk, k, dim=1)
    return top.values, [torch.gather(p, 1, top.indices) for p in pays]


def nonzero_flat(mask: torch.Tensor) -> torch.Tensor:
    """Indices [C] int64 of the True entries of a contiguous bool tensor, in order, for sparse masks:
    a nonzero over 8-byte words first, then over the bytes of the few non-zero words."""
    flat = mask.reshape(-1)
    if flat.numel() % 8 or flat.storage_offset() % 8:
        return flat.nonzero().squeeze(1)
    words = flat.view(torch.int64)
    wi = (words != 0).nonzero().squeeze(1)
    j = flat.view(-1, 8)[wi].nonzero()
    return wi[j[:, 0]] * 8 + j[:, 1]


def pick(t: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """t[rows, cols] for t [N, d]; a flat index_select when t is contiguous (several times faster on
    CPU than advanced indexing)."""
    if t.is_contiguous():
        return t.view(-1).index_select(0, rows * t.shape[1] + cols)
    return t[rows, cols]


def sort_desc_by_row(row: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Permutation ordering entries by (row ascending, key descending). row, key [E] int64."""
    order = torch.sort(key, descending=True, stable=True).indices
    return order[torch.sort(row[order], stable=True).indices]


def merge_entries(
    keys: torch.Tensor,
    payloads: list[torch.Tensor],
    fills: list[float | int],
    cand_row: torch.Tensor,
    cand_key: torch.Tensor,
    cand_payloads: list[torch.Tensor],
    dedupe: int | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Merge candidates into a store; returns new (keys [d, k], payloads [d, k]).

    keys [d, k] int64, payloads [d, k] each (fills: their value in empty slots), cand_row [C] int64
    neuron of each candidate, cand_key [C], cand_payloads [C] each. dedupe: index into payloads of a
    group id (the doc id): only the largest key per (neuron, group) survives. Rows without candidates
    are left as they are. Candidates are grouped per row into a padded [t, cmax] block that is
    concatenated to the t touched store rows and cut by one topk along the rows; a segmented sort over
    all entries is the fallback when the padding would be wasteful (one row with many candidates)."""
    d, k = keys.shape
    if cand_row.numel() == 0:
        return keys, payloads
    cand_payloads = [cp.to(p.dtype) for p, cp in zip(payloads, cand_payloads)]
    if dedupe is not None:
        keys, payloads, cand_row, cand_key, cand_payloads = _dedupe(
            keys, payloads, fills, cand_row, cand_key, cand_payloads, dedupe
        )
        if cand_row.numel() == 0:
            return keys, payloads
    order = torch.sort(cand_row, stable=True).indices
    row = cand_row[order]
    touched, counts = torch.unique_consecutive(row, return_counts=True)
    t, c = touched.numel(), row.numel()
    cmax = int(counts.max())
    if t * (k + cmax) > PAD_FACTOR * (t * k + c) + PAD_SLACK:
        return _merge_sorted(keys, payloads, fills, touched, row, cand_key[order], [p[order] for p in cand_payloads])
    dev = keys.device
    local = torch.repeat_interleave(torch.arange(t, device=dev), counts)
    rank = torch.arange(c, device=dev) - (torch.cumsum(counts, 0) - counts)[local]
    block = torch.full((t, cmax), EMPTY, dtype=torch.int64, device=dev)
    block[local, rank] = cand_key[order]
    top = torch.topk(torch.cat([keys[touched], block], 1), k, dim=1)
    new_keys = keys.clone()
    new_keys[touched] = top.values
    new_payloads = []
    for p, fill, cp in zip(payloads, fills, cand_payloads):
        pblock = torch.full((t, cmax), fill, dtype=p.dtype, device=dev)
        pblock[local, rank] = cp[order]
        new_p = p.clone()
        new_p[touched] = torch.gather(torch.cat([p[touched], pblock], 1), 1, top.indices)
        new_payloads.append(new_p)
    return new_keys, new_payloads


def _dedupe(keys, payloads, fills, cand_row, cand_key, cand_payloads, g):
    """One entry per (row, group): the largest key among the candidates and the store row.

    Returns the store with superseded entries emptied (key EMPTY, payload fill) and the surviving
    candidates."""
    group = cand_payloads[g]
    order = torch.sort(cand_key, descending=True, stable=True).indices
    order = order[torch.sort(group[order], stable=True).indices]
    order = order[torch.sort(cand_row[order], stable=True).indices]
    r, gr = cand_row[order], group[order]
    first = torch.ones_like(r, dtype=torch.bool)
    first[1:] = (r[1:] != r[:-1]) | (gr[1:] != gr[:-1])
    keep = order[first]
    cand_row, cand_key = cand_row[keep], cand_key[keep]
    cand_payloads = [p[keep] for p in cand_payloads]
    group = cand_payloads[g]
    skey, sgroup = keys[cand_row], payloads[g][cand_row]  # [C, k]
    match = (sgroup == group[:, None]) & (skey != EMPTY)
    has = match.any(1)
    slot = match.to(torch.int8).argmax(1)
    skey_at = skey.gather(1, slot[:, None]).squeeze(1)
    wins = has & (cand_key > skey_at)
    if bool(wins.any()):
        keys = keys.clone()
        payloads = [p.clone() for p in payloads]
        keys[cand_row[wins], slot[wins]] = EMPTY
        for p, fill in zip(payloads, fills):
            p[cand_row[wins], slot[wins]] = fill
    alive = ~has | wins
    return keys, payloads, cand_row[alive], cand_key[alive], [p[alive] for p in cand_payloads]


def _merge_sorted(keys, payloads, fills, touched, row, cand_key, cand_payloads):
    """merge_entries by a segmented sort of the touched store rows plus the candidates (row sorted)."""
    d, k = keys.shape
    dev = keys.device
    t = touched.numel()
    local = torch.searchsorted(touched, row)
    row = torch.cat([torch.arange(t, device=dev).repeat_interleave(k), local])
    key = torch.cat([keys[touched].reshape(-1), cand_key])
    pay = [torch.cat([p[touched].reshape(-1), cp]) for p, cp in zip(payloads, cand_payloads)]
    order = sort_desc_by_row(row, key)
    r = row[order]
    counts = torch.bincount(r, minlength=t)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(r.numel(), device=dev) - starts[r]
    sel = rank < k
    r, rank, src = r[sel], rank[sel], order[sel]
    sub_keys = torch.full((t, k), EMPTY, dtype=torch.int64, device=dev)
    sub_keys[r, rank] = key[src]
    new_keys = keys.clone()
    new_keys[touched] = sub_keys
    new_payloads = []
    for p, fill, pp in zip(payloads, fills, pay):
        sub = torch.full((t, k), fill, dtype=p.dtype, device=dev)
        sub[r, rank] = pp[src]
        new_p = p.clone()
        new_p[touched] = sub
        new_payloads.append(new_p)
    return new_keys, new_payloads


def column_topk(keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k largest keys of each column of keys [N, d] as flat entries (column, key, row), EMPTY dropped."""
    n, d = keys.shape
    kk = min(k, n)
    top = torch.topk(keys, kk, dim=0)
    col = torch.arange(d, device=keys.device).expand(kk, d).reshape(-1)
    key, row = top.values.reshape(-1), top.indices.reshape(-1)
    real = key != EMPTY
    return col[real], key[real], row[real]
