"""``analyze(run)``: every analysis on a profiled run, written to ``RUN/analysis/``.

RUN/analysis/
  {measure}_{table}.parquet   the tables of each AnalysisResult (e.g. agreement_layers.parquet, agreement_units,
                              sparsity_layers, composition_layers, knockouts_layers, lexical_layers, ...)
  findings.json               kvmem version, the rules' version and sha256, the verdicts and the paper-versus-
                              measured table (kvmem.analysis.findings.document)
  analysis.json               per measure: its meta (thresholds, token counts, baselines, seeds), the settings
                              it ran with, its planned cost and the seconds it took; the model and the run
Model-running measures take a sample of the run's own model rows drawn at random across its documents
(kvmem.analysis.common.sample_from_run, seeded): ``tokens`` counted tokens for sparsity and co-activation,
``composition_tokens`` and ``knockout_tokens`` for the costlier ones, each the first rows of one random order
of the run's rows (so the smaller samples are subsets of the larger). ``protocol(device)`` gives the
defaults: the full protocol on a GPU, a shorter one on a CPU (see PROTOCOL for what it costs). ``plan``
states each measure's cost (tokens, documents, forward passes) before anything runs.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from kvmem.errors import KvmemError
from kvmem.profile.run import Run

if TYPE_CHECKING:
    from kvmem.models.kvmodel import KVModel

MEASURES = ("sparsity", "coactivation", "composition", "knockouts", "agreement", "lexical", "mutation", "annotate")
DEFAULT_MEASURES = MEASURES[:-1]  # annotate (a CSV sheet for human labelling) runs only when asked for
# defaults by device kind: the full protocol on a GPU; on a CPU, smaller samples (knock-outs on every third
# analysed layer, fewer neurons for lexical and mutation) that still give every rate a stated interval. CPU
# seconds measured on SmolLM2-135M (30 layers, 2 threads, a loaded machine) with these sizes' predecessors:
# sparsity 78, agreement 203 (before its 2.7x speed-up), lexical 84, composition 268 for 1,298 tokens (3
# documents: its verdict then reads inconclusive, rules.toml min_docs), knock-outs 926 (739 s wall) on all 30
# layers for 785 predicted tokens (the LM head of every partial pass dominates; hence every third layer now);
# so the whole CPU default takes well over "a few minutes" there: see plan() for each measure's cost.
PROTOCOL = {
    "gpu": {"tokens": 32768, "composition_tokens": 8192, "knockout_tokens": 8192, "n_random": 5, "n_perm": 100,
            "knockout_ks": None, "knockout_stride": 1, "lexical_neurons": 128, "mutation_neurons": 64,
            "mutation_examples": 5, "annotate_tokens": 20000, "composition_per_row": 64, "knockout_length": None},
    "cpu": {"tokens": 4096, "composition_tokens": 1024, "knockout_tokens": 1024, "n_random": 3, "n_perm": 100,
            "knockout_ks": "10pct", "knockout_stride": 3, "lexical_neurons": 16, "mutation_neurons": 2,
            "mutation_examples": 2, "annotate_tokens": 4096, "composition_per_row": 32, "knockout_length": 64},
}


def protocol(device) -> dict:
    """The default sample sizes for a device ("cuda..." / "cpu" / torch.device)."""
    return dict(PROTOCOL["gpu" if str(device).startswith("cuda") else "cpu"])


def measure_sample(sample, sizes: dict, measure: str, seed: int = 0):
    """The part of the analysis sample a measure uses: sparsity and co-activation the first rows holding
    ``tokens`` counted tokens; composition ``composition_per_row`` random counted positions of each row (its
    cost is per counted token: more rows, more documents for the same budget); knock-outs the rows cut to
    ``knockout_length`` positions (its cost is per position)."""
    if measure == "composition":
        return sample.spread(per_row=sizes.get("composition_per_row"), seed=seed).head(sizes["composition_tokens"])
    if measure == "knockouts":
        return sample.spread(length=sizes.get("knockout_length")).head(sizes["knockout_tokens"])
    return sample.head(sizes["tokens"])


def _rows_needed(sizes: dict, seq_len: int) -> int:
    """Counted tokens of whole rows the analysis sample must hold for every measure's part of it."""
    per_row = sizes.get("composition_per_row") or seq_len
    length = sizes.get("knockout_length") or seq_len
    rows = max(-(-sizes["composition_tokens"] // min(per_row, seq_len)),
               -(-sizes["knockout_tokens"] // max(1, min(length, seq_len) - 1)))
    return max(sizes["tokens"], sizes["composition_tokens"], sizes["knockout_tokens"], rows * seq_len)


def _ks(setting, d_mlp: int):
    if setting == "10pct":
        return (max(1, d_mlp // 10),)
    return tuple(setting) if setting else None


@dataclass
class Step:
    """One measure's planned cost: counted ``tokens`` it rests on, model ``passes`` over them (a pass that
    runs only the blocks from one layer on counts as one), vocabulary ``projections`` (rows x |V|), and the
    progress ``total`` (layers for per-layer measures, else 1)."""

    measure: str
    tokens: int
    passes: int
    projections: int
    total: int
    note: str
    docs: int | None = None  # documents the sample's rows come from (the bootstrap clusters), where it has one


def plan(measures, n_layers_analysed: int, d_mlp: int, sizes: dict) -> list[Step]:
    """What each measure will cost (printed by ``kvmem analyze`` before it starts)."""
    L, out = n_layers_analysed, []
    ks = sizes.get("ks") or ()
    per_layer = 2 + len(ks) * (2 + sizes["n_random"])
    for m in measures:
        if m == "sparsity":
            out.append(Step(m, sizes["tokens"], 1, 0, 1, "one pass, stops after the last analysed layer"))
        elif m == "coactivation":
            out.append(Step(m, sizes["tokens"], 1, 0, 1, "one pass, firing matrices per batch"))
        elif m == "composition":
            out.append(Step(m, sizes["composition_tokens"], 1, sizes["composition_tokens"] * L * 4, 1,
                            "one pass with hidden states; per layer and token, readouts of residual, FFN update, "
                            "sub-updates"))
        elif m == "knockouts":
            stride = sizes.get("knockout_stride", 1)
            n = len(range(0, L, stride))
            every = f"every {stride}th analysed layer ({n}), " if stride > 1 else ""
            out.append(Step(m, sizes["knockout_tokens"], 1 + n * per_layer, 0, n,
                            f"{every}per layer {per_layer} partial passes (remove, linear, per k: top-max, top-rate, "
                            f"{sizes['n_random']} random draws)"))
        elif m == "agreement":
            out.append(Step(m, 0, 0, L * d_mlp, L, f"no forward pass: values x W_U, {sizes['n_perm']} derangement "
                                                   "draws"))
        elif m == "lexical":
            n = sizes["lexical_neurons"] * L * 5 * 2
            out.append(Step(m, 0, 0, 0, L, f"{n:,} short truncated-context runs ({sizes['lexical_neurons']} "
                                           "neurons per layer, 5 triggers, 2 lengths)"))
        elif m == "mutation":
            n = sizes["mutation_neurons"] * L * sizes["mutation_examples"] * 4
            out.append(Step(m, 0, 0, 0, L, f"{n:,} prefix runs, each up to the trigger ({sizes['mutation_neurons']} "
                                           f"neurons per layer, {sizes['mutation_examples']} triggers, original + "
                                           "first/last/random removed)"))
        elif m == "annotate":
            out.append(Step(m, sizes["annotate_tokens"], 1, 0, 1, "one pass for the keys' and random directions' "
                                                                  "triggers; writes annotation.csv + its key"))
    return out


def analyze(run: Run | str | Path, model: KVModel | None = None, *, tokens: int | None = None,
            knockout_tokens: int | None = None,
            composition_tokens: int | None = None, measures=DEFAULT_MEASURES, coactivation_neurons=None, layers=None,
            knockout_ks=None, n_random: int | None = None, n_perm: int | None = None, seed: int = 0,
            device: str = "auto", dtype: str = "auto", cache: bool = True, progress=None, on_plan=None,
            write: bool = True) -> dict:
    """Run ``measures`` on a run (folder or kvmem.open_run result); returns {measure: AnalysisResult,
    "findings": [...], "document": {...}} and writes RUN/analysis/ unless ``write`` is False.
    Sizes left None take ``protocol(model.device)``. ``progress(measure, advance, label)`` is called as each
    measure advances (``advance`` 0 announces it, None completes it); ``on_plan(steps)`` receives the plan
    before anything runs."""
    import kvmem
    from kvmem.analysis.common import sample_from_run
    from kvmem.analysis.findings import document
    from kvmem.analysis.neurons import run_neuron_stats

    if not isinstance(run, Run):
        run = kvmem.open_run(run)
    measures = list(measures)
    unknown = [m for m in measures if m not in MEASURES]
    if unknown:
        raise KvmemError(f"unknown measure {unknown[0]!r}; choose from {', '.join(MEASURES)}")
    if model is None:
        model = kvmem.load(run.model_spec, device=device, dtype=dtype)
    run.check_model(model)
    proto = protocol(model.device)
    sizes = {"tokens": tokens, "composition_tokens": composition_tokens, "knockout_tokens": knockout_tokens,
             "n_random": n_random, "n_perm": n_perm}
    sizes = {k: proto[k] if v is None else v for k, v in sizes.items()}
    sizes.update({k: proto[k] for k in ("lexical_neurons", "mutation_neurons", "mutation_examples", "annotate_tokens",
                                        "knockout_stride", "composition_per_row", "knockout_length")})
    for name in ("tokens", "composition_tokens", "knockout_tokens"):
        if sizes[name] < 2:
            raise KvmemError(f"{name} must be at least 2")
    sizes["ks"] = tuple(knockout_ks) if knockout_ks else _ks(proto["knockout_ks"], model.d_mlp)
    if layers is not None:  # layers named by the caller are all knocked out
        sizes["knockout_stride"] = 1
    if layers is None:
        layers = list(run.profiled_layers)
    else:
        missing = [layer for layer in layers if layer not in run.profiled_layers]
        if missing:
            raise KvmemError(f"layer {missing[0]} was not profiled in this run (layers: {run.profiled_layers})")
        layers = sorted(set(layers))
    steps = plan(measures, len(layers), model.d_mlp, sizes | {"ks": sizes["ks"] or ()})
    needs_sample = any(m in measures for m in ("sparsity", "coactivation", "composition", "knockouts"))
    biggest = _rows_needed(sizes, run.seq_len)
    sample = sample_from_run(run, biggest, seed=seed) if needs_sample else None  # parts of one random order
    for step in steps:  # the documents each sample spans: fewer than rules.toml's min_docs decide no verdict
        if step.measure in ("sparsity", "coactivation", "composition", "knockouts"):
            step.docs = measure_sample(sample, sizes, step.measure, seed).n_docs
    if on_plan is not None:
        on_plan(steps)
    tell = progress or (lambda measure, advance, label: None)
    stats = run_neuron_stats(run, layers)
    results, seconds, sample_tokens = {}, {}, {}
    for step in steps:
        name = step.measure
        tell(name, 0, "starting")
        t0 = time.perf_counter()
        res = _RUNNERS[name](run, model, layers, sample, stats, sizes, seed, cache, coactivation_neurons,
                             lambda label, _n=name: tell(_n, 1, label))
        seconds[name] = round(time.perf_counter() - t0, 2)
        results[name] = res
        sample_tokens[name] = int(res.meta.get("n_tokens", 0) or 0)
        tell(name, None, "done")  # completes the measure's bar whatever its own progress calls were
    folder = run.analysis_dir
    previous = _previous(folder, exclude=set(results)) if write else {}
    doc = _clean(document(previous | results, model.n_layers))  # as written: NaN -> None
    out = dict(results)
    out["findings"], out["document"] = doc["findings"], doc
    settings = {name: {"seed": seed, **{k: (list(v) if isinstance(v, tuple) else v) for k, v in sizes.items()}}
                for name in results}
    if write:
        _write(folder, results, previous, doc, run, model, layers, sample_tokens, seconds, settings, steps)
    return out


# --- one runner per measure: (run, model, layers, sample, stats, sizes, seed, cache, queries, tick) -------------

def _sparsity(run, model, layers, sample, stats, sizes, seed, cache, queries, tick):
    from kvmem.analysis.neurons import maxima_of
    from kvmem.analysis.sparsity import sparsity

    return sparsity(model, measure_sample(sample, sizes, "sparsity"), layers, maxima=maxima_of(stats), seed=seed)


def _coactivation(run, model, layers, sample, stats, sizes, seed, cache, queries, tick):
    from kvmem.analysis.coactivation import coactivation
    from kvmem.analysis.neurons import default_queries, maxima_of

    queries = queries if queries is not None else default_queries(run, layers, stats)
    return coactivation(model, measure_sample(sample, sizes, "coactivation"), queries, layers=layers, maxima=maxima_of(stats))


def _composition(run, model, layers, sample, stats, sizes, seed, cache, queries, tick):
    from kvmem.analysis.composition import composition
    from kvmem.analysis.neurons import maxima_of

    return composition(model, measure_sample(sample, sizes, "composition", seed), layers, cache=cache, seed=seed,
                       max_abs=maxima_of(stats))  # activity relative to the run's max |m| (no extra pass)


def _knockouts(run, model, layers, sample, stats, sizes, seed, cache, queries, tick):
    from kvmem.analysis.knockout import knockouts

    layers = layers[::sizes.get("knockout_stride", 1)]  # CPU default: every third layer (rules judge by majority)
    return knockouts(model, measure_sample(sample, sizes, "knockouts"), layers, stats=stats, ks=sizes["ks"],
                     n_random=sizes["n_random"], seed=seed, progress=tick)


def _agreement(run, model, layers, sample, stats, sizes, seed, cache, queries, tick):
    from kvmem.analysis.agreement import agreement

    return agreement(model, run, layers=layers, n_perm=sizes["n_perm"], seed=seed, progress=tick)


def _lexical(run, model, layers, sample, stats, sizes, seed, cache, queries, tick):
    from kvmem.analysis.lexical import lexical

    return lexical(model, run, layers=layers, seed=seed, n_neurons=sizes["lexical_neurons"], progress=tick)


def _mutation(run, model, layers, sample, stats, sizes, seed, cache, queries, tick):
    from kvmem.analysis.mutation import mutation

    return mutation(model, run, layers=layers, seed=seed, n_neurons=sizes["mutation_neurons"],
                    n_examples=sizes["mutation_examples"], progress=tick)


def _annotate(run, model, layers, sample, stats, sizes, seed, cache, queries, tick):
    from kvmem.analysis.annotate import annotate

    return annotate(model, run, layers=layers, seed=seed, tokens=sizes["annotate_tokens"])


_RUNNERS = {"sparsity": _sparsity, "coactivation": _coactivation, "composition": _composition,
            "knockouts": _knockouts, "agreement": _agreement, "lexical": _lexical, "mutation": _mutation,
            "annotate": _annotate}


def _write(folder: Path, results: dict, previous: dict, doc: dict, run, model, layers, sample_tokens, seconds,
           settings, steps):
    """Write ``run/analysis/`` as one folder (kvmem.atomic.staged): the earlier measures' files are
    carried over, the new ones added, and the folder is swapped in only when complete."""
    import shutil

    from kvmem.atomic import staged, write_json

    with staged(folder, "analysis") as tmp:
        if folder.is_dir():
            shutil.copytree(folder, tmp, dirs_exist_ok=True)
        for name in results:  # a refreshed measure's old tables go (a table it no longer writes must not linger)
            for p in tmp.glob(f"{name}_*.parquet"):
                p.unlink()
        for name, res in results.items():
            if name == "annotate":  # the blinded sheet and, separately, its key (CSV); raw scores as parquet
                from kvmem.analysis.annotate import write_annotation

                write_annotation(res, tmp)
                res = type(res)(name, {k: v for k, v in res.tables.items() if k in ("triggers",)}, res.meta)
            res.write(tmp)
        old = json.loads((folder / "analysis.json").read_text()) if previous else {}
        write_json(tmp / "findings.json", doc)
        cost = {s.measure: {"tokens": s.tokens, "documents": s.docs, "forward_passes": s.passes,
                            "projections": s.projections, "note": s.note} for s in steps}
        write_json(tmp / "analysis.json", _clean({
            "run": str(run.path), "model": model.spec, "device": str(model.device),
            "dtype": str(model.dtype).removeprefix("torch."), "run_tokens": run.tokens.n_tokens,
            "kvmem_version": doc["kvmem_version"], "rules": doc["rules"],
            "layers": {**old.get("layers", {}), **{name: layers for name in results}},
            "sample_tokens": {**old.get("sample_tokens", {}), **sample_tokens},
            "seconds": {**old.get("seconds", {}), **seconds},
            "settings": {**old.get("settings", {}), **settings},
            "cost": {**old.get("cost", {}), **cost},
            "measures": {**{name: r.meta for name, r in previous.items()},
                         **{name: res.meta for name, res in results.items()}}}))


def _previous(folder: Path, exclude: set) -> dict:
    """AnalysisResults of earlier ``analyze`` calls on this run (measures not in ``exclude``), so that
    ``--measures knockouts`` refreshes one measure and the findings still cover every measure."""
    from kvmem.analysis.result import AnalysisResult

    meta_path = folder / "analysis.json"
    if not meta_path.is_file():
        return {}
    metas = json.loads(meta_path.read_text()).get("measures", {})
    out = {}
    for name, meta in metas.items():
        if name in exclude:
            continue
        tables = {p.stem[len(name) + 1:]: pd.read_parquet(p) for p in sorted(folder.glob(f"{name}_*.parquet"))}
        if tables:
            out[name] = AnalysisResult(name, tables, meta)
    return out


def _clean(obj):
    """JSON-safe: NaN -> None, numpy/torch scalars -> Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    elif isinstance(obj, (np.ndarray, torch.Tensor)):
        return _clean(obj.tolist())
    if isinstance(obj, float) and obj != obj:
        return None
    return obj


def load_analysis(run_path) -> dict:
    """The tables and findings of RUN/analysis as {"findings": [...], "paper": [...], "rules": {...},
    "analysis": {...}, name: DataFrame} (a kvmem 0.2 findings.json, a bare list, reads as findings only)."""
    folder = Path(run_path) / "analysis"
    if not (folder / "findings.json").is_file():
        raise KvmemError(f"{run_path}: no analysis yet (run kvmem analyze {run_path})")
    data = json.loads((folder / "findings.json").read_text())
    if isinstance(data, list):
        data = {"findings": data}
    out = {"findings": data.get("findings", []), "paper": data.get("paper", []), "rules": data.get("rules", {}),
           "kvmem_version": data.get("kvmem_version"),
           "analysis": json.loads((folder / "analysis.json").read_text())}
    for path in sorted(folder.glob("*.parquet")):
        out[path.stem] = pd.read_parquet(path)
    return out
