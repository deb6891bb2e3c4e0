"""ContextWindows: for every example the report can show, the neuron's m over the example's context window.

Kept while the window's tokens stream through the profiler, so the report shades contexts without a
second forward pass. Entries are keyed by (neuron, global token index), not by store slot, so shifting
slots and shard merges need no bookkeeping. After every update of the LayerStats it belongs to, the
entries are exactly the (neuron, index) pairs referenced by

  the first n_top slots of ``top``, n_docs of ``top_docs``, n_bottom of ``bottom``   (an entry's rank in
      these stores only ever worsens as the stream goes on, so no later slot can come back into view)
  every slot of ``sample`` (the report picks quantile bands from its final content)
  every quadrant example (gated layers)

State (axes: E entries, W = before + 1 + after window positions):

  key      [E] int64       neuron * 2**32 + token index, ascending (so by neuron, then index)
  window   [E, W] dtype    m of that neuron at tokens index - before .. index + after; NaN = not known
  carry    [0, d_mlp]      kept empty since windows stay inside their model row (carry_index [0]); kept in the
                           state so states of earlier kvmem still load

A window holds only positions of the example's own model row (kvmem.profile.tokens.RowLayout): what the
model saw before the token, and the tokens after it in the same row. The profiler hands every counted
token of a row to the same update, consecutively, so a window is complete after the update that brings
its token; its positions outside the row (another row of the same document, the BOS, padding, a position
left out of the statistics) stay NaN. Two batch tokens are in the same row iff their token indices and
their row positions differ by the same offset (positions restart in every row).

Window values are the profiler's m exactly, rounded to ``dtype``: bfloat16 by default. GPU runs compute
m in bfloat16, so it loses nothing there; on CPU it is within 2**-8 relative (0.4%), far below the 1/20 of
max|m| the report's 21 shading levels resolve (a level moves by one for ~0.1% of positions); and unlike
float16 it keeps float32's range, so massive activations cannot overflow. float32 is exact.

Update on the CPU (numba, ``_plan`` and ``_fill``, neurons shared out to torch's threads like
kvmem.stats.fused): per neuron the shown slots' token indices are read off the stores' int64 keys and
merged with the kept entries of that neuron; after the first update only the keys that entered or left a
store row are looked at (a merge walk of the row against its copy from the previous update, with a count
of referencing slots per entry), so a neuron whose shown slots did not change costs a few dozen compares.
The windows are copied over and those of tokens in the batch filled (found by binary search in the
batch's indices), in token order (a window reads one column of m over W rows; in neuron order nearly every read would miss the
TLB). Other devices, float16 windows and
LayerStats(sync_free=True) (the default on a GPU) keeps a slot-aligned form during updates and sorts it
into this one only when the state is read (kvmem.stats.context_fixed: no host synchronisation per batch).
LayerStats(backend="torch") take the torch ops (a sort of the referenced keys with torch.unique, a
searchsorted against the kept ones and of the keys' tokens in the batch, gathers of the windows of batch
tokens; on a GPU, unique and nonzero each synchronise with the host once per layer); the tests hold the two to the same state bit for
bit. Memory: 8 + 2·W bytes per entry.

state_dict() names: meta.{version,d_mlp,before,after,n_top,n_docs,n_bottom}, count [d_mlp] int64 (entries
per neuron: the entries are sorted by neuron, so this is all the file needs of it), index [E] int64 (so
LayerStats.shifted moves it with the other token indices), window [E, W], carry.value [c, d_mlp],
carry.index [c] int64.
"""

from __future__ import annotations

import numpy as np
import torch

from kvmem.errors import KvmemError
from kvmem.stats import context_fixed
from kvmem.stats.keys import EMPTY
from kvmem.stats.parallel import run_parallel

try:  # numba is a dependency; a platform without its wheels still works on the torch path
    import numba
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None

_STATE_VERSION = 1
_LOW = 2**32 - 1
_PAD = 2**63 - 1  # sorts after every real key
# the store classes whose ``keys`` the CPU pass reads (kvmem.stats.topk, sample, quadrants)
_STORE_CLASSES = {"top": "Top", "top_docs": "TopDocs", "bottom": "Bottom", "sample": "Sample", "quadrants": "Quadrants"}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ContextWindows:
    """Context windows of the shown examples of one layer (see the module docstring)."""

    def __init__(self, d_mlp: int, before: int = 10, after: int = 4, n_top: int = 10, n_docs: int = 5,
                 n_bottom: int = 5, dtype: torch.dtype = torch.bfloat16, device="cpu"):
        if d_mlp < 1 or min(before, after, n_top, n_docs, n_bottom) < 0:
            raise KvmemError(f"ContextWindows needs d_mlp >= 1 and non-negative before, after, n_top, n_docs, "
                             f"n_bottom (got {d_mlp}, {before}, {after}, {n_top}, {n_docs}, {n_bottom})")
        if dtype not in DTYPES.values():
            raise KvmemError(f"ContextWindows dtype must be one of {', '.join(DTYPES)} (got {dtype})")
        self.d_mlp, self.before, self.after = int(d_mlp), int(before), int(after)
        self.n_top, self.n_docs, self.n_bottom = int(n_top), int(n_docs), int(n_bottom)
        self.dtype, self.device = dtype, torch.device(device)
        self.width = self.before + 1 + self.after
        self._fixed = None  # the slot-aligned form of sync-free updates (kvmem.stats.context_fixed), or None
        self._offs = torch.arange(-self.before, self.after + 1, device=self.device)  # [W]
        self.key = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.window = torch.full((0, self.width), float("nan"), dtype=dtype, device=self.device)
        self.carry = torch.zeros(0, self.d_mlp, dtype=dtype, device=self.device)
        self.carry_index = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._carry_end = -1  # token index after the carry's last (-1: no carry)
        # the CPU pass's memo (see _plan), valid while _snap_of is self.key: the shown slots' keys [d, slots]
        # behind self.key, each entry's number of referencing slots [E], each neuron's first entry [d + 1]
        self._snap, self._snap_of, self._refs, self._start = None, None, None, None

    @property
    def key(self) -> torch.Tensor:
        """Entry keys [E] int64, sorted (neuron * 2**32 + token index)."""
        self._sorted()
        return self._key

    @key.setter
    def key(self, t: torch.Tensor) -> None:
        self._sorted()
        self._key = t

    @property
    def window(self) -> torch.Tensor:
        """Windows [E, W] of the entries."""
        self._sorted()
        return self._window

    @window.setter
    def window(self, t: torch.Tensor) -> None:
        self._sorted()
        self._window = t

    def _sorted(self) -> None:
        """Turn the slot-aligned form of sync-free updates into the sorted one (synchronises)."""
        if getattr(self, "_fixed", None) is not None:
            self._key, self._window = context_fixed.materialize(self)
            self._fixed = None

    @property
    def settings(self) -> tuple[int, ...]:
        """(d_mlp, before, after, n_top, n_docs, n_bottom)."""
        return self.d_mlp, self.before, self.after, self.n_top, self.n_docs, self.n_bottom

    # ------------------------------------------------------------------ which entries
    def referenced(self, stats) -> torch.Tensor:
        """Sorted unique keys [E] of the (neuron, index) pairs the shown slots of ``stats`` (a LayerStats)
        reference now."""
        parts = [stats.top.index[:, :self.n_top], stats.top_docs.index[:, :self.n_docs],
                 stats.bottom.index[:, :self.n_bottom], stats.sample.index]
        if stats.gated:
            parts.append(stats.quadrants.index)
        idx = torch.cat([p.to(self.device) for p in parts], dim=1)  # [d_mlp, slots]
        neuron = torch.arange(self.d_mlp, device=self.device)[:, None]
        key = torch.where(idx >= 0, neuron * 2**32 + idx, torch.full_like(idx, _PAD)).flatten()
        key = torch.unique(key)  # sorted
        return key[:-1] if key.numel() and bool(key[-1] == _PAD) else key

    def _keep(self, key: torch.Tensor) -> torch.Tensor:
        """Windows [len(key), W] of ``key`` (sorted): the known ones, NaN rows for new keys."""
        if self.key.numel() == 0:
            return torch.full((key.numel(), self.width), float("nan"), dtype=self.dtype, device=self.device)
        pos = torch.searchsorted(self.key, key).clamp(max=self.key.numel() - 1)
        new = (self.key.index_select(0, pos) != key).nonzero().squeeze(1)
        return self.window.index_select(0, pos).index_fill_(0, new, float("nan"))

    # ------------------------------------------------------------------ update
    def update(self, stats, m: torch.Tensor, index: torch.Tensor, pos: torch.Tensor) -> None:
        """After ``stats.update`` of a batch: m [N, d_mlp] (float32, contiguous) of the tokens ``index`` [N]
        (int64, global, strictly increasing) at row positions ``pos`` [N] (int64). Keeps the windows of the
        entries ``stats`` now references, drops the rest, and fills the windows of the entries whose token
        is in this batch from the batch tokens of the same row."""
        n, d = m.shape
        if d != self.d_mlp:
            raise ValueError(f"m must be [N, {self.d_mlp}], got {tuple(m.shape)}")
        index = index.to(device=self.device, dtype=torch.int64).reshape(n).contiguous()
        pos = pos.to(device=self.device, dtype=torch.int64).reshape(n).contiguous()
        if getattr(stats, "sync_free", False):
            return context_fixed.update(self, stats, m, index, pos)
        stores = self._stores(stats, m)
        if stores is not None:
            self._update_cpu(stores, m, index, pos)
        else:
            self._update_torch(stats, m, index, pos)

    def _stores(self, stats, m: torch.Tensor):
        """The store keys [d, *] (int64, contiguous) of the shown slots, in the order of ``referenced``,
        when the numba pass can take this update (CPU, numba, a window dtype it writes, the stores of
        kvmem.stats.topk / sample / quadrants); None otherwise."""
        if not (_numba_ok and self.device.type == "cpu" and m.device.type == "cpu"
                and self.dtype in (torch.bfloat16, torch.float32) and m.dtype == torch.float32):
            return None
        parts = getattr(stats, "parts", None)
        if parts is None or getattr(stats, "backend", "auto") == "torch":  # LayerStats(backend="torch"): torch only
            return None
        names = ["top", "top_docs", "bottom", "sample"] + (["quadrants"] if stats.gated else [])
        out = []
        for name in names:
            part = parts.get(name)
            if type(part).__name__ != _STORE_CLASSES[name]:
                return None
            keys = part.keys
            if keys.dtype != torch.int64 or keys.device.type != "cpu" or keys.dim() != 2 or keys.shape[0] != self.d_mlp:
                return None
            out.append(keys.contiguous())
        return out

    def _update_cpu(self, stores, m: torch.Tensor, index: torch.Tensor, pos: torch.Tensor) -> None:
        """update on the CPU: per neuron, the shown slots' indices (read off the store keys) merged with the
        kept entries (``_plan``), then the windows copied and filled from m (``_fill``); two
        numba passes over the neurons, shared out to torch's threads."""
        d, n = self.d_mlp, m.shape[0]
        top, docs, bot, smp = stores[:4]
        quad = stores[4] if len(stores) > 4 else torch.full((d, 0), EMPTY, dtype=torch.int64)
        widths = (min(self.n_top, top.shape[1]), min(self.n_docs, docs.shape[1]), min(self.n_bottom, bot.shape[1]),
                  quad.shape[1])
        slots = sum(widths) + smp.shape[1]
        old_key = self.key.contiguous()
        e_old = old_key.numel()
        # the previous update's shown keys and reference counts, while they still describe self.key
        incr = (self._snap is not None and self._snap_of is self.key and self._snap.shape == (d, slots)
                and self._refs.shape[0] == e_old)
        snap = self._snap if incr else np.full((d, slots), EMPTY, dtype=np.int64)
        old_refs = self._refs if incr else np.zeros(0, dtype=np.int32)
        idx = np.empty((d, slots), dtype=np.int64)
        src = np.empty((d, slots), dtype=np.int64)
        refs = np.empty((d, slots), dtype=np.int32)
        cnt = np.zeros(d + 1, dtype=np.int64)
        old_start = self._start if incr else torch.searchsorted(old_key, torch.arange(d + 1) * 2**32).numpy()
        np_stores = [t.numpy() for t in (top, docs, bot, smp, quad)]
        parts_n = max(1, min(torch.get_num_threads(), d // 64 or 1))
        cuts = [d * p // parts_n for p in range(parts_n + 1)]
        args = (*np_stores, *widths, snap, incr, old_key.numpy(), old_start, old_refs, idx, src, refs, cnt)
        run_parallel([lambda a=a, b=b: _plan(a, b, *args) for a, b in zip(cuts[:-1], cuts[1:])])
        new_start = np.zeros(d + 1, dtype=np.int64)
        np.cumsum(cnt[:d], out=new_start[1:])
        e = int(new_start[d])
        bits = torch.int16 if self.dtype == torch.bfloat16 else torch.int32
        key = torch.empty(e, dtype=torch.int64)
        window = torch.empty((e, self.width), dtype=self.dtype)
        new_refs = np.empty(e, dtype=np.int32)
        args = (idx, src, refs, new_start, self.window.contiguous().view(bits).numpy(), key.numpy(),
                window.view(bits).numpy(), new_refs, m.view(torch.int32).numpy(), index.numpy(), pos.numpy(), n,
                self.before, self.after, self.dtype == torch.bfloat16)
        run_parallel([lambda a=a, b=b: _fill(a, b, *args) for a, b in zip(cuts[:-1], cuts[1:])])
        self.key, self.window = key, window
        self._snap, self._snap_of, self._refs, self._start = snap, key, new_refs, new_start

    def _update_torch(self, stats, m: torch.Tensor, index: torch.Tensor, pos: torch.Tensor) -> None:
        """update with torch ops (any device): unique of the referenced keys, searchsorted against the kept
        ones and of their tokens in the batch, gathers of the windows of the batch's tokens."""
        n, d = m.shape
        key = self.referenced(stats)
        window = self._keep(key)
        if n and key.numel():
            tok, neuron = key & _LOW, key >> 32
            r = torch.searchsorted(index, tok).clamp(max=n - 1)
            sel = (index.index_select(0, r) == tok).nonzero().squeeze(1)  # entries whose token is in the batch
            if sel.numel():
                rs = r.index_select(0, sel)
                rr = rs[:, None] + self._offs  # [S, W] batch row of each window position
                rc = rr.clamp(0, n - 1)
                ok = ((rr >= 0) & (rr < n) & (index[rc] == tok.index_select(0, sel)[:, None] + self._offs)
                      & (pos[rc] == pos.index_select(0, rs)[:, None] + self._offs))  # same row
                got = m.reshape(-1).index_select(0, (rc * d + neuron.index_select(0, sel)[:, None]).flatten())
                w = torch.where(ok, got.view_as(rr).to(self.dtype), window.index_select(0, sel))
                window.index_copy_(0, sel, w)
        self.key, self.window = key, window

    # ------------------------------------------------------------------ merge
    def merge(self, other: "ContextWindows", stats=None) -> "ContextWindows":
        """Add the windows of ``other`` (another block of the stream) in place; returns self. A position
        known in either is known (where both know it, self's value); with ``stats`` (the merged
        LayerStats) only the entries it references are kept. The carry (now always empty) is the one that
        ends later."""
        if other.settings != self.settings or other.dtype != self.dtype:
            raise KvmemError(f"cannot merge context windows with (d_mlp, before, after, n_top, n_docs, n_bottom) "
                             f"{other.settings} / {other.dtype} into {self.settings} / {self.dtype}")
        key = torch.cat([self.key, other.key.to(self.device)])
        win = torch.cat([self.window, other.window.to(self.device)])
        order = torch.sort(key, stable=True).indices  # self's entry first among equal keys
        key, win = key[order], win[order]
        if key.numel() > 1:
            dup = torch.cat([torch.zeros(1, dtype=torch.bool, device=self.device), key[1:] == key[:-1]])
            later = dup.nonzero().squeeze(1)  # the second of each pair (keys are unique within a side)
            win[later - 1] = torch.where(torch.isnan(win[later - 1]), win[later], win[later - 1])
            key, win = key[~dup], win[~dup]
        self.key, self.window = key, win
        if stats is not None:
            ref = self.referenced(stats)
            self.window, self.key = self._keep(ref), ref
        if other.carry_index.numel() and other._carry_end > self._carry_end:
            self.carry, self.carry_index = other.carry.to(self.device).clone(), other.carry_index.to(self.device).clone()
            self._carry_end = other._carry_end
        return self

    # ------------------------------------------------------------------ read-outs
    def lookup(self, neuron: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Windows [..., W] float32 of (neuron, index) pairs (same shape [...]); NaN rows for pairs not
        kept (or index < 0)."""
        neuron, index = neuron.to(self.device).long(), index.to(self.device).long()
        key = torch.where(index >= 0, neuron * 2**32 + index, torch.full_like(index, _PAD)).flatten()
        nan = torch.full((key.numel(), self.width), float("nan"), device=self.device)
        if self.key.numel() == 0:
            return nan.view(*index.shape, self.width)
        pos = torch.searchsorted(self.key, key).clamp(max=self.key.numel() - 1)
        found = (self.key[pos] == key)[:, None]
        return torch.where(found, self.window[pos].float(), nan).view(*index.shape, self.width)

    def covers(self, before: int, after: int, n_top: int, n_docs: int, n_bottom: int) -> bool:
        """Whether windows of this size were kept for at least this many slots of each store."""
        return (before <= self.before and after <= self.after and n_top <= self.n_top and n_docs <= self.n_docs
                and n_bottom <= self.n_bottom)

    @property
    def neuron(self) -> torch.Tensor:
        """Neuron of each entry [E] int64."""
        return self.key >> 32

    @property
    def index(self) -> torch.Tensor:
        """Global token index of each entry [E] int64."""
        return self.key & _LOW

    def nbytes(self) -> int:
        """Bytes held (entries, windows and carry)."""
        return sum(t.numel() * t.element_size() for t in (self.key, self.window, self.carry, self.carry_index))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        def i64(x: int) -> torch.Tensor:
            return torch.tensor(int(x), dtype=torch.int64, device=self.device)

        sd = {"meta.version": i64(_STATE_VERSION), "meta.d_mlp": i64(self.d_mlp), "meta.before": i64(self.before),
              "meta.after": i64(self.after), "meta.n_top": i64(self.n_top), "meta.n_docs": i64(self.n_docs),
              "meta.n_bottom": i64(self.n_bottom),
              "count": torch.bincount(self.neuron, minlength=self.d_mlp), "index": self.index,
              "window": self.window, "carry.value": self.carry, "carry.index": self.carry_index}
        return {name: t.detach().clone().contiguous() for name, t in sd.items()}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        if int(sd["meta.version"]) != _STATE_VERSION:
            raise KvmemError(f"ContextWindows state version {int(sd['meta.version'])} is not {_STATE_VERSION}")
        meta = tuple(int(sd[f"meta.{x}"]) for x in ("d_mlp", "before", "after", "n_top", "n_docs", "n_bottom"))
        if meta != self.settings or sd["window"].dtype != self.dtype:
            raise KvmemError(f"ContextWindows state {meta} / {sd['window'].dtype} does not fit {self.settings} / "
                             f"{self.dtype}")
        dev = self.device
        neuron = torch.repeat_interleave(torch.arange(self.d_mlp, device=dev), sd["count"].to(dev).long())
        self.key = neuron * 2**32 + sd["index"].to(dev).long()
        self.window = sd["window"].to(dev).clone()
        self.carry, self.carry_index = sd["carry.value"].to(dev).clone(), sd["carry.index"].to(dev).long().clone()
        self._carry_end = int(self.carry_index[-1]) + 1 if self.carry_index.numel() else -1

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], device="cpu") -> "ContextWindows":
        c = cls(*(int(sd[f"meta.{x}"]) for x in ("d_mlp", "before", "after", "n_top", "n_docs", "n_bottom")),
                dtype=sd["window"].dtype, device=device)
        c.load_state_dict(sd)
        return c

    def __repr__(self) -> str:
        return (f"ContextWindows(d_mlp={self.d_mlp}, before={self.before}, after={self.after}, n_top={self.n_top}, "
                f"n_docs={self.n_docs}, n_bottom={self.n_bottom}, entries={self.key.numel()})")


# ---------------------------------------------------------------------- CPU kernels (numba)
def _bsearch(old_key, lo, hi, x):
    """Position of token index x among old_key[lo:hi] (one neuron's entries, ascending), or -1."""
    while lo < hi:
        mid = (lo + hi) >> 1
        v = old_key[mid] & _LOW
        if v < x:
            lo = mid + 1
        elif v > x:
            hi = mid
        else:
            return mid
    return -1


def _leave(old_key, o0, o1, ref, pk):
    """The slot key pk left the shown slots: one reference less to its kept entry (False: none is kept,
    the memo does not add up)."""
    q = _bsearch(old_key, o0, o1, _LOW - (pk & _LOW))
    if q < 0:
        return False
    ref[q - o0] -= 1
    return True


def _enter(old_key, o0, o1, ref, new, nn, ck):
    """The slot key ck entered the shown slots: one reference more to its kept entry, or its token index
    appended to new (returns the new count nn)."""
    x = _LOW - (ck & _LOW)
    q = _bsearch(old_key, o0, o1, x)
    if q >= 0:
        ref[q - o0] += 1
        return nn
    new[nn] = x
    return nn + 1


def _plan(j0, j1, top, docs, bot, smp, quad, n_top, n_docs, n_bot, n_quad, snap, incr, old_key, old_start,
          old_refs, idx, src, refs, cnt):
    """Neurons j0 .. j1: the sorted distinct token indices the shown slots reference now, into
    idx[j, :cnt[j]], with their kept entry (src: position in old_key, -1 = new) and how many shown slots
    reference each (refs). snap[j] holds the shown slots' keys of the previous update (written here for the
    next); with ``incr`` (old_refs are those of the previous update's entries) only the keys that left or
    entered a store row are looked at: a row is sorted descending, so one merge walk of the previous and
    the current row finds them. A row found out of order, or no ``incr``, sorts all the slots instead
    and merges them with the kept entries."""
    width = snap.shape[1]
    n_smp = smp.shape[1]
    ref = np.empty(width + 1, np.int64)  # the neuron's kept entries: their reference counts
    new = np.empty(width + 1, np.int64)  # token indices entering (with repeats)
    for j in range(j0, j1):
        o0, o1 = old_start[j], old_start[j + 1]
        ok = incr and o1 - o0 <= width
        nn = 0
        if ok:
            for a in range(o1 - o0):
                ref[a] = old_refs[o0 + a]
            base = 0
            for st in range(4):
                keys = top if st == 0 else docs if st == 1 else bot if st == 2 else smp
                w = n_top if st == 0 else n_docs if st == 1 else n_bot if st == 2 else n_smp
                p = 0
                c = 0
                while ok:
                    pk = snap[j, base + p] if p < w else EMPTY
                    ck = keys[j, c] if c < w else EMPTY
                    if c > 0 and c < w and ck != EMPTY and ck >= keys[j, c - 1]:
                        ok = False  # not sorted descending
                    elif pk == EMPTY and ck == EMPTY:
                        break
                    elif pk == ck:
                        p += 1
                        c += 1
                    elif pk > ck:  # left the shown slots
                        ok = _leave(old_key, o0, o1, ref, pk)
                        p += 1
                    else:  # entered them
                        nn = _enter(old_key, o0, o1, ref, new, nn, ck)
                        c += 1
                base += w
            for col in range(n_quad):
                if not ok:
                    break
                pk = snap[j, base + col]
                ck = quad[j, col]
                if pk != ck:
                    if pk != EMPTY:
                        ok = _leave(old_key, o0, o1, ref, pk)
                    if ck != EMPTY:
                        nn = _enter(old_key, o0, o1, ref, new, nn, ck)
        if ok:  # a memo that does not add up (it cannot, short of a bug) is not trusted
            live = nn
            for a in range(o1 - o0):
                if ref[a] < 0:
                    ok = False
                live += ref[a] > 0
            ok = ok and live <= width
        if not ok:  # every shown slot, sorted, then merged with the kept entries
            for a in range(o1 - o0):
                ref[a] = 0
            nn = 0
            for st in range(5):
                keys = top if st == 0 else docs if st == 1 else bot if st == 2 else smp if st == 3 else quad
                w = n_top if st == 0 else n_docs if st == 1 else n_bot if st == 2 else n_smp if st == 3 else n_quad
                for col in range(w):
                    k = keys[j, col]
                    if k != EMPTY:
                        new[nn] = _LOW - (k & _LOW)
                        nn += 1
        for a in range(1, nn):  # insertion sort (of a few entering indices, or of every slot)
            x = new[a]
            b = a - 1
            while b >= 0 and new[b] > x:
                new[b + 1] = new[b]
                b -= 1
            new[b + 1] = x
        # merge: the kept entries still referenced and the entering indices (repeats counted)
        u = 0
        a = 0
        b = 0
        nk = o1 - o0
        while a < nk or b < nn:
            ka = old_key[o0 + a] & _LOW if a < nk else _PAD
            kb = new[b] if b < nn else _PAD
            if ka < kb:
                if ref[a] > 0:
                    idx[j, u] = ka
                    src[j, u] = o0 + a
                    refs[j, u] = ref[a]
                    u += 1
                a += 1
            else:
                r = 0
                while b < nn and new[b] == kb:
                    r += 1
                    b += 1
                idx[j, u] = kb
                if ka == kb:
                    src[j, u] = o0 + a
                    refs[j, u] = ref[a] + r
                    a += 1
                else:
                    src[j, u] = -1
                    refs[j, u] = r
                u += 1
        cnt[j] = u
        base = 0
        for st in range(5):
            keys = top if st == 0 else docs if st == 1 else bot if st == 2 else smp if st == 3 else quad
            w = n_top if st == 0 else n_docs if st == 1 else n_bot if st == 2 else n_smp if st == 3 else n_quad
            for col in range(w):
                snap[j, base + col] = keys[j, col]
            base += w


def _fill(j0, j1, idx, src, refs, new_start, old_win, key, win, new_refs, mbits, bidx, bpos, n, before, after,
          bf16):
    """Neurons j0 .. j1: the entries idx[j, :count] (sorted, from ``_plan``) at new_start[j] of key / win /
    new_refs, their windows the kept ones (old_win[src]; NaN for new entries, src -1), and the windows of
    entries whose token is in the batch (bidx [n] its token indices, ascending; bpos [n] row positions; m's
    float32 bits) filled from the batch tokens of the same row; windows as bits (bfloat16 rounded to
    nearest even like torch).

    The windows are filled in batch order (a counting sort of the entries by their first batch row): a
    window reads one column of m over ``width`` rows, and neighbouring tokens share those rows' pages
    and cache lines, where neuron order would miss the TLB on nearly every read."""
    width = before + 1 + after
    nan = 0x7FC0 if bf16 else 0x7FC00000
    e0, e1 = new_start[j0], new_start[j1]
    task = np.empty(e1 - e0, np.int64)  # entries whose token is in the batch
    where = np.empty(e1 - e0, np.int64)  # ... and its batch row
    nt = 0
    lo_i = bidx[0] if n > 0 else 0
    hi_i = bidx[n - 1] if n > 0 else -1
    for j in range(j0, j1):
        base = new_start[j]
        for u in range(new_start[j + 1] - base):
            i = idx[j, u]
            e = base + u
            key[e] = j * 4294967296 + i
            new_refs[e] = refs[j, u]
            o = src[j, u]
            if o >= 0:
                for w in range(width):
                    win[e, w] = old_win[o, w]
            else:
                for w in range(width):
                    win[e, w] = nan
            if lo_i <= i <= hi_i:
                a, b = 0, n
                while a < b:
                    mid = (a + b) >> 1
                    if bidx[mid] < i:
                        a = mid + 1
                    else:
                        b = mid
                if a < n and bidx[a] == i:
                    task[nt] = e
                    where[nt] = a
                    nt += 1
    if nt == 0:
        return
    # counting sort of the tasks by their first batch row
    first = np.zeros(n + 2, np.int64)
    for t in range(nt):
        first[max(where[t] - before, 0) + 1] += 1
    for r in range(n + 1):
        first[r + 1] += first[r]
    order = np.empty(nt, np.int64)
    for t in range(nt):
        r = max(where[t] - before, 0)
        order[first[r]] = t
        first[r] += 1
    for q in range(nt):
        t = order[q]
        e = task[t]
        r = where[t]
        i = key[e] & _LOW
        j = key[e] >> 32
        p = bpos[r]
        for rr in range(max(r - before, 0), min(r + after + 1, n)):
            off = rr - r
            if bidx[rr] != i + off or bpos[rr] != p + off:  # another row
                continue
            v = np.int64(mbits[rr, j]) & 0xFFFFFFFF
            if bf16:
                if (v & 0x7FFFFFFF) > 0x7F800000:  # NaN: what torch's vectorised cast writes
                    h = -1
                else:
                    h = (v + 0x7FFF + ((v >> 16) & 1)) >> 16
                    h = h - 65536 if h >= 32768 else h
                win[e, off + before] = h
            else:
                win[e, off + before] = mbits[rr, j]


_numba_ok = numba is not None
if numba is not None:
    _jit = numba.njit(cache=True, nogil=True)
    _bsearch = _jit(_bsearch)
    _leave, _enter = _jit(_leave), _jit(_enter)
    _plan, _fill = _jit(_plan), _jit(_fill)
