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
  * the rows of a block lie a page apart, where the hardware prefetchers stop: each row of m, gate and
    up is prefetched AHEAD rows before it is read (the llvm.prefetch intrinsic);
  * gated layers whose activation keeps its input's sign (LayerSpec.sign_preserving_act: SiLU, GELU,
    ReLU) take up's sign from m's and gate's, (up > 0) == ((m > 0) == (gate > 0)) wherever m != 0, and
    read up only on the rare rows with an m == 0 (exact zeros, underflow): a third less to read; the
    kernel is compiled for it as a second function (_kernel_signs) so that the flag costs no branch;
  * the stores (top, bottom, top_docs, sample, quadrant examples) are updated in place, entry by entry:
    a cheap test of each row against the stores' current k-th entries (float32 compares of the value
    with the entry's value, which agree with the keys' order as mono32 folds -0.0 onto +0.0; the sample
    priority as an int32) lets through the few entries that may enter; a branch-free loop without
    stores (which LLVM vectorizes) says whether a row has any, a second one marks them in a bit mask,
    and each is then compared on the full int64 key (kvmem.stats.keys) and inserted into the sorted row. Keys are unique per neuron, so the stores end up exactly as on the torch path (the
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

from types import FunctionType

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
TWO31 = 1 << 31
# up's sign taken from m's and gate's where m != 0 (kvmem.stats.base.LayerSpec.sign_preserving_act); the
# kernel is compiled once with it False (_kernel) and once True (_kernel_signs)
SIGNS = False


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


def _unmono(tmp, ftmp, hi):
    """The float32 whose mono32 is hi (an int32 in int64); -inf for an empty slot's high half (-2**31)."""
    if hi == INT32_MIN:
        return -np.inf
    tmp[0] = hi ^ 0x7FFFFFFF if hi < 0 else hi
    return ftmp[0]


def _ctz(x):
    """Index of the lowest set bit of x != 0."""
    j = 0
    while (x >> j) & 1 == 0:
        j += 1
    return j


def _mono(v):
    """mono32 of float32 bits v (int32 in int64), -0.0 folded onto +0.0."""
    v = 0 if v == INT32_MIN else v
    return v ^ 0x7FFFFFFF if v < 0 else v


def _cand(x, gp, upz, pr, ft, fb, sk, q0, q1, q2, q3):
    """Whether m = x may enter a store of a gated layer (gate > 0: gp, up > 0: upz; the thresholds as in
    _kernel). The quadrant thresholds are all taken and selected, no branches."""
    qa = q0 if upz else q1
    qc = q2 if upz else q3
    qb = qa if gp else qc
    return (x >= ft) | (x <= fb) | ((x > 0) & (pr >= sk)) | (abs(x) >= qb)


def _kernel(b0, b1, m, bits, gate, up, gated, ti, th, doc, nc, lut,
            top, bot, dkey, did, skey, sval, qkey, qval,
            l0_part, pos, s1, s2, hist, quad):
    n, d = m.shape
    k = top.shape[1]
    tmp = np.zeros(1, np.int32)
    hbase = np.arange(BLOCK).astype(np.uint32) * np.uint32(N_BINS)  # a neuron's row in the flat local histogram
    ftmp = tmp.view(np.float32)
    for b in range(b0, b1):
        j0 = b * BLOCK
        w = min(d, j0 + BLOCK) - j0
        a1 = np.zeros(BLOCK)
        a2 = np.zeros(BLOCK)
        npos = np.zeros(BLOCK, np.int32)
        h = np.zeros(BLOCK * N_BINS, np.int32)  # [BLOCK, N_BINS] flat
        ng = np.zeros(BLOCK, np.int32)
        nu = np.zeros(BLOCK, np.int32)
        ngu = np.zeros(BLOCK, np.int32)
        # the stores' entry thresholds: m >= ft may enter top, m <= fb bottom, |m| >= fq<c> quadrant c's
        # slot (float32 compares agree with the key order: mono32 folds -0.0 onto +0.0), and the sample
        # priority pr >= sk (int32: th + nx wraps like the priority's 32 bits, nx = neuron hash + 2**31)
        ft = np.empty(BLOCK, np.float32)
        fb = np.empty(BLOCK, np.float32)
        sk = np.empty(BLOCK, np.int32)
        nx = np.empty(BLOCK, np.int32)
        fq0 = np.full(BLOCK, -np.inf, np.float32)
        fq1 = np.full(BLOCK, -np.inf, np.float32)
        fq2 = np.full(BLOCK, -np.inf, np.float32)
        fq3 = np.full(BLOCK, -np.inf, np.float32)
        for j in range(w):
            r = j0 + j
            ft[j] = _unmono(tmp, ftmp, top[r, k - 1] >> 32)
            fb[j] = -_unmono(tmp, ftmp, bot[r, k - 1] >> 32)
            sk[j] = skey[r, k - 1] >> 32
            nx[j] = np.int32((nc[r] & LOW) - TWO31)
            if gated:
                fq0[j] = _unmono(tmp, ftmp, qkey[r, 0] >> 32)
                fq1[j] = _unmono(tmp, ftmp, qkey[r, 1] >> 32)
                fq2[j] = _unmono(tmp, ftmp, qkey[r, 2] >> 32)
                fq3[j] = _unmono(tmp, ftmp, qkey[r, 3] >> 32)
        # the current document's running max per neuron and its row
        cm = np.zeros(BLOCK, np.float32)
        cr = np.zeros(BLOCK, np.int32)
        for i in range(n):
            if i + AHEAD < n:  # a block's rows lie a page apart: the hardware prefetchers do not follow
                for c in range(0, w, 16):
                    _prefetch(m, i + AHEAD, j0 + c)
                    if gated:
                        _prefetch(gate, i + AHEAD, j0 + c)
                        if not SIGNS:
                            _prefetch(up, i + AHEAD, j0 + c)
            row = m[i, j0:j0 + w]
            if i == 0 or doc[i] != doc[i - 1]:
                if i > 0:
                    for j in range(w):
                        ftmp[0] = cm[j]
                        _offer_doc(dkey, did, j0 + j, _mono(np.int64(tmp[0])) * TWO32 + (LOW - ti[cr[j]]), doc[i - 1])
                for j in range(w):
                    cm[j] = row[j]
                    cr[j] = i
            else:
                for j in range(w):
                    x = row[j]
                    better = x > cm[j]
                    cm[j] = x if better else cm[j]
                    cr[j] = i if better else cr[j]
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
                h[hbase[j] + lut[np.uint32(brow[j]) >> 21]] += 1
            thi = np.int32(((th[i] + TWO31) & LOW) - TWO31)
            hit = False
            if gated:
                grow = gate[i, j0:j0 + w]
                if SIGNS:  # up's sign from m's and gate's; up itself only where m is 0 (see update)
                    urow = grow  # not read
                    zr = False
                    for j in range(w):
                        gp = grow[j] > 0
                        gi = np.int32(gp)
                        ui = np.int32((row[j] > 0) == gp)
                        ng[j] += gi
                        nu[j] += ui
                        ngu[j] += gi & ui
                        zr |= row[j] == 0
                    if zr:  # rare: correct the counts from up, and send the zeros to the stores' exact tests
                        for j in range(w):
                            if row[j] == 0:
                                gi = np.int32(grow[j] > 0)
                                dv = 1 - gi
                                ut = np.int32(up[i, j0 + j] > 0)
                                nu[j] += ut - dv
                                ngu[j] += (gi & ut) - (gi & dv)
                        hit = True
                else:
                    urow = up[i, j0:j0 + w]
                    for j in range(w):
                        gi = np.int32(grow[j] > 0)
                        ui = np.int32(urow[j] > 0)
                        ng[j] += gi
                        nu[j] += ui
                        ngu[j] += gi & ui
                if SIGNS:  # (two loops: a select between up's and the derived sign would still load up)
                    for j in range(w):  # no stores: vectorizes without alias checks
                        x = row[j]
                        gp = grow[j] > 0
                        hit |= _cand(x, gp, (x > 0) == gp, np.int32(thi + nx[j]), ft[j], fb[j], sk[j],
                                     fq0[j], fq1[j], fq2[j], fq3[j])
                else:
                    for j in range(w):
                        x = row[j]
                        hit |= _cand(x, grow[j] > 0, urow[j] > 0, np.int32(thi + nx[j]), ft[j], fb[j], sk[j],
                                     fq0[j], fq1[j], fq2[j], fq3[j])
            else:
                for j in range(w):
                    x = row[j]
                    pr = np.int32(thi + nx[j])
                    hit |= (x >= ft[j]) | (x <= fb[j]) | ((x > 0) & (pr >= sk[j]))
            if not hit:
                continue
            low = LOW - ti[i]
            fl = 0  # bit j: entry j may enter a store (the same tests, on the rows that have one)
            if gated:
                if SIGNS:  # zeros (m == 0: up's sign unknown here) go to the exact tests
                    for j in range(w):
                        x = row[j]
                        gp = grow[j] > 0
                        f = _cand(x, gp, (x > 0) == gp, np.int32(thi + nx[j]), ft[j], fb[j], sk[j],
                                  fq0[j], fq1[j], fq2[j], fq3[j])
                        fl |= np.int64(f | (x == 0)) << j
                else:
                    for j in range(w):
                        x = row[j]
                        f = _cand(x, grow[j] > 0, urow[j] > 0, np.int32(thi + nx[j]), ft[j], fb[j], sk[j],
                                  fq0[j], fq1[j], fq2[j], fq3[j])
                        fl |= np.int64(f) << j
            else:
                for j in range(w):
                    x = row[j]
                    pr = np.int32(thi + nx[j])
                    f = (x >= ft[j]) | (x <= fb[j]) | ((x > 0) & (pr >= sk[j]))
                    fl |= np.int64(f) << j
            while fl != 0:
                j = _ctz(fl)
                fl &= fl - 1
                x = row[j]
                pr = np.int32(thi + nx[j])
                mj = _mono(np.int64(brow[j]))
                r = j0 + j
                key = mj * TWO32 + low
                if key > top[r, k - 1]:
                    _insert(top, r, key)
                    ft[j] = _unmono(tmp, ftmp, top[r, k - 1] >> 32)
                neg = -1 - mj if mj != 0 else 0
                key = neg * TWO32 + low
                if key > bot[r, k - 1]:
                    _insert(bot, r, key)
                    fb[j] = -_unmono(tmp, ftmp, bot[r, k - 1] >> 32)
                if mj > 0:
                    key = np.int64(pr) * TWO32 + low
                    if key > skey[r, k - 1]:
                        _insert_p(skey, sval, r, key, x)
                        sk[j] = skey[r, k - 1] >> 32
                if gated:
                    gq = gate[i, r] > 0
                    if SIGNS and x != 0:
                        uq = (x > 0) == gq
                    else:
                        uq = up[i, r] > 0
                    c = 3 - 2 * np.int64(gq) - np.int64(uq)
                    ab = mj if mj >= 0 else -1 - mj
                    key = ab * TWO32 + low
                    if key > qkey[r, c]:
                        qkey[r, c] = key
                        qval[r, c] = x
                        fa = _unmono(tmp, ftmp, ab)
                        if c == 0:
                            fq0[j] = fa
                        elif c == 1:
                            fq1[j] = fa
                        elif c == 2:
                            fq2[j] = fa
                        else:
                            fq3[j] = fa
        for j in range(w):
            ftmp[0] = cm[j]
            _offer_doc(dkey, did, j0 + j, _mono(np.int64(tmp[0])) * TWO32 + (LOW - ti[cr[j]]), doc[n - 1])
            s1[j0 + j] += a1[j]
            s2[j0 + j] += a2[j]
            pos[j0 + j] = npos[j]
            for c in range(N_BINS):
                hist[j0 + j, c] += h[j * N_BINS + c]
            if gated:
                quad[j0 + j, 0] += ngu[j]
                quad[j0 + j, 1] += ng[j] - ngu[j]
                quad[j0 + j, 2] += nu[j] - ngu[j]
                quad[j0 + j, 3] += n - ng[j] - nu[j] + ngu[j]


def _with_globals(f, name, **consts):
    """A copy of function f named name (numba's cache tells them apart by it) seeing consts as globals."""
    g = FunctionType(f.__code__, {**f.__globals__, **consts}, name, f.__defaults__, f.__closure__)
    g.__qualname__ = name
    return g


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
    _unmono, _mono, _ctz, _cand = _jit(_unmono), _jit(_mono), _jit(_ctz), _jit(_cand)
    # two kernels: SIGNS a compile-time constant (a run-time flag left the up loops' cost in: ~2 ms of 9)
    _kernel_signs = _jit(_with_globals(_kernel, "_kernel_signs", SIGNS=True))
    _kernel = _jit(_kernel)

_LUT = BIN_LUT.numpy().astype(np.uint8)  # float32 bit code -> histogram bin


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
    # up's sign from m's and gate's wherever m != 0 (kvmem.stats.base.LayerSpec.sign_preserving_act)
    signs = gated and bool(quad.spec.sign_preserving_act)
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
    kern = _kernel_signs if signs else _kernel
    run_parallel([lambda a=a, b=b: kern(a, b, *args) for a, b in zip(cuts[:-1], cuts[1:])])
    l0, count = torch.from_numpy(l0_part.sum(0, dtype=np.int64)), torch.from_numpy(pos)
    batch.positives = (l0, count)  # other components (the torch path of any not covered) reuse them
    parts["counts"].add(l0, count, batch.pos)
    return names
