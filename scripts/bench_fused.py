"""Time only the fused CPU pass (kvmem.stats.fused.update) on synthetic SwiGLU batches with warm stores.

    python scripts/bench_fused.py [--n 2048] [--d-mlp 1536] [--threads 1] [--reps 9] [--plain] [--signs]
                                  [--module /path/to/variant.py] [--check]

Batches are like scripts/bench_stats.py's (m = silu(gate) * up with a heavy-tailed per-token scale,
~300-token documents, fresh token indices per batch). The stores are warmed with --warm batches first,
then each timed call gets a new batch. --module times a variant of fused.py (a file with the same
``update``); --check runs the variant and kvmem.stats.fused on the same batches and compares every state
tensor exactly (float64 sums to 1e-12 relative). For a quiet single-core figure run it under
``taskset -c 0`` with --threads 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

from kvmem import tuning
from kvmem.stats import LayerStats
from kvmem.stats import fused as fused_main
from kvmem.stats.base import Batch

COMPS = ["top", "bottom", "top_docs", "sample", "moments", "hist", "counts", "quadrants"]


def make_batch(i: int, n: int, d: int, gen: torch.Generator):
    scale = torch.distributions.StudentT(3.0).sample((n, 1)).abs().clamp(max=20) * 0.5 + 0.5
    gate = torch.randn(n, d, generator=gen) * scale
    up = torch.randn(n, d, generator=gen) * scale
    m = (torch.nn.functional.silu(gate) * up).contiguous()
    ti = torch.arange(i * n, (i + 1) * n)
    return m, ti, ti // 300, ti % 1024, gate, up


def load(path: str | None):
    if not path:
        return fused_main
    name = "fused_" + Path(path).stem
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def run(mod, data, s: LayerStats, gated: bool, times: list | None, clock=time.perf_counter):
    for m, ti, doc, pos, g, u in data:
        b = Batch(m, ti, doc, pos, g if gated else None, u if gated else None, int(ti[0]), int(ti[-1]),
                  int(ti[0]) > s._last_index, stats=s)
        t0 = clock()
        done = mod.update(s.parts, b)
        dt = clock() - t0
        assert done, "the fused pass did not cover the components"
        s.n += m.shape[0]
        s._last_index = int(ti[-1])
        if times is not None:
            times.append(dt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--d-mlp", type=int, default=1536)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--plain", action="store_true", help="not gated (no quadrants)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warm", type=int, default=6)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--module", default=None, help="a variant of kvmem/stats/fused.py to time instead")
    ap.add_argument("--check", action="store_true", help="compare the variant's states with kvmem.stats.fused")
    ap.add_argument("--signs", action="store_true",
                    help="sign_preserving_act (up's sign from m's and gate's; --check compares with it off)")
    ap.add_argument("--omp", action="store_true", help="torch's OpenMP team for the blocks (kvmem.tuning)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tuning.apply(args.omp)
    gated = not args.plain
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    data = [make_batch(i, args.n, args.d_mlp, gen) for i in range(args.warm + args.reps)]
    comps = COMPS if gated else COMPS[:-1]
    mod = load(args.module)
    s = LayerStats(args.d_mlp, k=args.k, gated=gated, max_pos=1024, components=comps, sign_preserving_act=args.signs)
    run(mod, data[:1], s, gated, None)  # compile
    s = LayerStats(args.d_mlp, k=args.k, gated=gated, max_pos=1024, components=comps, sign_preserving_act=args.signs)
    run(mod, data[: args.warm], s, gated, None)
    times: list = []
    run(mod, data[args.warm:], s, gated, times)
    med = statistics.median(times) * 1e3
    print(f"fused.update [{args.n}, {args.d_mlp}] gated={gated} threads={args.threads} "
          f"({mod.__name__}): median {med:.2f} ms, min {min(times) * 1e3:.2f} ms")
    if args.check:
        ref = LayerStats(args.d_mlp, k=args.k, gated=gated, max_pos=1024, components=comps)
        run(fused_main, data, ref, gated, None)
        a, b = s.state_dict(), ref.state_dict()
        bad = []
        for key in b:
            x, y = a[key], b[key]
            if x.dtype == torch.float64:
                ok = torch.allclose(x, y, rtol=1e-12, atol=1e-9)
            else:
                ok = torch.equal(x, y)
            if not ok:
                bad.append(key)
        print("check:", "identical" if not bad else f"DIFFER in {bad}")


if __name__ == "__main__":
    main()
