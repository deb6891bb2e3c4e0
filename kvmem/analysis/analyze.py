"""``analyze(run)``: every analysis on a profiled run, written to ``RUN/analysis/``.

RUN/analysis/
  {measure}_{table}.parquet   the tables of each AnalysisResult (e.g. agreement_layers.parquet,
                              agreement_pairs.parquet, sparsity_layers.parquet, sparsity_model.parquet,
                              composition_layers.parquet, knockouts_layers.parquet, knockouts_long.parquet,
                              lexical_layers.parquet, lexical_truncation.parquet, coactivation_partners.parquet)
  findings.json               the claims and verdicts (kvmem.analysis.findings)
  analysis.json               per measure: its meta (thresholds, token counts, baselines), seconds taken;
                              the model, the run and the sample sizes
Model-running measures use the first tokens of the run's token store, in the run's seq_len rows:
``tokens`` for sparsity and co-activation, ``knockout_tokens`` and ``composition_tokens`` (each at most
``tokens``) for the costlier ones.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from kvmem.analysis.common import run_slots, sample_from_run
from kvmem.errors import KvmemError
from kvmem.profile.run import Run

MEASURES = ("sparsity", "coactivation", "composition", "knockouts", "agreement", "lexical")


def run_neuron_stats(run: Run, layers) -> pd.DataFrame:
    """(layer, neuron, firing_rate, max) from the run's statistics."""
    frames = []
    for layer in layers:
        s = run.layer_stats(layer)
        values, _ = run_slots(run, layer, "top")
        frames.append(pd.DataFrame({"layer": layer, "neuron": range(values.shape[0]),
                                    "firing_rate": s.firing_rate().cpu().numpy(), "max": values[:, 0].numpy()}))
    return pd.concat(frames, ignore_index=True)


def default_queries(run: Run, layers, stats: pd.DataFrame, rel: float = 0.25, min_rate: float = 0.001) -> list:
    """Per layer, the neuron with the largest max among those estimated (from the run's histogram) to exceed
    ``rel`` x their max on at least ``min_rate`` of the tokens; the largest max overall if none does."""
    out = []
    for layer, g in stats.groupby("layer"):
        g = g.sort_values("neuron")
        score = torch.tensor(g["max"].to_numpy(), dtype=torch.float64)
        s = run.layer_stats(int(layer))
        if s.n:
            mx = torch.nan_to_num(s.max.double().cpu(), nan=0.0).clamp(min=0)
            rate = s.count_above(rel * mx).double().cpu() / s.n
            ok = rate >= min_rate
            if bool(ok.any()):
                score = torch.where(ok, score, torch.full_like(score, -torch.inf))
        out.append((int(layer), int(score.argmax())))
    return out


def steps(measures, n_layers: int) -> int:
    """How many times ``analyze`` calls ``progress`` (for a progress bar's total)."""
    return sum(n_layers if m == "knockouts" else 1 for m in measures)


def analyze(run: Run | str | Path, model=None, *, tokens: int = 20000, knockout_tokens: int = 4096,
            composition_tokens: int = 1024, measures=MEASURES, coactivation_neurons=None, layers=None, knockout_ks=None,
            device: str = "auto", dtype: str = "auto",
            cache: bool = True, progress=None, write: bool = True) -> dict:
    """Run ``measures`` on a run (folder or kvmem.open_run result); returns {measure: AnalysisResult,
    "findings": [...]} and writes RUN/analysis/ unless ``write`` is False."""
    import kvmem
    from kvmem.analysis.agreement import agreement
    from kvmem.analysis.coactivation import coactivation
    from kvmem.analysis.composition import composition
    from kvmem.analysis.knockout import knockouts
    from kvmem.analysis.lexical import lexical
    from kvmem.analysis.sparsity import sparsity
    from kvmem.analysis.findings import findings

    if not isinstance(run, Run):
        run = kvmem.open_run(run)
    unknown = [m for m in measures if m not in MEASURES]
    if unknown:
        raise KvmemError(f"unknown measure {unknown[0]!r}; choose from {', '.join(MEASURES)}")
    if tokens < 2:
        raise KvmemError("--tokens must be at least 2")
    if model is None:
        model = kvmem.load(run.model_spec, device=device, dtype=dtype)
    run.check_model(model)
    if layers is None:
        layers = run.profiled_layers
    else:
        missing = [layer for layer in layers if layer not in run.profiled_layers]
        if missing:
            raise KvmemError(f"layer {missing[0]} was not profiled in this run (layers: {run.profiled_layers})")
        layers = sorted(set(layers))
    tick = progress or (lambda label: None)
    sample = sample_from_run(run, tokens)
    stats = run_neuron_stats(run, layers)
    maxima = {layer: torch.tensor(g["max"].to_numpy()) for layer, g in stats.groupby("layer")}
    results, seconds = {}, {}

    def timed(name, fn):
        t0 = time.perf_counter()
        results[name] = fn()
        seconds[name] = round(time.perf_counter() - t0, 2)

    if "sparsity" in measures:
        timed("sparsity", lambda: sparsity(model, sample, layers, maxima=maxima))
        tick("sparsity")
    if "coactivation" in measures:
        queries = coactivation_neurons
        if queries is None:
            queries = default_queries(run, layers, stats)
        timed("coactivation", lambda: coactivation(model, sample, queries, layers=layers,
                                                                   maxima=maxima))
        tick("co-activation")
    if "composition" in measures:
        timed("composition", lambda: composition(model, sample.head(composition_tokens), layers,
                                                                cache=cache))
        tick("composition")
    if "knockouts" in measures:
        timed("knockouts", lambda: knockouts(model, sample.head(knockout_tokens), layers, stats=stats,
                                                      ks=knockout_ks, progress=tick))
    if "agreement" in measures:
        def run_agreement():
            from kvmem.vocab import compute_projection, project_values

            k = 10
            proj = project_values(model, k=k, cache=True) if cache else compute_projection(model, k=k)
            bottom = proj["bottom_ids"] if model.gated else None  # gated: m < 0 writes -v_i
            return agreement(run, proj["top_ids"], k=k, layers=layers, value_bottom_ids=bottom)

        timed("agreement", run_agreement)
        tick("agreement")
    if "lexical" in measures:
        timed("lexical", lambda: lexical(model, run, layers=layers))
        tick("lexical keys")
    folder = run.analysis_dir
    previous = _previous(folder, exclude=set(results)) if write else {}
    sample_tokens = {"sparsity": sample.n_tokens, "coactivation": sample.n_tokens,
                     "composition": sample.head(composition_tokens).n_tokens,
                     "knockouts": sample.head(knockout_tokens).n_tokens,
                     "agreement": run.tokens.n_tokens, "lexical": run.tokens.n_tokens}
    out = dict(results)
    out["findings"] = findings(previous | results, model.n_layers)
    if write:
        _write(folder, results, previous, out, run, model, layers, sample_tokens, seconds)
    return out


def _write(folder: Path, results: dict, previous: dict, out: dict, run, model, layers, sample_tokens, seconds):
    """Write ``run/analysis/`` as one folder (kvmem.atomic.staged): the earlier measures' files are
    carried over, the new ones added, and the folder is swapped in only when complete."""
    import shutil

    from kvmem.atomic import staged, write_json

    with staged(folder, "analysis") as tmp:
        if folder.is_dir():
            shutil.copytree(folder, tmp, dirs_exist_ok=True)
        for res in results.values():
            res.write(tmp)
        old = json.loads((folder / "analysis.json").read_text()) if previous else {}
        write_json(tmp / "findings.json", _clean(out["findings"]))
        write_json(tmp / "analysis.json", _clean({
            "run": str(run.path), "model": model.spec, "device": str(model.device),
            "dtype": str(model.dtype).removeprefix("torch."), "run_tokens": run.tokens.n_tokens,
            "layers": {**old.get("layers", {}), **{name: layers for name in results}},
            "sample_tokens": {**old.get("sample_tokens", {}),
                              **{name: n for name, n in sample_tokens.items() if name in results}},
            "seconds": {**old.get("seconds", {}), **seconds},
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
    if isinstance(obj, (np.generic, np.ndarray, torch.Tensor)):
        obj = obj.item()
    if isinstance(obj, float) and obj != obj:
        return None
    return obj


def load_analysis(run_path) -> dict:
    """The tables and findings of RUN/analysis as {"findings": [...], "analysis": {...}, name: DataFrame}."""
    folder = Path(run_path) / "analysis"
    if not (folder / "findings.json").is_file():
        raise KvmemError(f"{run_path}: no analysis yet (run kvmem analyze {run_path})")
    out = {"findings": json.loads((folder / "findings.json").read_text()),
           "analysis": json.loads((folder / "analysis.json").read_text())}
    for path in sorted(folder.glob("*.parquet")):
        out[path.stem] = pd.read_parquet(path)
    return out
