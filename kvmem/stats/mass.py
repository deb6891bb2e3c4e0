"""Mass-L0: per token, how many neurons carry 50% and 90% of the layer's written mass.

For gated FFNs (SwiGLU, GeGLU) the coefficients m are dense and sign-symmetric, so "neurons with m > 0"
(kvmem.stats.counts) is about half of them whatever the token. What a neuron writes into the residual
stream is m_i·v_i (v_i: its value vector, row i of W_out), so the figure that says how sparse a layer's
output is counts the neurons that carry most of Σ_i |m_i|·‖v_i‖.

Definition. Per token t, with w = ‖v‖ (``spec.value_norm``, [d] float32) and everything in float64
(|m_i|·w_i is a product of two float32 values, exact in float64):

    c_i = |m_i|·w_i,   S = Σ_i c_i,
    k_f(t) = the smallest k such that the k largest c_i sum to >= f·S        (k_f = 0 when S == 0)

for each fraction f in FRACTIONS = (0.5, 0.9). Ties among the c_i do not change k_f (equal values are
interchangeable in the sorted order). When S > 0, k_f = 1 + the number of inclusive prefix sums of the c_i
sorted descending that are strictly below f·S, so 1 <= k_f <= d. (S > 0 implies f·S > 0: the smallest
positive c_i is about 2**-298, far above float64's underflow.) m must be finite.

State (int64, added on merge):

    hist       [len(FRACTIONS), d + 1]   tokens with k_f = j
    pos_sum    [len(FRACTIONS), max_pos] Σ k_f over the tokens at each row position
    pos_count  [max_pos]                 tokens at each row position
    value_norm [d] float32               the w the counts were made with (a run file describes itself;
                                         two states with different value norms do not merge)

Read-outs: ``n``, ``distribution(f)``, ``mean(f)``, ``quantile(f, q)``, ``by_position(f)``.

Two update paths, one definition:

  * torch (any device; the reference): rows in chunks whose float64 working set (c, its sort, the sort's
    indices, the prefix sums) stays within ``CHUNK_BYTES``; c sorted descending, cumsum, S = the last prefix
    sum, k_f = 1 + count(prefix < f·S).
  * numba (CPU; ``update`` takes it when numba imports, the stats' numba switch kvmem.stats.fused.available
    is on, ``FORCE_TORCH`` is off and the LayerStats backend is not "torch"): O(d) per token, no sort. The
    c_i go into buckets read off their float64 bits (exponent and 5 mantissa bits: 32 buckets per octave,
    over the max(16, ceil(log2 d) + 5) octaves below the row's largest c, and a bottom bucket for everything
    smaller), with per-bucket sums and a linked list of members. The buckets are summed from the top until
    the running sum reaches f·S; the crossing bucket's members are then resolved exactly: sorted when few,
    else split once more on the next 6 mantissa bits and the crossing sub-bucket sorted. Every element of
    a higher bucket is larger than every element of a lower one, so this is the sorted order, summed in
    another association. The crossing never falls in the bottom bucket (that would need the bottom
    bucket's sum, at most d·2**-(ceil(log2 d) + 5 - 1/16) < 1/30 of the largest c, to reach
    (1 - f)·S >= S/10); if rounding ever put it there, its members are sorted. Rows are shared out over torch's threads
    (kvmem.stats.parallel.run_parallel) without numba's own threading (see kvmem.stats.fused); each row is
    one thread's, so the counts do not depend on the number of threads. About 2.5 ms for 2048 tokens of
    d = 1536 on 2 cores (the torch path, which sorts: about 80 ms).

Rounding: both paths compute the same c_i exactly; S and the prefix sums are float64 sums of the same
non-negative numbers in different orders (the numba path sums S with a vectorised reduction, the buckets
in their scan order). k_f can therefore differ between the paths (or from a sorted cumsum) only when a
prefix sum lies within float64 rounding (a few ulp of S) of f·S; on data whose sums are exact (small
integers, dyadic values) they agree bit for bit, and random data never comes that close.
"""

from __future__ import annotations

import numpy as np
import torch

from kvmem.errors import KvmemError
from kvmem.stats import fused
from kvmem.stats.base import Batch, Counters, LayerSpec
from kvmem.stats.parallel import run_parallel
from kvmem.stats.store import bincount_fixed

try:  # numba is a dependency; a platform without its wheels still works on the torch path
    import numba
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None

FRACTIONS = (0.5, 0.9)
FORCE_TORCH = False  # True: the torch path on every device (tests, benchmarks)
CHUNK_BYTES = 1 << 28  # the torch path's float64 working set per chunk of rows (about 4 x 8 bytes per entry)

assert list(FRACTIONS) == sorted(FRACTIONS) and 0 < FRACTIONS[0] and FRACTIONS[-1] < 1

# numba kernel: bucket codes from the float64 bits of c (>= 0, so the bits order like the values)
_MB = 5  # mantissa bits in a bucket code: 32 buckets per octave
_SH = 52 - _MB
_SUB = 6  # mantissa bits of the second split of a crowded crossing bucket
_NSUB = 1 << _SUB
_SMALL = 32  # a crossing (sub-)bucket with at most this many members is insertion-sorted


def n_buckets(d: int) -> int:
    """Buckets per row for d neurons: 32 per octave over max(16, ceil(log2 d) + 5) octaves below the row's
    largest c, so that the bottom bucket (everything smaller) sums to less than 1/30 of it."""
    return 32 * max(16, (d - 1).bit_length() + 5)


def _total(c, d):
    """Σ c[:d] (float64), vectorised: the association is fixed by the compiled code, not by the threads."""
    s = 0.0
    for j in range(d):
        s += c[j]
    return s


def _isort_desc(a, n):
    """Sort a[:n] descending in place (insertion sort: the crossing buckets are small)."""
    for i in range(1, n):
        x = a[i]
        j = i
        while j > 0 and a[j - 1] < x:
            a[j] = a[j - 1]
            j -= 1
        a[j] = x


def _take(e, n, acc, t):
    """Smallest r in [1, n] with acc + e[0] + ... + e[r-1] >= t (e[:n] sorted descending); n if never
    (only by rounding: the members were summed in another order when the bucket was picked)."""
    r = 0
    while r < n:
        acc += e[r]
        r += 1
        if acc >= t:
            return r
    return n


def _sorted_take(e, n, acc, t):
    if n <= _SMALL:
        _isort_desc(e, n)
        return _take(e, n, acc, t)
    s = np.sort(e[:n])[::-1]
    return _take(s, n, acc, t)


def _resolve(buf, n, bottom, acc, t, sums, cnts, tmp):
    """How many of the largest of the crossing bucket's members buf[:n] take the running sum from acc (the
    buckets above) to t. bottom: the bucket is the bottom one (members share no bit prefix)."""
    if n <= _SMALL or bottom:
        return _sorted_take(buf, n, acc, t)
    bits = buf.view(np.int64)
    s2 = _SH - _SUB
    for q in range(_NSUB):
        sums[q] = 0.0
        cnts[q] = 0
    for j in range(n):
        q = (bits[j] >> s2) & (_NSUB - 1)
        sums[q] += buf[j]
        cnts[q] += 1
    k = 0
    q = _NSUB - 1
    while q > 0:
        x = acc + sums[q]
        if x >= t:
            break
        acc = x
        k += cnts[q]
        q -= 1
    m = 0
    for j in range(n):  # the crossing sub-bucket's members
        tmp[m] = buf[j]
        m += ((bits[j] >> s2) & (_NSUB - 1)) == q
    return k + _sorted_take(tmp, m, acc, t)


def _kernel(r0, r1, m, w, fr, nb, out):
    """k_f of rows [r0, r1) of m [N, d] float32 into out [N, len(fr)] int64 (w [d] float64 >= 0)."""
    d = m.shape[1]
    nf = fr.shape[0]
    c = np.empty(d)
    bits = c.view(np.int64)
    hs = np.empty(nb)  # bucket sums
    head = np.empty(nb, np.int32)  # first member of each bucket (-1: none), then nxt[member]
    nxt = np.empty(d, np.int32)
    buf = np.empty(d)
    tmp = np.empty(d)
    sums = np.empty(_NSUB)
    cnts = np.empty(_NSUB, np.int64)
    cb = np.empty(nf, np.int64)
    above = np.empty(nf)
    cnt = np.empty(nf, np.int64)
    for i in range(r0, r1):
        row = m[i]
        for j in range(d):
            c[j] = abs(np.float64(row[j])) * w[j]
        mx = np.int64(0)
        for j in range(d):
            mx = max(mx, bits[j])
        S = _total(c, d)
        if S == 0.0:
            for f in range(nf):
                out[i, f] = 0
            continue
        base = (mx >> _SH) - (nb - 1)  # bucket b holds bits >> _SH == base + b (b = 0: <= base)
        hs[:] = 0.0
        head[:] = -1
        for j in range(d):
            q = max((bits[j] >> _SH) - base, 0)
            hs[q] += c[j]
            nxt[j] = head[q]
            head[q] = j
        # crossing buckets, from the top (fractions ascending: each crossing at or below the previous)
        run = 0.0
        prev = 0.0
        f = 0
        b = nb - 1
        while f < nf and b >= 0:
            prev = run
            run += hs[b]
            while f < nf and run >= fr[f] * S:
                cb[f] = b
                above[f] = prev
                f += 1
            b -= 1
        while f < nf:  # only by rounding (S was summed in another order): the bottom bucket
            cb[f] = 0
            above[f] = prev
            f += 1
        for f in range(0, nf, 2):  # members of the buckets above the crossing ones, two fractions a pass
            lo0 = (cb[f] + base + 1) << _SH  # the lowest bits of the bucket above the crossing one
            lo1 = (cb[min(f + 1, nf - 1)] + base + 1) << _SH
            k0 = 0
            k1 = 0
            for j in range(d):
                k0 += bits[j] >= lo0
                k1 += bits[j] >= lo1
            cnt[f] = k0
            if f + 1 < nf:
                cnt[f + 1] = k1
        for f in range(nf):
            k = cnt[f]
            n = 0
            j = head[cb[f]]
            while j >= 0:
                buf[n] = c[j]
                n += 1
                j = nxt[j]
            out[i, f] = k + _resolve(buf, n, cb[f] == 0, above[f], fr[f] * S, sums, cnts, tmp)


if numba is not None:
    _jit = numba.njit(cache=True, nogil=True)
    _total = numba.njit(cache=True, nogil=True, fastmath={"reassoc", "nsz"})(_total)
    _inl = numba.njit(cache=True, nogil=True, inline="always")  # inlined: half the cost of resolving
    _isort_desc, _take, _sorted_take, _resolve = _inl(_isort_desc), _inl(_take), _inl(_sorted_take), _inl(_resolve)
    _kernel = _jit(_kernel)

_FR = np.array(FRACTIONS, dtype=np.float64)
ROWS_PER_TASK = 16  # the fewest rows worth a thread


def k_numba(m: torch.Tensor, w: np.ndarray) -> torch.Tensor:
    """k_f [N, len(FRACTIONS)] int64 of m [N, d] (CPU, float32) with value norms w [d] float64 (numba)."""
    if numba is None:  # pragma: no cover - exercised only where numba is missing
        raise RuntimeError("numba is not available")
    m = m.to(torch.float32).contiguous()
    n, d = m.shape
    out = np.empty((n, len(FRACTIONS)), dtype=np.int64)
    if n:
        mn = m.detach().numpy()
        nb = n_buckets(d)
        parts = max(1, min(torch.get_num_threads(), n // ROWS_PER_TASK))
        cuts = [n * p // parts for p in range(parts + 1)]
        run_parallel([lambda a=a, b=b: _kernel(a, b, mn, w, _FR, nb, out) for a, b in zip(cuts[:-1], cuts[1:])])
    return torch.from_numpy(out)


def k_torch(m: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """k_f [N, len(FRACTIONS)] int64 of m [N, d] with value norms w [d] (any device; sort and cumsum)."""
    n, d = m.shape
    dev = m.device
    out = torch.empty(n, len(FRACTIONS), dtype=torch.int64, device=dev)
    wd = w.to(device=dev, dtype=torch.float64)
    fr = torch.tensor(FRACTIONS, dtype=torch.float64, device=dev)
    rows = max(1, CHUNK_BYTES // (32 * d))
    for a in range(0, n, rows):
        c = torch.mul(m[a:a + rows].abs(), wd)  # float32 |m| promoted to float64: exact products
        p = c.sort(dim=1, descending=True).values
        del c
        p.cumsum_(1)
        total = p[:, -1:]
        t = total * fr  # [rows, F]
        k = torch.stack([(p < t[:, i:i + 1]).sum(1) for i in range(len(FRACTIONS))], 1) + 1
        out[a:a + rows] = torch.where(total > 0, k, torch.zeros_like(k))
    return out


class MassCounts(Counters):
    """Mass-L0 per token: how many neurons carry FRACTIONS of Σ|m|·‖v‖ (see the module docstring)."""

    name = "mass"
    FIELDS = {
        "hist": (lambda s: (len(FRACTIONS), s.d_mlp + 1), torch.int64),
        "pos_sum": (lambda s: (len(FRACTIONS), s.max_pos), torch.int64),
        "pos_count": (lambda s: (s.max_pos,), torch.int64),
    }

    @classmethod
    def applies(cls, spec: LayerSpec) -> bool:
        return spec.value_norm is not None

    def __init__(self, spec: LayerSpec):
        if spec.value_norm is None:
            raise KvmemError("statistic 'mass' needs the layer's value norms (LayerSpec.value_norm)")
        super().__init__(spec)
        self._set_value_norm(spec.value_norm)
        self.last_path: str | None = None  # "numba" or "torch": the path the last update took

    def _set_value_norm(self, vn: torch.Tensor) -> None:
        vn = torch.as_tensor(vn)
        if tuple(vn.shape) != (self.spec.d_mlp,) or vn.dtype != torch.float32:
            raise KvmemError(f"statistic 'mass': value_norm is {tuple(vn.shape)} {vn.dtype}, expected "
                             f"({self.spec.d_mlp},) torch.float32")
        if not bool(torch.isfinite(vn).all()) or bool((vn < 0).any()):
            raise KvmemError("statistic 'mass': value_norm must be finite and >= 0")
        self.value_norm = vn.to(self.spec.device).clone()
        # the numba kernel's weights: float64 (exact), -0.0 made +0.0 so every c has a clear sign bit
        self._w64 = self.value_norm.to("cpu", torch.float64).numpy() + 0.0

    # ------------------------------------------------------------------ update
    def uses_numba(self, batch: Batch) -> bool:
        """Whether update(batch) takes the numba kernel (see the module docstring)."""
        return (numba is not None and not FORCE_TORCH and fused.available and batch.m.device.type == "cpu"
                and (batch.stats is None or batch.stats.backend != "torch"))

    def token_k(self, m: torch.Tensor, use_numba: bool | None = None) -> torch.Tensor:
        """k_f [N, len(FRACTIONS)] int64 of a batch m [N, d] (on the statistic's device), without adding it.
        use_numba: None = the module's switches (FORCE_TORCH, fused.available); the kernel runs on CPU only."""
        if m.dim() != 2 or m.shape[1] != self.spec.d_mlp:
            raise KvmemError(f"statistic 'mass': m is {tuple(m.shape)}, expected [N, {self.spec.d_mlp}]")
        if use_numba is None:
            use_numba = numba is not None and not FORCE_TORCH and fused.available
        if use_numba and m.device.type == "cpu":
            return k_numba(m, self._w64)
        return k_torch(m, self.value_norm)

    def update(self, batch: Batch) -> None:
        use = self.uses_numba(batch)
        k = self.token_k(batch.m, use)
        self.last_path = "numba" if use else "torch"
        batch.paths[self.name] = self.last_path
        self.add(k, batch.pos)

    def update_dense(self, batch: Batch) -> None:
        """update without host synchronisation: the torch k_f (sort and cumsum), index_add_ for the counts."""
        k = k_torch(batch.m, self.value_norm)
        self.last_path = batch.paths[self.name] = "torch"
        self.add(k, batch.pos, fixed=True)

    def add(self, k: torch.Tensor, pos: torch.Tensor, fixed: bool = False) -> None:
        """Add tokens' k_f [N, len(FRACTIONS)] int64 at row positions pos [N]."""
        nf, d1 = self.hist.shape
        dev = self.hist.device
        k = k.to(dev)
        pos = pos.to(dev)
        off = torch.arange(nf, device=dev) * d1
        if fixed:  # out of place, so that a failed sync-free update leaves the state as it was (LayerStats)
            self.hist = self.hist + bincount_fixed((k + off).reshape(-1), nf * d1).view(nf, d1)
            self.pos_sum = self.pos_sum.index_add(1, pos, k.T.contiguous())
            self.pos_count = self.pos_count + bincount_fixed(pos, self.spec.max_pos)
            return
        self.hist += torch.bincount((k + off).reshape(-1), minlength=nf * d1).view(nf, d1)
        self.pos_sum.index_add_(1, pos, k.T.contiguous())
        self.pos_count += torch.bincount(pos, minlength=self.spec.max_pos)

    # ------------------------------------------------------------------ merge, state
    def merge(self, other: "MassCounts") -> None:
        if not isinstance(other, MassCounts):
            raise KvmemError(f"statistic 'mass' cannot merge a {type(other).__name__}")
        if not torch.equal(self.value_norm, other.value_norm.to(self.value_norm.device)):
            raise KvmemError("statistic 'mass': the two states were made with different value norms "
                             "(different model weights?) and do not merge")
        super().merge(other)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return super().state_dict() | {"value_norm": self.value_norm}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(sd)
        self._set_value_norm(self._get(sd, "value_norm"))

    # ------------------------------------------------------------------ read-outs
    def _row(self, f: float) -> int:
        if f not in FRACTIONS:
            raise KvmemError(f"statistic 'mass': fraction must be one of {', '.join(map(str, FRACTIONS))} (got {f!r})")
        return FRACTIONS.index(f)

    @property
    def n(self) -> int:
        """Tokens seen."""
        return int(self.pos_count.sum())

    def distribution(self, f: float) -> torch.Tensor:
        """Tokens by k_f: int64 [d + 1] (entry j: tokens with k_f = j)."""
        return self.hist[self._row(f)].clone()

    def mean(self, f: float) -> float:
        """Mean k_f over the tokens seen (NaN when none)."""
        h = self.hist[self._row(f)]
        n = int(h.sum())
        if n == 0:
            return float("nan")
        return int((h * torch.arange(h.numel(), device=h.device)).sum()) / n

    def quantile(self, f: float, q: float) -> int:
        """The q-quantile of k_f, q in [0, 1]: the smallest j seen with (tokens with k_f <= j) / n >= q
        (q = 0: the smallest k_f seen; q = 0.5: the median, the lower one of two)."""
        h = self.hist[self._row(f)]
        if not 0.0 <= q <= 1.0:
            raise KvmemError(f"statistic 'mass': quantile q must lie in [0, 1] (got {q!r})")
        n = int(h.sum())
        if n == 0:
            raise KvmemError("statistic 'mass': no tokens seen, no quantile")
        cdf = h.cumsum(0).to(torch.float64) / n
        return int(((cdf >= q) & (h > 0)).nonzero()[0, 0])

    def by_position(self, f: float) -> torch.Tensor:
        """Mean k_f per row position: float64 [max_pos] (NaN where no tokens)."""
        return self.pos_sum[self._row(f)].to(torch.float64) / self.pos_count.to(torch.float64)
