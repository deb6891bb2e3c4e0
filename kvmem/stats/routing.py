"""Routing statistics of a mixture-of-experts layer: per routed expert its load, mean routing weight and
co-selection with the others, and per token the entropy of the router.

Axes: N tokens of the batch, E routed experts, k experts chosen per token, d = d_mlp flat neurons (the
layer's experts side by side: kvmem.models' MoELayout).

Input (``Batch.router``, a ``Router``, at the tokens that enter the statistics):
  logits  [N, E] float  the router logits (hook point ``moe.router``, after any edit)
  idx     [N, k] int64  the experts the family's rule chose for each token (distinct within a token)
  weight  [N, k] float  their routing weights, what multiplies each chosen expert's output (after the
                        family's renormalisation and scaling: softmax/top-k/renormalise, DeepSeek-V3's
                        routed_scaling_factor, GPT-OSS's top-k-then-softmax)

State (added on merge; int64 counts, float64 sums):
  n              []      tokens
  load           [E]     tokens routed to each expert
  weight_sum     [E]     Σ of the expert's routing weight over its tokens; ``weight_sumsq`` its squares
  entropy_sum    []      Σ over tokens of H(softmax(logits)) in nats; ``entropy_sumsq`` its squares
  sel_entropy_sum []     Σ over tokens of H(w / Σ w) over the k chosen weights, nats; ``sel_entropy_sumsq``
  cosel          [E, E]  tokens routed to both experts i and j (the diagonal is ``load``)
  expert         [d]     constant: the expert of each flat neuron (routed e: e; shared expert s: -1 - s);
                         two states merge only with the same map

Which distributions the entropies are of: ``entropy`` is the entropy of softmax over all E router logits,
for every family (also where the family scores experts otherwise, DeepSeek-V3's sigmoid, GPT-OSS's
softmax after top-k): the router's preference before selection, at most log E. ``sel_entropy`` is the
entropy of the k routing weights renormalised to sum 1 (what mixes the chosen experts), at most log k.

Read-outs: ``table(level)`` one row per expert with the load's share of tokens, its n and a Wilson
interval (kvmem.analysis.ci.wilson; tokens taken as independent, which tokens of one document are not, so
the interval is narrower than a document bootstrap would give), ``summary()`` the layer's figures,
``neuron_n()`` [d] the tokens routed to each neuron's expert (the denominators of the neuron statistics
of MoE layers: kvmem.stats.layer).

Both update paths are fixed-shape and sync-free (``update`` only adds the input checks): the chosen
experts become a one-hot [N, E] (scatter, distinct per token, so deterministic), counts and weights are
summed by row-vector products (float32 sums of 0/1 are exact below 2**24 tokens per update; weights in
float64), co-selection is onehotᵀ·onehot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch

from kvmem.errors import KvmemError
from kvmem.stats.base import Batch, Counters, LayerSpec

LEVEL = 0.95


@dataclass
class Router:
    """One batch's routing at the counted tokens: logits [N, E], idx [N, k] int64, weight [N, k]."""

    logits: torch.Tensor
    idx: torch.Tensor
    weight: torch.Tensor

    def flat(self, sel: torch.Tensor | None = None) -> "Router":
        """[batch, pos, ...] tensors as [batch·pos, ...], then the rows ``sel`` [N] (None: all)."""
        out = [t.reshape(-1, t.shape[-1]) for t in (self.logits, self.idx, self.weight)]
        if sel is not None:
            out = [t.index_select(0, sel) for t in out]
        return Router(*out)


def one_hot(idx: torch.Tensor, n_experts: int, dtype=torch.float32) -> torch.Tensor:
    """[N, E] with 1 where expert e is among a token's chosen idx [N, k] (distinct within a token)."""
    out = torch.zeros(idx.shape[0], n_experts, dtype=dtype, device=idx.device)
    return out.scatter_(1, idx, torch.ones(idx.shape, dtype=dtype, device=idx.device))


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H(softmax(logits)) per token, nats, float64 [N] (0·log 0 = 0, so -inf logits count as absent)."""
    p = torch.softmax(logits.to(torch.float64), dim=-1)
    return torch.special.entr(p).sum(-1)


def selected_entropy(weight: torch.Tensor) -> torch.Tensor:
    """H(w / Σ w) over the chosen experts' weights [N, k], nats, float64 [N] (0 where Σ w is 0)."""
    w = weight.to(torch.float64)
    s = w.sum(-1, keepdim=True)
    q = torch.where(s > 0, w / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(w))
    return torch.special.entr(q).sum(-1)


class Routing(Counters):
    """The component (see the module docstring); kept for layers whose spec has routed experts."""

    FIELDS = {
        "n": (lambda s: (), torch.int64),
        "load": (lambda s: (s.n_experts,), torch.int64),
        "weight_sum": (lambda s: (s.n_experts,), torch.float64),
        "weight_sumsq": (lambda s: (s.n_experts,), torch.float64),
        "entropy_sum": (lambda s: (), torch.float64),
        "entropy_sumsq": (lambda s: (), torch.float64),
        "sel_entropy_sum": (lambda s: (), torch.float64),
        "sel_entropy_sumsq": (lambda s: (), torch.float64),
        "cosel": (lambda s: (s.n_experts, s.n_experts), torch.int64),
    }

    @classmethod
    def applies(cls, spec: LayerSpec) -> bool:
        return spec.n_experts > 0

    def __init__(self, spec: LayerSpec):
        if spec.n_experts < 1 or spec.expert_of is None:
            raise KvmemError("routing statistics need a layer spec with n_experts >= 1 and expert_of")
        super().__init__(spec)
        self.expert = spec.expert_of.clone()

    @property
    def n_experts(self) -> int:
        return self.spec.n_experts

    # ------------------------------------------------------------------ update
    def update(self, batch: Batch) -> None:
        """update_dense after checking the input (this reads values back: not the sync-free path)."""
        r = batch.router
        check(r, self.n_experts, batch.n)
        self.update_dense(batch)

    def update_dense(self, batch: Batch) -> None:
        """Fixed shapes, no host synchronisation; assigns new state tensors (a failed update leaves the
        old ones: kvmem.stats.layer)."""
        r = batch.router
        if r is None:
            raise KvmemError("routing statistics need the batch's router logits, choices and weights")
        E, dev = self.n_experts, self.spec.device
        idx = r.idx.to(device=dev, dtype=torch.int64)
        n = idx.shape[0]
        hot = one_hot(idx, E)  # [N, E] float32
        ones32 = torch.ones(1, n, device=dev)
        ones64 = torch.ones(1, n, dtype=torch.float64, device=dev)
        w = torch.zeros(n, E, dtype=torch.float64, device=dev).scatter_(1, idx, r.weight.to(dev, torch.float64))
        h = token_entropy(r.logits.to(dev)).reshape(1, n)
        hs = selected_entropy(r.weight.to(dev)).reshape(1, n)
        self.n = self.n + n
        self.load = self.load + (ones32 @ hot)[0].to(torch.int64)
        self.weight_sum = self.weight_sum + (ones64 @ w)[0]
        self.weight_sumsq = self.weight_sumsq + (ones64 @ (w * w))[0]
        self.entropy_sum = self.entropy_sum + (h @ ones64.T)[0, 0]
        self.entropy_sumsq = self.entropy_sumsq + ((h * h) @ ones64.T)[0, 0]
        self.sel_entropy_sum = self.sel_entropy_sum + (hs @ ones64.T)[0, 0]
        self.sel_entropy_sumsq = self.sel_entropy_sumsq + ((hs * hs) @ ones64.T)[0, 0]
        self.cosel = self.cosel + (hot.T @ hot).to(torch.int64)
        batch.paths[self.name or "routing"] = "fixed"

    # ------------------------------------------------------------------ merge / state
    def merge(self, other: "Routing") -> None:
        if other.n_experts != self.n_experts or not torch.equal(other.expert.to(self.expert.device), self.expert):
            raise KvmemError("cannot merge routing statistics of layers with different experts")
        super().merge(other)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return super().state_dict() | {"expert": self.expert}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        expert = self._get(sd, "expert")
        if tuple(expert.shape) != (self.spec.d_mlp,) or not torch.equal(expert, self.expert.to(expert.device)):
            raise KvmemError(f"statistic {self.name!r}: the state's expert map does not fit this layer")
        super().load_state_dict(sd)

    # ------------------------------------------------------------------ read-outs
    def neuron_n(self) -> torch.Tensor:
        """Tokens routed to each flat neuron's expert, int64 [d] (shared experts: every token)."""
        e = self.expert
        return torch.where(e >= 0, self.load[e.clamp(min=0)], self.n.expand(e.shape))

    def table(self, level: float = LEVEL) -> pd.DataFrame:
        """One row per routed expert: expert, n (tokens of the layer), load (tokens routed to it), share =
        load / n with its Wilson interval share_lo/share_hi at ``level``, slot_share = load / Σ load (share of
        the N·k token-slots), uniform = k / E (the share if every expert had equal load), mean_weight and
        std_weight (population) of its routing weight over its tokens (NaN: no token)."""
        from kvmem.analysis.ci import wilson

        n = int(self.n)
        load = self.load.cpu()
        total = int(load.sum())
        ws, wq = self.weight_sum.cpu(), self.weight_sumsq.cpu()
        rows = []
        for e in range(self.n_experts):
            c = int(load[e])
            lo, hi = wilson(c, n, level)
            mean = float(ws[e]) / c if c else math.nan
            var = float(wq[e]) / c - mean * mean if c else math.nan
            rows.append({"expert": e, "n": n, "load": c, "share": c / n if n else math.nan, "share_lo": lo,
                         "share_hi": hi, "slot_share": c / total if total else math.nan,
                         "uniform": total / n / self.n_experts if n else math.nan,
                         "mean_weight": mean, "std_weight": math.sqrt(max(var, 0.0)) if c else math.nan})
        return pd.DataFrame(rows)

    def summary(self) -> dict:
        """n, n_experts, top_k (mean experts per token = Σ load / n), the two entropies' mean and population
        std (nats) and their maxima log E and log k."""
        n = int(self.n)
        k = int(self.load.sum()) / n if n else math.nan

        def moments(s, q):
            if not n:
                return math.nan, math.nan
            mu = float(s) / n
            return mu, math.sqrt(max(float(q) / n - mu * mu, 0.0))

        h, hstd = moments(self.entropy_sum, self.entropy_sumsq)
        sh, shstd = moments(self.sel_entropy_sum, self.sel_entropy_sumsq)
        return {"n": n, "n_experts": self.n_experts, "top_k": k, "entropy_mean": h, "entropy_std": hstd,
                "entropy_max": math.log(self.n_experts), "sel_entropy_mean": sh, "sel_entropy_std": shstd,
                "sel_entropy_max": math.log(k) if n and k > 0 else math.nan}


def route(batch: Batch, router: Router, spec: LayerSpec) -> None:
    """An MoE layer's batch (kvmem.stats.layer): its routing moved to the statistics' device, its active
    mask [N, d] (token routed to the neuron's expert; shared experts: every token) and m set to 0 where not
    active. Fixed shapes, no host synchronisation."""
    dev, n_e = spec.device, spec.n_experts
    idx = router.idx.to(device=dev, dtype=torch.int64).clamp(0, n_e - 1)  # out of range: flagged (LayerStats.check)
    router = Router(router.logits.to(dev), idx, router.weight.to(dev))
    hot = one_hot(router.idx, n_e + 1, dtype=torch.bool)  # column n_e: the shared experts, always on
    hot[:, n_e] = True
    col = torch.where(spec.expert_of >= 0, spec.expert_of, n_e)
    batch.router, batch.active = router, hot.index_select(1, col)
    batch.m = batch.m.masked_fill(~batch.active, 0.0)


def check(r: Router | None, n_experts: int, n: int) -> None:
    """The checks of a Router for N = n tokens (reads values back; KvmemError naming what is wrong)."""
    if r is None:
        raise KvmemError("routing statistics need the batch's router logits, choices and weights")
    if r.logits.dim() != 2 or tuple(r.logits.shape) != (n, n_experts):
        raise KvmemError(f"router logits must be [N, {n_experts}] for N = {n}, got {tuple(r.logits.shape)}")
    if r.idx.dim() != 2 or r.idx.shape[0] != n or tuple(r.weight.shape) != tuple(r.idx.shape):
        raise KvmemError(f"router idx and weight must both be [N, k], got {tuple(r.idx.shape)}, {tuple(r.weight.shape)}")
    if r.idx.dtype.is_floating_point:
        raise KvmemError("router idx must be an integer tensor")
    if n and (int(r.idx.min()) < 0 or int(r.idx.max()) >= n_experts):
        raise KvmemError(f"router idx must lie in [0, {n_experts})")
    if n and not bool((one_hot(r.idx.long(), n_experts).sum(1) == r.idx.shape[1]).all()):
        raise KvmemError("router idx must name each chosen expert once per token")
