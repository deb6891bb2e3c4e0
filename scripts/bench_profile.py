"""Benchmark `kvmem profile` side by side with the alternatives, in one run, on the same tokens.

Methods (tokens/s and peak memory of each):
  forward+logits   the model's plain forward pass with the LM head
  forward-no-head  the base model (no LM head): the ceiling for a profiler that needs no logits
  tlens-cache      TransformerLens 4 TransformerBridge.run_with_cache on the MLP hook_post hooks plus a
                   per-batch top-k merged into running stores (what a user would otherwise write)
  kvmem-profile    kvmem's streaming profiler over all neurons of all layers (all statistics)

  python scripts/bench_profile.py --model smollm2-135m --tokens 16384 --seq-len 512       # CPU, real model
  python scripts/bench_profile.py --shape gpt2-small --tokens 262144 --seq-len 1024       # GPU, random init
  python scripts/bench_profile.py --shape llama3-8b --tokens 65536 --seq-len 1024 --skip tlens-cache

Ratios printed at the end are measured in this one run. Peak memory: GPU max_memory_allocated per
method; on CPU the peak resident set size above the baseline, sampled every 5 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kvmem  # noqa: E402
from kvmem.profile.runner import Profiler, ProfileConfig, auto_batch_size  # noqa: E402
from kvmem.tuning import apply as apply_tuning  # noqa: E402
from kvmem.profile.tokens import TokenStore  # noqa: E402

SHAPES = {
    "gpt2-small": ("gpt2", dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)),
    "llama-1b": ("llama", dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=2048)),
    "llama3-8b": ("llama", dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336,
                                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                max_position_embeddings=2048)),
}


def build_random(shape: str, device: str, dtype: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, kw = SHAPES[shape]
    cfg = AutoConfig.for_model(model_type, **kw)
    dev = kvmem.models.load.resolve_device(device)
    dt = kvmem.models.load.resolve_dtype(dtype, dev)
    with torch.device(dev):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=dt)
    return kvmem.from_hf(hf, None, spec=f"random:{shape}", device=dev, dtype=dt)


class PeakMemory:
    """Peak GPU allocation, or peak RSS above the start on CPU (sampled)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            import psutil

            self.proc, self.base, self.peak, self.stop = psutil.Process(), 0, 0, False
            self.base = self.proc.memory_info().rss
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.value = torch.cuda.max_memory_allocated()
            self.note = "GPU peak allocated"
        else:
            self.stop = True
            self.thread.join()
            self.value = max(self.peak - self.base, 0)
            self.note = "CPU peak RSS above baseline"


def rows(ids: torch.Tensor, batch: int):
    for i in range(0, ids.shape[0], batch):
        yield ids[i:i + batch]


def method_forward(model, ids, batch, head: bool):
    base = model.hf.get_decoder() if hasattr(model.hf, "get_decoder") else model.hf.base_model
    with torch.inference_mode():
        for x in rows(ids, batch):
            x = x.to(model.device, non_blocking=True)
            if head:
                model.hf(input_ids=x, use_cache=False).logits.float()
            else:
                base(input_ids=x, use_cache=False)


def method_tlens(model, ids, batch, k=20):
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(model.hf.config.model_type, hf_model=model.hf,
                                                 tokenizer=model.tokenizer or _dummy_tokenizer())
    L, d = model.n_layers, model.d_mlp
    vals = torch.full((L, k, d), -torch.inf, device=model.device)
    idx = torch.full((L, k, d), -1, dtype=torch.long, device=model.device)
    offset = 0
    with torch.inference_mode():
        for x in rows(ids, batch):
            x = x.to(model.device)
            _, cache = bridge.run_with_cache(x, names_filter=lambda n: n.endswith("mlp.hook_post"))
            n = x.numel()
            pos = torch.arange(offset, offset + n, device=model.device)
            for layer in range(L):
                acts = cache[f"blocks.{layer}.mlp.hook_post"].reshape(n, d).float()
                v = torch.cat([vals[layer], acts])
                i = torch.cat([idx[layer], pos[:, None].expand(n, d)])
                top = v.topk(k, dim=0)
                vals[layer], idx[layer] = top.values, i.gather(0, top.indices)
            offset += n
            del cache


def _dummy_tokenizer():
    import tempfile

    from tokenizers import Tokenizer, models
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                  unk_token="<unk>", eos_token="<unk>", bos_token="<unk>")
    path = tempfile.mkdtemp()
    tok.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def method_kvmem(model, ids, batch, seq_len, k=20):
    flat = ids.flatten().to(torch.int32)
    store = TokenStore(flat, torch.tensor([0, flat.numel()]))
    cfg = ProfileConfig(seq_len=seq_len, batch_size=batch, top_k=k, checkpoint_every=1e9)
    Profiler(model, cfg, store, Path("/nonexistent")).run()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a model spec (e.g. smollm2-135m)")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="a random-init model of this shape instead")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=None, help="rows per batch (default ~8k tokens GPU, 2k CPU)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--skip", nargs="*", default=[], help="methods to skip")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of every method, interleaved (medians)")
    ap.add_argument("--json", dest="json_out", help="also write the results to this JSON file")
    args = ap.parse_args()
    model = build_random(args.shape, args.device, args.dtype) if args.shape else \
        kvmem.load(args.model or "smollm2-135m", device=args.device, dtype=args.dtype)
    n_rows = max(1, args.tokens // args.seq_len)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.d_vocab, (n_rows, args.seq_len), generator=gen)
    if model.tokenizer is not None and not args.shape:  # a real model reads real text
        from kvmem.profile.corpus import Corpus
        from kvmem.profile.tokens import tokenize

        store, _ = tokenize(Corpus("pydoc"), model.tokenizer, n_rows * args.seq_len)
        ids = store.ids[: n_rows * args.seq_len].long().view(n_rows, args.seq_len)
    batch = args.batch or auto_batch_size(model, args.seq_len)  # what kvmem profile takes by default
    methods = {
        "forward+logits": lambda: method_forward(model, ids, batch, head=True),
        "forward-no-head": lambda: method_forward(model, ids, batch, head=False),
        "kvmem-profile": lambda: method_kvmem(model, ids, batch, args.seq_len),
        "tlens-cache": lambda: method_tlens(model, ids, batch),  # last: the bridge wraps the HF modules
    }
    if model.device.type == "cpu":  # kvmem profile tunes glibc's allocator; every method runs with it
        print(f"CPU tuning for every method (kvmem.tuning, KVMEM_CPU_TUNING=0 turns it off): {apply_tuning()}")
    method_forward(model, ids[:batch], batch, head=False)  # warm-up (kernels, allocator)
    runs: dict[str, list[dict]] = {}
    order = [n for n in methods if n not in args.skip]
    # --repeat rounds, the methods interleaved within each (tlens-cache stays last: its bridge wraps
    # the model's modules); each method's figures are the medians over its rounds
    schedule = [n for _ in range(args.repeat) for n in order if n != "tlens-cache"]
    schedule += ["tlens-cache"] * (args.repeat if "tlens-cache" in order else 0)
    for name in schedule:
        fn = methods[name]
        with PeakMemory(model.device) as mem:
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        runs.setdefault(name, []).append({"seconds": dt, "cpu_seconds": cpu, "peak_bytes": mem.value,
                                          "note": mem.note})
        print(f"  round {len(runs[name])}: {name:16s} {ids.numel() / dt:10,.0f} tok/s wall  "
              f"{ids.numel() / cpu:10,.0f} tok/CPU-s", flush=True)
    results = {}
    for name in order:
        dt = statistics.median(r["seconds"] for r in runs[name])
        cpu = statistics.median(r["cpu_seconds"] for r in runs[name])
        peak = max(r["peak_bytes"] for r in runs[name])
        results[name] = {"seconds": dt, "cpu_seconds": cpu, "tokens_per_s": ids.numel() / dt,
                         "tokens_per_cpu_s": ids.numel() / cpu, "peak_bytes": peak,
                         "rounds": [r["seconds"] for r in runs[name]]}
        mem_note = runs[name][0]["note"]
        print(f"{name:16s} {ids.numel() / dt:10,.0f} tok/s wall  {ids.numel() / cpu:10,.0f} tok/CPU-s  "
              f"{dt:8.2f} s  peak {peak / 2**20:9.1f} MiB ({mem_note})", flush=True)
    r = {k: v["tokens_per_s"] for k, v in results.items()}
    rc = {k: v["tokens_per_cpu_s"] for k, v in results.items()}
    print(f"\n{model.spec}: {model.n_layers} layers x {model.d_mlp} neurons, {ids.numel():,} tokens, "
          f"seq_len {args.seq_len}, batch {batch} rows, {model.device} {str(model.dtype).removeprefix('torch.')}")
    kp, kc = r.get("kvmem-profile"), rc.get("kvmem-profile")
    for other in ("forward+logits", "forward-no-head", "tlens-cache"):
        if kp and other in r:
            print(f"kvmem-profile / {other:16s} = {kp / r[other]:.2f}x wall, {kc / rc[other]:.2f}x by CPU time "
                  "(the CPU-time ratio is robust to other load on a CPU machine)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
