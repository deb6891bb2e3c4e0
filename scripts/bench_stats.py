"""Time one LayerStats.update (warm stores) against the layer's down-projection matmul.

    python scripts/bench_stats.py [--n 8192] [--d-mlp 1536] [--d-model 576] [--gated] [--dtype float32]
                                  [--backend auto|torch]

Activations are synthetic SwiGLU coefficients m = silu(gate) * up with a heavy-tailed per-token scale
(gate, up ~ N(0, 1) * scale); each timed batch is new data (fresh token indices, ~300-token documents)
after --warm batches have filled the stores. The reference is coef @ W_out ([N, d_mlp] @ [d_mlp, d_model]),
one of the three matmuls of a gated FFN forward. Prints median ms and the ratio update / matmul.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvmem.stats import LayerStats


def batch(i: int, n: int, d: int, dtype: torch.dtype, gen: torch.Generator):
    scale = torch.distributions.StudentT(3.0).sample((n, 1)).abs().clamp(max=20) * 0.5 + 0.5
    gate = torch.randn(n, d, generator=gen) * scale
    up = torch.randn(n, d, generator=gen) * scale
    m = torch.nn.functional.silu(gate) * up
    ti = torch.arange(i * n, (i + 1) * n)
    return m.to(dtype), ti, ti // 300, ti % 1024, gate.to(dtype), up.to(dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--d-mlp", type=int, default=1536)
    ap.add_argument("--d-model", type=int, default=576)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--gated", action="store_true", help="also pass gate/up (quadrant statistics)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="auto", choices=["auto", "torch"],
                    help="auto: the fused kernel on CPU (kvmem.stats.fused); torch: the GPU path")
    ap.add_argument("--warm", type=int, default=8, help="batches streamed before timing")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of one update")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    dev = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    s = LayerStats(args.d_mlp, k=args.k, gated=args.gated, max_pos=1024, device=dev, backend=args.backend)
    data = [tuple(x.to(dev) for x in batch(i, args.n, args.d_mlp, dtype, gen)) for i in range(args.warm + args.reps)]
    w_out = torch.randn(args.d_mlp, args.d_model, dtype=dtype, device=dev)

    def upd(i: int):
        m, ti, doc, pos, g, u = data[i]
        s.update(m, ti, doc, pos, gate=g if args.gated else None, up=u if args.gated else None)

    t0 = time.perf_counter()
    for i in range(args.warm):
        upd(i)
    sync()
    warm_s = time.perf_counter() - t0
    t_upd, t_mm, c_upd, c_mm = [], [], [], []
    for i in range(args.warm, args.warm + args.reps):  # interleaved, so load changes hit both alike
        m = data[i][0]
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        m @ w_out
        sync()
        t_mm.append(time.perf_counter() - t0)
        c_mm.append(time.process_time() - c0)
        t0, c0 = time.perf_counter(), time.process_time()
        upd(i)
        sync()
        t_upd.append(time.perf_counter() - t0)
        c_upd.append(time.process_time() - c0)
    mu, mm = statistics.median(t_upd) * 1e3, statistics.median(t_mm) * 1e3
    cu, cm = statistics.median(c_upd) * 1e3, statistics.median(c_mm) * 1e3
    print(f"shape [{args.n}, {args.d_mlp}] {args.dtype} on {dev} (gated={args.gated}, k={args.k}, "
          f"backend {args.backend}), "
          f"torch threads {torch.get_num_threads()}")
    print(f"warm-up: {args.warm} updates in {warm_s:.2f} s; last paths: {s._paths}")
    print(f"LayerStats.update (warm): {mu:8.1f} ms  (min {min(t_upd) * 1e3:.1f})")
    print(f"coef @ W_out matmul:      {mm:8.1f} ms  (min {min(t_mm) * 1e3:.1f})")
    print(f"ratio update / matmul:    {mu / mm:8.2f}")
    print(f"CPU time (all threads): update {cu:.1f} ms, matmul {cm:.1f} ms, ratio {cu / cm:.2f}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        data.append(tuple(x.to(dev) for x in batch(len(data), args.n, args.d_mlp, dtype, gen)))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            upd(len(data) - 1)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
