"""A short profile with the GPU's sync-free statistics path, on CPU, under the host-sync guard: every hook's
work (the reshape, the counted positions' selection, LayerStats.update with all statistics and the context
windows) runs inside kvmem.stats.syncguard.no_host_sync(), so any host synchronisation fails the test; the
result equals a normal CPU run (itself checked against brute force in test_profile.py)."""

import pytest
import torch

import kvmem
from kvmem.profile import runner
from kvmem.profile.runner import ProfileConfig
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
