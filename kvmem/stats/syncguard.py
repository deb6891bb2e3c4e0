"""A guard against host synchronisation: ``with no_host_sync(): ...`` raises ``HostSync`` on any torch call
that, on a CUDA device, makes the host wait for the GPU's queue (or would, for a data-dependent shape).

It is a ``TorchFunctionMode``, so it sees every torch function and Tensor method called from Python inside
the region, on any device: the same code on CPU is checked for what it would do on a GPU. Caught:

  values to Python     Tensor.item, tolist, __bool__ (``if t``, ``if t.any()``), __int__, __float__,
                       __complex__, __index__ (a tensor used as a Python index), numpy, __repr__/__format__
  host copies          Tensor.cpu, and ``.to`` onto the CPU from another device
  data-dependent shape nonzero, argwhere, torch.where(cond) with one argument, unique, unique_consecutive,
                       masked_select, bincount (CUDA reads the max first), repeat_interleave of tensor repeats
                       without ``output_size``, tensor_split/split by a tensor, t[mask] and t[mask] = x with a
                       bool/uint8 mask (index, index_put)
  Python-bool results  torch.equal, allclose, is_nonzero
  explicit waits       torch.cuda.synchronize (patched for the region)

Not caught: syncs inside C++ (a kernel a torch op launches that syncs internally without one of the calls
above), numba or numpy code reached through ``.numpy()`` (that call itself is caught). ``allow()`` lifts the
guard for a block (checkpoints, the progress bar: batch boundaries).
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["HostSync", "no_host_sync", "allow", "SYNCING"]


class HostSync(RuntimeError):
    """A host-synchronising torch call inside a ``no_host_sync()`` region."""


_T = torch.Tensor
# always syncing (or a data-dependent output shape)
SYNCING = {
    _T.item, _T.tolist, _T.__bool__, _T.__int__, _T.__float__, _T.__complex__, _T.__index__, _T.numpy,
    _T.cpu, _T.__repr__, _T.__format__, _T.nonzero, torch.nonzero, _T.argwhere, torch.argwhere,
    torch.unique, _T.unique, torch.unique_consecutive, _T.unique_consecutive, torch.masked_select,
    _T.masked_select, torch.bincount, _T.bincount, torch.equal, _T.equal, torch.allclose, _T.allclose,
    torch.is_nonzero, _T.is_nonzero,
}
_REPEAT = {torch.repeat_interleave, _T.repeat_interleave}
_SPLIT = {torch.tensor_split, _T.tensor_split, torch.split, _T.split}
_WHERE = {torch.where, _T.where}
_INDEX = {_T.__getitem__, _T.__setitem__, _T.index_put_, _T.index_put, torch.index_put}
_TO = {_T.to}


def _name(func) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)


def _bool_mask(idx) -> bool:
    """Whether an index (a tensor, a tuple/list of them) holds a bool or uint8 mask tensor."""
    if isinstance(idx, torch.Tensor):
        return idx.dtype in (torch.bool, torch.uint8)
    if isinstance(idx, (tuple, list)):
        return any(_bool_mask(i) for i in idx)
    return False


def _to_cpu(args, kwargs) -> bool:
    src = args[0]
    if not isinstance(src, torch.Tensor) or src.device.type == "cpu":
        return False
    targets = list(args[1:]) + [kwargs.get("device")]
    for t in targets:
        if isinstance(t, (str, torch.device)):
            with contextlib.suppress(RuntimeError):
                return torch.device(t).type == "cpu"
        if isinstance(t, torch.Tensor):
            return t.device.type == "cpu"
    return False


def why(func, args, kwargs) -> str | None:
    """Why calling func(*args, **kwargs) synchronises with the host (None: it does not)."""
    if func in SYNCING:
        return _name(func)
    if func in _REPEAT:
        rep = args[1] if len(args) > 1 else kwargs.get("repeats")
        tensor_repeats = isinstance(rep, torch.Tensor) or (len(args) == 1 and "repeats" not in kwargs)
        if tensor_repeats and kwargs.get("output_size") is None:
            return "repeat_interleave without output_size"
    if func in _SPLIT:
        sec = args[1] if len(args) > 1 else kwargs.get("indices_or_sections", kwargs.get("split_size_or_sections"))
        if isinstance(sec, torch.Tensor):
            return f"{_name(func)} by a tensor"
    if func in _WHERE and len(args) + len(kwargs) == 1:
        return "torch.where(condition) (nonzero)"
    if func in _INDEX:
        idx = args[1] if len(args) > 1 else kwargs.get("indices")
        if _bool_mask(idx):
            return f"{_name(func)} with a boolean mask"
    if func in _TO and _to_cpu(args, kwargs):
        return "Tensor.to onto the CPU"
    return None


class _Guard(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.active = True

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.active:
            reason = why(func, args, kwargs)
            if reason is not None:
                raise HostSync(f"host synchronisation inside no_host_sync(): {reason}")
        return func(*args, **kwargs)


_current: list[_Guard] = []


@contextlib.contextmanager
def no_host_sync():
    """Raise HostSync on any host-synchronising torch call in the block (see the module docstring)."""
    guard = _Guard()

    def _sync(*a, **k):
        if guard.active:
            raise HostSync("host synchronisation inside no_host_sync(): torch.cuda.synchronize")
        return real_sync(*a, **k)

    real_sync = torch.cuda.synchronize
    torch.cuda.synchronize = _sync
    _current.append(guard)
    try:
        with guard:
            yield guard
    finally:
        _current.pop()
        torch.cuda.synchronize = real_sync


@contextlib.contextmanager
def allow():
    """Lift the innermost active guard for a block (work at batch boundaries that may synchronise)."""
    if not _current:
        yield
        return
    g = _current[-1]
    was, g.active = g.active, False
    try:
        yield
    finally:
        g.active = was
