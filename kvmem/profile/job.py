"""``profile()`` and ``merge()``: the jobs behind ``kvmem profile`` and ``kvmem merge``.

Under ``torchrun`` (WORLD_SIZE > 1) every rank tokenizes the same corpus, profiles its contiguous
block of rows into ``OUT/.shards/rank-R`` and rank 0 merges the shards into OUT, exactly as
``kvmem merge`` would. Ranks share OUT through the file system (one node, or a shared disk).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd
import torch

import kvmem
from kvmem.errors import KvmemError
from kvmem.profile import run as runfiles
from kvmem.profile.corpus import Corpus
from kvmem.profile.runner import Profiler, ProfileConfig, find_batch_size, parse_shard, remove_checkpoint, shard_of
from kvmem.profile.tables import layer_table, neuron_table
from kvmem.profile.tokens import TokenStore, tokenize


def profile(cfg: ProfileConfig, out, *, resume: bool = False, force: bool = False, model=None,
            progress_factory=None) -> runfiles.Run:
    """Profile every neuron of ``cfg.layers`` over the corpus; write and return the run in ``out``.

    ``progress_factory(total_tokens, done_tokens)`` may return a callable taking the number of tokens
    of each finished batch (the CLI passes a rich progress bar)."""
    cfg = cfg.validate()
    out = Path(out)
    runfiles.check_out_folder(out, force=force, resume=resume)
    ckpt = out / "checkpoint"
    if resume and not (ckpt / "progress.json").is_file():
        raise KvmemError(f"--resume: {out} holds no checkpoint to resume from")
    rank, world = _dist_rank_world()
    replace_old = force and not resume and out.exists()
    if replace_old and world > 1 and rank == 0:  # before any rank writes its shard
        shutil.rmtree(out)
    if model is None:
        model = kvmem.load(cfg.model, device=rank_device(cfg.device), dtype=cfg.dtype)
    cfg = replace(cfg, model=model.spec)  # the settings record the model actually profiled
    if resume:
        store = TokenStore.load(ckpt / "tokens.safetensors")
        corpus_info = json.loads((ckpt / "corpus.json").read_text())
    else:
        corpus = Corpus(cfg.corpus, cfg.text_field)
        store, ran_out = tokenize(corpus, model.tokenizer, cfg.tokens)
        corpus_info = {"source": cfg.corpus, "description": corpus.describe(), "n_docs": store.n_docs,
                       "invalid_utf8_docs": corpus.invalid_utf8, "ran_out": ran_out}
        if cfg.shard is not None:
            if world > 1:
                raise KvmemError("--shard and torchrun both split the corpus: use one of them")
            store = shard_of(store, cfg.seq_len, *parse_shard(cfg.shard))
            corpus_info |= {"shard": cfg.shard, "n_docs_in_corpus": corpus_info["n_docs"]}
    if world > 1:
        return _profile_distributed(model, cfg, store, corpus_info, out, rank, world, resume, progress_factory)
    if not resume:
        if replace_old:  # only now that the model and the corpus have loaded without error
            shutil.rmtree(out)
        ckpt.mkdir(parents=True, exist_ok=True)
        runfiles.atomic_write(ckpt / "tokens.safetensors", store.save)
        runfiles.write_json(ckpt / "corpus.json", corpus_info)
    return _profile_one(model, cfg, store, corpus_info, out, resume, progress_factory)


def _profile_one(model, cfg, store, corpus_info, out, resume, progress_factory):
    batch_size = find_batch_size(model, cfg, store, out)
    profiler = Profiler(model, replace(cfg, batch_size=batch_size), store, out)
    if resume:
        profiler.load_checkpoint()
    if progress_factory is not None:
        done = min(profiler.state.next_row * cfg.seq_len, store.n_tokens)
        profiler.progress = progress_factory(store.n_tokens, done)
    elapsed = profiler.run()
    settings = asdict(cfg) | {"layers": profiler.layers, "batch_size": profiler.batch_size}
    run = finalize(model, settings, store, profiler.stats, corpus_info, out, elapsed, values=value_tokens(model))
    remove_checkpoint(out)
    return run


def finalize(model_or_meta, settings: dict, store: TokenStore, stats: dict, corpus_info: dict, out: Path,
             elapsed: float, vocab: list[str] | None = None, values=None) -> runfiles.Run:
    """Write a complete run folder (manifest last) and return it opened. ``values``: per-neuron value
    tokens (layer, neuron, value_top_tokens, value_bottom_tokens) to join onto the neuron table."""
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model_or_meta, dict):
        model_meta = model_or_meta
    else:
        model = model_or_meta
        model_meta = model.info() | {"fingerprint": model.fingerprint()}
        vocab = model.token_strings(range(len(model.tokenizer)))
    neurons = neuron_table(stats, store, vocab)
    if values is not None:  # what each neuron's value vector writes (v_i·W_U), from kvmem.vocab
        neurons = neurons.merge(values, on=["layer", "neuron"], how="left")

    runfiles.atomic_write(out / "tokens.safetensors", store.save)
    runfiles.write_parquet(out / "vocab.parquet", pd.DataFrame({"id": range(len(vocab)), "token": vocab}))
    runfiles.save_stats(out / "stats.safetensors", stats)
    runfiles.write_parquet(out / "neurons.parquet", neurons)
    runfiles.write_parquet(out / "layers.parquet", layer_table(stats))
    manifest = {
        "kvmem_version": kvmem.__version__,
        "model": {k: model_meta[k] for k in ("model", "source", "family", "model_type", "n_layers", "d_model",
                                              "d_mlp", "d_vocab", "activation", "gated", "fingerprint", "dtype",
                                              "device")},
        "corpus": corpus_info | {"n_tokens": store.n_tokens},
        "settings": settings,
        "time": {"seconds": round(elapsed, 3),
                 "tokens_per_second": round(store.n_tokens / elapsed, 1) if elapsed > 0 else None},
    }
    runfiles.write_json(out / runfiles.MANIFEST, manifest)
    return runfiles.open_run(out)


def merge(paths, out, *, force: bool = False) -> runfiles.Run:
    """Merge runs over disjoint token streams (shards, in order) into one run, as if profiled together."""
    runs = [runfiles.open_run(p) for p in paths]
    if len(runs) < 2:
        raise KvmemError("merge needs at least two runs")
    out = Path(out)
    runfiles.check_out_folder(out, force=force, resume=False)
    first = runs[0].manifest
    for r in runs[1:]:
        for key in ("fingerprint", "model_type", "d_mlp"):
            if r.manifest["model"][key] != first["model"][key]:
                raise KvmemError(f"cannot merge {r.path} into {runs[0].path}: different model ({key})")
        for key in ("layers", "top_k", "seq_len"):
            if r.manifest["settings"][key] != first["settings"][key]:
                raise KvmemError(f"cannot merge {r.path}: --{key.replace('_', '-')} differs")
    store, stats, rekeyed = runs[0].tokens, dict(runs[0].stats), False
    for r in runs[1:]:
        other, other_stats = r.tokens, r.stats
        doc_end = store.end[1] - (1 if other.continues_doc else 0)
        if (other.offset, other.doc_base) != (store.end[0], doc_end):
            # independent runs (not shards of one stream): move the other run after this one
            d_tokens, d_docs = store.end[0] - other.offset, store.end[1] - other.doc_base
            other = TokenStore(other.ids, other.doc_offsets, False, store.end[0], store.end[1])
            other_stats = {layer: s.shifted(d_tokens, d_docs) for layer, s in other_stats.items()}
            rekeyed = True
        for layer, s in other_stats.items():
            stats[layer].merge(s)
        store = store.concat(other)
    corpus = dict(first["corpus"])
    corpus.update(n_docs=store.n_docs, invalid_utf8_docs=sum(r.manifest["corpus"]["invalid_utf8_docs"] for r in runs),
                  ran_out=runs[-1].manifest["corpus"]["ran_out"], merged_from=[str(r.path) for r in runs])
    if rekeyed:
        corpus["note"] = ("merged independent runs: token indices of later runs were shifted, so their random "
                          "examples ('sample') are a uniform sample of each run, not of the whole stream")
    corpus.pop("n_tokens", None)
    settings = dict(first["settings"]) | {"tokens": store.n_tokens}
    elapsed = sum(r.manifest["time"]["seconds"] for r in runs)
    if force and out.exists():
        shutil.rmtree(out)
    meta = dict(first["model"])
    value_cols = [c for c in runs[0].neurons.columns if c.startswith("value_")]
    values = runs[0].neurons[["layer", "neuron", *value_cols]] if value_cols else None
    return finalize(meta, settings, store, stats, corpus, out, elapsed, vocab=runs[0].vocab, values=values)


def value_tokens(model, n: int = 5):
    """Top and bottom tokens of every neuron's value vector (the cached whole-model projection)."""
    from kvmem.vocab import project_values

    table = project_values(model, k=10).table
    return pd.DataFrame({"layer": table.layer, "neuron": table.neuron,
                         "value_top_tokens": [list(t[:n]) for t in table.top_tokens],
                         "value_bottom_tokens": [list(t[:n]) for t in table.bottom_tokens]})


# --- torchrun -------------------------------------------------------------------------------
def _dist_rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def rank_device(device: str) -> str:
    """Under torchrun with CUDA, 'auto' means this rank's own GPU (LOCAL_RANK)."""
    rank, world = _dist_rank_world()
    if world > 1 and device == "auto" and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    return device


def _profile_distributed(model, cfg, store, corpus_info, out, rank, world, resume, progress_factory):
    import torch.distributed as dist

    wall_start = time.monotonic()
    if resume:
        raise KvmemError("--resume is not supported under torchrun; resume each shard or rerun")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if model.device.type == "cuda" else "gloo")
    shard_dir = out / ".shards" / f"rank-{rank}"
    shard = shard_of(store, cfg.seq_len, rank, world)
    info = corpus_info | {"shard": f"{rank}/{world}"}
    _profile_one(model, cfg, shard, info, shard_dir, False, progress_factory if rank == 0 else None)
    dist.barrier()
    result = None
    if rank == 0:
        shards = [out / ".shards" / f"rank-{r}" for r in range(world)]
        tmp = out / ".shards" / "merged"
        result = merge(shards, tmp, force=True)
        manifest = json.loads((tmp / runfiles.MANIFEST).read_text())
        for name in sorted(os.listdir(tmp)):
            if name != runfiles.MANIFEST:
                os.replace(tmp / name, out / name)
        wall = time.monotonic() - wall_start
        manifest["corpus"] = corpus_info | {"n_tokens": store.n_tokens}
        manifest["settings"]["world_size"] = world
        manifest["time"] = {"seconds": round(wall, 3), "tokens_per_second": round(store.n_tokens / wall, 1),
                            "seconds_summed_over_ranks": manifest["time"]["seconds"]}
        runfiles.write_json(out / runfiles.MANIFEST, manifest)  # last: the run is complete
        shutil.rmtree(out / ".shards")
        result = runfiles.open_run(out)
    dist.barrier()
    return result
