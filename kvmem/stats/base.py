"""The shape every statistic of a layer has (after baukit's ``runningstats``): a small class that owns its
state tensors, adds a batch, merges another instance of itself, and round-trips its state.

    class Stat:
        name        the key prefix of its state in a run file (``L{layer}.{name}.{key}``); set by the registry
        applies(spec) -> bool        classmethod: whether a layer of this spec keeps it (default: always)
        __init__(spec)               empty state for a layer (LayerSpec below)
        update(batch)                add one Batch (the torch path: any device; the reference)
        update_dense(batch)          the same with fixed shapes, no host synchronisation (the GPU path);
                                     default: update
        merge(other)                 add the state of the same statistic over a disjoint set of tokens
        shift(d_tokens, d_docs)      move every token index by d_tokens and document id by d_docs, in place
                                     (merging an independent run after another); default: nothing to move
        state_dict() / load_state_dict(sd)   flat tensors, exact: a restored stat continues bit-identically

A layer's statistics are a combination of them (kvmem.stats.layer.LayerStats, registered in
kvmem.stats.registry). A backend may update several components in one pass over the batch (the numba
kernel on CPU, kvmem.stats.fused); each component still owns its state, its meaning and its tests, and
``update`` is the path every backend is checked against (with brute force, tests/stats/stats_reference.py).

Axes: N tokens of the batch, d = d_mlp neurons, k slots per store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from kvmem.errors import KvmemError


@dataclass(frozen=True)
class LayerSpec:
    """What a layer's statistics are built for."""

    d_mlp: int  # neurons
    k: int = 20  # slots per top-k store
    gated: bool = False  # gate and up are passed with m (m = act(gate) * up)
    max_pos: int = 1024  # positions in a row (seq_len)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # ‖v_i‖ [d] float32: norm of each neuron's value vector (row i of W_out), the weight of |m_i| in what
    # the neuron writes; None: statistics that need it (kvmem.stats.mass) are not kept
    value_norm: torch.Tensor | None = field(default=None, compare=False, repr=False)
    # the gate's activation keeps the sign of its input: act(g)·g >= 0, and act(g) != 0 wherever g != 0 and
    # the product does not underflow (SiLU, GELU, GELU-tanh, ReLU; not e.g. a shifted or negated one). Then
    # wherever m != 0, (up > 0) == ((m > 0) == (gate > 0)), which lets the CPU pass (kvmem.stats.fused)
    # skip reading up. A run-time property of the model, not of the statistics (not in the state)
    sign_preserving_act: bool = False
    # mixture-of-experts layers (kvmem.stats.routing): routed experts (0: a dense layer) and expert_of [d]
    # int64, the expert of each flat neuron (routed e: e; shared expert s: -1 - s). Then the neuron
    # statistics count only the tokens routed to each neuron's expert (Batch.active, kvmem.stats.layer)
    n_experts: int = 0
    expert_of: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.d_mlp < 1 or self.k < 1 or self.max_pos < 1:
            raise KvmemError(f"LayerStats needs d_mlp, k, max_pos >= 1 (got {self.d_mlp}, {self.k}, {self.max_pos})")
        object.__setattr__(self, "device", torch.device(self.device))
        if self.value_norm is not None:
            vn = torch.as_tensor(self.value_norm).to(device=self.device, dtype=torch.float32).reshape(-1)
            if vn.numel() != self.d_mlp:
                raise KvmemError(f"value_norm has {vn.numel()} entries for d_mlp {self.d_mlp}")
            object.__setattr__(self, "value_norm", vn)
        if (self.n_experts > 0) != (self.expert_of is not None):
            raise KvmemError("an MoE layer's statistics need both n_experts >= 1 and expert_of")
        if self.expert_of is not None:
            eo = torch.as_tensor(self.expert_of).to(device=self.device, dtype=torch.int64).reshape(-1)
            if eo.numel() != self.d_mlp or bool((eo >= self.n_experts).any()):
                raise KvmemError(f"expert_of must map each of the {self.d_mlp} neurons to an expert below "
                                 f"n_experts {self.n_experts} (or a shared one, < 0)")
            object.__setattr__(self, "expert_of", eo)

    @property
    def moe(self) -> bool:
        """A mixture-of-experts layer: statistics relative to each expert's own tokens."""
        return self.n_experts > 0


@dataclass
class Batch:
    """One layer's batch, as every component sees it (all on the statistics' device).

    m [N, d] float32 contiguous; index [N] int64 global token index, strictly increasing; doc [N] int64
    global document id, non-decreasing; pos [N] int64 position in the model's input row; gate, up [N, d]
    (gated layers, else None). router: MoE layers' routing (kvmem.stats.routing.Router), else None; active
    [N, d] bool: MoE layers, whether the token is routed to the neuron's expert (m is 0 where not), else
    None; a component of an MoE layer counts a neuron only on its active tokens.
    first/last: index[0], index[-1]; monotone: every index exceeds every index
    seen before (ties with stored entries then lose on the index, so bounds may be strict).
    Sync-free updates (``update_dense``) get first = last = None and monotone False: nothing host-side.
    ``stats``: the LayerStats being updated (for components that read others', e.g. context windows)."""

    m: torch.Tensor
    index: torch.Tensor
    doc: torch.Tensor
    pos: torch.Tensor
    gate: torch.Tensor | None
    up: torch.Tensor | None
    first: int | None
    last: int | None
    monotone: bool
    stats: object = None
    paths: dict = field(default_factory=dict)  # code paths taken (diagnostics, tests)
    router: object = None  # kvmem.stats.routing.Router (MoE layers)
    active: torch.Tensor | None = None  # [N, d] bool (MoE layers): token routed to the neuron's expert

    @property
    def n(self) -> int:
        return self.m.shape[0]

    @cached_property
    def keys(self) -> torch.Tensor:
        """Store keys [N, d] int64 of (m, token index) (kvmem.stats.keys), shared by the sync-free updates."""
        from kvmem.stats.keys import encode

        return self.masked(encode(self.m, self.index[:, None]))

    def masked(self, keys: torch.Tensor) -> torch.Tensor:
        """Store keys [N, d] with EMPTY where the token is not active for the neuron (MoE layers: not routed
        to its expert), so that it never enters a store; unchanged for dense layers."""
        if self.active is None:
            return keys
        from kvmem.stats.keys import EMPTY

        return torch.where(self.active, keys, torch.full_like(keys, EMPTY))

    @cached_property
    def positives(self) -> torch.Tensor:
        """(l0 [N] int64: neurons with m > 0 per token, count [d] int64: tokens with m > 0 per neuron),
        shared by the components that need them; a backend that computed them may set them first."""
        from kvmem.stats.store import work_buffer

        n, d = self.m.shape
        posf = work_buffer("f32_a", (n, d), torch.float32, self.m.device)
        torch.gt(self.m, 0, out=posf)
        # float32 sums of 0/1 are exact integers below 2**24 in any order, so matrix-vector products do
        l0 = (posf @ torch.ones(d, device=self.m.device)).to(torch.int64)
        count = (torch.ones(n, device=self.m.device) @ posf).to(torch.int64)
        return l0, count


class Stat:
    """Base class of the components (see the module docstring)."""

    name: str = ""

    @classmethod
    def applies(cls, spec: LayerSpec) -> bool:
        return True

    def __init__(self, spec: LayerSpec):
        self.spec = spec

    def update(self, batch: Batch) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def update_dense(self, batch: Batch) -> None:
        """update with fixed shapes and no host synchronisation (LayerStats(sync_free=True), the default on
        a GPU); same state. It assigns new state tensors rather than writing into the old ones, so that an
        update failing half way (out of memory) can be undone by restoring the old references. Default:
        ``update``, for components whose update already is both."""
        self.update(batch)

    def merge(self, other: "Stat") -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def shift(self, d_tokens: int, d_docs: int) -> None:
        """Nothing to move by default (counts, sums)."""

    def state_dict(self) -> dict[str, torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def _get(self, sd: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        """sd[name] on this stat's device, a private copy; a missing name is a format error."""
        if name not in sd:
            raise KvmemError(f"statistic {self.name!r}: state has no {name!r}")
        return sd[name].to(self.spec.device).clone()


class Counters(Stat):
    """A stat whose whole state is a few tensors that add on merge (counts, sums, histograms).
    Subclasses list them in ``FIELDS`` {name: (shape(spec), dtype)}."""

    FIELDS: dict = {}

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        for f, (shape, dtype) in self.FIELDS.items():
            setattr(self, f, torch.zeros(shape(spec), dtype=dtype, device=spec.device))

    def merge(self, other: "Counters") -> None:
        for f in self.FIELDS:
            getattr(self, f).add_(getattr(other, f).to(self.spec.device))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f: getattr(self, f) for f in self.FIELDS}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        for f, (shape, dtype) in self.FIELDS.items():
            t = self._get(sd, f)
            if tuple(t.shape) != tuple(torch.Size(shape(self.spec))) or t.dtype != dtype:
                raise KvmemError(f"statistic {self.name!r}: {f} is {tuple(t.shape)} {t.dtype}, expected "
                                 f"{tuple(torch.Size(shape(self.spec)))} {dtype}")
            setattr(self, f, t)
