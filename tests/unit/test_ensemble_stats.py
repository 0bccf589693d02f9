"""Bootstrap intervals: nominal coverage in simulation, paired differences found or not."""

from __future__ import annotations

import numpy as np
import pytest

from ensemble import stats
from ensemble.stats import ItemScores


def test_interval_covers_a_known_mean_at_about_the_nominal_rate():
    rng = np.random.default_rng(0)
    p, n, trials, covered = 0.6, 300, 200, 0
    for t in range(trials):
        scores = ItemScores((rng.random(n) < p).astype(float))
        boot = stats.bootstrap_row({"s": scores}, resamples=400, seed=t, row=0)["s"]
        low, high = stats.interval(boot)
        covered += low <= p <= high
    # 95% nominal; 200 trials: the binomial sd is ~1.5 points, the percentile bootstrap runs slightly low
    assert 0.90 <= covered / trials <= 0.99


def test_paired_bootstrap_finds_a_planted_five_point_difference_and_not_a_zero_one():
    rng = np.random.default_rng(1)
    n = 2000
    base = (rng.random(n) < 0.5).astype(float)
    better = base.copy()
    flip = rng.choice(np.flatnonzero(base == 0), size=n // 20, replace=False)  # +5 points on the same items
    better[flip] = 1.0
    boot = stats.bootstrap_row({"a": ItemScores(better), "b": ItemScores(base)}, 1000, 0, 0)
    low, high = stats.interval(boot["a"] - boot["b"])
    assert stats.verdict(low, high) == "better" and low > 0.03 and high < 0.07
    same = base[rng.permutation(n)]  # the same score, other items right: no paired difference in expectation
    noise = stats.bootstrap_row({"a": ItemScores(base), "b": ItemScores(same)}, 1000, 0, 0)
    low, high = stats.interval(noise["a"] - noise["b"])
    assert stats.verdict(low, high) == "indistinguishable"
    worse = stats.bootstrap_row({"a": ItemScores(base), "b": ItemScores(better)}, 1000, 0, 0)
    assert stats.verdict(*stats.interval(worse["a"] - worse["b"])) == "worse"


def test_grouped_statistic_is_mean_per_class_recall():
    values = np.array([1, 0, 1, 1, 0, 0], dtype=float)
    groups = np.array([0, 0, 0, 1, 1, 2])
    assert stats.statistic(ItemScores(values, groups)) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    idx = np.array([[0, 1, 2, 3, 4, 5], [3, 3, 3, 3, 3, 3]])
    out = stats.statistic(ItemScores(values, groups), idx)
    assert out.tolist() == pytest.approx([(2 / 3 + 1 / 2 + 0) / 3, 1.0])


def test_resamples_are_seeded_and_shared_by_systems():
    a = ItemScores(np.arange(50) % 2 == 0)
    one = stats.bootstrap_row({"x": a, "y": a}, 100, seed=3, row=2)
    two = stats.bootstrap_row({"x": a}, 100, seed=3, row=2)
    assert np.array_equal(one["x"], one["y"]) and np.array_equal(one["x"], two["x"])
    with pytest.raises(ValueError, match="different numbers of items"):
        stats.bootstrap_row({"x": a, "y": ItemScores(np.ones(3))}, 10, 0, 0)
