"""``compare(runs)``: analyzed runs of different models side by side (``kvmem compare runs/A runs/B``).

Returns an AnalysisResult with
  models   one row per run: model, family, activation, gated, corpus, run tokens, sample tokens, and the
           model-level figures: sparsity at each threshold, carry shares, gate/up quadrants (gated),
           mean composition shares, mean knock-out losses, agreement and lexical shares by depth third
  layers   one row per (run, layer) with relative depth = layer / (n_layers - 1), for plotting curves
           of different depths on one axis
``meta["same_corpus"]`` says whether the runs share corpus source and token count (compare like with like).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from kvmem.analysis.analyze import load_analysis
from kvmem.analysis.common import thirds
from kvmem.analysis.result import AnalysisResult
from kvmem.errors import KvmemError

LAYER_COLUMNS = {  # per table, the columns compared (those present; each with its _lo/_hi where the table has them)
    "sparsity_layers": ["active1", "active10", "active_gt0", "abs_gt_1x_mean", "carry50_share", "carry90_share"],
    "agreement_layers": ["ex1", "base_ex1", "uniform_ex1", "docs_any", "next_top10"],
    "lexical_layers": ["same_token", "base_same_token", "kept_1", "kept_2"],
    "composition_layers": ["novel", "base_novel", "case_residual", "case_ffn", "case_agreement", "case_composition",
                           "changed_to_ffn"],
    "knockouts_layers": ["remove", "linear"],
}
THIRD_COLUMNS = ("ex1", "base_ex1", "same_token", "kept_1", "novel", "case_residual", "remove", "linear")


def compare(paths) -> AnalysisResult:
    import kvmem

    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise KvmemError("compare needs at least two runs")
    models, layers = [], []
    corpora = set()
    for path in paths:
        run = kvmem.open_run(path)
        a = load_analysis(path)
        m = run.manifest["model"]
        n_layers = int(m["n_layers"])
        corpora.add((run.manifest["corpus"].get("source"), run.manifest["corpus"].get("n_tokens")))
        row = {"run": str(path), "model": m["model"], "family": m["family"], "activation": m["activation"],
               "gated": m["gated"], "n_layers": n_layers, "d_mlp": m["d_mlp"],
               "corpus": run.manifest["corpus"].get("source"), "run_tokens": run.manifest["corpus"].get("n_tokens")}
        row.update({f"sample_tokens_{k}": v for k, v in a["analysis"].get("sample_tokens", {}).items()})
        if "sparsity_model" in a:
            s = a["sparsity_model"].iloc[0]
            row.update({k: float(s[k]) for k in s.index if k not in ("layers", "n_tokens", "d_mlp")})
        per = None
        for table, cols in LAYER_COLUMNS.items():
            if table not in a:
                continue
            have = [c for c in cols if c in a[table].columns]
            have += [f"{c}_{b}" for c in have for b in ("lo", "hi") if f"{c}_{b}" in a[table].columns]
            df = a[table][["layer"] + have]
            per = df if per is None else per.merge(df, on="layer", how="outer")
        if per is not None:
            th = thirds(per.layer.tolist(), n_layers)
            for part in ("lower", "upper"):
                sel = per[per.layer.isin(th[part])]
                for col in THIRD_COLUMNS:
                    if col in sel:
                        row[f"{part}_{col}"] = float(sel[col].mean())
            per.insert(0, "run", str(path))
            per.insert(1, "model", m["model"])
            per.insert(3, "depth", per.layer / max(n_layers - 1, 1))
            layers.append(per)
        row["verdicts"] = "; ".join(f"{f.get('name', f['measure'])}: {f['verdict']}" for f in a["findings"])
        models.append(row)
    meta = {"same_corpus": len(corpora) == 1, "corpora": sorted(map(str, corpora)),
            "note": "figures come from each run's analysis/ (see its analysis.json for thresholds and sample sizes)"}
    return AnalysisResult("compare", {"models": pd.DataFrame(models),
                                      "layers": pd.concat(layers, ignore_index=True) if layers else pd.DataFrame()},
                          meta)
