"""kvmem.analysis.ci against direct computations."""

import math

import numpy as np
import pandas as pd

from kvmem.analysis import ci


def test_wilson_matches_the_closed_form():
    lo, hi = ci.wilson(10, 100)
    # Wilson 95% for 10/100 (z = 1.959964): 0.0552 .. 0.1744
    assert abs(lo - 0.05523) < 1e-4 and abs(hi - 0.17437) < 1e-4
    assert all(math.isnan(x) for x in ci.wilson(0, 0))
    lo, hi = ci.wilson(0, 50)
    assert lo == 0.0 and 0 < hi < 0.08


def test_cluster_bootstrap_resamples_whole_clusters():
    # two clusters with constant values: every replicate mean is a weighted mix of 0 and 1 by cluster multiplicity
    values = np.array([0.0] * 3 + [1.0] * 1)
    clusters = np.array([0, 0, 0, 1])
    reps = ci.cluster_means(values, clusters, n_boot=200, seed=1)
    allowed = {0.0, 1.0, 1 / 4}  # (0,0) (1,1) (0,1)
    assert set(np.round(reps, 6)) <= {round(a, 6) for a in allowed}


def test_interval_brackets_the_mean_and_shrinks_with_more_clusters():
    rng = np.random.default_rng(0)
    small = rng.random(40) < 0.3
    big = rng.random(4000) < 0.3
    m1, lo1, hi1 = ci.interval(small, np.arange(40))
    m2, lo2, hi2 = ci.interval(big, np.arange(4000))
    assert lo1 <= m1 <= hi1 and lo2 <= m2 <= hi2
    assert hi2 - lo2 < (hi1 - lo1) / 4
    # iid units as their own clusters: the percentile interval is near the normal one
    se = math.sqrt(m2 * (1 - m2) / 4000)
    assert abs((hi2 - lo2) - 2 * 1.96 * se) < 0.01


def test_bootstrap_table_by_layer_skips_nan_units():
    units = pd.DataFrame({"layer": [0, 0, 0, 1, 1], "doc": [0, 1, 2, 0, 1], "hit": [1.0, 0.0, np.nan, 1.0, 1.0]})
    t = ci.bootstrap(units, ["hit"], by="layer", n_boot=100)
    assert list(t.layer) == [0, 1]
    assert t.hit.tolist() == [0.5, 1.0] and t.n_hit.tolist() == [2, 2]
    assert t.hit_lo[1] == 1.0 and t.hit_hi[1] == 1.0


def test_perm_pvalue_is_never_zero():
    assert ci.perm_pvalue(5.0, [1, 2, 3]) == 0.25
    assert ci.perm_pvalue(1.0, [1, 2, 3]) == 1.0
