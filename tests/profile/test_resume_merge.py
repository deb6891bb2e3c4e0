"""Resume after a kill is byte-identical; shards merge into the single run; torchrun on CPU (gloo)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import kvmem
from kvmem.profile.runner import ProfileConfig

FILES = ("stats.safetensors", "tokens.safetensors", "neurons.parquet", "layers.parquet", "vocab.parquet")
ROOT = Path(__file__).resolve().parents[2]


def kvmem_cmd(*args):
    return [sys.executable, "-m", "kvmem", *map(str, args)]


def env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def manifest_without_time(path):
    m = json.loads((path / "manifest.json").read_text())
    m.pop("time")
    return m


def test_kill_then_resume_is_byte_identical(tmp_path, tiny_dirs):
    model = tiny_dirs["llama"]
    args = [model, "--tokens", "1600", "--seq-len", "8", "--batch-size", "1", "--top-k", "4",
            "--checkpoint-every", "0"]
    subprocess.run(kvmem_cmd("profile", *args, "--out", tmp_path / "whole"), check=True, env=env(),
                   capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(kvmem_cmd("profile", *args, "--out", out), env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = out.with_name("killed.partial") / "checkpoint" / "progress.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if json.loads(progress.read_text())["next_row"] >= 20:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the run finished before it could be killed (or left a half run in --out)"
    killed_at = json.loads(progress.read_text())["next_row"]
    assert 0 < killed_at < 200
    # the same command again continues the unfinished run from its checkpoint
    again = subprocess.run(kvmem_cmd("profile", *args, "--out", out), env=env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "continuing the unfinished run" in again.stderr
    assert not progress.parent.parent.exists()
    for name in FILES:
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert any(".context." in name for name in load_file(str(out / "stats.safetensors")))  # the windows too
    assert manifest_without_time(out) == manifest_without_time(tmp_path / "whole")


def _state(run):
    return load_file(str(run.path / "stats.safetensors"))


def assert_same_stats(a, b, cuts=(), tol=0.0):
    """a (merged from shards starting at the global token indices ``cuts``) has b's statistics exactly (float
    values within ``tol`` relative where the two ran with other thread counts); its context windows know
    every position b knows except those across a cut from their example."""
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for name in sa:
        if name.endswith((".sum", ".sumsq")):  # sums of float32 batch sums in another order (the whole run
            # takes the full rows of every shard before the short ones: kvmem.profile.runner.schedule)
            torch.testing.assert_close(sa[name], sb[name], rtol=1e-6, atol=1e-6)
        elif name.endswith(".context.window"):
            prefix = name[: -len("window")]
            offs = torch.arange(-int(sa[prefix + "meta.before"]), int(sa[prefix + "meta.after"]) + 1)
            index = sa[prefix + "index"][:, None]
            side = lambda x: sum((x >= c).long() for c in cuts)  # noqa: E731
            across = side(index + offs) != side(index)
            wa, wb = sa[name].float(), sb[name].float()
            assert torch.equal(~wa.isnan(), ~wb.isnan() & ~across), name
            torch.testing.assert_close(wa[~wa.isnan()], wb[~wa.isnan()], rtol=tol, atol=tol, msg=name)
        elif not name.endswith("meta.last_index"):  # exact; empty slots hold NaN
            t = tol if sa[name].is_floating_point() else 0
            torch.testing.assert_close(sa[name], sb[name], rtol=t, atol=t, equal_nan=True, msg=name)
    assert torch.equal(a.tokens.ids, b.tokens.ids) and torch.equal(a.tokens.doc_offsets, b.tokens.doc_offsets)


def test_merge_of_shards_equals_one_run(tmp_path, corpus, tiny_models):
    """Shards of document rows (BOS first) merge into the single run exactly. One row per batch: a row's m
    then depends on the row alone (in a padded batch its batch-mates change the float rounding)."""
    model = tiny_models["qwen2"]
    cfg = ProfileConfig(corpus=str(corpus), seq_len=8, batch_size=1, top_k=4, checkpoint_every=1e9)
    from dataclasses import replace

    whole = kvmem.profile(cfg, tmp_path / "whole", model=model)
    kvmem.profile(replace(cfg, shard="0/2"), tmp_path / "a", model=model)
    b = kvmem.profile(replace(cfg, shard="1/2"), tmp_path / "b", model=model)
    assert b.tokens.continues_doc and b.tokens.offset > 0  # the shard boundary falls inside the long document
    assert b.layout.bos_id is not None and int(b.layout.position(torch.tensor([b.tokens.offset]))[0]) == 1
    merged = kvmem.merge([tmp_path / "a", tmp_path / "b"], tmp_path / "ab")
    assert_same_stats(merged, whole, cuts=[b.tokens.offset])
    assert merged.tokens.n_docs == whole.tokens.n_docs
    # independent runs merge too: the second is moved after the first
    again = kvmem.merge([tmp_path / "whole", tmp_path / "whole"], tmp_path / "twice")
    assert again.tokens.n_tokens == 2 * whole.tokens.n_tokens
    s2, s1 = again.stats[0], whole.stats[0]
    assert torch.equal(s2.count_pos, 2 * s1.count_pos) and s2.n == 2 * s1.n
    assert torch.equal(s2.top.value[:, 0], s1.top.value[:, 0])
    n = whole.tokens.n_tokens  # the second run's windows moved with its tokens
    later = s2.context.index >= n
    assert later.any() and torch.equal(s2.context.window[later].float().nan_to_num(), s1.context.lookup(
        s2.context.neuron[later], s2.context.index[later] - n).nan_to_num())


def test_torchrun_two_processes_equal_one(tmp_path, corpus, tiny_dirs, tiny_models):
    args = ["--corpus", corpus, "--seq-len", "8", "--batch-size", "1", "--top-k", "4"]  # rows alone: see above
    model = tiny_dirs["gpt2"]
    subprocess.run(kvmem_cmd("profile", model, *args, "--out", tmp_path / "one"), check=True, env=env(),
                   capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
                "-m", "kvmem", "profile", str(model), *map(str, args), "--out", str(tmp_path / "two")]
    res = subprocess.run(torchrun, env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    one, two = kvmem.open_run(tmp_path / "one"), kvmem.open_run(tmp_path / "two")
    assert two.manifest["settings"]["world_size"] == 2
    cut = int(one.layout.starts[one.layout.n_rows // 2])  # where rank 1's block of rows starts
    # torchrun runs each rank with OMP_NUM_THREADS=1, the single run with the machine's threads: m differs
    # by matmul rounding (~1e-7 relative); every index, count and slot is the same
    assert_same_stats(two, one, cuts=[cut], tol=1e-5)
    assert not (tmp_path / "two" / ".shards").exists()


def test_kill_between_the_checkpoint_files_resumes_identically(tmp_path, corpus, tiny_models, monkeypatch):
    """A kill after a checkpoint's state is written but before progress.json is: the old progress
    must still name the state it belongs to (deterministic version of the subprocess kill above)."""
    from kvmem.profile import run as runfiles

    model = tiny_models["llama"]
    cfg = ProfileConfig(corpus=str(corpus), seq_len=8, batch_size=1, top_k=4, checkpoint_every=0)
    whole = kvmem.profile(cfg, tmp_path / "whole", model=model)
    real, calls = runfiles.write_json, []

    def killed_on_the_fourth_progress(path, obj):
        if Path(path).name == "progress.json":
            calls.append(1)
            if len(calls) == 4:
                raise KeyboardInterrupt  # the state file of this checkpoint is already on disk
        real(path, obj)

    monkeypatch.setattr(runfiles, "write_json", killed_on_the_fourth_progress)
    with pytest.raises(KeyboardInterrupt):
        kvmem.profile(cfg, tmp_path / "run", model=model)
    monkeypatch.setattr(runfiles, "write_json", real)
    resumed = kvmem.profile(cfg, tmp_path / "run", model=model, resume=True)
    for name in FILES:
        assert (resumed.path / name).read_bytes() == (whole.path / name).read_bytes(), name
    assert resumed.stats[0].context.key.numel() > 0
