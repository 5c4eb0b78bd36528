"""Intervals over seeds cover the true mean at their nominal rate (measured by simulation, where the
old percentile bootstrap falls short); paired differences pair by seed; the item-level bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from moe_adapt.errors import MoEAdaptError
from moe_adapt.eval.stats import (
    BOOTSTRAP,
    BOOTSTRAP_MIN_N,
    T_INTERVAL,
    bootstrap_ci,
    paired_difference,
    seed_interval,
    t_interval,
)

EXPERIMENTS = 2000


def _coverage(n: int, make_interval) -> float:
    """Share of EXPERIMENTS simulated sweeps of n seeds (normal values, mean 3, sd 2) whose interval
    holds the true mean."""
    rng = np.random.default_rng(1000 + n)
    samples = rng.normal(3.0, 2.0, size=(EXPERIMENTS, n))
    hits = 0
    for rep, sample in enumerate(samples):
        ci = make_interval(sample, rep)
        hits += ci.low <= 3.0 <= ci.high
    return hits / EXPERIMENTS


@pytest.mark.parametrize("n", [3, 5])
def test_seed_intervals_hold_their_coverage_where_the_percentile_bootstrap_does_not(n: int) -> None:
    t_cov = _coverage(n, lambda s, rep: seed_interval(s, seed=rep))
    boot_cov = _coverage(n, lambda s, rep: bootstrap_ci(s, n_resamples=1000, seed=rep))
    print(f"n={n}: t-interval coverage {t_cov:.3f}, percentile bootstrap {boot_cov:.3f}")
    assert t_cov >= 0.93  # nominal 0.95; 2000 experiments give a standard error of 0.005
    assert boot_cov < 0.93 and boot_cov < t_cov - 0.03  # what the report used to print as "95%"


def test_paired_difference_coverage_at_three_seeds() -> None:
    # a shared per-seed offset (sd 1) plus condition noise (sd 0.1); the true difference is -0.1
    rng = np.random.default_rng(7)
    hits = 0
    for _ in range(EXPERIMENTS):
        offsets = rng.normal(0.0, 1.0, size=3)
        a = {s: 5.0 + o + rng.normal(0, 0.1) for s, o in enumerate(offsets)}
        b = {s: 5.1 + o + rng.normal(0, 0.1) for s, o in enumerate(offsets)}
        d = paired_difference(a, b)
        assert d.ci.method == T_INTERVAL
        hits += d.ci.low <= -0.1 <= d.ci.high
    assert hits / EXPERIMENTS >= 0.93


def test_t_interval_is_the_textbook_one() -> None:
    values = [2.0, 2.5, 4.0]
    ci = t_interval(values)
    sd = float(np.std(values, ddof=1))
    half = 4.302652729911275 * sd / math.sqrt(3)  # t_{0.975, 2}
    assert (ci.low, ci.high) == pytest.approx((np.mean(values) - half, np.mean(values) + half))
    assert ci.method == T_INTERVAL and ci.n == 3 and ci.to_dict()["method"] == T_INTERVAL
    ref = scipy_stats.t.interval(0.9, df=2, loc=np.mean(values), scale=sd / math.sqrt(3))
    assert (t_interval(values, confidence=0.9).low, t_interval(values, confidence=0.9).high) == pytest.approx(
        ref
    )
    assert math.isnan(t_interval([1.0]).low)
    assert t_interval([1.0, 1.0]).low == t_interval([1.0, 1.0]).high == 1.0


def test_seed_interval_switches_to_the_bootstrap_at_large_n() -> None:
    rng = np.random.default_rng(0)
    assert seed_interval(rng.normal(size=BOOTSTRAP_MIN_N - 1)).method == T_INTERVAL
    big = seed_interval(rng.normal(size=BOOTSTRAP_MIN_N), n_resamples=500, seed=3)
    assert big.method == BOOTSTRAP and big.low < big.mean < big.high


def test_item_level_bootstrap_near_nominal_on_many_values() -> None:
    rng = np.random.default_rng(123)
    true_mean, hits, reps = 3.0, 0, 200
    for rep in range(reps):
        sample = rng.normal(true_mean, 2.0, size=25)
        ci = bootstrap_ci(sample, n_resamples=1000, seed=rep)
        hits += ci.low <= true_mean <= ci.high
    assert 0.88 <= hits / reps <= 0.99


def test_deterministic_and_ordered() -> None:
    values = [0.1, 0.4, 0.35, 0.2]
    a = bootstrap_ci(values, n_resamples=500, seed=7)
    b = bootstrap_ci(values, n_resamples=500, seed=7)
    assert a == b and a.method == BOOTSTRAP
    assert a.low <= a.mean <= a.high and a.n == 4 and a.confidence == 0.95
    assert a.mean == pytest.approx(np.mean(values))
    wider = bootstrap_ci(values, n_resamples=500, seed=7, confidence=0.99)
    assert wider.low <= a.low and wider.high >= a.high
    assert seed_interval(values) == seed_interval(values, seed=99)  # a t-interval draws nothing


def test_single_value_has_no_interval() -> None:
    ci = bootstrap_ci([2.5])
    assert ci.mean == 2.5 and math.isnan(ci.low) and math.isnan(ci.high) and ci.n == 1


def test_paired_difference_pairs_by_seed() -> None:
    a = {1: 2.50, 2: 2.47, 3: 2.52, 9: 1.0}
    b = {3: 2.55, 1: 2.53, 2: 2.51, 4: 3.0}
    d = paired_difference(a, b, n_resamples=2000)
    assert d.seeds == (1, 2, 3) and d.unpaired_seeds == (4, 9)
    assert d.ci.mean == pytest.approx(-0.1 / 3)
    assert d.ci.high < 0  # every paired difference is negative, and close together
    assert d.to_dict()["seeds"] == [1, 2, 3]
    # Pairing removes the shared per-seed offset: unpaired CIs overlap, the paired one excludes 0.
    rng = np.random.default_rng(0)
    offsets = rng.normal(0, 1.0, size=10)
    a2 = {s: 5.0 + o for s, o in enumerate(offsets)}
    b2 = {s: 5.1 + o + rng.normal(0, 0.01) for s, o in enumerate(offsets)}
    assert paired_difference(a2, b2, n_resamples=2000).ci.high < 0
    ca, cb = seed_interval(list(a2.values())), seed_interval(list(b2.values()))
    assert ca.high > cb.low


def test_bad_inputs() -> None:
    for fn in (bootstrap_ci, t_interval, seed_interval):
        with pytest.raises(MoEAdaptError, match="no values"):
            fn([])
        with pytest.raises(MoEAdaptError, match="non-finite"):
            fn([1.0, float("nan")])
        with pytest.raises(MoEAdaptError, match=r"confidence=1\.5"):
            fn([1.0, 2.0], confidence=1.5)
    with pytest.raises(MoEAdaptError, match="n_resamples=0"):
        bootstrap_ci([1.0, 2.0], n_resamples=0)
    with pytest.raises(MoEAdaptError, match="at least one seed in common"):
        paired_difference({1: 1.0}, {2: 1.0})
