"""LayerStats: the statistics of one FFN layer's coefficients m [N, d_mlp], a combination of components.

Updated once per layer per batch while a corpus streams through the model (``kvmem profile``); shards merge
exactly (``merge``) and the state round-trips through safetensors (``state_dict``). The components are the
ones registered in kvmem.stats.registry (each a kvmem.stats.base.Stat: its own state, update, merge and
read-outs), plus optional context windows of the report's examples (kvmem.stats.context), updated last
because they read the others' stores:

  top, bottom, top_docs   k largest / smallest m, k documents by their max m (kvmem.stats.topk)
  sample                  uniform sample of k tokens with m > 0 (kvmem.stats.sample)
  moments                 float64 sum and sum of squares (kvmem.stats.moments)
  hist                    [d, 197] counts over the fixed bins HIST_EDGES (kvmem.stats.hist)
  counts                  m > 0 per neuron and per token (L0), by position (kvmem.stats.counts)
  quadrants               gated layers: (gate, up) sign combinations and an example each (kvmem.stats.quadrants)
  context                 optional: m over the context windows of the shown examples (kvmem.stats.context)

Ties everywhere go to (value descending, then lower token index); see kvmem.stats.keys. Same input stream
and batch boundaries give bit-identical state.

Backends: on CPU one fused numba pass over the batch updates the components it knows (kvmem.stats.fused);
everything else, and every component on other devices or with ``backend="torch"``, takes the component's
own ``update``. The tests run every check on both.

Sync-free updates (``sync_free``; on by default on any device but the CPU, the GPU path): every component
takes its ``update_dense`` (fixed shapes: topk along the tokens and the slots, scatter amax, index_add_;
kvmem.stats.base) and the context windows their slot-aligned form (kvmem.stats.context_fixed), so an update
only queues kernels: no value is read back to the host. The input checks then run on the device into a
flag that ``check()`` raises at the next batch boundary that reads the state (``state_dict``, ``merge``,
the read-outs the profiler takes at checkpoints and at the end); positions outside [0, max_pos) are clamped
until then. The state is the same, bit for bit, as the other paths'. ``compile=True`` (which implies
sync_free unless that is set) runs each component's update_dense through torch.compile (one compiled
function per component class, shared by all layers; the first batches pay the compilation: about 40 s for
all components on 2 CPU cores; the same state as eager, tested on CPU).

Mixture-of-experts layers (``n_experts``, ``expert_of``: the expert of each flat neuron, kvmem.stats.base.
LayerSpec): every update also takes the batch's routing (kvmem.stats.routing.Router), kept by the
``routing`` component, and the neuron statistics are relative to each expert's own tokens: m is set to 0
where the token is not routed to the neuron's expert (the contract's raw m is 0 there already), the stores
see those pairs as empty keys, the histogram leaves them out, and the rates, means and the neuron table's
``n`` divide by ``neuron_n()``, the tokens routed to the expert. No fused CPU pass: the components' torch
updates (or their sync-free ones) honour the mask. Token-level figures (L0, mass-L0) count every token of the
layer. The sync-free path checks the routing's expert indices on the device like its other input checks.

state_dict(): ``meta.{version,d_mlp,k,gated,max_pos,last_index,n}`` (MoE layers: and ``meta.n_experts``) and
``{component}.{key}`` for each component. Naming contract: a tensor whose name ends in ``.index`` holds global token indices (-1 = none),
``top_docs.doc`` global document ids (-1 = none); ``shifted`` moves exactly those. Format 1 (kvmem 0.2,
unprefixed moments and counts) is read and converted.
"""

from __future__ import annotations

import torch

from kvmem.errors import KvmemError
from kvmem.stats import fused, readout
from kvmem.stats.base import Batch, LayerSpec
from kvmem.stats.context import ContextWindows
from kvmem.stats.keys import MAX_TOKEN_INDEX
from kvmem.stats.quadrants import QuadrantSlots as Quadrants
from kvmem.stats.registry import COMPONENTS, build, component_class
from kvmem.stats.topk import Slots

STATE_VERSION = 2
BACKENDS = ("auto", "torch")
# format 1 names -> format 2 names
_V1_NAMES = {"n": "meta.n", "count_pos": "counts.pos", "sum": "moments.sum", "sumsq": "moments.sumsq",
             "hist": "hist.count", "l0_hist": "counts.l0_hist", "l0_pos_sum": "counts.l0_pos_sum",
             "l0_pos_count": "counts.l0_pos_count"}
OPTIONAL = ("mass",)  # components a state may lack (written by an earlier kvmem): their read-outs are None

__all__ = ["LayerStats", "Quadrants", "Slots", "STATE_VERSION"]


_COMPILED: dict = {}


def compiled(cls):
    """torch.compile of a component class's update_dense (cached: one per class, shared by all layers)."""
    fn = _COMPILED.get(cls)
    if fn is None:
        fn = _COMPILED[cls] = torch.compile(cls.update_dense)
    return fn


class LayerStats:
    """Streaming per-neuron statistics of one FFN layer (see the module docstring)."""

    def __init__(self, d_mlp: int, k: int = 20, gated: bool = False, max_pos: int = 1024, device="cpu",
                 backend: str = "auto", context: ContextWindows | None = None,
                 value_norm: torch.Tensor | None = None, components=None, sign_preserving_act: bool = False,
                 sync_free: bool | None = None, compile: bool = False, n_experts: int = 0,
                 expert_of: torch.Tensor | None = None):
        if backend not in BACKENDS:
            raise KvmemError(f"LayerStats backend must be one of {', '.join(BACKENDS)} (got {backend!r})")
        # "auto": the fused one-pass kernel on CPU (kvmem.stats.fused), torch elsewhere; "torch": torch only
        self.backend = backend
        # sign_preserving_act: see LayerSpec (m = act(gate) * up with act keeping gate's sign)
        # n_experts, expert_of: a mixture-of-experts layer (kvmem.stats.base.LayerSpec; module docstring)
        self.spec = LayerSpec(int(d_mlp), int(k), bool(gated), int(max_pos), torch.device(device), value_norm,
                              bool(sign_preserving_act), int(n_experts), expert_of)
        if self.spec.moe and self.spec.gated:
            raise KvmemError("MoE layers' statistics take m only (gated=False): gate and up are not kept for experts")
        self.parts = build(self.spec, components)
        self.n = 0
        self._last_index = -1  # largest token index seen (decides strict vs widened thresholds)
        if context is not None and (context.d_mlp != self.d_mlp or context.device != self.device):
            raise KvmemError(f"context windows for d_mlp {context.d_mlp} on {context.device} do not fit this layer")
        self.context = context
        self._paths: dict = {}  # code paths taken by the last update (diagnostics, tests)
        # no host synchronisation in update (module docstring); None: on unless the device is the CPU
        self.sync_free = (self.spec.device.type != "cpu" or compile) if sync_free is None else bool(sync_free)
        self._bad: torch.Tensor | None = None  # [4] bool: invalid token_index / doc_id / pos_in_seq / router idx seen
        self.compile = bool(compile)  # torch.compile the sync-free component updates (module docstring)

    @property
    def _last_index(self) -> int:
        """Largest token index seen (-1: none); read back from the device after sync-free updates."""
        v = self._last
        return v if isinstance(v, int) else int(v)

    @_last_index.setter
    def _last_index(self, v) -> None:
        self._last = v if isinstance(v, torch.Tensor) else int(v)

    def check(self) -> None:
        """Raise the ValueError update would have raised for the first invalid input a sync-free update saw
        (the check waits for the device: call it at batch boundaries); then clear the flag."""
        if self._bad is None:
            return
        bad, self._bad = self._bad.tolist(), None
        if bad[0]:
            raise ValueError(f"token_index must be strictly increasing within [0, {MAX_TOKEN_INDEX}]")
        if bad[1]:
            raise ValueError("doc_id must be non-negative and non-decreasing")
        if bad[2]:
            raise ValueError(f"pos_in_seq must lie in [0, {self.max_pos})")
        if bad[3]:
            raise KvmemError(f"router idx must lie in [0, {self.spec.n_experts}) and name each chosen expert once "
                             "per token")

    d_mlp = property(lambda self: self.spec.d_mlp)
    k = property(lambda self: self.spec.k)
    gated = property(lambda self: self.spec.gated)
    max_pos = property(lambda self: self.spec.max_pos)
    device = property(lambda self: self.spec.device)

    # ------------------------------------------------------------------ update
    def update(self, coef, token_index, doc_id, pos_in_seq, gate=None, up=None, router=None) -> None:
        """Add one batch. coef [N, d_mlp] (any float dtype; computed in float32), token_index [N] int64
        (global, strictly increasing, < 2**32 - 1), doc_id [N] int64 (>= 0, non-decreasing), pos_in_seq [N]
        int64 (< max_pos); gated layers also gate, up [N, d_mlp] (m = act(gate) * up). With context windows,
        every token of a model row that enters the statistics comes in the same update (kvmem.stats.context).
        MoE layers (and only they) also take router, a kvmem.stats.routing.Router of the same N tokens."""
        d, dev = self.d_mlp, self.device
        if (router is None) == self.spec.moe:
            raise ValueError("router is required for the statistics of MoE layers and only for them")
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
        if self.sync_free:
            return self._update_fixed(m, ti, doc, pos, gate, up, router)
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
        if self.gated:
            gate, up = gate.to(dev), up.to(dev)
        batch = Batch(m, ti, doc, pos, gate, up, first, last, first > self._last_index, stats=self)
        if self.spec.moe:  # the components' torch updates honour Batch.active (module docstring)
            from kvmem.stats.routing import check, route

            check(router, self.spec.n_experts, n)
            route(batch, router, self.spec)
            done = ()
            batch.paths["dense"] = "moe"
        else:
            done = fused.update(self.parts, batch) if self._fused(m) else ()
            batch.paths["dense"] = "fused" if done else "torch"
        for name, part in self.parts.items():
            if name not in done:
                part.update(batch)
        self.n += n
        self._last_index = max(self._last_index, last)
        if self.context is not None:  # a row's counted tokens come in one batch (kvmem.stats.context)
            self.context.update(self, batch.m, ti, pos)
        self._paths = batch.paths

    def _update_fixed(self, m, ti, doc, pos, gate, up, router=None) -> None:
        """update without host synchronisation (module docstring): checks into self._bad, dense updates.
        All or nothing: the components assign new state tensors (Stat.update_dense), so on any exception
        (out of memory half way) the old references are put back and the batch can be retried."""
        saved = ([dict(vars(p)) for p in self.parts.values()], self.n, self._last, self._bad,
                 None if self.context is None else dict(vars(self.context)))
        try:
            self._update_fixed_parts(m, ti, doc, pos, gate, up, router)
        except BaseException:
            for p, state in zip(self.parts.values(), saved[0]):
                vars(p).clear()
                vars(p).update(state)
            self.n, self._last, self._bad = saved[1:4]
            if self.context is not None:
                vars(self.context).clear()
                vars(self.context).update(saved[4])
            raise

    def _bad_router(self, router) -> torch.Tensor:
        """MoE layers: whether the routing's expert indices are out of range or repeated within a token (a
        device flag, no synchronisation); False for dense layers."""
        if not self.spec.moe:
            return torch.zeros((), dtype=torch.bool, device=self.device)
        from kvmem.stats.routing import one_hot

        idx = router.idx.to(device=self.device, dtype=torch.int64)
        out = ((idx < 0) | (idx >= self.spec.n_experts)).any()
        hot = one_hot(idx.clamp(0, self.spec.n_experts - 1), self.spec.n_experts)
        return out | (hot.sum(1) != idx.shape[1]).any()

    def _update_fixed_parts(self, m, ti, doc, pos, gate, up, router=None) -> None:
        bad = torch.stack([(ti[0] < 0) | (ti[-1] > MAX_TOKEN_INDEX) | ~(ti[1:] > ti[:-1]).all(),
                           (doc[0] < 0) | ~(doc[1:] >= doc[:-1]).all(),
                           (pos.min() < 0) | (pos.max() >= self.max_pos),
                           self._bad_router(router)])
        self._bad = bad if self._bad is None else self._bad | bad
        pos = pos.clamp(0, self.max_pos - 1)
        if self.gated:
            gate, up = gate.to(self.device), up.to(self.device)
        batch = Batch(m, ti, doc, pos, gate, up, None, None, False, stats=self)
        if self.spec.moe:
            from kvmem.stats.routing import route

            route(batch, router, self.spec)
            m = batch.m
        for part in self.parts.values():
            if self.compile:
                compiled(type(part))(part, batch)
            else:
                part.update_dense(batch)
        batch.paths["dense"] = "compiled" if self.compile else "fixed"
        self.n += m.shape[0]
        last = self._last if isinstance(self._last, torch.Tensor) else torch.tensor(self._last, device=self.device)
        self._last = torch.maximum(last, ti[-1])
        if self.context is not None:
            self.context.update(self, m, ti, pos)
        self._paths = batch.paths

    def _fused(self, m: torch.Tensor) -> bool:
        """Whether this update takes the fused CPU pass (kvmem.stats.fused)."""
        return self.backend != "torch" and m.device.type == "cpu" and fused.available

    # ------------------------------------------------------------------ merge
    def merge(self, other: "LayerStats") -> "LayerStats":
        """Add the statistics of other (a disjoint set of tokens) in place; returns self. Exact for the
        stores, counts and histograms (documents split across the two are deduplicated by doc id). A
        component kept by only one side (a run of an older kvmem) is dropped: the merge keeps what both have."""
        a = (self.d_mlp, self.k, self.gated, self.max_pos)
        b = (other.d_mlp, other.k, other.gated, other.max_pos)
        self.check()
        other.check()
        if a != b:
            raise KvmemError(f"cannot merge LayerStats with (d_mlp, k, gated, max_pos) {b} into {a}")
        if self.spec.moe != other.spec.moe:
            raise KvmemError("cannot merge the statistics of an MoE layer with those of a dense one")
        if self.spec.moe and (self.spec.n_experts != other.spec.n_experts or
                              not torch.equal(self.spec.expert_of, other.spec.expert_of.to(self.device))):
            raise KvmemError("cannot merge routing statistics of layers with different experts")
        for name in list(self.parts):
            if name in other.parts:
                self.parts[name].merge(other.parts[name])
            else:
                del self.parts[name]
        self.n += other.n
        self._last_index = max(self._last_index, other._last_index)
        if self.context is not None and other.context is not None:
            self.context.merge(other.context, stats=self)
        else:  # one side kept no windows (a run of an older kvmem): the merged run keeps none either
            self.context = None
        return self

    # ------------------------------------------------------------------ read-outs
    def component(self, name: str):
        """The component registered as ``name`` (KeyError if this layer does not keep it)."""
        return self.parts[name]

    top = property(lambda self: self.parts["top"].slots(), doc="Slots: the k largest m per neuron")
    bottom = property(lambda self: self.parts["bottom"].slots(), doc="Slots: the k smallest m (most negative first)")
    top_docs = property(lambda self: self.parts["top_docs"].slots(), doc="Slots (+ doc): the k best documents")
    sample = property(lambda self: self.parts["sample"].slots(), doc="Slots: uniform sample of tokens with m > 0")
    max = property(lambda self: self.parts["top"].best(), doc="Largest m per neuron, float32 [d] (NaN before any)")
    min = property(lambda self: self.parts["bottom"].best(), doc="Smallest m per neuron, float32 [d] (NaN before any)")
    sum = property(lambda self: self.parts["moments"].sum)
    sumsq = property(lambda self: self.parts["moments"].sumsq)
    hist = property(lambda self: self.parts["hist"].count, doc="[d, N_BINS] counts over HIST_EDGES")
    count_pos = property(lambda self: self.parts["counts"].pos, doc="tokens with m > 0 per neuron [d]")
    l0_hist = property(lambda self: self.parts["counts"].l0_hist)
    l0_pos_sum = property(lambda self: self.parts["counts"].l0_pos_sum)
    l0_pos_count = property(lambda self: self.parts["counts"].l0_pos_count)

    @property
    def quadrants(self) -> Quadrants | None:
        """Gated layers: sign-combination counts and an example per quadrant; None otherwise."""
        q = self.parts.get("quadrants")
        return q.slots() if q is not None else None

    @property
    def quadrant_count(self) -> torch.Tensor:
        return self.parts["quadrants"].count

    @property
    def mass(self):
        """kvmem.stats.mass.MassCounts (neurons carrying 50% / 90% of Σ|m|·‖v‖ per token), or None when
        this layer does not keep it (no value norms given, or a run of an older kvmem)."""
        return self.parts.get("mass")

    moe = property(lambda self: self.spec.moe, doc="An MoE layer: neuron statistics relative to each expert's tokens")
    routing = property(lambda self: self.parts.get("routing"),
                       doc="kvmem.stats.routing.Routing of an MoE layer (load, weights, entropy, co-selection), else None")
    neuron_n = readout.neuron_n
    mean = readout.mean
    std = readout.std
    firing_rate = readout.firing_rate
    count_above = readout.count_above
    count_below = readout.count_below
    to_frame = readout.to_frame

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat, contiguous tensors (safetensors-ready after .cpu()); exact: load_state_dict restores
        a LayerStats that continues bit-identically."""
        def i64(x: int) -> torch.Tensor:
            return torch.tensor(int(x), dtype=torch.int64, device=self.device)

        self.check()
        sd = {"meta.version": i64(STATE_VERSION), "meta.d_mlp": i64(self.d_mlp), "meta.k": i64(self.k),
              "meta.gated": i64(self.gated), "meta.max_pos": i64(self.max_pos),
              "meta.last_index": i64(self._last_index), "meta.n": i64(self.n)}
        if self.spec.moe:
            sd["meta.n_experts"] = i64(self.spec.n_experts)
        for name, part in self.parts.items():
            sd.update({f"{name}.{key}": t for key, t in part.state_dict().items()})
        if self.context is not None:
            sd.update({f"context.{name}": t for name, t in self.context.state_dict().items()})
        return {name: t.detach().clone().contiguous() for name, t in sd.items()}

    @staticmethod
    def upgrade(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A state of any readable format as format 2 (format 1: moments and counts without prefixes)."""
        version = int(sd["meta.version"])
        if version == STATE_VERSION:
            return sd
        if version != 1:
            raise KvmemError(f"LayerStats state version {version} is not {STATE_VERSION}")
        out = {_V1_NAMES.get(name, name): t for name, t in sd.items()}
        out["meta.version"] = torch.tensor(STATE_VERSION)
        return out

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Exact restore from state_dict() output (config must match this object's). The components are
        the ones the state holds (the registered ones this layer applies, possibly without OPTIONAL ones)."""
        sd = self.upgrade(sd)
        meta = tuple(int(sd[f"meta.{x}"]) for x in ("d_mlp", "k", "gated", "max_pos"))
        if meta != (self.d_mlp, self.k, int(self.gated), self.max_pos):
            raise KvmemError(f"LayerStats state with (d_mlp, k, gated, max_pos) {meta} does not fit this object")
        prefixes = {name.split(".", 1)[0] for name in sd}
        unknown = prefixes - set(COMPONENTS) - {"meta", "context"}
        if unknown:
            raise KvmemError(f"LayerStats state holds statistics this kvmem does not know: {', '.join(sorted(unknown))}")
        spec = self.spec
        if "mass" in prefixes and "mass.value_norm" in sd:
            spec = LayerSpec(spec.d_mlp, spec.k, spec.gated, spec.max_pos, spec.device, sd["mass.value_norm"],
                             spec.sign_preserving_act, spec.n_experts, spec.expert_of)
            self.spec = spec
        if ("routing" in prefixes) != ("meta.n_experts" in sd):
            raise KvmemError("LayerStats state: routing statistics and meta.n_experts come together (MoE layers)")
        if "meta.n_experts" in sd:  # an MoE layer: the experts are the state's
            spec = LayerSpec(spec.d_mlp, spec.k, spec.gated, spec.max_pos, spec.device, spec.value_norm,
                             spec.sign_preserving_act, int(sd["meta.n_experts"]), sd["routing.expert"])
            self.spec = spec
        self.parts = build(spec, [name for name in COMPONENTS if name in prefixes])
        for name, part in self.parts.items():
            part.load_state_dict({key[len(name) + 1:]: t for key, t in sd.items() if key.startswith(name + ".")})
        self.n = int(sd["meta.n"])
        self._last_index = int(sd["meta.last_index"])
        ctx = {name[len("context."):]: t for name, t in sd.items() if name.startswith("context.")}
        self.context = ContextWindows.from_state_dict(ctx, device=self.device) if ctx else None

    def missing(self) -> list[str]:
        """The registered statistics a layer like this one keeps but this object lacks (a state written with
        fewer components), except OPTIONAL ones; a run's reader refuses a run whose layers miss any."""
        want = [n for n, c in ((n, component_class(n)) for n in COMPONENTS) if c.applies(self.spec)]
        return [n for n in want if n not in self.parts and n not in OPTIONAL]

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
                device=device, components=())
        s.load_state_dict(sd)
        return s

    def __repr__(self) -> str:
        return (f"LayerStats(d_mlp={self.d_mlp}, k={self.k}, gated={self.gated}, max_pos={self.max_pos}, "
                f"n={self.n}, device={str(self.device)!r}, components={list(self.parts)})")
