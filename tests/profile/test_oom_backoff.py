"""Out-of-memory back-off of the profile runner (Profiler.run_batch), on CPU: an OOM injected once from
inside a layer's statistics update (after earlier layers took the batch, and half way through this layer's
components) makes the runner retry the batch as halves, leaving out the layers that already took it; the
result equals an uninterrupted run, so nothing was lost or counted twice."""

import pytest
import torch
from test_sync_free_profile import BATCH, K, SEQ, same_stats

import kvmem
from kvmem.profile import runner
from kvmem.profile.runner import ProfileConfig
from kvmem.stats import sample


def test_oom_in_a_hook_is_retried_at_half_size_without_loss(tmp_path, corpus, tiny_models, monkeypatch):
    model = tiny_models["llama"]
    cfg = ProfileConfig(corpus=str(corpus), seq_len=SEQ, batch_size=BATCH, top_k=K, checkpoint_every=1e9)
    monkeypatch.setattr(runner, "SYNC_FREE", True)
    ref = kvmem.profile(cfg, tmp_path / "ref", model=model)
    calls, real = [], sample.Sample.update_dense

    def flaky(self, batch):
        calls.append(batch.n)
        if len(calls) == 2:  # layer 1 of the first batch, after its top/bottom/top_docs stores took it
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(self, batch)

    monkeypatch.setattr(sample.Sample, "update_dense", flaky)
    backoffs = []
    monkeypatch.setattr(runner.Profiler, "run", lambda self, _run=runner.Profiler.run: (_run(self), backoffs.append(
        (self.backoffs, self.split)))[0])
    run = kvmem.profile(cfg, tmp_path / "run", model=model)
    assert backoffs == [(1, 2)]  # one back-off; later batches ran in two parts
    first = calls[0]
    h1, h2 = calls[2], calls[4]  # layers 1 and 2 (layer 0 left out) on the first half, then on the second
    assert calls[2:6] == [h1, h1, h2, h2] and h1 + h2 == first and 0 < h2 <= h1 < first
    assert sum(s.n for s in run.stats.values()) == sum(s.n for s in ref.stats.values())
    same_stats(run.stats, ref.stats)


def test_batch_size_from_free_memory(monkeypatch):
    """On a GPU the rows per batch follow the free memory (half of it over the update's bytes per token),
    within GPU_TOKENS; on CPU 4k tokens."""
    from types import SimpleNamespace

    gpu = SimpleNamespace(device=torch.device("cuda", 0), d_mlp=14336)
    per_token = runner.STATS_BYTES_PER_ENTRY * 14336
    for free, tokens in ((2 * per_token * 8192, 8192), (10**15, runner.GPU_TOKENS[1]), (10**6, runner.GPU_TOKENS[0])):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, f=free: (f, 2 * f))
        assert runner.auto_batch_size(gpu, 1024) == tokens // 1024
    assert runner.auto_batch_size(SimpleNamespace(device=torch.device("cpu"), d_mlp=64), 512) == 8
