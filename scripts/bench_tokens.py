"""Benchmark the token store at corpus scale: tokenization throughput and host memory, then a profile over
the memory-mapped store (kvmem.profile.tokens / tokenfile).

  python scripts/bench_tokens.py                        # 100M tokens: ~400 MB JSONL + ~400 MB store in --dir
  python scripts/bench_tokens.py --tokens 2000000 --compare 1000000 --profile-tokens 200000   # a quick check

Stages, each in its own process so that its peak resident set (VmHWM) is its own:
  corpus     a synthetic JSONL corpus written on the fly (deterministic ``--seed``): documents of 20 to 2,000
             words drawn Zipf-like from the words of the standard library's reference manual (pydoc_data),
             generated until about ``--tokens`` * 1.05 tokens; plus the SmolLM2 tokenizer saved as a folder
             (the one ``kvmem.load("smollm2-135m")`` uses, without the model)
  tokenize   ``kvmem.profile.tokens.tokenize`` of ``--tokens`` tokens into ``tokens.safetensors``; a thread
             samples VmRSS every 0.25 s and the tokens written so far (from the file's size), so the table
             gives tok/s and resident memory at 10M, 50M, 100M tokens (scaled to --tokens)
  compare    ways of tokenizing ``--compare`` tokens: the fast tokenizer's batch call on its Rust thread pool
             (kvmem's way), the same with TOKENIZERS_PARALLELISM=false (one thread), and a pool of
             ``--workers`` processes each encoding single-threaded batches, in order
  profile    ``kvmem.profile.runner.Profiler`` of a random-init Llama (d_model 64, 2 layers, d_mlp 256, the
             tokenizer's vocabulary) over about ``--profile-tokens`` tokens of the mapped store (0: skip; all:
             the whole store): by default (``--profile-from spread``) rows evenly spaced over the whole store's
             row layout, so that the pass reads pages from its start to its end; ``start``: its first tokens.
             Every statistic, on CPU; resident memory at start, after set-up, sampled during, at the end, peak

Files stay in ``--dir`` (default /tmp/kvmem-bench-tokens) only with ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HERE = Path(__file__).resolve()


# --- memory ------------------------------------------------------------------------------------------
def status() -> dict:
    """This process's VmRSS, VmHWM, RssAnon, RssFile in MiB (/proc/self/status)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(line.split()[1]) / 1024
    return out


class Sampler:
    """A thread sampling ``status()`` and ``count()`` every ``every`` seconds: [(seconds, count, status)]."""

    def __init__(self, count=lambda: 0, every: float = 0.25):
        self.count, self.every, self.samples = count, every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - self.t0, self.count(), status()))
            self._stop.wait(self.every)

    def __enter__(self):
        self.t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.samples.append((time.perf_counter() - self.t0, self.count(), status()))


# --- stage: corpus -------------------------------------------------------------------------------------
def stage_corpus(args) -> dict:
    from pydoc_data.topics import topics

    from kvmem.models.load import bundled_path, cache_dir

    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    tok_dir = d / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        cached = sorted((cache_dir() / "gguf").glob("SmolLM2-135M-Instruct*/tokenizer.json"))
        gguf = bundled_path("smollm2-135m")
        tok = AutoTokenizer.from_pretrained(cached[0].parent) if cached else \
            AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tok.save_pretrained(tok_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    counts: dict[str, int] = {}
    for text in topics.values():
        for w in re.findall(r"[A-Za-z]+", text):
            counts[w] = counts.get(w, 0) + 1
    words = sorted(counts, key=lambda w: (-counts[w], w))
    weights = [1.0 / (r + 1) for r in range(len(words))]  # Zipf over the manual's frequency ranks
    cum = [0.0]
    for w in weights:
        cum.append(cum[-1] + w)
    cum = cum[1:]
    rng = random.Random(args.seed)

    def doc() -> str:
        n = int(round(20 * 100 ** rng.random()))  # 20 .. 2,000 words, log-uniform
        return " ".join(rng.choices(words, cum_weights=cum, k=n))

    sample = [doc() for _ in range(300)]
    per_word = sum(len(t) + 1 for t in tok(sample, add_special_tokens=False)["input_ids"]) / \
        sum(len(s.split()) for s in sample)
    rng = random.Random(args.seed)
    target_words = int(args.tokens * 1.05 / per_word)
    path, n_words, n_docs, t0 = d / "corpus.jsonl", 0, 0, time.perf_counter()
    with open(path, "w", buffering=1 << 22) as f:
        while n_words < target_words:
            text = doc()
            n_words += text.count(" ") + 1
            n_docs += 1
            f.write(json.dumps({"text": text}) + "\n")
    return {"corpus": str(path), "bytes": path.stat().st_size, "docs": n_docs, "words": n_words,
            "tokens_per_word": round(per_word, 3), "seconds": round(time.perf_counter() - t0, 1)}


# --- stage: tokenize ---------------------------------------------------------------------------------
def _milestones(samples, total: int) -> list[dict]:
    marks = [m for m in (total // 10, total // 2, total) if m > 0]
    out = []
    for m in marks:
        hit = next((s for s in samples if s[1] >= m), samples[-1])
        peak = max(s[2]["VmRSS"] for s in samples if s[0] <= hit[0])
        out.append({"tokens": m, "seconds": round(hit[0], 2), "tok_per_s": round(hit[1] / hit[0]) if hit[0] else None,
                    "rss_mib": round(hit[2]["VmRSS"], 1), "rss_anon_mib": round(hit[2]["RssAnon"], 1),
                    "peak_rss_mib_so_far": round(peak, 1)})
    return out


def stage_tokenize(args) -> dict:
    from transformers import AutoTokenizer

    from kvmem.profile.corpus import Corpus
    from kvmem.profile.tokenfile import HEADER_BYTES
    from kvmem.profile.tokens import TokenStore, tokenize

    d = Path(args.dir)
    tok = AutoTokenizer.from_pretrained(d / "tokenizer")
    out = d / "tokens.safetensors"
    out.unlink(missing_ok=True)  # the sampler reads the tokens written from this file's size
    before = status()

    def written() -> int:
        try:
            return max(0, (out.stat().st_size - HEADER_BYTES) // 4)
        except OSError:
            return 0

    with Sampler(written) as s:
        store, ran_out = tokenize(Corpus(str(d / "corpus.jsonl")), tok, args.tokens, path=out)
    seconds = s.samples[-1][0]
    n = store.n_tokens
    del store
    after_write = status()
    store = TokenStore.load(out)
    after_load = status()
    lens = store.doc_offsets.diff()
    return {"tokens": n, "docs": store.n_docs, "ran_out": ran_out, "seconds": round(seconds, 1),
            "tok_per_s": round(n / seconds), "store_bytes": out.stat().st_size,
            "rss_before_mib": round(before["VmRSS"], 1), "rss_after_write_mib": round(after_write["VmRSS"], 1),
            "rss_after_load_mib": round(after_load["VmRSS"], 1), "peak_rss_mib": round(after_load["VmHWM"], 1),
            "mean_doc_tokens": round(float(lens.double().mean()), 1), "milestones": _milestones(s.samples, n)}


# --- stage: compare --------------------------------------------------------------------------------
_POOL_TOK = None


def _pool_init(tok_dir: str) -> None:
    global _POOL_TOK
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from transformers import AutoTokenizer

    _POOL_TOK = AutoTokenizer.from_pretrained(tok_dir).backend_tokenizer


def _pool_encode(docs: list[str]):
    import numpy as np

    enc = _POOL_TOK.encode_batch_fast(docs, add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.int32) for e in enc]


def stage_compare(args) -> dict:
    """One variant (``--variant``) of tokenizing ``--compare`` tokens into a store (timed after set-up: the
    tokenizer loaded, the pool's workers started)."""
    from transformers import AutoTokenizer

    from kvmem.profile.corpus import Corpus
    from kvmem.profile.tokens import tokenize

    d = Path(args.dir)
    out = d / f"compare-{args.variant}.safetensors"
    if args.variant in ("batch", "batch-1thread"):
        tok = AutoTokenizer.from_pretrained(d / "tokenizer")
        t0 = time.perf_counter()
        store, _ = tokenize(Corpus(str(d / "corpus.jsonl")), tok, args.compare, path=out)
        n = store.n_tokens
    else:  # a process pool, each worker single-threaded, batches written in order
        import concurrent.futures as cf
        import multiprocessing as mp

        import numpy as np

        from kvmem.profile.tokenfile import TokenWriter
        from kvmem.profile.tokens import _take

        tok = AutoTokenizer.from_pretrained(d / "tokenizer")
        eos = tok.eos_token_id
        docs = Corpus(str(d / "corpus.jsonl")).documents()
        pending, n = [], 0
        with cf.ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn"), initializer=_pool_init,
                                    initargs=(str(d / "tokenizer"),)) as pool, TokenWriter(out) as w:
            list(pool.map(_pool_encode, [["warm up"]] * args.workers))  # workers started: timed from here
            t0 = time.perf_counter()

            def drain(one: bool):
                nonlocal n
                while pending and (not one or len(pending) >= 2 * args.workers):
                    arrays = [np.append(a, np.int32(eos)) for a in pending.pop(0).result()]
                    flat = np.concatenate(arrays)[: args.compare - n]
                    ends = np.minimum(np.cumsum([a.size for a in arrays]), flat.size)
                    ends = ends[: int(np.searchsorted(ends, flat.size)) + 1]
                    w.add(flat, ends)
                    n += flat.size
                    if n >= args.compare:
                        return True
                return False

            done = False
            while not done:
                chunk = _take(docs, 256, 1 << 22)
                if not chunk:
                    break
                pending.append(pool.submit(_pool_encode, chunk))
                done = drain(one=True)
            if not done:
                drain(one=False)
            for f in pending:
                f.cancel()
            w.close()
    seconds = time.perf_counter() - t0
    out.unlink(missing_ok=True)
    return {"variant": args.variant, "tokens": n, "seconds": round(seconds, 2), "tok_per_s": round(n / seconds),
            "peak_rss_mib": round(status()["VmHWM"], 1)}


# --- stage: profile ----------------------------------------------------------------------------------
def stage_profile(args) -> dict:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    import kvmem
    from kvmem.profile.runner import Profiler, ProfileConfig
    from kvmem.profile.tokens import TokenStore

    d = Path(args.dir)
    tok = AutoTokenizer.from_pretrained(d / "tokenizer")
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=256,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                                      max_position_embeddings=args.seq_len))
    model = kvmem.from_hf(hf, tok, spec="random:llama-d64-l2")
    store = TokenStore.load(d / "tokens.safetensors")
    want = store.n_tokens if args.profile_tokens == "all" else min(int(args.profile_tokens), store.n_tokens)
    cfg = ProfileConfig(seq_len=args.seq_len, top_k=20, checkpoint_every=1e9)
    start = status()
    done = [0]
    spread = args.profile_from == "spread" and want < store.n_tokens
    part = store if spread else store.slice_tokens(0, want)
    prof = Profiler(model, cfg, part, d / "profile-out", progress=lambda k: done.__setitem__(0, done[0] + k))
    if spread:  # rows evenly spaced over the whole store's layout, ascending, in batches of the auto size
        prof.plan = spread_plan(prof.layout, want, prof.batch_size)
    n = sum(int(prof.layout.lengths[r].sum()) for r in prof.plan)
    rows = torch.cat(prof.plan)
    reach = [int(prof.layout.starts[rows[0]]), int(prof.layout.starts[rows[-1]] + prof.layout.lengths[rows[-1]])]
    built = status()
    with Sampler(lambda: done[0], every=1.0) as s:
        seconds = prof.run()
    end = status()
    rss = [x[2]["VmRSS"] for x in s.samples]
    return {"tokens": n, "store_tokens": store.n_tokens, "from": "spread" if spread else "start",
            "rows": int(rows.numel()), "store_rows": prof.layout.n_rows, "token_span": reach,
            "seq_len": args.seq_len, "batch_rows": prof.batch_size,
            "layers": prof.layers, "d_mlp": model.d_mlp, "seconds": round(seconds, 1),
            "tok_per_s": round(n / seconds), "threads": torch.get_num_threads(),
            "rss_start_mib": round(start["VmRSS"], 1), "rss_after_setup_mib": round(built["VmRSS"], 1),
            "rss_first_sample_mib": round(rss[0], 1), "rss_at_10pct_mib": round(rss[len(rss) // 10], 1),
            "rss_end_mib": round(end["VmRSS"], 1), "rss_max_during_mib": round(max(rss), 1),
            "rss_file_end_mib": round(end["RssFile"], 1), "peak_rss_mib": round(end["VmHWM"], 1),
            "milestones": _milestones(s.samples, n)}


def spread_plan(layout, tokens: int, batch_size: int) -> list:
    """Batches (ascending row numbers) of about ``tokens`` store tokens in rows evenly spaced over the layout."""
    import torch

    mean = float(layout.lengths.double().mean())
    k = min(layout.n_rows, max(1, round(tokens / mean)))
    rows = torch.unique(torch.linspace(0, layout.n_rows - 1, k).round().long())
    return [rows[i:i + batch_size] for i in range(0, rows.numel(), batch_size)]


STAGES = {"corpus": stage_corpus, "tokenize": stage_tokenize, "compare": stage_compare, "profile": stage_profile}


def run_stage(args, stage: str, **extra) -> dict:
    """Run one stage in a fresh process; its JSON result."""
    cmd = [sys.executable, str(HERE), "--stage", stage, "--dir", args.dir, "--tokens", str(args.tokens),
           "--compare", str(args.compare), "--profile-tokens", str(args.profile_tokens), "--seq-len",
           str(args.seq_len), "--seed", str(args.seed), "--workers", str(args.workers), "--profile-from",
           args.profile_from]
    for k, v in extra.items():
        cmd += [f"--{k}", str(v)]
    env = dict(os.environ)
    if extra.get("variant") == "batch-1thread":
        env["TOKENIZERS_PARALLELISM"] = "false"
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"stage {stage} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=100_000_000, help="tokens of the store")
    ap.add_argument("--compare", type=int, default=10_000_000, help="tokens per tokenization variant (0: skip)")
    ap.add_argument("--profile-tokens", default="5000000", help="tokens profiled from the store's start (0, N, all)")
    ap.add_argument("--profile-from", choices=("spread", "start"), default="spread",
                    help="profile rows evenly spaced over the whole mapped store (spread) or its first tokens (start)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=2, help="processes of the pool variant")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default="/tmp/kvmem-bench-tokens")
    ap.add_argument("--keep", action="store_true", help="keep the corpus and the store in --dir")
    ap.add_argument("--json", dest="json_out", help="also write the results to this JSON file")
    ap.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="batch", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage:
        print(json.dumps(STAGES[args.stage](args)))
        return
    results = {"args": vars(args), "cpus": os.cpu_count()}
    try:
        results["corpus"] = c = run_stage(args, "corpus")
        print(f"corpus: {c['docs']:,} documents, {c['bytes'] / 2**20:,.0f} MiB JSONL, "
              f"{c['tokens_per_word']} tokens/word, written in {c['seconds']} s", flush=True)
        results["tokenize"] = t = run_stage(args, "tokenize")
        print(f"tokenize: {t['tokens']:,} tokens in {t['docs']:,} documents, {t['seconds']} s = {t['tok_per_s']:,} "
              f"tok/s; store {t['store_bytes'] / 2**20:,.0f} MiB on disk; RSS before {t['rss_before_mib']} MiB, "
              f"after writing {t['rss_after_write_mib']} MiB, after loading (mapped) {t['rss_after_load_mib']} MiB, "
              f"peak {t['peak_rss_mib']} MiB", flush=True)
        for m in t["milestones"]:
            print(f"  at {m['tokens']:>12,} tokens: {m['seconds']:7.1f} s  {m['tok_per_s']:>10,} tok/s  "
                  f"RSS {m['rss_mib']:7.1f} MiB (anon {m['rss_anon_mib']:.1f})  peak so far "
                  f"{m['peak_rss_mib_so_far']:.1f} MiB", flush=True)
        if args.compare:
            results["compare"] = []
            for variant in ("batch", "batch-1thread", "pool"):
                r = run_stage(args, "compare", variant=variant)
                results["compare"].append(r)
                print(f"  {variant:14s} {r['tokens']:,} tokens {r['seconds']:7.2f} s {r['tok_per_s']:>10,} tok/s  "
                      f"peak RSS {r['peak_rss_mib']} MiB (the pool: the parent's)", flush=True)
        if args.profile_tokens not in ("0", ""):
            results["profile"] = p = run_stage(args, "profile")
            print(f"profile: {p['tokens']:,} of {p['store_tokens']:,} tokens ({p['rows']:,} of {p['store_rows']:,} rows, "
                  f"{p['from']}, store tokens {p['token_span'][0]:,}..{p['token_span'][1]:,}), layers {p['layers']} x {p['d_mlp']} "
                  f"neurons, seq_len {p['seq_len']}, {p['batch_rows']} rows/batch, {p['threads']} threads: "
                  f"{p['seconds']} s = {p['tok_per_s']:,} tok/s; RSS start {p['rss_start_mib']} MiB, after set-up "
                  f"{p['rss_after_setup_mib']}, at 10% {p['rss_at_10pct_mib']}, end {p['rss_end_mib']} MiB "
                  f"(file-backed {p['rss_file_end_mib']}), max during {p['rss_max_during_mib']}, peak "
                  f"{p['peak_rss_mib']} MiB", flush=True)
            for m in p["milestones"]:
                print(f"  at {m['tokens']:>12,} tokens: {m['seconds']:7.1f} s  {m['tok_per_s']:>10,} tok/s  "
                      f"RSS {m['rss_mib']:7.1f} MiB", flush=True)
    finally:
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(results, indent=2))
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
