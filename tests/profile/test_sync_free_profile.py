"""A short profile with the GPU's sync-free statistics path, on CPU, under the host-sync guard: every hook's
work (the reshape, the counted positions' selection, LayerStats.update with all statistics and the context
windows) runs inside kvmem.stats.syncguard.no_host_sync(), so any host synchronisation fails the test; the
result equals a normal CPU run (itself checked against brute force in test_profile.py).

Three reaches of the guard: the runner's HOOK_GUARD (the statistics' side of each layer's hook); every PyTorch
hook the run installs, wrapped whole (kvmem.hooks' point dispatch, capture's hand-over, the adapter's view);
and the whole forward pass under a recording guard, whose only syncs are transformers' own (its attention-mask
builder reads one or two flags back per batch, before the first layer). Outside the forward pass, at batch boundaries:
the progress bar (host-side lengths), checkpoints (the state read back), the deferred input checks."""

import contextlib
import traceback
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import kvmem
from kvmem.profile import runner
from kvmem.profile.runner import ProfileConfig
from kvmem.stats import syncguard
from kvmem.stats.syncguard import HostSync, no_host_sync

SEQ, BATCH, K = 16, 3, 5


def same_stats(a, b):
    for layer in a:
        sa, sb = a[layer].state_dict(), b[layer].state_dict()
        assert sa.keys() == sb.keys()
        for name in sa:
            if name.startswith("moments."):  # float64 sums: the same to rounding (kvmem.stats.moments)
                torch.testing.assert_close(sa[name], sb[name], rtol=1e-12, atol=1e-12)
            else:  # bit for bit, NaNs included
                assert torch.equal(sa[name].reshape(-1).view(torch.uint8), sb[name].reshape(-1).view(torch.uint8)), \
                    (layer, name)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_profile_hooks_make_no_host_sync(tmp_path, corpus, tiny_models, family, monkeypatch):
    model = tiny_models[family]
    cfg = ProfileConfig(corpus=str(corpus), seq_len=SEQ, batch_size=BATCH, top_k=K, checkpoint_every=1e9)
    ref = kvmem.profile(cfg, tmp_path / "ref", model=model)
    calls = []

    def guard():
        calls.append(1)
        return no_host_sync()

    monkeypatch.setattr(runner, "SYNC_FREE", True)
    monkeypatch.setattr(runner, "HOOK_GUARD", guard)
    run = kvmem.profile(cfg, tmp_path / "run", model=model)
    assert len(calls) >= model.n_layers * 2  # every layer of several batches ran under the guard
    assert all(run.stats[layer].context is not None for layer in run.stats)
    same_stats(run.stats, ref.stats)


def test_the_guard_would_catch_a_sync_in_a_hook(tmp_path, corpus, tiny_models, monkeypatch):
    """The same run with the sparse torch path (it reads sizes back: nonzero, bool(...)) fails."""
    cfg = ProfileConfig(corpus=str(corpus), seq_len=SEQ, batch_size=BATCH, top_k=K, checkpoint_every=1e9)
    monkeypatch.setattr(runner, "SYNC_FREE", False)
    monkeypatch.setattr(runner, "HOOK_GUARD", no_host_sync)
    with pytest.raises(HostSync):
        kvmem.profile(cfg, tmp_path / "run", model=tiny_models["llama"])


def guard_every_hook(monkeypatch) -> list:
    """Make every forward (pre-)hook registered from now on run inside no_host_sync(); returns a list that
    gets one entry per guarded hook call."""
    calls = []

    def wrap(register):
        def patched(self, hook, *args, **kwargs):
            def guarded(*a, **k):
                calls.append(1)
                with no_host_sync():
                    return hook(*a, **k)
            return register(self, guarded, *args, **kwargs)
        return patched

    monkeypatch.setattr(nn.Module, "register_forward_hook", wrap(nn.Module.register_forward_hook))
    monkeypatch.setattr(nn.Module, "register_forward_pre_hook", wrap(nn.Module.register_forward_pre_hook))
    return calls


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_every_hook_of_the_profile_makes_no_host_sync(tmp_path, corpus, tiny_models, family, monkeypatch):
    model = tiny_models[family]
    cfg = ProfileConfig(corpus=str(corpus), seq_len=SEQ, batch_size=BATCH, top_k=K, checkpoint_every=1e9)
    ref = kvmem.profile(cfg, tmp_path / "ref", model=model)
    monkeypatch.setattr(runner, "SYNC_FREE", True)
    calls = guard_every_hook(monkeypatch)
    run = kvmem.profile(cfg, tmp_path / "run", model=model)
    monkeypatch.undo()
    assert len(calls) >= model.n_layers * 2 * 2  # block pre-hook and FFN hooks of every layer, several batches
    same_stats(run.stats, ref.stats)


class SyncLog(TorchFunctionMode):
    """Records (reason, innermost file of the caller's stack outside torch) for every host-synchronising call
    (kvmem.stats.syncguard.why) instead of raising."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = syncguard.why(func, args, kwargs)
        if reason is not None:
            frames = [f.filename for f in traceback.extract_stack()[:-1]]
            outside = [f for f in frames if "/torch/" not in f and f != __file__]
            self.seen.append((reason, outside[-1] if outside else "?"))
        return func(*args, **kwargs)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_whole_forward_pass_syncs_only_in_transformers_mask_builder(tmp_path, corpus, tiny_models, family,
                                                                       monkeypatch):
    """Every step (the model's forward pass, every hook, every update) under a recording guard: its host
    syncs, one or two per batch, are all transformers' own (masking_utils checks whether the attention mask
    can be left to SDPA's is_causal; without a mask it checks whether positions are packed instead), before
    the first layer; none comes from kvmem. On a GPU they wait for the previous batch's queued work."""
    model = tiny_models[family]
    cfg = ProfileConfig(corpus=str(corpus), seq_len=SEQ, batch_size=BATCH, top_k=K, checkpoint_every=1e9)
    monkeypatch.setattr(runner, "SYNC_FREE", True)
    step, log, batches = runner.Profiler.step, SyncLog(), []

    def logged_step(self, rows, b):
        batches.append(rows.numel())
        with log:
            return step(self, rows, b)

    monkeypatch.setattr(runner.Profiler, "step", logged_step)
    kvmem.profile(cfg, tmp_path / "run", model=model)
    assert len(batches) >= 3
    assert {Path(where).name for _, where in log.seen} == {"masking_utils.py"}, log.seen
    assert len(log.seen) <= 2 * len(batches)  # one check, a second on some padded batches


def test_the_guard_would_catch_a_sync_in_the_hook_dispatch(tmp_path, corpus, tiny_models, monkeypatch):
    """A sync planted in capture's hand-over (kvmem.capture, outside the runner's HOOK_GUARD) fails the
    wrapped-hook run."""
    import sys

    cap = sys.modules["kvmem.capture"]  # the module (kvmem.capture is also the package's function)
    real = cap.hooks

    @contextlib.contextmanager
    def syncing(model, fns, **kw):
        fns = {p: [*(f if isinstance(f, list) else [f]), lambda t: t.abs().max().item() and None]
               for p, f in fns.items()}
        with real(model, fns, **kw) as r:
            yield r

    cfg = ProfileConfig(corpus=str(corpus), seq_len=SEQ, batch_size=BATCH, top_k=K, checkpoint_every=1e9)
    monkeypatch.setattr(runner, "SYNC_FREE", True)
    monkeypatch.setattr(cap, "hooks", syncing)
    guard_every_hook(monkeypatch)
    with pytest.raises(HostSync):
        kvmem.profile(cfg, tmp_path / "run", model=tiny_models["llama"])
