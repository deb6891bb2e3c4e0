"""Scorer arithmetic against hand computations (and scipy's Wilson interval)."""

import math

import numpy as np
import pytest
from scipy.stats import binomtest, pearsonr

from kvmem.explain.scorers import balanced_accuracy, correlation, expected_value, pearson, scale


def test_balanced_accuracy_by_hand():
    # positives: T, T, F, failed -> 2 of 4 right; negatives: F (right), T (wrong) -> 1 of 2
    s = balanced_accuracy([True, True, False, None, False, True], [True, True, True, True, False, False])
    assert s.value == pytest.approx((2 / 4 + 1 / 2) / 2)
    assert s.n == 6
    lp, hp = binomtest(2, 4).proportion_ci(0.95, "wilson")
    ln, hn = binomtest(1, 2).proportion_ci(0.95, "wilson")
    assert s.lo == pytest.approx((lp + ln) / 2, abs=1e-6) and s.hi == pytest.approx((hp + hn) / 2, abs=1e-6)
    assert "1 failed" in s.note


def test_balanced_accuracy_imbalanced_and_perfect():
    # 3 positives all found, 1 negative wrongly flagged: plain accuracy 0.75, balanced (1 + 0) / 2
    assert balanced_accuracy([True] * 4, [True, True, True, False]).value == pytest.approx(0.5)
    s = balanced_accuracy([True, False], [True, False])
    assert s.value == 1.0 and s.hi == 1.0 and s.lo < 1.0


def test_balanced_accuracy_empty_class_is_nan():
    s = balanced_accuracy([True, True], [True, True])
    assert math.isnan(s.value) and "class" in s.note
    with pytest.raises(ValueError):
        balanced_accuracy([True], [True, False])


def test_correlation_pools_snippets_and_skips_failures():
    pred = [[0, 10, 0], None, [5, 0]]
    real = [[0.1, 2.0, 0.0], [1, 2], [1.0, 0.2]]
    s = correlation(pred, real, n_boot=200)
    r = pearsonr([0, 10, 0, 5, 0], [0.1, 2.0, 0.0, 1.0, 0.2]).statistic
    assert s.value == pytest.approx(r) and s.n == 5 and "1 snippets failed" in s.note
    assert s.lo <= s.value <= s.hi or math.isnan(s.lo)
    assert math.isnan(correlation([[1, 1, 1]], [[0, 1, 2]]).value)
    assert math.isnan(pearson([1.0], [2.0]))


def test_expected_value_by_hand():
    # p(0) = 0.2, p(10) = 0.8 -> 8.0; choices absent from the dict are left out, others ignored
    lp = {"0": math.log(0.2), "10": math.log(0.8), "x": 0.0}
    assert expected_value(lp) == pytest.approx(8.0)
    # renormalised: p ∝ (1, 1, 2) over 1, 2, 3 -> (1 + 2 + 6) / 4
    assert expected_value({"1": 0.0, "2": 0.0, "3": math.log(2)}) == pytest.approx(9 / 4)
    assert math.isnan(expected_value({"a": 0.0}))


def test_scale_by_hand():
    # relative to max |m| = 4: 4 -> 10, 1 -> 2.5 -> 3 (halves up), 0.19 -> 0.475 -> 0, -3 -> 0, 8 -> clipped 10
    assert scale([4.0, 1.0, 0.19, -3.0, 8.0], 4.0) == [10, 3, 0, 0, 10]
    assert scale(np.array([1.0, 2.0]), 0.0) == [0, 0]
