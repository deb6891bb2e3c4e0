"""Mixture-of-experts layers seen as one flat FFN whose neurons are all the experts' neurons.

Axes: N tokens (batch·pos flattened inside), E routed experts, k = top_k, I = d_expert, F = d_mlp flat.

Flat neuron index (``MoELayout``): routed expert e, neuron i -> e·I + i; shared expert s, neuron i ->
E·I + s·d_shared + i. ``W_in`` / ``W_gate`` [d_model, F] and ``W_out`` [F, d_model] stack the experts'
up, gate and down projections in that order (materialised once, cached until a weight changes).

Two coefficients per expert neuron and token, both [batch, pos, F], zero where the token is not routed:
  raw m  the expert's own activation, the input of that expert's down projection (``raw_coefficients``;
         hook point ``moe.expert.coef``); GPT-OSS: (clamp(up) + 1)·glu(clamp(gate)) with its biases;
  c = w·m  w the token's routing weight of that expert (``route``), for a Qwen2-MoE shared expert
         sigmoid(shared_expert_gate(x)), for other shared experts 1 (``coefficients``; hook ``ffn.coef``).
The block output is ``output(c, gates)`` = Σ_e c_e·W_down_e + Σ_e gates_e·b_down_e (the second term only
where experts have biases, GPT-OSS: pass the dense routing weights ``gates`` [.., E] there), exactly what
transformers computes up to float summation order.

``recompute`` runs the hook points of one MoE block from its input (kvmem.hooks calls it from a forward
hook on the block): ffn.x -> moe.router (logits [.., E]) -> routing -> moe.expert.coef (m) -> ffn.coef (c)
-> output -> ffn.out. When no point function edited anything the block's own output is kept. The routing
rules (``route_fn``) are in kvmem.models.routing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kvmem.errors import KvmemError
from kvmem.models.base import FFNLayer
from kvmem.neurons import NeuronId

MOE_POINTS = ("ffn.x", "moe.router", "moe.expert.coef", "ffn.coef", "ffn.out")
Route = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class MoELayout:
    """The shape of one MoE layer: ``n_experts`` routed experts of ``d_expert`` neurons, ``top_k`` chosen
    per token, ``n_shared`` shared experts of ``d_shared`` neurons (every token goes through them)."""

    n_experts: int
    d_expert: int
    top_k: int
    n_shared: int = 0
    d_shared: int = 0

    def __post_init__(self):
        if min(self.n_experts, self.d_expert, self.top_k) < 1 or self.top_k > self.n_experts:
            raise KvmemError(f"MoELayout: bad sizes {self}")
        if (self.n_shared > 0) != (self.d_shared > 0):
            raise KvmemError(f"MoELayout: n_shared and d_shared must both be set or both 0 ({self})")

    @property
    def d_routed(self) -> int:
        return self.n_experts * self.d_expert

    @property
    def d_flat(self) -> int:
        return self.d_routed + self.n_shared * self.d_shared

    def expert_range(self, expert: int, shared: bool = False) -> range:
        """The flat indices of one expert's neurons."""
        if shared:
            if not 0 <= expert < self.n_shared:
                raise KvmemError(f"shared expert {expert} out of range (the layer has {self.n_shared})")
            start = self.d_routed + expert * self.d_shared
            return range(start, start + self.d_shared)
        if not 0 <= expert < self.n_experts:
            raise KvmemError(f"expert {expert} out of range (the layer has experts 0..{self.n_experts - 1})")
        return range(expert * self.d_expert, (expert + 1) * self.d_expert)

    def flat(self, nid: NeuronId) -> int:
        """The flat index of an expert neuron id (a dense id 'L.N' is taken as the flat index itself)."""
        if nid.expert is None:
            if nid.neuron >= self.d_flat:
                raise KvmemError(f"neuron {nid}: flat index out of range (0..{self.d_flat - 1})")
            return nid.neuron
        width = self.d_shared if nid.shared else self.d_expert
        rng = self.expert_range(nid.expert, nid.shared)
        if nid.neuron >= width:
            raise KvmemError(f"neuron {nid}: index {nid.neuron} out of range (experts have neurons 0..{width - 1})")
        return rng.start + nid.neuron

    def neuron_id(self, layer: int, flat: int) -> NeuronId:
        """The NeuronId of flat index ``flat`` of layer ``layer`` (prints as L.eE.N or L.sS.N)."""
        if not 0 <= flat < self.d_flat:
            raise KvmemError(f"flat neuron index {flat} out of range (0..{self.d_flat - 1})")
        if flat < self.d_routed:
            e, i = divmod(flat, self.d_expert)
            return NeuronId(layer, i, e, False)
        s, i = divmod(flat - self.d_routed, self.d_shared)
        return NeuronId(layer, i, s, True)

    def describe(self) -> str:
        shared = f", {self.n_shared} shared x {self.d_shared}" if self.n_shared else ""
        return f"{self.n_experts} experts x {self.d_expert}, top {self.top_k}{shared}"


def _cached(method):
    """Cache a weight-derived tensor on the layer until one of its parameters is replaced or edited."""
    name = method.__name__

    def wrapper(self):
        key = tuple((p.data_ptr(), p._version) for p in self.ffn_module.parameters())
        hit = self._cache.get(name)
        if hit is None or hit[0] != key:
            with torch.no_grad():
                hit = (key, method(self))
            self._cache[name] = hit
        return hit[1]
    wrapper.__name__ = name
    wrapper.__doc__ = method.__doc__
    return property(wrapper)


@dataclass(frozen=True)
class MoELayer(FFNLayer):
    """One MoE FFN layer as a flat key-value memory (see the module docstring). ``in_module``, ``gate_module``
    and ``out_module`` are the fused experts module; ``ffn_module`` the sparse-MoE block.

    Experts storage (transformers 5): ``concat`` gate_up_proj [E, 2I, d_model] (gate rows first), down_proj
    [E, d_model, I] (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3); ``interleaved`` gate_up_proj [E, d_model, 2I]
    (gate at even columns, up at odd), down_proj [E, I, d_model], with biases (GPT-OSS)."""

    layout: MoELayout | None = None
    router: nn.Module | None = None  # router.weight [E, d_model] (GPT-OSS: and router.bias [E])
    route_fn: Route | None = None  # (logits [N, E], x [N, d_model]) -> (idx [N, k] long, weight [N, k])
    storage: str = "concat"
    router_fp32: bool = False  # DeepSeek-V3 computes its router logits in float32
    shared: nn.Module | None = None  # one gated MLP of width n_shared·d_shared (gate_proj, up_proj, down_proj)
    shared_gate: nn.Module | None = None  # Qwen2-MoE: the shared expert's weight is sigmoid(shared_gate(x))
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        super().__post_init__()
        if self.layout is None or self.router is None or self.route_fn is None:
            raise KvmemError(f"layer {self.index}: an MoE layer needs its layout, router and routing rule")
        if self.storage not in ("concat", "interleaved"):
            raise KvmemError(f"layer {self.index}: unknown experts storage {self.storage!r}")

    @property
    def experts(self) -> nn.Module:
        return self.out_module

    @property
    def has_expert_bias(self) -> bool:
        return self.storage == "interleaved"

    # --- per-expert weights, [in, out] -------------------------------------------------
    def _gate_up(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_gate, W_up) [E, d_model, I] of the routed experts (views)."""
        gu = self.experts.gate_up_proj
        if self.storage == "concat":
            d = self.layout.d_expert
            return gu[:, :d].transpose(1, 2), gu[:, d:].transpose(1, 2)
        return gu[..., ::2], gu[..., 1::2]

    def down(self, expert: int) -> torch.Tensor:
        """W_down of one routed expert [I, d_model]."""
        dp = self.experts.down_proj[expert]
        return dp.T if self.storage == "concat" else dp

    def _flat(self, routed: torch.Tensor, shared: torch.Tensor | None, dim: int) -> torch.Tensor:
        parts = [routed] if shared is None else [routed, shared]
        return torch.cat(parts, dim)

    @_cached
    def W_gate(self) -> torch.Tensor:
        g, _ = self._gate_up()
        routed = g.permute(1, 0, 2).reshape(g.shape[1], -1)
        return self._flat(routed, None if self.shared is None else self.shared.gate_proj.weight.T, 1)

    @_cached
    def W_in(self) -> torch.Tensor:
        _, u = self._gate_up()
        routed = u.permute(1, 0, 2).reshape(u.shape[1], -1)
        return self._flat(routed, None if self.shared is None else self.shared.up_proj.weight.T, 1)

    @_cached
    def W_out(self) -> torch.Tensor:
        dp = self.experts.down_proj
        per_expert = dp.transpose(1, 2) if self.storage == "concat" else dp  # [E, I, d_model]
        routed = per_expert.reshape(-1, per_expert.shape[2])
        return self._flat(routed, None if self.shared is None else self.shared.down_proj.weight.T, 0)

    def _flat_bias(self, half: int) -> torch.Tensor | None:
        if not self.has_expert_bias:
            return None
        b = self.experts.gate_up_proj_bias[:, half::2].reshape(-1)
        if self.shared is not None:
            b = torch.cat([b, torch.zeros(self.layout.n_shared * self.layout.d_shared, dtype=b.dtype, device=b.device)])
        return b

    @property
    def b_gate(self) -> torch.Tensor | None:
        return self._flat_bias(0)

    @property
    def b_in(self) -> torch.Tensor | None:
        return self._flat_bias(1)

    @property
    def b_out(self) -> torch.Tensor | None:
        return None  # GPT-OSS's expert down biases are weighted by the routing: see ``output(c, gates)``

    @property
    def b_down(self) -> torch.Tensor | None:
        """[E, d_model] the routed experts' down-projection biases (GPT-OSS), else None."""
        return self.experts.down_proj_bias if self.has_expert_bias else None

    @property
    def d_mlp(self) -> int:
        return self.layout.d_flat

    # --- routing ---------------------------------------------------------------------------
    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits [..., E] from the block input x [..., d_model] (float32 for DeepSeek-V3)."""
        w, b = self.router.weight, getattr(self.router, "bias", None)
        if self.router_fp32:
            return F.linear(x.float(), w.float(), None if b is None else b.float())
        return F.linear(x, w, b)

    def route(self, logits: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The family's routing rule: (idx [..., k] long, weight [..., k]) from logits [..., E] and x [..., d_model].
        A logit of -inf never routes (whole-expert ablation)."""
        lead = logits.shape[:-1]
        idx, w = self.route_fn(logits.reshape(-1, logits.shape[-1]), x.reshape(-1, x.shape[-1]))
        return idx.reshape(*lead, -1), w.reshape(*lead, -1)

    def gates(self, idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The dense routing weights [..., E] (zero for experts a token is not routed to)."""
        g = torch.zeros(*idx.shape[:-1], self.layout.n_experts, dtype=weight.dtype, device=weight.device)
        return g.scatter(-1, idx, weight)

    def coef_scale(self, gates: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """w per flat neuron [..., F]: the routing weight of its expert; for shared experts their gate."""
        lay = self.layout
        w = gates.repeat_interleave(lay.d_expert, dim=-1)
        if self.shared is None:
            return w
        if self.shared_gate is not None:
            s = torch.sigmoid(self.shared_gate(x)).to(w.dtype)
        else:
            s = torch.ones(*x.shape[:-1], 1, dtype=w.dtype, device=w.device)
        return torch.cat([w, s.expand(*x.shape[:-1], lay.n_shared * lay.d_shared)], -1)

    # --- coefficients and output ----------------------------------------------------------------
    def _expert_m(self, e: int, xs: torch.Tensor) -> torch.Tensor:
        """Raw m [n, I] of routed expert e on the tokens xs [n, d_model], exactly as transformers computes it."""
        ex = self.experts
        if self.storage == "concat":
            gate_up = F.linear(xs, ex.gate_up_proj[e])
        else:
            gate_up = xs @ ex.gate_up_proj[e] + ex.gate_up_proj_bias[e]
        return ex._apply_gate(gate_up)

    def raw_coefficients(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Raw m [..., F] from x [..., d_model]: each routed expert's activation on its tokens (zero on the
        others) and the shared experts' on every token. ``idx`` [..., k]: the routing (from x when None)."""
        if idx is None:
            idx, _ = self.route(self.router_logits(x), x)
        lead, xf, idf = x.shape[:-1], x.reshape(-1, x.shape[-1]), idx.reshape(-1, idx.shape[-1])
        lay = self.layout
        m = torch.zeros(xf.shape[0], lay.d_flat, dtype=x.dtype, device=x.device)
        hit = torch.zeros(lay.n_experts + 1, dtype=torch.long, device=x.device)
        hit.index_add_(0, idf.reshape(-1).clamp(0, lay.n_experts), torch.ones_like(idf.reshape(-1)))
        for e in hit[:lay.n_experts].nonzero().flatten().tolist():
            rows = (idf == e).any(-1).nonzero().flatten()
            m[rows, e * lay.d_expert:(e + 1) * lay.d_expert] = self._expert_m(e, xf[rows]).to(m.dtype)
        if self.shared is not None:
            sh = self.shared
            m[:, lay.d_routed:] = sh.act_fn(sh.gate_proj(xf)) * sh.up_proj(xf)
        return m.reshape(*lead, lay.d_flat)

    def coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """c = w·m [..., F] from the block input x [..., d_model] (the ffn.coef point)."""
        logits = self.router_logits(x)
        idx, w = self.route(logits, x)
        m = self.raw_coefficients(x, idx)
        return m * self.coef_scale(self.gates(idx, w), x).to(m.dtype)

    def output(self, c: torch.Tensor, gates: torch.Tensor | None = None) -> torch.Tensor:
        """The block output [..., d_model] from c [..., F]: Σ_e c_e·W_down_e + shared, plus Σ_e gates_e·b_down_e
        where experts have biases (GPT-OSS: ``gates`` [..., E] required there)."""
        lay = self.layout
        lead, cf = c.shape[:-1], c.reshape(-1, c.shape[-1])
        y = torch.zeros(cf.shape[0], self.W_out.shape[1], dtype=c.dtype, device=c.device)
        routed = cf[:, :lay.d_routed].reshape(cf.shape[0], lay.n_experts, lay.d_expert)
        for e in (routed != 0).any(-1).any(0).nonzero().flatten().tolist():
            rows = (routed[:, e] != 0).any(-1).nonzero().flatten()
            y.index_add_(0, rows, (routed[rows, e] @ self.down(e).to(c.dtype)))
        if self.shared is not None:
            y = y + cf[:, lay.d_routed:] @ self.shared.down_proj.weight.T.to(c.dtype)
        if self.has_expert_bias:
            if gates is None:
                raise KvmemError(f"layer {self.index}: its experts have biases; pass gates (the routing weights)")
            y = y + gates.reshape(-1, lay.n_experts).to(c.dtype) @ self.b_down.to(c.dtype)
        return y.reshape(*lead, y.shape[-1])

    def write(self, m: torch.Tensor, y: torch.Tensor | None = None, resid: torch.Tensor | None = None,
              gates: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's whole write [..., d_model] float32 from c (= its output: MoE blocks are pre-norm)."""
        return (self.output(m, gates) if y is None else y).float() * self.write_scale

    def written_rest(self, scale=None, resid=None, gates: torch.Tensor | None = None) -> torch.Tensor:
        """What the layer writes besides its neurons: zero, or Σ_e gates_e·b_down_e (GPT-OSS, gates required)."""
        d = self.W_out.shape[1]
        if not self.has_expert_bias:
            shape = () if scale is None else scale.shape[:-1]
            return torch.zeros(*shape, d, device=self.W_out.device)
        if gates is None:
            raise KvmemError(f"layer {self.index}: its experts have biases; pass gates (the routing weights)")
        return (gates.float() @ self.b_down.float()) * self.write_scale


def is_moe(layer: FFNLayer) -> bool:
    return isinstance(layer, MoELayer)


def block_hook(lay: MoELayer, point: Callable[[str, torch.Tensor], torch.Tensor | None], wanted: set):
    """The forward hook (with kwargs) kvmem.hooks installs on an MoE block: ``recompute`` from its input; the
    output replaced only when a point function edited something (GPT-OSS's (output, scores) tuple kept)."""
    def hook(module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        y = output[0] if isinstance(output, tuple) else output
        new = recompute(lay, x, y, point, wanted)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new
    return hook


def recompute(lay: MoELayer, x: torch.Tensor, y: torch.Tensor,
              point: Callable[[str, torch.Tensor], torch.Tensor | None], wanted: set) -> torch.Tensor | None:
    """Run one MoE block's hook points from its input x [b, p, d_model] and output y [b, p, d_model].
    ``point(name, t)`` runs that point's functions (a replacement or None); ``wanted``: the point names hooked.
    Returns the new output, or None when nothing was edited (the block's own output stands)."""
    edited = False

    def at(name: str, t: torch.Tensor) -> torch.Tensor:
        nonlocal edited
        if name not in wanted:
            return t
        new = point(name, t)
        if new is None:
            return t
        edited = True
        return new

    x = at("ffn.x", x)
    if edited or wanted & {"moe.router", "moe.expert.coef", "ffn.coef"}:
        logits = at("moe.router", lay.router_logits(x))
        idx, w = lay.route(logits, x)
        inner = edited or wanted & {"moe.expert.coef", "ffn.coef"}
        if inner:
            m = at("moe.expert.coef", lay.raw_coefficients(x, idx))
            gates = lay.gates(idx, w)
            c = at("ffn.coef", m * lay.coef_scale(gates, x).to(m.dtype))
            if edited:
                y = lay.output(c, gates).to(y.dtype)
    y = at("ffn.out", y)
    return y if edited else None
