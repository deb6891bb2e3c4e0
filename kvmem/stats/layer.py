"""LayerStats: streaming, mergeable statistics of one FFN layer's coefficients m [N, d_mlp].

Updated once per layer per batch while a corpus streams through the model (``kvmem profile``);
shards merge exactly (``merge``) and the state round-trips through safetensors (``state_dict``).
Per neuron (rows below are [d_mlp, ...]; all tensors live on ``device``):

  top        k largest m: value float32 [d, k], index int64 [d, k] (global token index, -1 = empty)
  bottom     k smallest m (most negative first), same layout
  top_docs   k documents with the largest max m, each document once: value, index (its argmax token), doc
  sample     uniform random sample of k tokens with m > 0 (top-k of a hash of (token, neuron)): value, index
  n, count_pos, sum, sumsq (float64), min, max      moments (min/max read off bottom/top)
  hist       [d, 197] counts over the fixed bins HIST_EDGES (kvmem.stats.hist)
  quadrants  gated layers: count [d, 4] of (gate>0, up>0), (gate>0, up<=0), (gate<=0, up>0),
             (gate<=0, up<=0) and per quadrant the largest-|m| example: value [d, 4], index [d, 4]
  l0_hist [d+1], l0_pos_sum [max_pos], l0_pos_count [max_pos]: neurons with m > 0 per token
  context    optional (``context=ContextWindows(...)``): m over the context windows of the examples the
             report shows, updated after the stores (kvmem.stats.context; needs contiguous token indices)

Ties everywhere go to (value descending, then lower token index); see kvmem.stats.keys. Empty slots hold
value NaN and index -1 (doc -1). Same input stream and batch boundaries give bit-identical state.

Two update paths give the same statistics (the stores exactly, the float64 sums up to rounding):
on CPU one fused pass over the batch (kvmem.stats.fused, numba), elsewhere a few large torch
operations per batch (kvmem.stats.update: candidate masks, sparse merges). ``backend="torch"`` forces
the second; the tests run every check on both.

state_dict() names: meta.{version,d_mlp,k,gated,max_pos,last_index}, n, {top,bottom,sample}.{value,index},
top_docs.{value,index,doc}, sample.priority (kept so that shifting indices does not redraw the sample),
count_pos, sum, sumsq, hist, l0_hist, l0_pos_sum, l0_pos_count, quadrants.{count,value,index} (gated),
context.* (ContextWindows.state_dict, when kept).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kvmem.errors import KvmemError
from kvmem.stats import readout
from kvmem.stats.hist import N_BINS, batch_hist
from kvmem.stats.keys import (
    EMPTY,
    MAX_TOKEN_INDEX,
    decode_index,
    decode_value,
    encode,
    encode_high,
    key_high,
    neuron_hash,
)
from kvmem.stats.store import merge_entries, work_buffer
from kvmem.stats import fused
from kvmem.stats.context import ContextWindows
from kvmem.stats.update import bounds, candidates, update_sample, update_values

_STATE_VERSION = 1
BACKENDS = ("auto", "torch")


class Slots(NamedTuple):
    """A per-neuron store: value [d, k] float32, index [d, k] int64 (-1 empty), doc [d, k] (top_docs only)."""

    value: torch.Tensor
    index: torch.Tensor
    doc: torch.Tensor | None = None


class Quadrants(NamedTuple):
    """Gated layers: count [d, 4] int64; largest-|m| example per quadrant: value [d, 4], index [d, 4]."""

    count: torch.Tensor
    value: torch.Tensor
    index: torch.Tensor


def _moments(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column sums of m and m*m [N, d] float32 as float64 [d]: every value is converted to float64 first
    (squares of float32 values are exact in float64), so only the float64 additions round. The sums are
    row-vector products (BLAS gemv: deterministic for a given thread count, twice as fast as sum(0))."""
    x = work_buffer("f64", tuple(m.shape), torch.float64, m.device)
    x.copy_(m)
    ones = torch.ones(1, m.shape[0], dtype=torch.float64, device=m.device)
    total = (ones @ x)[0]
    x.mul_(x)
    return total, (ones @ x)[0]


class LayerStats:
    """Streaming per-neuron statistics of one FFN layer (see the module docstring)."""

    def __init__(self, d_mlp: int, k: int = 20, gated: bool = False, max_pos: int = 1024, device="cpu",
                 backend: str = "auto", context: ContextWindows | None = None):
        if d_mlp < 1 or k < 1 or max_pos < 1:
            raise KvmemError(f"LayerStats needs d_mlp, k, max_pos >= 1 (got {d_mlp}, {k}, {max_pos})")
        if backend not in BACKENDS:
            raise KvmemError(f"LayerStats backend must be one of {', '.join(BACKENDS)} (got {backend!r})")
        # "auto": the fused one-pass kernel on CPU (kvmem.stats.fused), torch elsewhere; "torch": torch only
        self.backend = backend
        self.d_mlp, self.k, self.gated, self.max_pos = int(d_mlp), int(k), bool(gated), int(max_pos)
        self.device = torch.device(device)
        d, dev = self.d_mlp, self.device

        def keys(width: int = self.k) -> torch.Tensor:
            return torch.full((d, width), EMPTY, dtype=torch.int64, device=dev)

        self._top, self._bot, self._doc_key, self._smp_key = keys(), keys(), keys(), keys()
        self._doc_id = torch.full((d, self.k), -1, dtype=torch.int64, device=dev)
        self._smp_val = torch.full((d, self.k), float("nan"), device=dev)
        self._neuron_c = neuron_hash(torch.arange(d, device=dev))
        self.n = 0
        self.count_pos = torch.zeros(d, dtype=torch.int64, device=dev)
        self.sum = torch.zeros(d, dtype=torch.float64, device=dev)
        self.sumsq = torch.zeros(d, dtype=torch.float64, device=dev)
        self.hist = torch.zeros(d, N_BINS, dtype=torch.int64, device=dev)
        self.l0_hist = torch.zeros(d + 1, dtype=torch.int64, device=dev)
        self.l0_pos_sum = torch.zeros(self.max_pos, dtype=torch.int64, device=dev)
        self.l0_pos_count = torch.zeros(self.max_pos, dtype=torch.int64, device=dev)
        if self.gated:
            self._q_key = keys(4)
            self._q_val = torch.full((d, 4), float("nan"), device=dev)
            self.quadrant_count = torch.zeros(d, 4, dtype=torch.int64, device=dev)
        self._last_index = -1  # largest token index seen (decides strict vs widened thresholds)
        if context is not None and (context.d_mlp != d or context.device != dev):
            raise KvmemError(f"context windows for d_mlp {context.d_mlp} on {context.device} do not fit this layer")
        self.context = context
        self._paths: dict = {}  # code paths taken by the last update (diagnostics, tests)

    # ------------------------------------------------------------------ update
    def update(self, coef, token_index, doc_id, pos_in_seq, gate=None, up=None) -> None:
        """Add one batch. coef [N, d_mlp] (any float dtype; computed in float32), token_index [N] int64
        (global, strictly increasing, < 2**32 - 1), doc_id [N] int64 (>= 0, non-decreasing), pos_in_seq [N]
        int64 (< max_pos); gated layers also gate, up [N, d_mlp] (m = act(gate) * up)."""
        d, dev = self.d_mlp, self.device
        if coef.dim() != 2 or coef.shape[1] != d:
            raise ValueError(f"coef must be [N, {d}], got {tuple(coef.shape)}")
        n = coef.shape[0]
        if (gate is None or up is None) if self.gated else (gate is not None or up is not None):
            raise ValueError("gate and up are required for gated LayerStats and only for them")
        if self.gated and (tuple(gate.shape) != (n, d) or tuple(up.shape) != (n, d)):
            raise ValueError(f"gate and up must be [N, {d}] like coef")
        if n == 0:
            return
        if n >= 2**24:
            raise ValueError("at most 2**24 - 1 tokens per update")
        m = coef.to(device=dev, dtype=torch.float32).contiguous()
        ti = token_index.to(device=dev, dtype=torch.int64).reshape(n)
        doc = doc_id.to(device=dev, dtype=torch.int64).reshape(n)
        pos = pos_in_seq.to(device=dev, dtype=torch.int64).reshape(n)
        checks = torch.stack(
            [ti[0], ti[-1], (ti[1:] > ti[:-1]).all().long(), (doc[1:] >= doc[:-1]).all().long(), doc[0],
             pos.min(), pos.max()]
        ).tolist()
        first, last, inc, nondec, doc0, pmin, pmax = checks
        if first < 0 or last > MAX_TOKEN_INDEX or not inc:
            raise ValueError(f"token_index must be strictly increasing within [0, {MAX_TOKEN_INDEX}]")
        if not nondec or doc0 < 0:
            raise ValueError("doc_id must be non-negative and non-decreasing")
        if pmin < 0 or pmax >= self.max_pos:
            raise ValueError(f"pos_in_seq must lie in [0, {self.max_pos})")
        monotone = first > self._last_index
        self._paths = {}
        if self.gated:
            gate, up = gate.to(dev), up.to(dev)

        if self._fused(m):
            l0, pos_count = fused.update(self, m, ti, doc, gate, up)
            self._paths["dense"] = "fused"
        else:
            l0, pos_count = self._dense_torch(m)
            b = bounds(self, d, dev, monotone)
            flat = candidates(m, b, gate, up) if b.any else None
            update_values(self, m, ti, doc, b, flat, gate, up)
            update_sample(self, m, ti, pos_count)
            self._paths["dense"] = "torch"
        self.count_pos += pos_count
        self.l0_hist += torch.bincount(l0, minlength=d + 1)
        self.l0_pos_sum.index_add_(0, pos, l0)
        self.l0_pos_count += torch.bincount(pos, minlength=self.max_pos)
        self.n += n
        self._last_index = max(self._last_index, last)
        if self.context is not None:
            if last - first != n - 1:
                raise ValueError("context windows need contiguous token indices within a batch")
            self.context.update(self, m, first)

    def _fused(self, m: torch.Tensor) -> bool:
        """Whether this update takes the fused CPU pass (kvmem.stats.fused)."""
        return self.backend != "torch" and m.device.type == "cpu" and fused.available

    def _dense_torch(self, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The dense part of the torch path (any device): adds the moments and the histogram; returns
        (l0 [N], positives per neuron [d]) of the batch."""
        n, d = m.shape
        dev = m.device
        posf = work_buffer("f32_a", (n, d), torch.float32, dev)
        torch.gt(m, 0, out=posf)
        # float32 sums of 0/1 are exact integers below 2**24 in any order, so matrix-vector products do
        l0 = (posf @ torch.ones(d, device=dev)).to(torch.int64)
        pos_count = (torch.ones(n, device=dev) @ posf).to(torch.int64)
        total, squares = _moments(m)
        self.sum += total
        self.sumsq += squares
        code = work_buffer("i32_a", (n, d), torch.int32, dev)
        flat = work_buffer("i32_b", (n, d), torch.int32, dev)
        self.hist += batch_hist(m, code, flat).T
        return l0, pos_count

    # ------------------------------------------------------------------ merge
    def _check_compatible(self, other: "LayerStats") -> None:
        a = (self.d_mlp, self.k, self.gated, self.max_pos)
        b = (other.d_mlp, other.k, other.gated, other.max_pos)
        if a != b:
            raise KvmemError(f"cannot merge LayerStats with (d_mlp, k, gated, max_pos) {b} into {a}")

    def merge(self, other: "LayerStats") -> "LayerStats":
        """Add the statistics of other (a disjoint set of tokens) in place; returns self. Exact for the
        stores, counts and histograms (documents split across the two are deduplicated by doc id)."""
        self._check_compatible(other)
        d, dev = self.d_mlp, self.device

        def entries(keys: torch.Tensor, *payloads: torch.Tensor):
            keys = keys.to(dev)
            real = (keys != EMPTY).reshape(-1)
            rows = torch.arange(d, device=dev).repeat_interleave(keys.shape[1])[real]
            return rows, keys.reshape(-1)[real], [p.to(dev).reshape(-1)[real] for p in payloads]

        r, key, _ = entries(other._top)
        self._top, _ = merge_entries(self._top, [], [], r, key, [])
        r, key, _ = entries(other._bot)
        self._bot, _ = merge_entries(self._bot, [], [], r, key, [])
        r, key, pay = entries(other._doc_key, other._doc_id)
        self._doc_key, (self._doc_id,) = merge_entries(self._doc_key, [self._doc_id], [-1], r, key, pay, dedupe=0)
        r, key, pay = entries(other._smp_key, other._smp_val)
        self._smp_key, (self._smp_val,) = merge_entries(self._smp_key, [self._smp_val], [float("nan")], r, key, pay)
        if self.gated:
            ok, ov = other._q_key.to(dev), other._q_val.to(dev)
            take = ok > self._q_key
            self._q_key = torch.where(take, ok, self._q_key)
            self._q_val = torch.where(take, ov, self._q_val)
            self.quadrant_count += other.quadrant_count.to(dev)
        for name in ("count_pos", "sum", "sumsq", "hist", "l0_hist", "l0_pos_sum", "l0_pos_count"):
            getattr(self, name).add_(getattr(other, name).to(dev))
        self.n += other.n
        self._last_index = max(self._last_index, other._last_index)
        if self.context is not None and other.context is not None:
            self.context.merge(other.context, stats=self)
        else:  # one side kept no windows (a run of an older kvmem): the merged run keeps none either
            self.context = None
        return self

    # ------------------------------------------------------------------ read-outs
    @property
    def top(self) -> Slots:
        return Slots(decode_value(self._top), decode_index(self._top))

    @property
    def bottom(self) -> Slots:
        return Slots(-decode_value(self._bot) + 0.0, decode_index(self._bot))

    @property
    def top_docs(self) -> Slots:
        return Slots(decode_value(self._doc_key), decode_index(self._doc_key), self._doc_id.clone())

    @property
    def sample(self) -> Slots:
        return Slots(self._smp_val.clone(), decode_index(self._smp_key))

    def _sample_priority(self) -> torch.Tensor:
        """The sample's priorities [d, k] int64 in [0, 2**32) (-1 = empty); see kvmem.stats.keys."""
        k = self._smp_key
        return torch.where(k == EMPTY, torch.full_like(k, -1), key_high(k) + 2**31)

    @property
    def quadrants(self) -> Quadrants | None:
        if not self.gated:
            return None
        return Quadrants(self.quadrant_count.clone(), self._q_val.clone(), decode_index(self._q_key))

    @property
    def max(self) -> torch.Tensor:
        """Largest m per neuron, float32 [d] (NaN before any update)."""
        return decode_value(self._top[:, 0])

    @property
    def min(self) -> torch.Tensor:
        """Smallest m per neuron, float32 [d] (NaN before any update)."""
        return -decode_value(self._bot[:, 0]) + 0.0

    mean = readout.mean
    std = readout.std
    firing_rate = readout.firing_rate
    count_above = readout.count_above
    to_frame = readout.to_frame

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat, contiguous tensors (safetensors-ready after .cpu()); exact: load_state_dict restores
        a LayerStats that continues bit-identically."""
        def i64(x: int) -> torch.Tensor:
            return torch.tensor(int(x), dtype=torch.int64, device=self.device)

        top, bot, docs, smp = self.top, self.bottom, self.top_docs, self.sample
        sd = {
            "meta.version": i64(_STATE_VERSION), "meta.d_mlp": i64(self.d_mlp), "meta.k": i64(self.k),
            "meta.gated": i64(self.gated), "meta.max_pos": i64(self.max_pos),
            "meta.last_index": i64(self._last_index), "n": i64(self.n),
            "top.value": top.value, "top.index": top.index,
            "bottom.value": bot.value, "bottom.index": bot.index,
            "top_docs.value": docs.value, "top_docs.index": docs.index, "top_docs.doc": docs.doc,
            "sample.value": smp.value, "sample.index": smp.index, "sample.priority": self._sample_priority(),
            "count_pos": self.count_pos, "sum": self.sum, "sumsq": self.sumsq, "hist": self.hist,
            "l0_hist": self.l0_hist, "l0_pos_sum": self.l0_pos_sum, "l0_pos_count": self.l0_pos_count,
        }
        if self.gated:
            q = self.quadrants
            sd.update({"quadrants.count": q.count, "quadrants.value": q.value, "quadrants.index": q.index})
        if self.context is not None:
            sd.update({f"context.{name}": t for name, t in self.context.state_dict().items()})
        return {name: t.detach().clone().contiguous() for name, t in sd.items()}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Exact restore from state_dict() output (config must match this object's)."""
        meta = tuple(int(sd[f"meta.{x}"]) for x in ("d_mlp", "k", "gated", "max_pos"))
        if int(sd["meta.version"]) != _STATE_VERSION:
            raise KvmemError(f"LayerStats state version {int(sd['meta.version'])} is not {_STATE_VERSION}")
        if meta != (self.d_mlp, self.k, int(self.gated), self.max_pos):
            raise KvmemError(f"LayerStats state with (d_mlp, k, gated, max_pos) {meta} does not fit this object")
        dev = self.device

        def get(name: str) -> torch.Tensor:
            return sd[name].to(dev).clone()

        def keys(value: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            return torch.where(index >= 0, encode(value, index), torch.full_like(index, EMPTY))

        self._top = keys(get("top.value"), get("top.index"))
        self._bot = keys(-get("bottom.value"), get("bottom.index"))
        self._doc_key, self._doc_id = keys(get("top_docs.value"), get("top_docs.index")), get("top_docs.doc")
        smp_index = get("sample.index")
        # the stored priority, not one recomputed from the index: stats whose token indices were
        # shifted (merging independent runs) keep the sample they drew
        high = get("sample.priority") - 2**31
        self._smp_key = torch.where(smp_index >= 0, encode_high(high, smp_index), torch.full_like(smp_index, EMPTY))
        self._smp_val = get("sample.value")
        for name in ("count_pos", "sum", "sumsq", "hist", "l0_hist", "l0_pos_sum", "l0_pos_count"):
            setattr(self, name, get(name))
        if self.gated:
            self.quadrant_count = get("quadrants.count")
            self._q_val = get("quadrants.value")
            self._q_key = keys(self._q_val.abs(), get("quadrants.index"))
        self.n = int(sd["n"])
        self._last_index = int(sd["meta.last_index"])
        ctx = {name[len("context."):]: t for name, t in sd.items() if name.startswith("context.")}
        self.context = ContextWindows.from_state_dict(ctx, device=dev) if ctx else None

    def shifted(self, d_tokens: int, d_docs: int) -> "LayerStats":
        """A copy with every token index moved by d_tokens and document id by d_docs (to merge an
        independent run after another); the random sample keeps the priorities it was drawn with."""
        sd = self.state_dict()
        for name, t in sd.items():
            if name.endswith(".index"):
                sd[name] = torch.where(t >= 0, t + d_tokens, t)
        sd["top_docs.doc"] = torch.where(sd["top_docs.doc"] >= 0, sd["top_docs.doc"] + d_docs, sd["top_docs.doc"])
        sd["meta.last_index"] = sd["meta.last_index"] + d_tokens
        return LayerStats.from_state_dict(sd, device=self.device)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], device="cpu") -> "LayerStats":
        """A new LayerStats on device restored from state_dict() output."""
        s = cls(int(sd["meta.d_mlp"]), int(sd["meta.k"]), bool(int(sd["meta.gated"])), int(sd["meta.max_pos"]),
                device=device)
        s.load_state_dict(sd)
        return s

    def __repr__(self) -> str:
        return (f"LayerStats(d_mlp={self.d_mlp}, k={self.k}, gated={self.gated}, max_pos={self.max_pos}, "
                f"n={self.n}, device={str(self.device)!r})")
