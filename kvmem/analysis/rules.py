"""The verdict rules file (``rules.toml``) and the interval arithmetic the verdicts use.

``load_rules()`` reads kvmem/analysis/rules.toml (or a given file) and keeps its sha256, which
``findings`` writes into findings.json beside the kvmem version. An ``Est`` is a rate with its 95%
interval: from a measure's ``units`` table (one row per sampled unit, cluster column ``doc``) through
kvmem.analysis.ci.bootstrap, or from the ``{col}``, ``{col}_lo``, ``{col}_hi`` columns of its per-layer
``layers`` table. Comparisons against a threshold answer YES (the whole interval is on the rule's side),
NO (the whole interval is on the other side, ties included) or UNSURE (it straddles the threshold).
"""

from __future__ import annotations

import hashlib
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kvmem.analysis import ci
from kvmem.errors import KvmemError

RULES_PATH = Path(__file__).with_name("rules.toml")
YES, NO, UNSURE = "yes", "no", "unsure"
MIN_DOCS = 5  # default of rules.toml's min_docs
SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE, NOT_TESTED = "supported", "not supported", "inconclusive", "not tested"
VERDICTS = (SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE, NOT_TESTED)


@dataclass(frozen=True)
class Rules:
    """The parsed rules file: ``data`` (the TOML as a dict), its ``sha256`` and ``version``."""

    data: dict
    sha256: str
    path: str

    @property
    def version(self) -> str:
        return str(self.data["version"])

    def claim(self, name: str) -> dict:
        return self.data["claims"][name]

    def header(self) -> dict:
        """What findings.json records about the rules."""
        return {"version": self.version, "sha256": self.sha256, "file": self.path, "date": self.data.get("date"),
                "level": self.data.get("level"), "n_boot": self.data.get("n_boot"),
                "min_docs": self.data.get("min_docs", MIN_DOCS)}


def load_rules(path: str | Path | None = None) -> Rules:
    """Parse ``path`` (default: the bundled rules.toml); KvmemError if it is missing or malformed."""
    path = Path(path) if path is not None else RULES_PATH
    try:
        raw = path.read_bytes()
        data = tomllib.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise KvmemError(f"rules file {path}: {e}") from None
    for key in ("version", "claims"):
        if key not in data:
            raise KvmemError(f"rules file {path}: no {key!r}")
    for name, c in data["claims"].items():
        for key in ("claim", "source", "measure", "rule"):
            if key not in c:
                raise KvmemError(f"rules file {path}: claim {name!r} has no {key!r}")
    return Rules(data, hashlib.sha256(raw).hexdigest(), path.name if path == RULES_PATH else str(path))


@dataclass(frozen=True)
class Est:
    """A rate: ``value`` with its interval [``lo``, ``hi``] and the count ``n`` it rests on. ``how`` says
    where the interval comes from ("bootstrap", "per-layer bounds", "layer mean of per-layer bounds",
    "none": point estimate, lo = hi = value)."""

    value: float
    lo: float
    hi: float
    n: float
    how: str
    docs: float = math.nan  # documents (bootstrap clusters) the estimate rests on, where known
    min_docs: int = 0  # fewer documents than this: no comparison is decided (UNSURE)

    @property
    def few_docs(self) -> bool:
        return self.docs == self.docs and self.docs < self.min_docs

    def as_dict(self, name: str) -> dict:
        return {name: self.value, f"{name}_lo": self.lo, f"{name}_hi": self.hi, f"n_{name}": self.n}

    def minus(self, other: "Est") -> "Est":
        """A conservative difference interval [lo - other.hi, hi - other.lo] (no correlation assumed)."""
        return Est(self.value - other.value, self.lo - other.hi, self.hi - other.lo, min(self.n, other.n),
                   "difference of intervals", min(self.docs, other.docs), max(self.min_docs, other.min_docs))


def _zero_width(e: Est) -> Est:
    """A 0/1 rate with no or every event has a zero-width percentile bootstrap interval; widen it to the
    Wilson score interval of k = value * n events (a rate of 0 out of 48 is not known to be exactly 0)."""
    if e.lo == e.hi == e.value and e.value in (0.0, 1.0) and e.n == e.n and e.n > 0:
        lo, hi = ci.wilson(e.value * e.n, e.n)
        return Est(e.value, lo, hi, e.n, e.how + ", widened to the Wilson interval (no or every event)", e.docs,
                   e.min_docs)
    return e


def pick(df: pd.DataFrame | None, names, k=None) -> str | None:
    """The first of ``names`` that is a column of ``df`` (names may hold ``{k}``)."""
    if df is None:
        return None
    for name in names:
        name = name.format(k=k) if k is not None else name
        if name in df.columns:
            return name
    return None


def _units(res) -> pd.DataFrame | None:
    return res.tables.get("units") if res is not None else None


def _min_docs(rules: Rules | None) -> int:
    return int((rules.data if rules is not None else {}).get("min_docs", MIN_DOCS))


def _docs(row, col: str) -> float:
    for name in (f"n_docs_{col}", "n_docs", "n_clusters"):
        if name in row and row[name] == row[name]:
            return float(row[name])
    return math.nan


def _boot_kwargs(rules: Rules | None) -> dict:
    d = rules.data if rules is not None else {}
    return {"n_boot": int(d.get("n_boot", ci.N_BOOT)), "seed": int(d.get("seed", 0)),
            "level": float(d.get("level", ci.LEVEL))}


def pooled(res, layers, names, rules: Rules | None = None) -> Est | None:
    """The rate ``names`` pooled over ``layers``: cluster bootstrap over the units of those layers when the
    measure has a units table with the column; else from the layers table (one layer: its own bounds;
    several: the mean of their values and of their bounds). None when nothing counts."""
    layers = list(layers)
    if res is None or not layers:
        return None
    units = _units(res)
    col = pick(units, names)
    if col is not None and "doc" in units.columns:
        u = units[units.layer.isin(layers)]
        if u[col].notna().any():
            row = ci.bootstrap(u, col, **_boot_kwargs(rules)).iloc[0]
            docs = float(u.loc[u[col].notna(), "doc"].nunique())
            return _zero_width(Est(float(row[col]), float(row[f"{col}_lo"]), float(row[f"{col}_hi"]),
                                   float(row[f"n_{col}"]), "bootstrap", docs, _min_docs(rules)))
    df = res.tables.get("layers")
    col = pick(df, names)
    if col is None:
        return None
    sel = df[df.layer.isin(layers) & df[col].notna()]
    if sel.empty:
        return None
    value = float(sel[col].mean())
    n = float(sel[f"n_{col}"].sum()) if f"n_{col}" in sel else float(sel["n_units"].sum()) if "n_units" in sel \
        else math.nan
    docs = max((_docs(r, col) for _, r in sel.iterrows()), default=math.nan)  # at least this many
    if f"{col}_lo" in sel and f"{col}_hi" in sel and sel[f"{col}_lo"].notna().all():
        how = "per-layer bounds" if len(sel) == 1 else "layer mean of per-layer bounds"
        return _zero_width(Est(value, float(sel[f"{col}_lo"].mean()), float(sel[f"{col}_hi"].mean()), n, how, docs,
                               _min_docs(rules)))
    return Est(value, value, value, n, "none", docs, _min_docs(rules))


def null_pooled(res, layers, names, rules: Rules | None = None) -> Est | None:
    """A baseline pooled over ``layers`` from the measure's ``null`` table (one row per (layer, draw): the
    draw's rate and its count ``n_{rate}``): per draw, the count-weighted mean over the layers; the value is
    the mean over draws and the interval the draws' central ``level`` range (their spread). None without
    a null table holding the column."""
    null = res.tables.get("null") if res is not None else None
    col = pick(null, names)
    if col is None or "draw" not in null.columns:
        return None
    sel = null[null.layer.isin(list(layers)) & null[col].notna()]
    if sel.empty:
        return None
    w = sel[f"n_{col}"] if f"n_{col}" in sel.columns else pd.Series(1.0, index=sel.index)
    g = (sel[col] * w).groupby(sel.draw).sum() / w.groupby(sel.draw).sum()
    g = g.dropna()
    if g.empty:
        return None
    q = (1 - float((rules.data if rules else {}).get("level", ci.LEVEL))) / 2
    return Est(float(g.mean()), float(g.quantile(q)), float(g.quantile(1 - q)), float(len(g)),
               f"spread of {len(g)} derangement draws")


def per_layer(res, names, rules: Rules | None = None, k=None) -> dict[int, Est]:
    """{layer: Est} for every layer of the measure's layers table (bounds from its ``_lo``/``_hi``
    columns, else a bootstrap of its units by layer, else point estimates)."""
    df = res.tables.get("layers") if res is not None else None
    col = pick(df, names, k)
    if col is None:
        return {}
    units = _units(res)
    boot = None
    if f"{col}_lo" not in df.columns and units is not None and col in units.columns and "doc" in units.columns:
        boot = ci.bootstrap(units, col, by="layer", **_boot_kwargs(rules)).set_index("layer")
    out = {}
    for _, row in df.iterrows():
        layer, v = int(row.layer), float(row[col])
        if math.isnan(v):
            continue
        n = float(row[f"n_{col}"]) if f"n_{col}" in df.columns else math.nan
        if f"{col}_lo" in df.columns and not math.isnan(float(row[f"{col}_lo"])):
            out[layer] = _zero_width(Est(v, float(row[f"{col}_lo"]), float(row[f"{col}_hi"]), n, "per-layer bounds",
                                         _docs(row, col), _min_docs(rules)))
        elif boot is not None and layer in boot.index:
            b = boot.loc[layer]
            out[layer] = _zero_width(Est(float(b[col]), float(b[f"{col}_lo"]), float(b[f"{col}_hi"]),
                                         float(b[f"n_{col}"]), "bootstrap", float(b["n_clusters"]), _min_docs(rules)))
        else:
            out[layer] = Est(v, v, v, n, "none", _docs(row, col), _min_docs(rules))
    return out


def difference(res_a, layers_a, res_b, layers_b, names, rules: Rules | None = None) -> Est | None:
    """Pooled rate over ``layers_a`` minus over ``layers_b``: with units, percentile interval of the
    difference of independent cluster-bootstrap replicates of the two pools; else Est.minus."""
    a, b = pooled(res_a, layers_a, names, rules), pooled(res_b, layers_b, names, rules)
    if a is None or b is None:
        return None
    units = _units(res_a)
    col = pick(units, names)
    if a.how == "bootstrap" and b.how == "bootstrap" and col is not None:
        kw = _boot_kwargs(rules)
        reps = []
        for layers, seed in ((layers_a, kw["seed"]), (layers_b, kw["seed"] + 1)):
            u = units[units.layer.isin(list(layers)) & units[col].notna()]
            reps.append(ci.cluster_means(u[col].to_numpy(), u["doc"].to_numpy(), kw["n_boot"], seed))
        d = reps[0] - reps[1]
        d = d[~np.isnan(d)]
        q = (1 - kw["level"]) / 2
        return Est(a.value - b.value, float(np.quantile(d, q)), float(np.quantile(d, 1 - q)), min(a.n, b.n),
                   "bootstrap of the difference", min(a.docs, b.docs), _min_docs(rules))
    return a.minus(b)


def above(e: Est, threshold: float) -> str:
    """YES if the whole interval is above ``threshold``, NO if it is at or below it, else UNSURE (also
    when the estimate rests on fewer than ``min_docs`` documents)."""
    if e.few_docs:
        return UNSURE
    if e.lo > threshold:
        return YES
    if e.hi <= threshold:
        return NO
    return UNSURE


def below(e: Est, threshold: float) -> str:
    """YES if the whole interval is below ``threshold``, NO if it is at or above it, else UNSURE (also
    when the estimate rests on fewer than ``min_docs`` documents)."""
    if e.few_docs:
        return UNSURE
    if e.hi < threshold:
        return YES
    if e.lo >= threshold:
        return NO
    return UNSURE


def combine(states) -> str:
    """All YES: supported; any NO: not supported; else inconclusive."""
    states = list(states)
    if any(s == NO for s in states):
        return NOT_SUPPORTED
    return SUPPORTED if all(s == YES for s in states) else INCONCLUSIVE


def majority(states) -> str:
    """Per-layer states: YES in more than half the layers: supported; NO in at least half: not supported;
    else inconclusive."""
    states = list(states)
    n = len(states)
    if n and sum(s == YES for s in states) > n / 2:
        return SUPPORTED
    if n and sum(s == NO for s in states) >= n / 2:
        return NOT_SUPPORTED
    return INCONCLUSIVE
