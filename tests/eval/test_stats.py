"""Bootstrap CIs cover the true mean at about the nominal rate; paired differences pair by seed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moe_adapt.errors import MoEAdaptError
from moe_adapt.eval.stats import bootstrap_ci, paired_difference


def test_coverage_near_nominal_on_normal_data() -> None:
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
    assert a == b
    assert a.low <= a.mean <= a.high and a.n == 4 and a.confidence == 0.95
    assert a.mean == pytest.approx(np.mean(values))
    wider = bootstrap_ci(values, n_resamples=500, seed=7, confidence=0.99)
    assert wider.low <= a.low and wider.high >= a.high


def test_single_value_has_no_interval() -> None:
    ci = bootstrap_ci([2.5])
    assert ci.mean == 2.5 and math.isnan(ci.low) and math.isnan(ci.high) and ci.n == 1


def test_paired_difference_pairs_by_seed() -> None:
    a = {1: 2.50, 2: 2.47, 3: 2.52, 9: 1.0}
    b = {3: 2.55, 1: 2.53, 2: 2.51, 4: 3.0}
    d = paired_difference(a, b, n_resamples=2000)
    assert d.seeds == (1, 2, 3) and d.unpaired_seeds == (4, 9)
    assert d.ci.mean == pytest.approx(-0.1 / 3)
    assert d.ci.high < 0  # every paired difference is negative
    assert d.to_dict()["seeds"] == [1, 2, 3]
    # Pairing removes the shared per-seed offset: unpaired CIs overlap, the paired one excludes 0.
    rng = np.random.default_rng(0)
    offsets = rng.normal(0, 1.0, size=10)
    a2 = {s: 5.0 + o for s, o in enumerate(offsets)}
    b2 = {s: 5.1 + o + rng.normal(0, 0.01) for s, o in enumerate(offsets)}
    assert paired_difference(a2, b2, n_resamples=2000).ci.high < 0
    ca, cb = bootstrap_ci(list(a2.values())), bootstrap_ci(list(b2.values()))
    assert ca.high > cb.low


def test_bad_inputs() -> None:
    with pytest.raises(MoEAdaptError, match="no values"):
        bootstrap_ci([])
    with pytest.raises(MoEAdaptError, match="non-finite"):
        bootstrap_ci([1.0, float("nan")])
    with pytest.raises(MoEAdaptError, match=r"confidence=1\.5"):
        bootstrap_ci([1.0, 2.0], confidence=1.5)
    with pytest.raises(MoEAdaptError, match="n_resamples=0"):
        bootstrap_ci([1.0, 2.0], n_resamples=0)
    with pytest.raises(MoEAdaptError, match="at least one seed in common"):
        paired_difference({1: 1.0}, {2: 1.0})
