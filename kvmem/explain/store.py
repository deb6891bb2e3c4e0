"""``RUN/explanations.parquet``: one row per (neuron, side, sign, explainer), written by kvmem explain / score.

Columns (``COLUMNS``): neuron (str "L.N"), layer (int32), side ("key" | "value"), sign ("+" | "-"; "+" for
non-gated FFNs), description, explainer ("baseline" or the model name), backend ("baseline" | "local" |
"http"), prompt_hash (sha256 hex of the explainer prompt), created (ISO-8601 UTC), and per scorer s in
SCORERS: s (float64 balanced accuracy / correlation, NaN if not scored), s_n (int32 items scored), s_lo,
s_hi (float64 95% interval), s_note (why NaN / failures); plus scorer (the model that scored) and
split_seed (int32: the seed of the held-out split, kvmem.explain.data). Written
atomically (kvmem.atomic); read through ``kvmem.open_run(path).explanations``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from kvmem.atomic import write_parquet

if TYPE_CHECKING:
    from kvmem.profile.run import Run

FILE = "explanations.parquet"
SCORERS = ("detection", "fuzzing", "simulation", "value")
KEY = ["neuron", "side", "sign", "explainer"]
_BASE = {"neuron": "string", "layer": "int32", "side": "string", "sign": "string", "description": "string",
         "explainer": "string", "backend": "string", "prompt_hash": "string", "created": "string"}
COLUMNS: dict[str, str] = dict(_BASE)
for _s in SCORERS:
    COLUMNS.update({_s: "float64", f"{_s}_n": "int32", f"{_s}_lo": "float64", f"{_s}_hi": "float64",
                    f"{_s}_note": "string"})
COLUMNS["scorer"] = "string"
COLUMNS["split_seed"] = "int32"  # the seed of the explain / score split (kvmem.explain.data)


def empty() -> pd.DataFrame:
    return conform(pd.DataFrame({c: [] for c in COLUMNS}))


def conform(df: pd.DataFrame) -> pd.DataFrame:
    """The table with every column of COLUMNS in order and dtype (missing scores NaN / n 0 / notes '')."""
    df = df.copy()
    for c, dtype in COLUMNS.items():
        if c not in df:
            df[c] = float("nan") if dtype == "float64" else (0 if dtype == "int32" else "")
        if dtype == "int32":
            df[c] = df[c].fillna(0).astype("int32")
        elif dtype == "float64":
            df[c] = df[c].astype("float64")
        else:
            df[c] = df[c].fillna("").astype(str)
    return df[list(COLUMNS) + [c for c in df.columns if c not in COLUMNS]].reset_index(drop=True)


def path_of(run: Run) -> object:
    return run.path / FILE


def read(run: Run) -> pd.DataFrame:
    """The run's explanations (an empty table with COLUMNS if none were written)."""
    p = path_of(run)
    if not p.is_file():
        return empty()
    return conform(pd.read_parquet(p))


def merge(old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """``old`` with the rows of ``new`` added; a new row replaces an old one of the same KEY."""
    new = conform(new)
    if old is None or old.empty:
        return new.sort_values(KEY, kind="stable").reset_index(drop=True)
    old = conform(old)
    keys = set(map(tuple, new[KEY].to_numpy().tolist()))
    keep = [tuple(r) not in keys for r in old[KEY].to_numpy().tolist()]
    out = pd.concat([old[keep], new], ignore_index=True)
    return out.sort_values(KEY, kind="stable").reset_index(drop=True)


def write(run: Run, df: pd.DataFrame) -> None:
    """Replace RUN/explanations.parquet with ``df`` (atomically)."""
    write_parquet(path_of(run), conform(df))


KEY_SCORERS = ("detection", "fuzzing", "simulation")


def side_of(scorer: str) -> str:
    """The side a scorer scores: value for "value", key for the others."""
    return "value" if scorer == "value" else "key"


def default_explainer(df: pd.DataFrame) -> str:
    """The explainer a neuron's score is read from when none is named: the LLM explainer with the most rows
    (ties: the first by name), else "baseline"."""
    llm = df[(df["explainer"] != "baseline") & (df["description"] != "")]
    if llm.empty:
        return "baseline"
    counts = llm["explainer"].value_counts()
    return sorted(counts[counts == counts.max()].index)[0]


def neuron_scores(df: pd.DataFrame, scorer: str = "detection", explainer: str | None = None) -> pd.DataFrame:
    """One row per neuron with a ``scorer`` score from ``explainer`` (default: ``default_explainer``): the best
    sign's row (highest score; ties: "+"). Columns: neuron, layer, sign, explainer, description, score,
    score_n, score_lo, score_hi, and the baseline's row of the same neuron, side and sign: baseline,
    baseline_n, baseline_lo, baseline_hi, baseline_description (NaN / "" where there is none). Sorted by
    score (descending), then layer and neuron."""
    from kvmem.errors import KvmemError

    if scorer not in SCORERS:
        raise KvmemError(f"scorer must be one of {', '.join(SCORERS)}, not {scorer!r}")
    df = conform(df)
    explainer = explainer or default_explainer(df)
    side = side_of(scorer)
    rows = df[(df["side"] == side) & (df["explainer"] == explainer) & df[scorer].notna()].copy()
    cols = ["neuron", "layer", "sign", "explainer", "description", "score", "score_n", "score_lo", "score_hi",
            "baseline", "baseline_n", "baseline_lo", "baseline_hi", "baseline_description"]
    if rows.empty:
        return pd.DataFrame({c: [] for c in cols})
    rows["_plus"] = rows["sign"] == "+"
    rows = rows.sort_values([scorer, "_plus"], ascending=[False, False], kind="stable").drop_duplicates("neuron")
    base = df[(df["side"] == side) & (df["explainer"] == "baseline")].set_index(["neuron", "sign"])
    out = pd.DataFrame({"neuron": rows["neuron"], "layer": rows["layer"], "sign": rows["sign"],
                        "explainer": rows["explainer"], "description": rows["description"], "score": rows[scorer],
                        "score_n": rows[f"{scorer}_n"], "score_lo": rows[f"{scorer}_lo"],
                        "score_hi": rows[f"{scorer}_hi"]})
    keys = list(zip(rows["neuron"], rows["sign"]))
    for name, col in (("baseline", scorer), ("baseline_n", f"{scorer}_n"), ("baseline_lo", f"{scorer}_lo"),
                      ("baseline_hi", f"{scorer}_hi"), ("baseline_description", "description")):
        out[name] = [base[col].get(k, float("nan") if col != "description" else "") for k in keys]
    out["baseline_n"] = out["baseline_n"].fillna(0).astype("int64")
    out["_n"] = [int(str(x).split(".")[-1]) for x in out["neuron"]]
    out = out.sort_values(["score", "layer", "_n"], ascending=[False, True, True], kind="stable")
    return out.drop(columns="_n").reset_index(drop=True)[cols]
