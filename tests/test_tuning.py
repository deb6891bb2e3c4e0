"""kvmem.tuning: process-wide CPU tuning only where the profiler applies it, with a switch to turn it off."""

import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, sys
import torch
import kvmem
from kvmem import tuning
from kvmem.stats import LayerStats
s = LayerStats(8, k=2)
m = torch.randn(64, 8)
s.update(m, torch.arange(64), torch.zeros(64, dtype=torch.long), torch.arange(64) % 16)
after_import = tuning.state()
from kvmem.profile.runner import ProfileConfig, Profiler
from kvmem.profile.tokens import TokenStore
from transformers import GPT2Config, AutoModelForCausalLM
hf = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
model = kvmem.from_hf(hf, None)
store = TokenStore(torch.arange(40, dtype=torch.int32) % 50, torch.tensor([0, 40]))
p = Profiler(model, ProfileConfig(seq_len=8, batch_size=2, top_k=2, checkpoint_every=1e9), store, Path("."))
p.run()
print(json.dumps({"after_import": after_import, "after_profile": tuning.state(), "profiler": p.tuning}))
""".replace('Path(".")', "__import__('pathlib').Path('.')")


def probe(env_extra):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env_extra}
    res = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    import json

    return json.loads(res.stdout.strip().splitlines()[-1])


def test_nothing_is_tuned_on_import_or_by_the_statistics_alone_only_by_the_profiler():
    got = probe({})
    assert got["after_import"] == {"omp_team": False, "allocator": False}
    glibc = platform.libc_ver()[0] == "glibc"
    assert got["after_profile"]["allocator"] is glibc and got["profiler"]["allocator"] is glibc
    assert got["after_profile"]["omp_team"] is True  # torch's CPU build here runs on libgomp


def test_the_switch_turns_both_off():
    got = probe({"KVMEM_CPU_TUNING": "0"})
    assert got["after_profile"] == {"omp_team": False, "allocator": False} == got["profiler"]
