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

import pandas as pd

from kvmem.atomic import write_parquet

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


def path_of(run) -> object:
    return run.path / FILE


def read(run) -> pd.DataFrame:
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


def write(run, df: pd.DataFrame) -> None:
    """Replace RUN/explanations.parquet with ``df`` (atomically)."""
    write_parquet(path_of(run), conform(df))
