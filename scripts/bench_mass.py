"""Time kvmem.stats.mass (mass-L0 per token) on both paths.

    python scripts/bench_mass.py [--n 2048] [--d-mlp 1536] [--threads 2] [--reps 30] [--device cpu]

Synthetic SwiGLU coefficients m = silu(gate) * up with a heavy-tailed per-token scale and value norms
uniform in [0.5, 1.5]. Each path computes k_f of the same batch --reps times (the torch path a few times
only: it sorts); prints the median and best ms and checks that the two paths agree.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvmem.stats.base import LayerSpec
from kvmem.stats.mass import MassCounts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--d-mlp", type=int, default=1536)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    gen = torch.Generator().manual_seed(0)
    scale = torch.distributions.StudentT(3.0).sample((a.n, 1)).abs().clamp(max=20) * 0.5 + 0.5
    gate = torch.randn(a.n, a.d_mlp, generator=gen) * scale
    up = torch.randn(a.n, a.d_mlp, generator=gen) * scale
    m = (torch.nn.functional.silu(gate) * up).contiguous().to(a.device)
    w = torch.rand(a.d_mlp, generator=gen) + 0.5
    stat = MassCounts(LayerSpec(a.d_mlp, value_norm=w, device=torch.device(a.device)))
    results = {}
    for name, use in (("numba", True), ("torch", False)):
        if use and m.device.type != "cpu":
            continue
        stat.token_k(m, use)  # compile / warm up
        times = []
        for _ in range(a.reps if use else max(3, a.reps // 10)):
            if m.device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            results[name] = stat.token_k(m, use)
            if m.device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t) * 1e3)
        print(f"{name:6s} N={a.n} d={a.d_mlp} threads={a.threads}: median {statistics.median(times):.2f} ms, "
              f"best {min(times):.2f} ms")
    if len(results) == 2:
        print("paths agree:", torch.equal(results["numba"], results["torch"].cpu()))
    k = next(iter(results.values())).double()
    print("mean k_0.5 = %.1f, k_0.9 = %.1f of %d" % (k[:, 0].mean(), k[:, 1].mean(), a.d_mlp))


if __name__ == "__main__":
    main()
