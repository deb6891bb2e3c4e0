"""One hook layer: named points per layer, read and edited the same way for every family.

Points of layer l, in the order the forward pass reaches them (``POINTS``), each [batch, pos, ...]:
  resid.pre   the block's input (the residual stream before block l)            [batch, pos, d_model]
  ffn.x       the FFN input (after the block's pre-FFN norm)                     [batch, pos, d_model]
  ffn.gate    x·W_gate + b_gate (gated FFNs only)                                [batch, pos, d_mlp]
  ffn.pre     x·W_in + b_in (the up projection of gated FFNs)                    [batch, pos, d_mlp]
  ffn.coef    m, the input of W_out (the coefficients of the value vectors)      [batch, pos, d_mlp]
  ffn.out     the FFN output m·W_out + b_out (before any post-FFN norm)          [batch, pos, d_model]
  resid.post  the block's output (the residual stream after block l)            [batch, pos, d_model]
(For gated FFNs, ffn.gate and ffn.pre may run in either order: families differ.)
At a mixture-of-experts layer (kvmem.models.moe; d_mlp = the flat width of all expert neurons):
  moe.router       the router logits (editable: an edit changes the routing)       [batch, pos, n_experts]
  moe.expert.coef  raw m of every expert neuron, zero where not routed              [batch, pos, d_mlp]
  ffn.coef         c = w·m (w the token's routing weight of that expert)            [batch, pos, d_mlp]
and ffn.x / ffn.out / resid.*; no ffn.pre or ffn.gate. One forward hook on the MoE block recomputes these
from the block input (``kvmem.models.moe.recompute``); the block's own output stands unless a function edited.

The one primitive::

    with hooks(model, {("ffn.coef", 5): fn, ("resid.post", 7): [g, h]}, stop_after=True) as run:
        model.hf(input_ids=ids)
    run.stopped  # True when the pass was cut short

``fn(t)`` gets the point's tensor [batch, pos, ...] (not detached, not copied: clone before editing in
place) and returns a replacement of the same shape (an edit) or None (a read). A list of functions at one
point runs in order, each seeing the previous one's replacement. ``stop_after=True`` ends the forward pass
once every point of the last hooked layer has run in this pass (nothing later is computed: no later block,
no LM head); ``stop_after=(name, layer)`` stops after that point. Every hook is removed on exit, also when
the block raises.

Shapes: families that flatten [batch, pos] inside the FFN (OPT reshapes to [batch·pos, d] before fc1) are
viewed back as [batch, pos, ...] from the block input's shape, which a pre-hook on every hooked block
records; replacements are reshaped to what the module expects. Callers never see flattened shapes.

Where a point lives (the module and whether its input or output is meant) is ``sites(model, layer)``:
ffn.x is the input of the FFN module (of in_module when the family has no FFN module, as OPT), ffn.pre /
ffn.gate the outputs of in_module / gate_module (each its half of the one fused [gate | up] output where the
view says ``fused_gate_up``, as Phi-3), ffn.coef the input of out_module, ffn.out the output of ffn_module
(a copy where the view says ``out_mutated``: Falcon adds attention into that tensor in place afterwards),
resid.pre / resid.post the input / output of the block. An adapter may override a family's
sites with a method ``hook_sites(layer) -> {point: (module, "input" | "output")}``.

Also here, built on the primitive: ``zero_ffn``, ``zero_coefs``, ``set_coefs``, ``scale_coefs``,
``linearize`` (dicts of point functions, combined with ``merge``) and ``skip_blocks`` (blocks return cached
outputs instead of computing them). Nothing else in kvmem registers PyTorch hooks (kvmem.models aside).
"""

from __future__ import annotations

import operator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Mapping, Sequence, Union

import torch
from torch import nn

from kvmem.errors import KvmemError
from kvmem.models.moe import MOE_POINTS, block_hook, is_moe

if TYPE_CHECKING:
    from kvmem.models.kvmodel import KVModel

POINTS = ("resid.pre", "ffn.x", "ffn.gate", "ffn.pre", "ffn.coef", "ffn.out", "resid.post")  # a dense layer's
MOE_ONLY = ("moe.router", "moe.expert.coef")
ORDER = ("resid.pre", "ffn.x", "moe.router", "ffn.gate", "ffn.pre", "moe.expert.coef", "ffn.coef", "ffn.out",
         "resid.post")  # every point, in forward order
DENSE_ONLY = ("ffn.gate", "ffn.pre")
Point = tuple[str, int]  # (name, layer)
Fn = Callable[[torch.Tensor], Union[torch.Tensor, None]]


class _Stop(Exception):
    """Raised inside the forward pass to end it early; caught by ``hooks`` on exit."""


@dataclass
class HookRun:
    """What ``hooks`` yields: the points installed and whether a forward pass was stopped early."""

    points: tuple[Point, ...]
    stopped: bool = False
    _fired: set = field(default_factory=set, repr=False)


def sites(model: KVModel, layer: int) -> dict[str, tuple[nn.Module, str]]:
    """point name -> (module, "input" | "output") for one layer of a KVModel (see the module docstring)."""
    custom = getattr(model.adapter, "hook_sites", None)
    if custom is not None:
        return dict(custom(layer))
    lay = model.layers[layer]
    flat_ffn = lay.ffn_module is lay.out_module or lay.ffn_module is lay.in_module  # no FFN module (OPT)
    out = {
        "resid.pre": (model.adapter.blocks()[layer], "input"),
        "ffn.x": (lay.in_module, "input") if flat_ffn else (lay.ffn_module, "input"),
        "ffn.pre": (lay.in_module, "output"),
        "ffn.coef": (lay.out_module, "input"),
        "ffn.out": (lay.ffn_module, "output"),
        "resid.post": (model.adapter.blocks()[layer], "output"),
    }
    if lay.gate_module is not None:
        out["ffn.gate"] = (lay.gate_module, "output")
    return out


def check_points(model: KVModel, points: Iterable[Point]) -> list[Point]:
    """Validated (name, layer) pairs in forward order; an unknown name, a layer out of range or ffn.gate on a
    non-gated model is a KvmemError."""
    out = []
    for point in points:
        if not (isinstance(point, tuple) and len(point) == 2):
            raise KvmemError(f"hook point {point!r}: write it as (name, layer), e.g. ('ffn.coef', 3)")
        name, layer = point
        if name not in ORDER:
            raise KvmemError(f"unknown hook point {name!r}; choose from {', '.join(ORDER)}")
        try:
            layer = operator.index(layer)  # ints, numpy and 0-d torch integers
        except TypeError:
            raise KvmemError(f"hook point {name}: layer {layer!r} is not an integer") from None
        if not 0 <= layer < model.n_layers:
            raise KvmemError(f"hook point {name}: layer {layer} out of range (the model has layers 0..{model.n_layers - 1})")
        moe = is_moe(model.layers[layer])
        if moe and name in DENSE_ONLY:
            raise KvmemError(f"hook point {name}: layer {layer} is a mixture of experts (no {name}; use "
                             "moe.expert.coef or ffn.coef)")
        if not moe and name.startswith("moe."):
            raise KvmemError(f"hook point {name}: layer {layer} is not a mixture of experts")
        if name == "ffn.gate" and not model.gated:
            raise KvmemError(f"{model.family} FFNs are not gated: there is no 'ffn.gate' point")
        out.append((name, layer))
    return sorted(set(out), key=lambda p: (p[1], ORDER.index(p[0])))


def _chain(fns) -> list[Fn]:
    if fns is None:
        return []
    if callable(fns):
        return [fns]
    return [f for f in fns if f is not None]


@contextmanager
def hooks(model: KVModel, fns: Mapping[Point, Fn | Sequence[Fn] | None], *,
          stop_after: bool | Point | None = None) -> Iterator[HookRun]:
    """Install point functions on a KVModel for the duration of the block (see the module docstring)."""
    chains: dict[Point, list[Fn]] = {}
    for key, value in fns.items():
        (point,) = check_points(model, [key])
        chains.setdefault(point, []).extend(_chain(value))
    if isinstance(stop_after, tuple):
        (stop_point,) = check_points(model, [stop_after])
        chains.setdefault(stop_point, [])
        stop_set = {stop_point}
    elif stop_after:
        if not chains:
            raise KvmemError("stop_after=True needs at least one hook point")
        last = max(layer for _, layer in chains)
        stop_set = {p for p in chains if p[1] == last}
    else:
        stop_set = set()
    stop_layer = next(iter(stop_set))[1] if stop_set else None
    run = HookRun(tuple(sorted(chains, key=lambda p: (p[1], ORDER.index(p[0])))))
    shapes: dict[int, torch.Size] = {}  # layer -> [batch, pos] of the current pass's block input
    handles = []

    def apply(point: Point, t: torch.Tensor) -> torch.Tensor | None:
        """Run the point's functions on t (viewed as [batch, pos, ...]); the replacement in t's own shape."""
        native = t.shape
        if t.dim() == 2 and point[1] in shapes:
            t = t.view(*shapes[point[1]], t.shape[-1])
        changed = False
        for fn in chains[point]:
            new = fn(t)
            if new is not None:
                if new.shape != t.shape:
                    raise KvmemError(f"hook at {point[0]} layer {point[1]} returned shape {tuple(new.shape)}, "
                                     f"expected {tuple(t.shape)}")
                t, changed = new, True
        return t.reshape(native) if changed else None

    def after(point: Point) -> None:
        if stop_set:
            run._fired.add(point)
            if stop_set <= run._fired:
                run._fired.clear()
                run.stopped = True
                raise _Stop

    def input_hook(point: Point, block: bool):
        def hook(module, args, kwargs):
            if block:
                t = args[0] if args else kwargs["hidden_states"]
                shapes[point[1]] = t.shape[:2]
                if point[1] == stop_layer:
                    run._fired.clear()  # a new pass reaches the stop layer
            if point not in chains:
                return None
            t = args[0] if args else kwargs["hidden_states"]
            new = apply(point, t)
            after(point)
            if new is None:
                return None
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}
        return hook

    def output_hook(point: Point):
        lay = model.layers[point[1]]
        half = None  # fused [gate | up] output (Phi-3): the point is one half of it
        if lay.fused_gate_up and point[0] in ("ffn.gate", "ffn.pre"):
            half = 0 if point[0] == "ffn.gate" else 1
        mutated = point[0] == "ffn.out" and lay.out_mutated  # the block edits this tensor in place later

        def hook(module, args, output):
            t = output[0] if isinstance(output, tuple) else output
            full = t
            if half is not None:
                t = lay.split_gate_up(full)[half]
            elif mutated:
                t = t.clone()
            new = apply(point, t)
            after(point)
            if new is None:
                return None
            if half is not None:
                new_full = full.clone()
                lay.split_gate_up(new_full)[half].copy_(new)
                new = new_full
            return (new, *output[1:]) if isinstance(output, tuple) else new
        return hook

    def moe_point(layer: int):
        def point(name: str, t: torch.Tensor) -> torch.Tensor | None:
            new = apply((name, layer), t)
            after((name, layer))
            return new
        return point

    try:
        for layer in sorted({layer for _, layer in chains}):
            where = sites(model, layer)
            # the block pre-hook records [batch, pos] for OPT-style flattened FFNs (and serves resid.pre)
            handles.append(where["resid.pre"][0].register_forward_pre_hook(
                input_hook(("resid.pre", layer), block=True), with_kwargs=True))
            if is_moe(model.layers[layer]):
                if any(p[1] == layer and p[0] in MOE_POINTS for p in chains):
                    wanted = {name for name, lyr in chains if lyr == layer and name in MOE_POINTS}
                    hook = block_hook(model.layers[layer], moe_point(layer), wanted)
                    handles.append(model.layers[layer].ffn_module.register_forward_hook(hook, with_kwargs=True))
                if ("resid.post", layer) in chains:
                    handles.append(where["resid.post"][0].register_forward_hook(output_hook(("resid.post", layer))))
                continue
            for name in POINTS[1:]:
                point = (name, layer)
                if point not in chains:
                    continue
                module, side = where[name]
                if side == "input":
                    handles.append(module.register_forward_pre_hook(input_hook(point, block=False), with_kwargs=True))
                else:
                    handles.append(module.register_forward_hook(output_hook(point)))
        yield run
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()


def routing(model: KVModel, layer: int, logits: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing rule of MoE layer ``layer``: (idx [..., k] long, weight [..., k]) from router logits
    [..., n_experts] (as seen at moe.router, edits included) and the block input x [..., d_model]."""
    lay = model.layers[layer]
    if not is_moe(lay):
        raise KvmemError(f"layer {layer} is not a mixture of experts: it has no routing")
    return lay.route(logits, x)


# --- edits built on the primitive: dicts of point functions -----------------------------------------------

PointFns = dict[Point, list[Fn]]


def merge(*parts: Mapping[Point, Fn | Sequence[Fn] | None]) -> PointFns:
    """Combine point-function dicts; functions at the same point run in the order given."""
    out: PointFns = {}
    for part in parts:
        for point, fns in part.items():
            out.setdefault(point, []).extend(_chain(fns))
    return out


def zero_ffn(layer: int) -> PointFns:
    """The FFN's output is zero (every coefficient zero and no b_out): the layer's FFN removed."""
    return {("ffn.out", layer): [torch.zeros_like]}


def _at(m: torch.Tensor, positions) -> tuple:
    return (Ellipsis,) if positions is None else (slice(None), positions)


def ablate_experts(layer: int, experts, positions=None) -> PointFns:
    """Drop routed experts from the routing of an MoE layer: their router logits become -inf at moe.router, so
    the family's rule routes each token to its next experts (renormalised as the family does)."""
    idx = torch.as_tensor(list(experts), dtype=torch.long)

    def fn(logits):
        logits = logits.clone()
        sel = logits[_at(logits, positions)]
        sel[..., idx.to(logits.device)] = float("-inf")
        logits[_at(logits, positions)] = sel
        return logits
    return {("moe.router", layer): [fn]}


def zero_coefs(layer: int, neurons, positions=None) -> PointFns:
    """m_i = 0 for the given neurons, at every position or at ``positions`` (indices into pos)."""
    idx = torch.as_tensor(list(neurons), dtype=torch.long)

    def fn(m):
        m = m.clone()
        sel = m[_at(m, positions)]
        sel[..., idx.to(m.device)] = 0
        m[_at(m, positions)] = sel
        return m
    return {("ffn.coef", layer): [fn]}


def scale_coefs(layer: int, factor: torch.Tensor, positions=None) -> PointFns:
    """m' = m ⊙ factor, factor [d_mlp], at every position or at ``positions``."""
    def fn(m):
        m = m.clone()
        m[_at(m, positions)] = m[_at(m, positions)] * factor.to(device=m.device, dtype=m.dtype)
        return m
    return {("ffn.coef", layer): [fn]}


def set_coefs(layer: int, values: Mapping[int, float], positions=None) -> PointFns:
    """m_i = c for each neuron i -> c of ``values``, at every position or at ``positions`` (LM-Debugger's
    intervention: equivalent to adding (c − m_i)·v_i to the FFN output)."""
    idx = torch.as_tensor(list(values), dtype=torch.long)
    val = torch.as_tensor([float(values[i]) for i in values])

    def fn(m):
        m = m.clone()
        sel = m[_at(m, positions)]
        sel[..., idx.to(m.device)] = val.to(device=m.device, dtype=m.dtype)
        m[_at(m, positions)] = sel
        return m
    return {("ffn.coef", layer): [fn]}


def linearize(model: KVModel, layer: int) -> PointFns:
    """The activation becomes the identity: m' = x·W_in + b_in (non-gated), or (x·W_gate + b_gate) ⊙
    (x·W_in + b_in) (gated: only act() is removed). ffn.pre (and ffn.gate) are kept in the pass and replace m
    at ffn.coef; put other coefficient edits after this one in ``merge`` to apply them on top."""
    kept: dict[str, torch.Tensor] = {}
    out: PointFns = {("ffn.pre", layer): [lambda t: kept.__setitem__("pre", t)]}
    if model.layers[layer].gate_module is not None:
        out[("ffn.gate", layer)] = [lambda t: kept.__setitem__("gate", t)]

    def fn(m):
        new = kept.pop("pre")
        if "gate" in kept:
            new = kept.pop("gate") * new
        return new
    out[("ffn.coef", layer)] = [fn]
    return out


def record(points: Iterable[Point], into: dict, *, detach: bool = True) -> PointFns:
    """Read-only functions storing each point's tensor in ``into[point]`` (detached by default)."""
    def keeper(point):
        def fn(t):
            into[point] = t.detach() if detach else t
        return fn
    return {p: [keeper(p)] for p in points}


@contextmanager
def skip_blocks(model: KVModel, cached: Mapping[int, torch.Tensor], upto: int):
    """Blocks 0..upto-1 return ``cached[i]`` (their resid.post [batch, pos, d_model] from an earlier pass of
    the same batch, cloned) instead of computing: an edit at layer ``upto`` or later cannot change them.
    Decoder blocks return the hidden states as a tensor in transformers 5 (the test checks every family).
    The blocks' own ``forward`` attributes are restored on exit, also on error."""
    blocks = model.adapter.blocks()
    missing = [i for i in range(upto) if i not in cached]
    if missing:
        raise KvmemError(f"skip_blocks: no cached output for block {missing[0]}")
    saved = {}
    try:
        for i in range(upto):
            saved[i] = blocks[i].__dict__.get("forward")
            blocks[i].forward = lambda *a, _out=cached[i], **k: _out.clone()
        yield
    finally:
        for i, fwd in saved.items():
            if fwd is None:
                del blocks[i].forward
            else:
                blocks[i].forward = fwd
