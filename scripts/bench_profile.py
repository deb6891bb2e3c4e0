"""Benchmark `kvmem profile` side by side with the alternatives, in one run, on the same tokens.

Methods (tokens/s and peak memory of each, every one warmed up on one batch first):
  forward+logits     the model's plain forward pass with the LM head (logits cast to float32)
  forward-no-head    the base model (no LM head): the ceiling for a profiler that needs no logits
  forward-compiled   the base model under torch.compile (its compile time is reported apart, not timed)
  tlens-cache        TransformerLens 4 TransformerBridge.run_with_cache on the MLP hook_post hooks plus a
                     per-batch top-k (k=20) merged into running stores (what a user would otherwise write)
  kvmem-profile      kvmem's streaming profiler over all neurons of all layers, all statistics
  kvmem-sync-off     the same with the statistics' sync-free path off (kvmem.profile.runner.SYNC_FREE=False):
                     what the host synchronisations cost, when the runner has that switch
  kvmem-compiled     the same with ProfileConfig(compile=True), when the runner has that option

  python scripts/bench_profile.py --model smollm2-135m --tokens 16384 --seq-len 512        # CPU, real model
  python scripts/bench_profile.py --shape gpt2-small --tokens 1048576 --seq-len 1024        # GPU, random init, bf16
  python scripts/bench_profile.py --shape llama3-8b --tokens 131072 --seq-len 1024 --skip tlens-cache
  python scripts/bench_profile.py --smoke                                                   # CPU, tiny, float32

Output: the table on stdout, and bench-<shape>.json + bench-<shape>.md in --out (default: $OUT when set).
The ratios and the bars (issue 14) are measured in this one run:
  GPT-2 small   kvmem >= 1.5x forward+logits and >= 4x tlens-cache
  Llama-3-8B    kvmem >= 0.9x forward-no-head
  memory        kvmem peak <= forward-no-head peak + the statistics' own size (LayerStats state tensors)
Peak memory: torch.cuda.max_memory_allocated, reset before each method (it includes the weights); on CPU
the peak resident set size above the method's start, sampled every 5 ms (indicative only).
From the kvmem tok/s the run projects the hours for all neurons of this shape over 20M and 100M tokens on
one such device (for llama3-8b: Llama-3.1-8B, 458,752 neurons), beside GLUScope's and Transluce's figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kvmem  # noqa: E402
from kvmem.models.load import resolve_device, resolve_dtype  # noqa: E402
from kvmem.profile.runner import Profiler, ProfileConfig, auto_batch_size  # noqa: E402
from kvmem.profile.tokens import TokenStore  # noqa: E402
from kvmem.tuning import apply as apply_tuning  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import PUBLISHED, check_bars, markdown, project, ratio  # noqa: E402,F401

_LLAMA = dict(num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
              rope_theta=500000.0)
SHAPES = {  # (model_type, config fields); random init
    "gpt2-small": ("gpt2", dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)),
    "llama-1b": ("llama", dict(_LLAMA, num_hidden_layers=16, hidden_size=2048, intermediate_size=8192)),
    "llama3-8b": ("llama", dict(_LLAMA, num_hidden_layers=32, hidden_size=4096, intermediate_size=14336)),
    # --smoke: the same code paths on CPU in seconds
    "tiny-gpt2": ("gpt2", dict(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=256,
                                bos_token_id=0, eos_token_id=0)),
    "tiny-llama": ("llama", dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)),
}
# run in this order: the plain methods first, the compiled ones (long warm-ups) after, tlens-cache last (its
# bridge wraps the model's modules)
METHODS = ("forward+logits", "forward-no-head", "kvmem-profile", "kvmem-sync-off", "forward-compiled", "kvmem-compiled",
           "tlens-cache")


def build_random(shape: str, device: str, dtype: str):
    """A random-init model of ``shape``, built directly on the device in its dtype (an 8B model never
    passes through host memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, kw = SHAPES[shape]
    cfg = AutoConfig.for_model(model_type, **kw)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    torch.manual_seed(0)
    with torch.device(dev):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=dt)
    return kvmem.from_hf(hf.eval(), None, spec=f"random:{shape}", device=dev, dtype=dt)


class PeakMemory:
    """Peak GPU allocation (weights included), or peak RSS above the start on CPU (sampled)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        else:
            import psutil

            self.proc, self.stop = psutil.Process(), False
            self.base = self.peak = self.proc.memory_info().rss
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
            self.value, self.note = torch.cuda.max_memory_allocated(), "GPU peak allocated (weights included)"
        else:
            self.stop = True
            self.thread.join()
            self.value, self.note = max(self.peak - self.base, 0), "CPU peak RSS above the method's start"


def batches(ids: torch.Tensor, batch: int, device: torch.device):
    for i in range(0, ids.shape[0], batch):
        yield ids[i:i + batch].to(device, non_blocking=True)


def decoder(model):
    return model.hf.get_decoder() if hasattr(model.hf, "get_decoder") else model.hf.base_model


def forward_fn(model, head: bool, compiled=None):
    base = compiled if compiled is not None else decoder(model)

    def run(ids, batch):
        with torch.inference_mode():
            for x in batches(ids, batch, model.device):
                if head:
                    model.hf(input_ids=x, use_cache=False).logits.float()
                else:
                    base(input_ids=x, use_cache=False)
    return run


def tlens_fn(model, k: int = 20):
    """TransformerBridge.run_with_cache on blocks.*.mlp.hook_post, then a running top-k per neuron."""
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(model.hf.config.model_type, hf_model=model.hf,
                                                 tokenizer=model.tokenizer or _dummy_tokenizer())
    L, d = model.n_layers, model.d_mlp

    def run(ids, batch):
        vals = torch.full((L, k, d), -torch.inf, device=model.device)
        idx = torch.full((L, k, d), -1, dtype=torch.long, device=model.device)
        offset = 0
        with torch.inference_mode():
            for x in batches(ids, batch, model.device):
                _, cache = bridge.run_with_cache(x, names_filter=lambda n: n.endswith("mlp.hook_post"))
                n = x.numel()
                pos = torch.arange(offset, offset + n, device=model.device)
                for layer in range(L):
                    acts = cache[f"blocks.{layer}.mlp.hook_post"].reshape(n, d).float()
                    top = torch.cat([vals[layer], acts]).topk(k, dim=0)
                    vals[layer] = top.values
                    idx[layer] = torch.cat([idx[layer], pos[:, None].expand(n, d)]).gather(0, top.indices)
                offset += n
                del cache
    return run


def _dummy_tokenizer():
    import tempfile

    from tokenizers import Tokenizer, models
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                  unk_token="<unk>", eos_token="<unk>", bos_token="<unk>")
    path = tempfile.mkdtemp()
    tok.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def runner_options() -> set[str]:
    return {f.name for f in dataclasses.fields(ProfileConfig)}


def kvmem_fn(model, seq_len: int, compiled: bool, k: int = 20, sync_free: bool | None = None):
    """`kvmem profile` of every neuron of every layer with every statistic (context windows included),
    through the public Profiler API; returns the Profiler (its statistics are sized afterwards)."""
    extra = {"compile": True} if compiled else {}

    def run(ids, batch):
        from kvmem.profile import runner

        flat = ids.flatten().to(torch.int32)
        store = TokenStore(flat, torch.tensor([0, flat.numel()]))
        cfg = ProfileConfig(seq_len=seq_len, batch_size=batch, top_k=k, checkpoint_every=1e12, **extra)
        old = getattr(runner, "SYNC_FREE", None)
        if sync_free is not None:
            runner.SYNC_FREE = sync_free
        try:
            prof = Profiler(model, cfg, store, Path("/nonexistent"))
            prof.run()
        finally:
            if sync_free is not None:
                runner.SYNC_FREE = old
        return prof
    return run


def stats_bytes(prof) -> int:
    """The statistics' own size: bytes of every LayerStats state tensor over all layers."""
    total = 0
    for st in prof.stats.values():
        total += sum(t.numel() * t.element_size() for t in st.state_dict().values())
    return total


def environment(model) -> dict:
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        commit = None
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "device": str(model.device), "dtype": str(model.dtype).removeprefix("torch."), "kvmem_commit": commit}
    if model.device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(model.device)
    return env


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a model spec (e.g. smollm2-135m)")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="a random-init model of this shape instead")
    ap.add_argument("--smoke", action="store_true", help="tiny shape (default tiny-gpt2), CPU, float32, 512 tokens, "
                    "rows of 64, 4 rows a batch, one torch thread, torch.compile with the eager backend, the "
                    "sync-free path on: every method and the output, in seconds")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per method (default 16384; --smoke 512)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per row (default 1024 for shapes, 512 else)")
    ap.add_argument("--batch", type=int, default=None, help="rows per batch (default: kvmem profile's, ~8k tokens "
                    "GPU, 4k CPU)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--skip", nargs="*", default=[], choices=METHODS, help="methods to skip")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of every method, interleaved (medians)")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; --smoke eager)")
    ap.add_argument("--sync-free", choices=("auto", "on", "off"), default=None,
                    help="the statistics' sync-free path (kvmem.profile.runner.SYNC_FREE; auto: on except on CPU; "
                         "--smoke: on, so that the GPU's path runs on CPU)")
    ap.add_argument("--out", default=None, help="folder for bench-<shape>.json/.md (default: $OUT when set)")
    ap.add_argument("--json", dest="json_out", help="also write the JSON to this file")
    a = ap.parse_args(argv)
    if a.smoke:
        a.shape = a.shape or "tiny-gpt2"
        a.device, a.dtype = "cpu", "float32"
        a.tokens, a.seq_len = a.tokens or 512, a.seq_len or 64
        a.compile_backend = a.compile_backend or "eager"
        a.batch = a.batch or 4
        a.sync_free = a.sync_free or "on"
    a.tokens = a.tokens or 16384
    a.seq_len = a.seq_len or (1024 if a.shape else 512)
    a.compile_backend = a.compile_backend or "inductor"
    a.sync_free = a.sync_free or "auto"
    a.out = a.out or os.environ.get("OUT")
    return a


def main(argv=None) -> dict:
    """Runs the benchmark; returns the report (also written to --out). The runner's SYNC_FREE switch is
    set for the run and restored after it."""
    from kvmem.profile import runner

    args = parse(argv)
    threads, old = torch.get_num_threads(), getattr(runner, "SYNC_FREE", None)
    if args.smoke:  # tiny shapes: one thread (a shared CPU's OpenMP team spins for nothing: 3x slower)
        torch.set_num_threads(1)
    if hasattr(runner, "SYNC_FREE"):  # the switch, where this checkout has it
        runner.SYNC_FREE = {"auto": None, "on": True, "off": False}[args.sync_free]
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)
        if hasattr(runner, "SYNC_FREE"):
            runner.SYNC_FREE = old


def _run(args) -> dict:
    from kvmem.profile import runner

    model = build_random(args.shape, args.device, args.dtype) if args.shape else \
        kvmem.load(args.model or "smollm2-135m", device=args.device, dtype=args.dtype)
    batch = args.batch or auto_batch_size(model, args.seq_len)  # what kvmem profile takes by default
    n_rows = max(batch, args.tokens // args.seq_len // batch * batch)  # whole batches: one compiled shape
    ids = torch.randint(0, model.d_vocab, (n_rows, args.seq_len), generator=torch.Generator().manual_seed(0))
    if model.tokenizer is not None and not args.shape:  # a real model reads real text
        from kvmem.profile.corpus import Corpus
        from kvmem.profile.tokens import tokenize

        store, _ = tokenize(Corpus("pydoc"), model.tokenizer, n_rows * args.seq_len)
        ids = store.ids[: n_rows * args.seq_len].long().view(n_rows, args.seq_len)
    if model.device.type == "cuda":
        ids = ids.pin_memory()
    else:  # kvmem profile tunes glibc's allocator; every method runs with it
        print(f"CPU tuning for every method (kvmem.tuning, KVMEM_CPU_TUNING=0 turns it off): {apply_tuning()}")
    order = [n for n in METHODS if n not in args.skip]
    if "kvmem-compiled" in order and "compile" not in runner_options():
        order.remove("kvmem-compiled")
        print("kvmem-compiled skipped: ProfileConfig has no `compile` option in this checkout")
    if "kvmem-sync-off" in order and not hasattr(runner, "SYNC_FREE"):
        order.remove("kvmem-sync-off")
        print("kvmem-sync-off skipped: kvmem.profile.runner has no SYNC_FREE switch in this checkout")
    results: dict[str, dict] = {}
    fns, rounds = {}, {}
    warm = ids[:batch]

    def setup(name):  # builds and warms one method on one batch (compile and bridge boot timed apart)
        t0 = time.perf_counter()
        if name in ("forward+logits", "forward-no-head"):
            fn = forward_fn(model, head=name == "forward+logits")
        elif name == "forward-compiled":
            fn = forward_fn(model, head=False, compiled=torch.compile(decoder(model), backend=args.compile_backend,
                                                                      dynamic=False))
        elif name == "tlens-cache":
            fn = tlens_fn(model)
        else:
            fn = kvmem_fn(model, args.seq_len, compiled=name == "kvmem-compiled",
                          sync_free=False if name == "kvmem-sync-off" else None)
        setup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        fn(warm, batch)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        warm_s = time.perf_counter() - t0
        extra = {"compile_seconds": warm_s} if "compiled" in name else {}
        return fn, extra | ({"setup_seconds": setup_s} if name == "tlens-cache" else {})

    # --repeat rounds, the methods interleaved within each; tlens-cache runs last (its bridge wraps the
    # model's modules); a method that fails is recorded with its error and the others go on
    schedule = [n for _ in range(args.repeat) for n in order if n != "tlens-cache"]
    schedule += ["tlens-cache"] * (args.repeat if "tlens-cache" in order else 0)
    for name in schedule:
        if "error" in results.get(name, {}):
            continue
        try:
            if name not in fns:
                fns[name], results[name] = setup(name)
            with PeakMemory(model.device) as mem:
                t0 = time.perf_counter()
                out = fns[name](ids, batch)
                if model.device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - one method's failure leaves the others' figures
            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {e}".replace("\n", " ")}
            if model.device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        if out is not None:  # a Profiler: the statistics' own size, then it goes (its memory with it)
            results[name]["stats_bytes"] = stats_bytes(out)
            if getattr(out, "backoffs", 0):  # out-of-memory back-offs (the runner's, where it has them)
                results[name]["oom_backoffs"] = out.backoffs
            del out
        rounds.setdefault(name, []).append((dt, mem.value, mem.note))
        results[name] |= {"seconds": statistics.median(r[0] for r in rounds[name]),
                          "peak_bytes": max(r[1] for r in rounds[name]), "peak_note": mem.note,
                          "rounds": [r[0] for r in rounds[name]]}
        results[name]["tokens_per_s"] = ids.numel() / results[name]["seconds"]
        print(f"  round {len(rounds[name])}: {name:16s} {ids.numel() / dt:12,.0f} tok/s  {dt:8.2f} s  "
              f"peak {mem.value / 2**30:7.2f} GiB", flush=True)
        report(args, model, ids, batch, order, results, final=False)  # a timeout later keeps these figures
    return report(args, model, ids, batch, order, results, final=True)


def report(args, model, ids, batch, order, results, final: bool) -> dict:
    """The report of what is measured so far, written to --out (bench-<shape>.json/.md) and --json."""
    results = {n: results[n] for n in order if n in results}
    kvs = [n for n in ("kvmem-compiled", "kvmem-profile") if "tokens_per_s" in results.get(n, {})]
    kv = max(kvs, key=lambda n: results[n]["tokens_per_s"]) if kvs else "kvmem-profile"
    size = results.get(kv, {}).get("stats_bytes")
    shape = args.shape or model.spec
    rep = {"shape": shape, "final": final, "args": vars(args), "env": environment(model),
           "n_layers": model.n_layers, "d_mlp": model.d_mlp, "tokens": ids.numel(), "seq_len": args.seq_len,
           "batch": batch, "results": results, "stats_bytes": size, "kvmem_method": kv,
           "bars": check_bars(shape, results, kv, size),
           "projection": project(results.get(kv, {}).get("tokens_per_s"), model.n_layers * model.d_mlp),
           "published": PUBLISHED}
    text = markdown(rep)
    if final:
        print("\n" + text, flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = "bench-" + "".join(c if c.isalnum() or c in "._-" else "_" for c in shape)
        (out / f"{stem}.json").write_text(json.dumps(rep, indent=2))
        (out / f"{stem}.md").write_text(text)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rep, indent=2))
    return rep


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
