"""The host-sync guard (kvmem.stats.syncguard), then LayerStats' sync-free update under it, against brute force.

The guard is checked kind by kind: each call it claims to catch raises inside ``no_host_sync()`` and runs
outside it; calls that do not synchronise pass."""

import pytest
import torch

from kvmem.stats.syncguard import HostSync, allow, no_host_sync

T = torch.arange(6, dtype=torch.float32)
I = torch.tensor([3, 1, 2])
MASK = T > 2

SYNCS = {
    "item": lambda: T[0].item(),
    "tolist": lambda: T.tolist(),
    "bool": lambda: bool(T[1]),
    "if any": lambda: 1 if (T > 3).any() else 0,
    "int": lambda: int(T[1]),
    "float": lambda: float(T[1]),
    "index": lambda: [0, 1, 2][I[1]],
    "numpy": lambda: T.numpy(),
    "cpu": lambda: T.cpu(),
    "repr": lambda: repr(T),
    "nonzero": lambda: T.nonzero(),
    "torch.nonzero": lambda: torch.nonzero(T),
    "argwhere": lambda: torch.argwhere(T),
    "where1": lambda: torch.where(MASK),
    "unique": lambda: torch.unique(I),
    "unique_consecutive": lambda: torch.unique_consecutive(I),
    "masked_select": lambda: torch.masked_select(T, MASK),
    "bincount": lambda: torch.bincount(I),
    "repeat_interleave": lambda: torch.repeat_interleave(T[:3], I),
    "tensor_split": lambda: torch.tensor_split(T, torch.tensor([2])),
    "mask index": lambda: T[MASK],
    "mask setitem": lambda: T.clone().__setitem__(MASK, 0.0),
    "mask index_put_": lambda: T.clone().index_put_((MASK,), torch.tensor(0.0)),
    "equal": lambda: torch.equal(T, T),
    "allclose": lambda: torch.allclose(T, T),
    "is_nonzero": lambda: T[1].is_nonzero(),
    "cuda.synchronize": lambda: torch.cuda.synchronize(),
}

FREE = {
    "arith": lambda: (T * 2 + 1).sum(),
    "int index": lambda: T[I],
    "slice": lambda: T[1:3],
    "where3": lambda: torch.where(MASK, T, 0.0),
    "topk": lambda: torch.topk(T, 2),
    "repeat_interleave output_size": lambda: torch.repeat_interleave(T[:3], I, output_size=6),
    "repeat_interleave int": lambda: torch.repeat_interleave(T, 2),
    "to cpu from cpu": lambda: T.to("cpu"),
    "any (kept on device)": lambda: (T > 3).any(),
    "scatter_add": lambda: torch.zeros(4).index_add_(0, I, torch.ones(3)),
}


@pytest.mark.parametrize("kind", list(SYNCS))
def test_guard_catches(kind):
    if kind == "cuda.synchronize" and not torch.cuda.is_available():
        with no_host_sync(), pytest.raises(HostSync):
            SYNCS[kind]()
        return
    SYNCS[kind]()  # fine outside the guard
    with no_host_sync(), pytest.raises(HostSync, match="host synchronisation"):
        SYNCS[kind]()


@pytest.mark.parametrize("kind", list(FREE))
def test_guard_lets_pass(kind):
    with no_host_sync():
        FREE[kind]()


def test_allow_lifts_the_guard_for_a_block():
    with no_host_sync():
        with allow():
            assert T[1].item() == 1.0
        with pytest.raises(HostSync):
            T[1].item()
    assert T[1].item() == 1.0  # and nothing is left behind
