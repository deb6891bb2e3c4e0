"""Uncertainty for the analyses: cluster bootstrap over documents, Wilson intervals, permutation p-values.

A measure keeps one row per sampled *unit* (a token, an example, a neuron's trigger) in a ``units``
table with a ``layer`` column, a cluster column (``doc``: the global document id the unit comes from)
and one column per rate (0/1 or float; NaN = the unit does not count for that rate). ``bootstrap``
resamples whole documents with replacement, so units of one document (correlated) move together, and
gives the mean of each rate with a percentile interval. Rates pooled over several layers (a depth
third) are bootstrapped the same way: pass those layers' units.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

LEVEL = 0.95
N_BOOT = 1000


def wilson(k: float, n: float, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval of a binomial rate k/n ((nan, nan) when n = 0)."""
    if n <= 0:
        return math.nan, math.nan
    z = _z(level)
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def _z(level: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + level / 2)


def cluster_means(values: np.ndarray, clusters: np.ndarray, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """Bootstrap replicates [n_boot] of the mean of ``values`` [n] (NaN-free) when whole clusters [n]
    are resampled with replacement: per replicate, sum of the drawn clusters' sums / sum of their counts."""
    values = np.asarray(values, dtype=np.float64)
    _, inv = np.unique(np.asarray(clusters), return_inverse=True)
    n_c = int(inv.max()) + 1 if inv.size else 0
    if n_c == 0:
        return np.full(n_boot, np.nan)
    sums = np.bincount(inv, weights=values, minlength=n_c)
    counts = np.bincount(inv, minlength=n_c).astype(np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_c, size=(n_boot, n_c))
    w = np.zeros((n_boot, n_c))
    np.add.at(w, (np.repeat(np.arange(n_boot), n_c), draws.reshape(-1)), 1.0)  # multiplicity of each cluster
    tot = w @ counts
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tot > 0, (w @ sums) / tot, np.nan)


def interval(values, clusters, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean of the non-NaN ``values`` and its cluster-bootstrap percentile interval."""
    values = np.asarray(values, dtype=np.float64)
    clusters = np.asarray(clusters)
    ok = ~np.isnan(values)
    if not ok.any():
        return math.nan, math.nan, math.nan
    reps = cluster_means(values[ok], clusters[ok], n_boot, seed)
    reps = reps[~np.isnan(reps)]
    a = (1 - level) / 2
    return float(values[ok].mean()), float(np.quantile(reps, a)), float(np.quantile(reps, 1 - a))


def bootstrap(units: pd.DataFrame, cols, *, cluster: str = "doc", by=None, n_boot: int = N_BOOT, seed: int = 0,
              level: float = LEVEL) -> pd.DataFrame:
    """Per group of ``by`` (a column name, a list of them, or None for one row): n_units, n_clusters and,
    per rate column c, c (the mean), c_lo and c_hi (cluster-bootstrap percentile interval at ``level``)
    and n_c (units counted for c)."""
    cols = [cols] if isinstance(cols, str) else list(cols)
    groups = [((), units)] if by is None else units.groupby(by, sort=True)
    keys = [] if by is None else ([by] if isinstance(by, str) else list(by))
    rows = []
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(keys, key))
        row["n_units"] = len(g)
        row["n_clusters"] = int(g[cluster].nunique())
        for c in cols:
            mean, lo, hi = interval(g[c].to_numpy(), g[cluster].to_numpy(), n_boot, seed, level)
            row.update({c: mean, f"{c}_lo": lo, f"{c}_hi": hi, f"n_{c}": int(g[c].notna().sum())})
        rows.append(row)
    return pd.DataFrame(rows)


def perm_pvalue(observed: float, null) -> float:
    """One-sided permutation p-value, (1 + #{null >= observed}) / (1 + n_null): never 0."""
    null = np.asarray(null, dtype=np.float64)
    null = null[~np.isnan(null)]
    if math.isnan(observed) or null.size == 0:
        return math.nan
    return float((1 + (null >= observed).sum()) / (1 + null.size))
