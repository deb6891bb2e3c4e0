"""Benchmark the whole-model value projection (``kvmem.vocab.compute_projection``).

    python scripts/bench_vocab.py                                  # SmolLM2-135M on the CPU
    python scripts/bench_vocab.py --chunk-mb 64 --chunk-mb 256     # compare chunk bounds
    python scripts/bench_vocab.py --shape llama3-8b                # random-init Llama-3-8B shapes, on CUDA
    python scripts/bench_vocab.py --shape llama3-8b --device cpu --layers 1 --neurons 256   # smoke test

``--shape llama3-8b`` builds only what the projection reads, in bfloat16 on the device: W_out of
32 layers × 14,336 × 4,096 (3.8 GB), W_U 4,096 × 128,256 (1.1 GB) and the final RMSNorm, with
random weights (timings do not depend on the values). It reports the time and the peak device
memory (torch.cuda.max_memory_allocated) above the weights. ``--layers`` / ``--neurons`` cut the
work down for a run without a GPU (the figures then do not describe the full model).
Prints one JSON object per run on stdout. The RSS figures are sampled during each run; only the
first run of a process is clean (the allocator keeps pages freed by earlier runs).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time

import torch

SHAPES = {"llama3-8b": dict(n_layers=32, d_model=4096, d_mlp=14336, d_vocab=128256)}


class _Layer:
    def __init__(self, W_out):
        self.W_out = W_out  # [d_mlp, d_model]


class ShapeModel:
    """The attributes ``compute_projection`` reads, with random weights: no tokenizer, no attention."""

    def __init__(self, n_layers, d_model, d_mlp, d_vocab, device, dtype, seed=0):
        g = torch.Generator(device=device).manual_seed(seed)
        self.device, self.dtype = torch.device(device), dtype
        self.layers = [_Layer(torch.randn(d_mlp, d_model, device=device, dtype=dtype, generator=g) * 0.02)
                       for _ in range(n_layers)]
        self.W_U = torch.randn(d_model, d_vocab, device=device, dtype=dtype, generator=g) * 0.02
        self.final_norm = torch.nn.RMSNorm(d_model, eps=1e-5, device=device, dtype=dtype)
        self.n_layers, self.d_model, self.d_mlp, self.d_vocab = n_layers, d_model, d_mlp, d_vocab

    def value_norms(self, layer):
        return torch.linalg.vector_norm(self.layers[layer].W_out, dim=1, dtype=torch.float32)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RssSampler(threading.Thread):
    """The peak resident set size during one run (sampled every 5 ms; ru_maxrss is per process)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.done = rss_mb(), threading.Event()

    def run(self):
        while not self.done.wait(0.005):
            self.peak = max(self.peak, rss_mb())

    def stop(self) -> float:
        self.done.set()
        self.join()
        return max(self.peak, rss_mb())


def bench(model, chunk_mb, through_norm, k, label) -> dict:
    from kvmem.vocab import chunk_rows, compute_projection

    cuda = model.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss0, cpu0 = rss_mb(), cpu_seconds()
    sampler = RssSampler()
    sampler.start()
    t0 = time.perf_counter()
    out = compute_projection(model, k=k, through_norm=through_norm, chunk_mb=chunk_mb)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak_rss = sampler.stop()
    n = model.n_layers * model.d_mlp
    res = {
        "model": label, "device": str(model.device), "dtype": str(model.dtype).removeprefix("torch."),
        "n_layers": model.n_layers, "d_mlp": model.d_mlp, "d_model": model.d_model, "d_vocab": model.d_vocab,
        "neurons": n, "k": k, "through_norm": through_norm, "chunk_mb": chunk_mb,
        "rows_per_chunk": chunk_rows(model.d_vocab, chunk_mb, model.d_mlp),
        "seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds() - cpu0, 2), "threads": torch.get_num_threads(),
        "neurons_per_s": round(n / seconds),
        "tflops": round(2 * n * model.d_model * model.d_vocab / seconds / 1e12, 2),
        "rss_before_mb": round(rss0), "peak_rss_mb": round(peak_rss), "peak_rss_above_before_mb": round(peak_rss - rss0),
        "result_mb": round(sum(t.numel() * t.element_size() for t in out.values()) / 2**20, 1),
    }
    if cuda:
        res["gpu"] = torch.cuda.get_device_name(model.device)
        res["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
        res["weights_gpu_mb"] = round(base / 2**20)
        res["peak_gpu_above_weights_mb"] = round((torch.cuda.max_memory_allocated() - base) / 2**20)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="kvmem model spec (ignored with --shape)")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="random-init model of this shape instead")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="auto: float32 for --model on CPU, bfloat16 for --shape / CUDA")
    ap.add_argument("--chunk-mb", type=float, action="append", help="repeatable (default 256)")
    ap.add_argument("--through-norm", action="store_true")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--layers", type=int, help="--shape only: fewer layers")
    ap.add_argument("--neurons", type=int, help="--shape only: fewer neurons per layer")
    args = ap.parse_args(argv)
    from kvmem.models.load import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    if args.shape:
        shape = dict(SHAPES[args.shape])
        shape["n_layers"] = args.layers or shape["n_layers"]
        shape["d_mlp"] = args.neurons or shape["d_mlp"]
        dtype = torch.bfloat16 if args.dtype == "auto" else resolve_dtype(args.dtype, device)
        model = ShapeModel(**shape, device=device, dtype=dtype)
        label = f"{args.shape} (random init{', reduced' if args.layers or args.neurons else ''})"
        if device.type != "cuda":
            print("note: no CUDA device: this run is a CPU smoke test; the GPU figures are unmeasured",
                  file=sys.stderr)
    else:
        import kvmem

        model = kvmem.load(args.model, device=str(device), dtype=args.dtype)
        label = args.model
    for chunk_mb in args.chunk_mb or [256]:
        print(json.dumps(bench(model, chunk_mb, args.through_norm, args.k, label)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
