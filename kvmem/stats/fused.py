"""A CPU backend: the update of several components (kvmem.stats.base) in one pass over the batch (numba).

It covers the components named in ``FUSED`` (top, bottom, top_docs, sample, moments, hist, counts,
quadrants) and writes their state tensors in place; each of them keeps its own torch ``update``, which other
devices take and which the tests check against the same brute force. The torch updates are built for a
GPU: a dozen full passes over m [N, d_mlp]
(positive counts, float64 moments, histogram codes, candidate masks), then sorts and merges of the
candidates. On a CPU each pass is a trip through memory and each small op has a fixed cost, and
together they cost about a third of a transformer layer's forward pass. ``update`` does the whole
update in a single read of m (and gate, up):

  * neurons are split into blocks of ``BLOCK`` columns; each block is walked row by row by one thread,
    so every per-neuron accumulator and every row of every store belongs to one thread, and sums run
    in token order: the result does not depend on the number of threads;
  * counts, positives, float64 moments, the histogram (kvmem.stats.hist bins, read off the float32
    bits) and the quadrant sign counts are accumulated in block-local arrays and added at the end;
  * the stores (top, bottom, top_docs, sample, quadrant examples) are updated in place, entry by entry:
    a cheap integer test on the high half of the key (the order-preserving image of the value, or the
    sample priority) against the store's current k-th entry lets through the few entries that may
    enter, which are then compared on the full int64 key (kvmem.stats.keys) and inserted into the
    sorted row. Keys are unique per neuron, so the stores end up exactly as on the torch path (the
    top-k keys of everything seen), whatever the order of the tokens;
  * top_docs: per block and neuron the running max of the current document (first token on ties) is
    kept, and offered to the store when the document ends (or the batch does), replacing the entry of
    the same document when it is larger (documents continue across batches).

The kernel is compiled without numba's own threading (a second OpenMP runtime beside torch's would
make the two spin against each other on a small CPU); the blocks are shared out to
torch.get_num_threads() threads by kvmem.stats.parallel (torch's own OpenMP team where it can). GPU (and any device other than
the CPU) takes the components' torch updates, which the tests run on CPU too; both are checked against the same
brute-force statistics.
"""

from __future__ import annotations

import numpy as np
import torch

from kvmem.stats.hist import BIN_LUT, N_BINS
from kvmem.stats.keys import EMPTY, token_hash
from kvmem.stats.parallel import run_parallel

try:  # numba is a dependency; a platform without its wheels still works on the torch path
    import numba
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None

available = numba is not None
BLOCK = 64  # neurons per block: a block's local histogram (64 * 197 int32) stays in the core's cache
AHEAD = 8  # rows of m, gate and up prefetched ahead of the one being read (see _prefetch)
LOW = (1 << 32) - 1
TWO32 = 1 << 32
INT32_MIN = -(1 << 31)
BELOW = -(1 << 62)  # below every high half of a key


def _insert(keys, r, key):
    """Insert key into row r of a store sorted descending (key > the row's last key); the last drops."""
    pos = keys.shape[1] - 1
    while pos > 0 and keys[r, pos - 1] < key:
        keys[r, pos] = keys[r, pos - 1]
        pos -= 1
    keys[r, pos] = key


def _insert_p(keys, pay, r, key, p):
    """_insert with a payload riding along."""
    pos = keys.shape[1] - 1
    while pos > 0 and keys[r, pos - 1] < key:
        keys[r, pos] = keys[r, pos - 1]
        pay[r, pos] = pay[r, pos - 1]
        pos -= 1
    keys[r, pos] = key
    pay[r, pos] = p


def _offer_doc(keys, docs, r, key, doc):
    """A document's best entry: replaces the row's entry of the same document if larger, else enters
    like any entry (one entry per document)."""
    k = keys.shape[1]
    if key <= keys[r, k - 1]:
        return
    for s in range(k):
        if keys[r, s] != EMPTY and docs[r, s] == doc:
            if key <= keys[r, s]:
                return
            for t in range(s, k - 1):  # remove the old entry; the row's tail frees a slot
                keys[r, t] = keys[r, t + 1]
                docs[r, t] = docs[r, t + 1]
            keys[r, k - 1] = EMPTY
            docs[r, k - 1] = -1
            break
    _insert_p(keys, docs, r, key, doc)


def _kernel(b0, b1, m, bits, gate, up, gated, ti, th, doc, nc, lut,
            top, bot, dkey, did, skey, sval, qkey, qval,
            l0_part, pos, s1, s2, hist, quad):
    n, d = m.shape
    k = top.shape[1]
    for b in range(b0, b1):
        j0 = b * BLOCK
        w = min(d, j0 + BLOCK) - j0
        a1 = np.zeros(BLOCK)
        a2 = np.zeros(BLOCK)
        npos = np.zeros(BLOCK, np.int32)
        h = np.zeros((BLOCK, N_BINS), np.int32)
        ng = np.zeros(BLOCK, np.int32)
        nu = np.zeros(BLOCK, np.int32)
        ngu = np.zeros(BLOCK, np.int32)
        qc = np.zeros(BLOCK, np.int64)
        mo = np.zeros(BLOCK, np.int64)
        # high halves of each store's last key (EMPTY -> -2**31: everything passes the first test)
        tk = np.empty(BLOCK, np.int64)
        bk = np.empty(BLOCK, np.int64)
        sk = np.empty(BLOCK, np.int64)
        qk = np.zeros((4, BLOCK), np.int64)
        ncb = np.empty(BLOCK, np.int64)
        hf = np.zeros(BLOCK, np.int32)
        for j in range(w):
            tk[j] = top[j0 + j, k - 1] >> 32
            bk[j] = bot[j0 + j, k - 1] >> 32
            sk[j] = skey[j0 + j, k - 1] >> 32
            ncb[j] = nc[j0 + j]
            if gated:
                for q in range(4):
                    qk[q, j] = qkey[j0 + j, q] >> 32
        # the current document's running max per neuron (high half of the key) and its row
        cm = np.full(BLOCK, BELOW, np.int64)
        cr = np.zeros(BLOCK, np.int64)
        for i in range(n):
            if i + AHEAD < n:  # a block's rows lie a page apart: the hardware prefetchers do not follow
                for c in range(0, w, 16):
                    _prefetch(m, i + AHEAD, j0 + c)
                    if gated:
                        _prefetch(gate, i + AHEAD, j0 + c)
                        _prefetch(up, i + AHEAD, j0 + c)
            if i > 0 and doc[i] != doc[i - 1]:
                for j in range(w):
                    _offer_doc(dkey, did, j0 + j, cm[j] * TWO32 + (LOW - ti[cr[j]]), doc[i - 1])
                    cm[j] = BELOW
            row = m[i, j0:j0 + w]
            brow = bits[i, j0:j0 + w]
            lp = 0
            for j in range(w):
                x = np.float64(row[j])
                a1[j] += x
                a2[j] += x * x
                p = np.int32(row[j] > 0)
                lp += p
                npos[j] += p
            l0_part[b, i] = lp
            for j in range(w):
                h[j, lut[(brow[j] >> 21) & 2047]] += 1
            for j in range(w):
                v = np.int64(brow[j])
                v = 0 if v == INT32_MIN else v
                mj = v ^ 0x7FFFFFFF if v < 0 else v
                mo[j] = mj
                better = mj > cm[j]
                cm[j] = mj if better else cm[j]
                cr[j] = i if better else cr[j]
            # which entries may enter a store: vectorizable flags first, the rare hits after
            if gated:
                grow = gate[i, j0:j0 + w]
                urow = up[i, j0:j0 + w]
                for j in range(w):
                    gi = np.int32(grow[j] > 0)
                    ui = np.int32(urow[j] > 0)
                    ng[j] += gi
                    nu[j] += ui
                    ngu[j] += gi & ui
                    qc[j] = 3 - 2 * gi - ui  # the quadrant's column in LayerStats.quadrants
                    mj = mo[j]
                    ab = mj if mj >= 0 else -1 - mj  # mono of |m|
                    gm = -np.int64(gi)  # all ones where gate > 0 (bit masks: no branches, vectorizes)
                    um = -np.int64(ui)
                    qb = ((qk[0, j] & um | qk[1, j] & ~um) & gm) | ((qk[2, j] & um | qk[3, j] & ~um) & ~gm)
                    hf[j] = np.int32(ab >= qb)
            else:
                for j in range(w):
                    hf[j] = 0
            thi = th[i]
            nh = 0
            for j in range(w):
                mj = mo[j]
                neg = -1 - mj if mj != 0 else 0  # mono of -m
                pr = ((thi + ncb[j]) & LOW) - (1 << 31)  # sample priority, high half
                f = hf[j] | np.int32(mj >= tk[j]) | np.int32(neg >= bk[j]) | (np.int32(mj > 0) & np.int32(pr >= sk[j]))
                hf[j] = f
                nh += f
            if nh == 0:
                continue
            low = LOW - ti[i]
            for j in range(w):
                if hf[j] == 0:
                    continue
                mj = mo[j]
                r = j0 + j
                if mj >= tk[j]:
                    key = mj * TWO32 + low
                    if key > top[r, k - 1]:
                        _insert(top, r, key)
                        tk[j] = top[r, k - 1] >> 32
                neg = -1 - mj if mj != 0 else 0
                if neg >= bk[j]:
                    key = neg * TWO32 + low
                    if key > bot[r, k - 1]:
                        _insert(bot, r, key)
                        bk[j] = bot[r, k - 1] >> 32
                pr = ((thi + ncb[j]) & LOW) - (1 << 31)
                if mj > 0 and pr >= sk[j]:
                    key = pr * TWO32 + low
                    if key > skey[r, k - 1]:
                        _insert_p(skey, sval, r, key, row[j])
                        sk[j] = skey[r, k - 1] >> 32
                if gated:
                    c = qc[j]
                    ab = mj if mj >= 0 else -1 - mj
                    if ab >= qk[c, j]:
                        key = ab * TWO32 + low
                        if key > qkey[r, c]:
                            qkey[r, c] = key
                            qval[r, c] = row[j]
                            qk[c, j] = ab
        for j in range(w):
            _offer_doc(dkey, did, j0 + j, cm[j] * TWO32 + (LOW - ti[cr[j]]), doc[n - 1])
            s1[j0 + j] += a1[j]
            s2[j0 + j] += a2[j]
            pos[j0 + j] = npos[j]
            for c in range(N_BINS):
                hist[j0 + j, c] += h[j, c]
            if gated:
                quad[j0 + j, 0] += ngu[j]
                quad[j0 + j, 1] += ng[j] - ngu[j]
                quad[j0 + j, 2] += nu[j] - ngu[j]
                quad[j0 + j, 3] += n - ng[j] - nu[j] + ngu[j]


if numba is not None:
    from llvmlite import binding as _llvm
    from llvmlite import ir as _ir
    from numba.core import cgutils, types
    from numba.extending import intrinsic

    # llvm.prefetch is overloaded on the pointer type: p0 with opaque pointers (LLVM >= 15), p0i8 before
    _PREFETCH = "llvm.prefetch.p0" if _llvm.llvm_version_info[0] >= 15 else "llvm.prefetch.p0i8"

    @intrinsic
    def _prefetch(typingctx, arr, i, j):
        """Prefetch the cache line holding arr[i, j] (2-D array; no bounds check) into L1 for reading.

        Measured on SmolLM2's shape (2048 x 1536, gated), one thread: the kernel takes 23 ms without it,
        11 ms with it. A block reads 256 bytes of each row of m, gate and up, rows 6 KB apart: every row
        is on a new page, where the hardware prefetchers stop, and the row's work is too long for the
        core to run ahead to the next row's loads, so each row waited on its cache misses."""
        sig = types.void(arr, i, j)

        def codegen(context, builder, signature, args):
            aryty = signature.args[0]
            ary = context.make_array(aryty)(context, builder, args[0])
            inds = [context.cast(builder, a, t, types.intp) for a, t in zip(args[1:], signature.args[1:])]
            ptr = cgutils.get_item_pointer2(
                context, builder, data=ary.data, shape=cgutils.unpack_tuple(builder, ary.shape),
                strides=cgutils.unpack_tuple(builder, ary.strides), layout=aryty.layout, inds=inds,
                wraparound=False, boundscheck=False)
            i8p, i32 = _ir.IntType(8).as_pointer(), _ir.IntType(32)
            fn = cgutils.get_or_insert_function(
                builder.module, _ir.FunctionType(_ir.VoidType(), [i8p, i32, i32, i32]), _PREFETCH)
            # read, locality 3 (keep in all levels), data cache
            builder.call(fn, [builder.bitcast(ptr, i8p), _ir.Constant(i32, 0), _ir.Constant(i32, 3), _ir.Constant(i32, 1)])
            return context.get_dummy_value()

        return sig, codegen

    _jit = numba.njit(cache=True, nogil=True)
    _insert, _insert_p, _offer_doc = _jit(_insert), _jit(_insert_p), _jit(_offer_doc)
    _kernel = _jit(_kernel)

_LUT = BIN_LUT.numpy().astype(np.int32)  # float32 bit code -> histogram bin


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


# the components this pass updates (by registered name and class); any other component takes its own update
FUSED = {"top": "Top", "bottom": "Bottom", "top_docs": "TopDocs", "sample": "Sample", "moments": "Moments",
         "hist": "Histogram", "counts": "PositiveCounts", "quadrants": "Quadrants"}


def covers(parts: dict) -> tuple[str, ...]:
    """The names of ``parts`` this pass updates: all of FUSED that are present (quadrants only for gated
    layers), or none when one of the others is missing or of another class."""
    names = tuple(n for n in FUSED if n in parts)
    if any(type(parts[n]).__name__ != FUSED[n] for n in names) or set(FUSED) - set(names) - {"quadrants"}:
        return ()
    return names


def update(parts: dict, batch) -> tuple[str, ...]:
    """One fused pass of the batch (kvmem.stats.base.Batch, m [N, d] float32 contiguous on the CPU) into the
    components it covers; returns their names (empty: nothing done, every component updates itself)."""
    names = covers(parts)
    if not names:
        return ()
    m, ti, doc = batch.m, batch.index, batch.doc
    n, d = m.shape
    nblk = (d + BLOCK - 1) // BLOCK
    top, bot, docs, smp = parts["top"], parts["bottom"], parts["top_docs"], parts["sample"]
    quad = parts.get("quadrants")
    gated = quad is not None
    if gated:
        g = batch.gate.to(torch.float32).contiguous()
        u = batch.up.to(torch.float32).contiguous()
        qkey, qval, qcount = quad.keys, quad.value, quad.count
    else:
        g = u = torch.zeros(1, 1)
        qkey, qval, qcount = torch.zeros(1, 4, dtype=torch.int64), torch.zeros(1, 4), torch.zeros(1, 4, dtype=torch.int64)
    for c, attrs in ((top, ("keys",)), (bot, ("keys",)), (docs, ("keys", "doc")), (smp, ("keys", "value"))):
        for a in attrs:
            setattr(c, a, getattr(c, a).contiguous())
    l0_part = np.empty((nblk, n), dtype=np.int32)
    pos = np.zeros(d, dtype=np.int64)
    args = (
        _np(m), _np(m.view(torch.int32)), _np(g), _np(u), gated, _np(ti), _np(token_hash(ti)), _np(doc),
        _np(smp.neuron_c), _LUT,
        _np(top.keys), _np(bot.keys), _np(docs.keys), _np(docs.doc), _np(smp.keys), _np(smp.value),
        _np(qkey), _np(qval),
        l0_part, pos, _np(parts["moments"].sum), _np(parts["moments"].sumsq), _np(parts["hist"].count), _np(qcount),
    )
    parts_n = min(torch.get_num_threads(), nblk)
    cuts = [nblk * p // parts_n for p in range(parts_n + 1)]
    run_parallel([lambda a=a, b=b: _kernel(a, b, *args) for a, b in zip(cuts[:-1], cuts[1:])])
    l0, count = torch.from_numpy(l0_part.sum(0, dtype=np.int64)), torch.from_numpy(pos)
    batch.positives = (l0, count)  # other components (the torch path of any not covered) reuse them
    parts["counts"].add(l0, count, batch.pos)
    return names
