"""Every profile can be re-run after a failure, a kill or Ctrl-C; foreign folders are never touched."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

import kvmem
from kvmem.errors import KvmemError
from kvmem.profile import runner
from kvmem.profile.runner import ProfileConfig

FILES = ("stats.safetensors", "tokens.safetensors", "neurons.parquet", "layers.parquet", "vocab.parquet")


@pytest.fixture()
def cfg(corpus):
    return ProfileConfig(corpus=str(corpus), seq_len=8, batch_size=2, top_k=4, checkpoint_every=1e9)


def interrupt_at_step(monkeypatch, n: int):
    """Ctrl-C inside the n-th batch (1-based) of the next profile."""
    real, calls = runner.Profiler.step, []

    def step(self, row, ids):
        calls.append(row)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(self, row, ids)

    monkeypatch.setattr(runner.Profiler, "step", step)
    return lambda: monkeypatch.setattr(runner.Profiler, "step", real)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def same_files(a, b):
    for name in FILES:
        assert (a.path / name).read_bytes() == (b.path / name).read_bytes(), name


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_over(tmp_path, cfg, tiny_models, monkeypatch):
    model = tiny_models["llama"]
    whole = kvmem.profile(cfg, tmp_path / "whole", model=model)
    restore = interrupt_at_step(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        kvmem.profile(cfg, tmp_path / "run", model=model)
    restore()
    partial = tmp_path / "run.partial"
    assert not (tmp_path / "run").exists() and partial.is_dir()
    assert not (partial / "checkpoint" / "progress.json").exists()  # killed before the first checkpoint
    notes = []
    resumed = kvmem.profile(cfg, tmp_path / "run", model=model, resume=True, notes=notes)
    assert any("before its first checkpoint" in n for n in notes)
    same_files(resumed, whole)
    assert not partial.exists()


def test_the_same_command_again_continues_or_restarts_its_own_unfinished_run(tmp_path, cfg, tiny_models, monkeypatch):
    model = tiny_models["qwen2"]
    every = replace(cfg, checkpoint_every=0)
    whole = kvmem.profile(every, tmp_path / "whole", model=model)
    restore = interrupt_at_step(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        kvmem.profile(every, tmp_path / "run", model=model)
    restore()
    notes = []
    again = kvmem.profile(every, tmp_path / "run", model=model, notes=notes)  # no --resume, no --force
    assert any("continuing the unfinished run" in n for n in notes)
    same_files(again, whole)


def test_other_settings_do_not_silently_replace_an_unfinished_run(tmp_path, cfg, tiny_models, monkeypatch):
    model = tiny_models["llama"]
    every = replace(cfg, checkpoint_every=0)
    restore = interrupt_at_step(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        kvmem.profile(every, tmp_path / "run", model=model)
    restore()
    partial = tmp_path / "run.partial"
    before = snapshot(partial)
    with pytest.raises(KvmemError, match="other settings .*top_k=4"):
        kvmem.profile(replace(every, top_k=3), tmp_path / "run", model=model)
    with pytest.raises(KvmemError, match="other settings"):
        kvmem.profile(replace(every, top_k=3), tmp_path / "run", model=model, resume=True)
    assert snapshot(partial) == before
    run = kvmem.profile(replace(every, top_k=3), tmp_path / "run", model=model, force=True)
    assert run.manifest["settings"]["top_k"] == 3 and not partial.exists()


def test_force_keeps_the_finished_run_until_the_new_one_is_complete(tmp_path, cfg, tiny_models, monkeypatch):
    model = tiny_models["llama"]
    old = kvmem.profile(cfg, tmp_path / "run", model=model)
    before = snapshot(old.path)
    restore = interrupt_at_step(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        kvmem.profile(replace(cfg, top_k=3), tmp_path / "run", model=model, force=True)
    restore()
    assert snapshot(tmp_path / "run") == before  # the old run is whole
    new = kvmem.profile(replace(cfg, top_k=3), tmp_path / "run", model=model, force=True)
    assert new.manifest["settings"]["top_k"] == 3
    assert not (tmp_path / "run.partial").exists()


@pytest.mark.parametrize("where", ["out", "partial"])
def test_a_folder_with_foreign_files_is_refused_and_left_untouched(tmp_path, cfg, tiny_models, where):
    folder = tmp_path / ("run" if where == "out" else "run.partial")
    (folder / "notes").mkdir(parents=True)
    (folder / "notes" / "mine.txt").write_text("my own work")
    (folder / "data.csv").write_text("a,b\n1,2\n")
    before = snapshot(folder)
    with pytest.raises(KvmemError, match="other files|not made by kvmem"):
        kvmem.profile(cfg, tmp_path / "run", model=tiny_models["llama"])
    if where == "partial":  # not even --force touches a NAME.partial kvmem did not make
        with pytest.raises(KvmemError, match="not made by kvmem"):
            kvmem.profile(cfg, tmp_path / "run", model=tiny_models["llama"], force=True)
    assert snapshot(folder) == before


def test_merge_into_its_own_unfinished_folder_succeeds(tmp_path, cfg, tiny_models, monkeypatch):
    from kvmem.profile import job

    model = tiny_models["llama"]
    a = kvmem.profile(replace(cfg, shard="0/2"), tmp_path / "a", model=model)
    b = kvmem.profile(replace(cfg, shard="1/2"), tmp_path / "b", model=model)
    real = job.finalize

    def killed(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(job, "finalize", killed)
    with pytest.raises(KeyboardInterrupt):
        kvmem.merge([a.path, b.path], tmp_path / "ab")
    monkeypatch.setattr(job, "finalize", real)
    assert not (tmp_path / "ab").exists()
    merged = kvmem.merge([a.path, b.path], tmp_path / "ab")
    assert merged.tokens.n_tokens == a.tokens.n_tokens + b.tokens.n_tokens


def test_merge_names_the_context_setting_that_differs(tmp_path, cfg, tiny_models):
    model = tiny_models["llama"]
    a = kvmem.profile(replace(cfg, shard="0/2"), tmp_path / "a", model=model)
    b = kvmem.profile(replace(cfg, shard="1/2", context_before=5), tmp_path / "b", model=model)
    with pytest.raises(KvmemError, match="its context_before is 5, not 10"):
        kvmem.merge([a.path, b.path], tmp_path / "ab")
    assert not (tmp_path / "ab").exists() and not (tmp_path / "ab.partial").exists()
