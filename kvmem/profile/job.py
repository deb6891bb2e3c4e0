"""``profile()`` and ``merge()``: the jobs behind ``kvmem profile`` and ``kvmem merge``.

A run is built in its staging sibling ``OUT.partial/`` (kvmem.atomic): checkpoints live in
``OUT.partial/checkpoint/`` (job.json: the settings and model fingerprint it was started with;
tokens.safetensors and corpus.json: the token stream; progress.json + stats-ROW.safetensors: the
last checkpoint), the finished files are written there too, and the folder is moved onto OUT last.

Under ``torchrun`` (WORLD_SIZE > 1) every rank tokenizes the same corpus, profiles its contiguous
block of rows into ``OUT.partial/.shards/rank-R`` and rank 0 merges the shards, exactly as
``kvmem merge`` would. Ranks share OUT through the file system (one node, or a shared disk).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch

import kvmem
from kvmem.atomic import check_target, is_own_partial, open_staging, publish, staged, staging_of
from kvmem.errors import KvmemError
from kvmem.profile import run as runfiles
from kvmem.profile.corpus import Corpus
from kvmem.profile.runner import (CONTEXT_FIELDS, Profiler, ProfileConfig, bos_id, find_batch_size, layout_of,
                                  parse_shard, remove_checkpoint, shard_of)
from kvmem.profile import schema
from kvmem.profile.schema import RUN_FORMAT
from kvmem.profile.tables import layer_table, neuron_table, routing_table
from kvmem.profile.tokens import TokenStore, tokenize

if TYPE_CHECKING:
    from kvmem.models.kvmodel import KVModel


# settings a checkpoint may be continued with although they differ (they do not change the result)
_FREE_SETTINGS = ("checkpoint_every", "batch_size", "cpu_tuning", "device_map", "compile")


def profile(cfg: ProfileConfig, out, *, resume: bool = False, force: bool = False, model: KVModel | None = None,
            progress_factory=None, stages: dict | None = None, notes: list | None = None) -> runfiles.Run:
    """Profile every neuron of ``cfg.layers`` over the corpus; write and return the run in ``out``.

    The run is built in ``OUT.partial`` (kvmem.atomic) and moved onto ``out`` when complete, so ``out``
    only ever holds a finished run and a finished run replaced with ``force`` stays until the new one
    is complete. Re-running the same command after a kill or Ctrl-C continues the unfinished run from
    its last checkpoint (identical to an uninterrupted run), or starts it over if it had none yet;
    ``resume`` insists on continuing. ``progress_factory(total_tokens, done_tokens)`` may return a
    callable taking the number of tokens of each finished batch (the CLI passes a rich progress bar).
    ``stages`` ({name: seconds}) collects the time of each stage; ``notes`` what the job decided."""
    cfg = cfg.validate()
    out = Path(out)
    stages = {} if stages is None else stages
    notes = [] if notes is None else notes
    if resume and runfiles.is_run(out) and not is_own_partial(staging_of(out), runfiles.PARTIAL_KIND):
        raise KvmemError(f"--resume: {out} is a finished run; nothing to resume")
    check_target(out, None, force=force)
    rank, world = _dist_rank_world()
    t = time.perf_counter()
    if model is None:
        model = load_model(cfg)
        stages["load"] = time.perf_counter() - t
    cfg = replace(cfg, model=model.spec)  # the settings record the model actually profiled
    if world > 1:
        if resume:
            raise KvmemError("--resume is not supported under torchrun; resume each shard or rerun")
        return _profile_distributed(model, cfg, out, rank, world, progress_factory, stages)
    job = {"config": _settings(cfg, model), "fingerprint": model.fingerprint()}
    staging = staging_of(out)
    continuing = _can_continue(staging, job, resume=resume, force=force, notes=notes)
    if not continuing:  # before the staging folder is touched: a bad corpus leaves nothing behind
        t = time.perf_counter()
        store, corpus_info = _tokenized(cfg, model)
        stages["tokenize"] = time.perf_counter() - t
    staging = open_staging(out, runfiles.PARTIAL_KIND, fresh=not continuing)
    ckpt = staging / "checkpoint"
    if continuing:
        store = TokenStore.load(ckpt / "tokens.safetensors")
        corpus_info = json.loads((ckpt / "corpus.json").read_text())
    else:
        ckpt.mkdir(parents=True, exist_ok=True)
        runfiles.write_file(ckpt / "tokens.safetensors", store.save)
        runfiles.write_json(ckpt / "corpus.json", corpus_info)
        runfiles.write_json(ckpt / "job.json", job)
    _profile_one(model, cfg, store, corpus_info, staging, continuing, progress_factory, stages)
    publish(staging, out)
    return runfiles.open_run(out)


def _settings(cfg: ProfileConfig, model) -> dict:
    """The settings that decide a run's result, as JSON (layers resolved against the model)."""
    from kvmem.capture import check_layers

    # the tokenizer's BOS decides the rows too (kvmem.profile.tokens.RowLayout)
    d = asdict(cfg) | {"layers": list(check_layers(model, cfg.layers)), "bos_id": bos_id(model, cfg)}
    return {k: v for k, v in json.loads(json.dumps(d)).items() if k not in _FREE_SETTINGS}


def _can_continue(staging: Path, job: dict, *, resume: bool, force: bool, notes: list) -> bool:
    """Whether the unfinished run in ``staging`` is continued (see ``profile``)."""
    if not is_own_partial(staging, runfiles.PARTIAL_KIND):
        if resume:
            notes.append("--resume: no unfinished run was found; starting one")
        return False
    ckpt = staging / "checkpoint"
    try:
        saved = json.loads((ckpt / "job.json").read_text())
    except (OSError, ValueError):
        saved = None
    has_state = (ckpt / "progress.json").is_file()
    if saved is None or not has_state:
        notes.append(f"{staging} held an unfinished run killed before its first checkpoint; starting it over")
        return False
    diff = [k for k in sorted(set(saved["config"]) | set(job["config"]))
            if saved["config"].get(k) != job["config"].get(k)]
    if saved.get("fingerprint") != job["fingerprint"]:
        diff.insert(0, "model weights")
    if not diff:
        done = json.loads((ckpt / "progress.json").read_text()).get("next_row", 0)
        notes.append(f"continuing the unfinished run in {staging} from its last checkpoint (row {done:,})")
        return True
    what = ", ".join(f"{k}={saved['config'].get(k)!r}" if k in saved["config"] else k for k in diff)
    if force and not resume:
        notes.append(f"{staging} held an unfinished run with other settings ({what}); starting over")
        return False
    raise KvmemError(f"{staging} holds an unfinished run with other settings ({what}): run with those settings "
                     "to continue it, or pass --force (without --resume) to start over")


def _tokenized(cfg: ProfileConfig, model) -> tuple[TokenStore, dict]:
    corpus = Corpus(cfg.corpus, cfg.text_field)
    store, ran_out = tokenize(corpus, model.tokenizer, cfg.tokens)
    corpus_info = {"source": cfg.corpus, "description": corpus.describe(), "n_docs": store.n_docs,
                   "invalid_utf8_docs": corpus.invalid_utf8, "ran_out": ran_out}
    if cfg.shard is not None:
        store = shard_of(store, layout_of(model, cfg, store), *parse_shard(cfg.shard))
        corpus_info |= {"shard": cfg.shard, "n_docs_in_corpus": corpus_info["n_docs"]}
    return store, corpus_info


def _profile_one(model, cfg, store, corpus_info, out, resume, progress_factory, stages):
    """Profile ``store`` into the folder ``out`` (a staging folder) and finalize the run there."""
    batch_size = find_batch_size(model, cfg, store, out)
    profiler = Profiler(model, replace(cfg, batch_size=batch_size), store, out)
    if resume:
        profiler.load_checkpoint()
    if progress_factory is not None:
        done = profiler.done_tokens()
        profiler.progress = progress_factory(store.n_tokens, done)
    elapsed = profiler.run()
    stages["profile"] = elapsed
    settings = asdict(cfg) | {"layers": profiler.layers, "batch_size": profiler.batch_size,
                              "bos_id": profiler.layout.bos_id}
    t = time.perf_counter()
    values = value_tokens(model)
    stages["value_projection"] = time.perf_counter() - t
    run = finalize(model, settings, store, profiler.stats, corpus_info, out, elapsed, values=values, stages=stages,
                   layout=profiler.layout.settings())
    remove_checkpoint(out)
    return run


def finalize(model_or_meta, settings: dict, store: TokenStore, stats: dict, corpus_info: dict, out: Path,
             elapsed: float, vocab: list[str] | None = None, values=None, stages: dict | None = None,
             layout: dict | None = None) -> runfiles.Run:
    """Write a complete run folder (manifest last) and return it opened. ``layout``: the rows' settings
    (RowLayout.settings(); required: the manifest's "layout"). ``values``: per-neuron value
    tokens (layer, neuron, value_top_tokens, value_bottom_tokens) to join onto the neuron table;
    ``stages``: seconds per stage, recorded in the manifest (``writing`` is added here)."""
    from kvmem.models.fingerprint import SCHEME

    if layout is None:
        raise KvmemError("finalize needs the run's row layout")
    t_write = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model_or_meta, dict):
        model_meta = model_or_meta
    else:
        model = model_or_meta
        model_meta = model.info() | {"fingerprint": model.fingerprint(), "fingerprint_scheme": SCHEME}
        vocab = model.token_strings(range(len(model.tokenizer)))
    neurons = neuron_table(stats, store, vocab)
    if values is not None:  # what each neuron's value vector writes (v_i·W_U), from kvmem.vocab
        neurons = neurons.merge(values, on=["layer", "neuron"], how="left")

    runfiles.write_file(out / "tokens.safetensors", store.save)
    runfiles.write_parquet(out / "vocab.parquet", pd.DataFrame({"id": range(len(vocab)), "token": vocab}))
    runfiles.save_stats(out / "stats.safetensors", stats)
    runfiles.write_parquet(out / "neurons.parquet", neurons)
    runfiles.write_parquet(out / "layers.parquet", layer_table(stats))
    moe = moe_section(stats)
    if moe is not None:  # mixture-of-experts layers: their routing table (kvmem.profile.schema.ROUTING)
        runfiles.write_parquet(out / schema.ROUTING_FILE, routing_table(stats))
    manifest = {
        "format": RUN_FORMAT,  # kvmem.profile.schema: what a run folder of this format holds
        "kvmem_version": kvmem.__version__,
        "model": {k: model_meta[k] for k in ("model", "source", "family", "model_type", "n_layers", "d_model",
                                              "d_mlp", "d_vocab", "activation", "gated", "fingerprint", "dtype",
                                              "device")} | {k: model_meta[k] for k in ("fingerprint_scheme",)
                                                             if k in model_meta},
        "corpus": corpus_info | {"n_tokens": store.n_tokens},
        "settings": settings,
        "layout": layout,
        "time": {"seconds": round(elapsed, 3),
                 "tokens_per_second": round(store.n_tokens / elapsed, 1) if elapsed > 0 else None},
    }
    if moe is not None:
        manifest["moe"] = moe
    if stages:
        stages["writing"] = time.perf_counter() - t_write
        manifest["time"]["stages"] = {k: round(v, 3) for k, v in stages.items()}
    runfiles.write_json(out / runfiles.MANIFEST, manifest)
    return runfiles.open_run(out)


def moe_section(stats: dict) -> dict | None:
    """The manifest's "moe" (kvmem.profile.schema) from the profiled layers' statistics; None without MoE
    layers. The MoE layers must share one layout of routed and shared experts."""
    moe = {layer: s for layer, s in stats.items() if s.moe}
    if not moe:
        return None
    shapes = {(s.spec.n_experts, int(s.spec.expert_of.min().clamp(max=0).neg())) for s in moe.values()}
    if len(shapes) > 1:
        raise KvmemError(f"MoE layers with different numbers of routed / shared experts {sorted(shapes)}: not supported")
    (n_experts, n_shared), = shapes
    k = {round(s.routing.summary()["top_k"]) for s in moe.values() if int(s.routing.n)}
    return {"layers": sorted(moe), "n_experts": n_experts, "top_k": k.pop() if len(k) == 1 else None,
            "n_shared": n_shared, "neuron": NEURON_NOTE, "entropy": ENTROPY_NOTE}


NEURON_NOTE = ("raw m at moe.expert.coef (the expert's own activation, before the routing weight), over the "
               "tokens routed to the neuron's expert only")
ENTROPY_NOTE = ("router_entropy: softmax over all routed experts' router logits; sel_entropy: the chosen experts' "
                "routing weights renormalised to sum 1 (nats)")


def merge(paths, out, *, force: bool = False) -> runfiles.Run:
    """Merge runs over disjoint token streams (shards, in order) into one run, as if profiled together."""
    runs = [runfiles.open_run(p) for p in paths]
    if len(runs) < 2:
        raise KvmemError("merge needs at least two runs")
    out = Path(out)
    check_target(out, None, force=force)
    first = runs[0].manifest
    for r in runs[1:]:
        for key in ("fingerprint", "model_type", "d_mlp"):
            if r.manifest["model"][key] != first["model"][key]:
                raise KvmemError(f"cannot merge {r.path} into {runs[0].path}: different model ({key})")
        for key in ("layers", "top_k", "seq_len"):
            if r.manifest["settings"][key] != first["settings"][key]:
                raise KvmemError(f"cannot merge {r.path}: --{key.replace('_', '-')} differs")
        for key in CONTEXT_FIELDS:  # runs of kvmem 0.1 have none: their merge keeps no windows
            mine, theirs = first["settings"].get(key), r.manifest["settings"].get(key)
            if mine is not None and theirs is not None and mine != theirs:
                raise KvmemError(f"cannot merge {r.path}: its {key} is {theirs!r}, not {mine!r}")
    layout = runs[0].layout.settings()
    for r in runs[1:]:
        if r.layout.settings() != layout:
            raise KvmemError(f"cannot merge {r.path}: its rows ({r.layout.settings()}) differ from {layout}")
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
    meta = dict(first["model"])
    value_cols = [c for c in runs[0].neurons.columns if c.startswith("value_")]
    values = runs[0].neurons[["layer", "neuron", *value_cols]] if value_cols else None
    with staged(out, runfiles.PARTIAL_KIND) as tmp:  # out is replaced only by the complete merged run
        finalize(meta, settings, store, stats, corpus, tmp, elapsed, vocab=runs[0].vocab, values=values,
                 layout=layout)
    return runfiles.open_run(out)


def value_tokens(model: KVModel, n: int = 5):
    """Top and bottom tokens of every neuron's value vector (the cached whole-model projection)."""
    from kvmem.vocab import project_values

    table = project_values(model, k=10).table
    return pd.DataFrame({"layer": table.layer, "neuron": table.neuron,
                         "value_top_tokens": [list(t[:n]) for t in table.top_tokens],
                         "value_bottom_tokens": [list(t[:n]) for t in table.bottom_tokens]})


# --- torchrun -------------------------------------------------------------------------------
def _dist_rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def load_model(cfg: ProfileConfig):
    """The KVModel ``cfg`` profiles: on ``cfg.device`` (this torchrun rank's GPU), or with ``device_map`` auto
    built on the host in ``cfg.dtype`` (auto: bfloat16) and spread over the visible GPUs by accelerate
    (kvmem.models.load.dispatch); its ``device`` is then the embedding's, where the input ids go. Under
    torchrun each rank spreads over the GPUs it sees: give each rank its group with CUDA_VISIBLE_DEVICES
    (kvmem.stats.placement)."""
    from kvmem.models.load import dispatch

    if cfg.device_map is None:
        return kvmem.load(cfg.model, device=rank_device(cfg.device), dtype=cfg.dtype)
    if not torch.cuda.is_available():
        raise KvmemError("--device-map auto needs CUDA GPUs (none is visible)")
    kv = kvmem.load(cfg.model, device="cpu", dtype="bfloat16" if cfg.dtype == "auto" else cfg.dtype)
    dispatch(kv.hf, cfg.device_map)
    return replace(kv, device=kv.hf.get_input_embeddings().weight.device)


def rank_device(device: str) -> str:
    """Under torchrun with CUDA, 'auto' means this rank's own GPU (LOCAL_RANK)."""
    rank, world = _dist_rank_world()
    if world > 1 and device == "auto" and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    return device


def _profile_distributed(model, cfg, out, rank, world, progress_factory, stages):
    """Every rank profiles its block of rows into ``OUT.partial/.shards/rank-R``; rank 0 merges them
    into ``OUT.partial`` and publishes it onto ``out``."""
    import torch.distributed as dist

    if cfg.shard is not None:
        raise KvmemError("--shard and torchrun both split the corpus: use one of them")
    wall_start = time.monotonic()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if model.device.type == "cuda" else "gloo")
    if rank == 0:
        open_staging(out, runfiles.PARTIAL_KIND, fresh=True)
    dist.barrier()
    staging = staging_of(out)
    t = time.perf_counter()
    store, corpus_info = _tokenized(cfg, model)
    stages["tokenize"] = time.perf_counter() - t
    shard = shard_of(store, layout_of(model, cfg, store), rank, world)
    info = corpus_info | {"shard": f"{rank}/{world}"}
    _profile_one(model, cfg, shard, info, staging / ".shards" / f"rank-{rank}", False,
                 progress_factory if rank == 0 else None, stages)
    dist.barrier()
    result = None
    if rank == 0:
        shards = [staging / ".shards" / f"rank-{r}" for r in range(world)]
        tmp = staging / ".shards" / "merged"
        merge(shards, tmp, force=True)
        manifest = json.loads((tmp / runfiles.MANIFEST).read_text())
        for name in sorted(os.listdir(tmp)):
            if name != runfiles.MANIFEST:
                os.replace(tmp / name, staging / name)
        wall = time.monotonic() - wall_start
        manifest["corpus"] = corpus_info | {"n_tokens": store.n_tokens}
        manifest["settings"]["world_size"] = world
        manifest["time"] = {"seconds": round(wall, 3), "tokens_per_second": round(store.n_tokens / wall, 1),
                            "seconds_summed_over_ranks": manifest["time"]["seconds"],
                            "stages_rank0": {k: round(v, 3) for k, v in stages.items()}}
        shutil.rmtree(staging / ".shards")
        runfiles.write_json(staging / runfiles.MANIFEST, manifest)  # last: the run is complete
        publish(staging, out)
        result = runfiles.open_run(out)
    dist.barrier()
    return result
