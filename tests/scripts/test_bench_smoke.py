"""scripts/bench_profile.py on CPU (--smoke: tiny shapes, float32) and the GPU script's pieces.

The timings themselves are not checked (2 shared cores); what is: every method runs and lands in the JSON
and the markdown, the bar and projection arithmetic against hand computations, the statistics' size
against the bytes safetensors writes for them, a failing method leaving the others' figures, and the
device call documented in docs/gpu.md fitting the device tool's limits.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import scripts.bench_profile as bench  # noqa: E402


def test_smoke_runs_every_method_and_writes_json_and_markdown(tmp_path):
    from kvmem.profile import runner

    before = getattr(runner, "SYNC_FREE", None)
    rep = bench.main(["--smoke", "--out", str(tmp_path)])
    assert getattr(runner, "SYNC_FREE", None) == before  # the switch is restored
    expected = [m for m in bench.METHODS if (m != "kvmem-compiled" or "compile" in bench.runner_options())
                and (m != "kvmem-sync-off" or hasattr(runner, "SYNC_FREE"))]
    assert list(rep["results"]) == expected
    for name, r in rep["results"].items():
        assert "error" not in r, (name, r)
        assert r["tokens_per_s"] == pytest.approx(rep["tokens"] / r["seconds"])
    assert rep["tokens"] == 512 and rep["seq_len"] == 64 and rep["batch"] == 4 and rep["final"]
    assert rep["results"]["forward-compiled"]["compile_seconds"] > 0
    assert rep["stats_bytes"] > 0 and [b["bar"] for b in rep["bars"]] == [
        f"{rep['kvmem_method']} / forward+logits", f"{rep['kvmem_method']} / tlens-cache",
        f"{rep['kvmem_method']} peak <= forward-no-head peak + statistics"]
    saved = json.loads((tmp_path / "bench-tiny-gpt2.json").read_text())
    assert saved["results"].keys() == rep["results"].keys() and saved["final"] is True
    md = (tmp_path / "bench-tiny-gpt2.md").read_text()
    for name in expected:
        assert f"| {name} | {rep['results'][name]['tokens_per_s']:,.0f} |" in md
    assert "GLUScope" in md and "Transluce" in md and "20,000,000" in md and "100,000,000" in md


def test_a_failing_method_leaves_the_others(tmp_path, monkeypatch):
    def broken(model, head, compiled=None):
        def run(ids, batch):
            raise RuntimeError("boom\nsecond line")
        return run
    monkeypatch.setattr(bench, "forward_fn", broken)
    rep = bench.main(["--smoke", "--shape", "tiny-llama", "--skip", "tlens-cache", "kvmem-compiled", "kvmem-sync-off",
                      "--out", str(tmp_path)])
    res = rep["results"]
    assert res["forward+logits"]["error"] == "RuntimeError: boom second line"  # one line
    assert "error" in res["forward-no-head"] and "error" in res["forward-compiled"]
    assert res["kvmem-profile"]["tokens_per_s"] > 0
    bar = rep["bars"][0]
    assert bar["bar"] == "kvmem-profile / forward-no-head" and bar["value"] is None and bar["ok"] is None
    assert "| forward+logits | failed |" in (tmp_path / "bench-tiny-llama.md").read_text()


def test_bars_and_projection_by_hand():
    res = {"forward+logits": {"tokens_per_s": 200.0, "peak_bytes": 0},
           "forward-no-head": {"tokens_per_s": 400.0, "peak_bytes": 1000},
           "tlens-cache": {"tokens_per_s": 80.0},
           "kvmem-profile": {"tokens_per_s": 300.0, "peak_bytes": 1100}}
    bars = {b["bar"]: b for b in bench.check_bars("gpt2-small", res, "kvmem-profile", stats_size=100)}
    assert bars["kvmem-profile / forward+logits"]["value"] == 1.5 and bars["kvmem-profile / forward+logits"]["ok"]
    assert bars["kvmem-profile / tlens-cache"]["value"] == 3.75 and bars["kvmem-profile / tlens-cache"]["ok"] is False
    mem = bars["kvmem-profile peak <= forward-no-head peak + statistics"]
    assert mem["ok"] and mem["allowed_bytes"] == 1100  # equal to the allowance passes
    assert not bench.check_bars("gpt2-small", res, "kvmem-profile", stats_size=99)[-1]["ok"]
    eight = {b["bar"]: b for b in bench.check_bars("llama3-8b", res, "kvmem-profile", stats_size=100)}
    assert eight["kvmem-profile / forward-no-head"]["value"] == 0.75 and not eight["kvmem-profile / forward-no-head"]["ok"]
    proj = bench.project(40_000.0, 458_752)
    assert [p["tokens"] for p in proj] == [20_000_000, 100_000_000]
    assert proj[0]["hours"] == pytest.approx(20_000_000 / 40_000 / 3600)  # 0.1389 h
    assert proj[1]["hours"] == pytest.approx(100_000_000 / 40_000 / 3600)
    assert bench.project(None, 1) == []


def test_statistics_size_is_what_safetensors_stores(tmp_path):
    from safetensors import safe_open

    from kvmem.profile import run as runfiles

    model = bench.build_random("tiny-llama", "cpu", "float32")
    ids = torch.randint(0, model.d_vocab, (8, 64), generator=torch.Generator().manual_seed(1))
    prof = bench.kvmem_fn(model, 64, compiled=False)(ids, 4)
    runfiles.save_stats(tmp_path / "s.safetensors", prof.stats)
    stored = 0
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            stored += t.numel() * t.element_size()
    assert bench.stats_bytes(prof) == stored > 0


def test_forward_without_head_returns_hidden_states_not_logits():
    model = bench.build_random("tiny-gpt2", "cpu", "float32")
    x = torch.randint(0, model.d_vocab, (2, 16))
    with torch.inference_mode():
        out = bench.decoder(model)(input_ids=x, use_cache=False)
        ref = model.hf(input_ids=x, use_cache=False, output_hidden_states=True)
    assert out.last_hidden_state.shape == (2, 16, 64)
    torch.testing.assert_close(out.last_hidden_state, ref.hidden_states[-1])


def test_gpu_call_in_docs_fits_the_device_tool():
    doc = (ROOT / "docs" / "gpu.md").read_text()
    command = re.search(r"^command: `(.+)`$", doc, flags=re.M).group(1)
    assert len(command) <= 2000 and "scripts/gpu_bench.sh" in command
    assert re.search(r"^carry: \[\"\.whl\"\]$", doc, flags=re.M)
    timeout = int(re.search(r"^timeout_s: (\d+)$", doc, flags=re.M).group(1))
    budgets = re.findall(r"_TIMEOUT:-(\d+)", (ROOT / "scripts" / "gpu_bench.sh").read_text())
    assert sum(map(int, budgets)) + 60 <= timeout <= 600  # both shapes' timeouts and the set-up fit the call
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_bench.sh")], check=True)
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "fetch_gpu_wheels.sh")], check=True)
