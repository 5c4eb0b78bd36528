"""Confidence intervals for results over seeds, paired differences between conditions, and the
item-level bootstrap.

A multi-seed sweep gives a handful of numbers per condition (one per seed). We report their mean
with an interval, and compare two conditions on the *paired* differences (run A and run B with the
same seed share data order and initialisation, so the difference removes that source of variance).

Which interval (:func:`seed_interval`): at the sample sizes of a sweep (3 or 5 seeds) a percentile
bootstrap is far too narrow — its "95%" interval covers the true mean about 75% of the time at
n = 3 and 84% at n = 5 on normal data (``tests/eval/test_stats.py`` measures it by simulation),
because resampling 3 values cannot see the spread the t distribution accounts for. So the mean over
seeds and the paired difference get a Student t-interval (``mean ± t_{n-1} · s / √n``, exact for
normal data), and the percentile bootstrap is kept for large samples (:data:`BOOTSTRAP_MIN_N` or
more values) and for item-level resampling (benchmark items, where n is in the hundreds). Every
:class:`ConfidenceInterval` names its method, and the report prints it.

Array legend: ``values_N`` (one value per seed or item), ``idx_RN`` (resample × value index),
``means_R`` (one mean per bootstrap resample).

With a single value there is no spread to resample: the interval is reported as NaN, never as a
zero-width interval that would look like certainty.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as scipy_stats

from moe_adapt.errors import MoEAdaptError

__all__ = [
    "BOOTSTRAP",
    "BOOTSTRAP_MIN_N",
    "T_INTERVAL",
    "ConfidenceInterval",
    "PairedDifference",
    "bootstrap_ci",
    "paired_difference",
    "seed_interval",
    "t_interval",
]

T_INTERVAL = "Student t"
"""The method name of :func:`t_interval`."""
BOOTSTRAP = "percentile bootstrap"
"""The method name of :func:`bootstrap_ci`."""
BOOTSTRAP_MIN_N = 30
"""From this many values on, :func:`seed_interval` uses the percentile bootstrap (no normality
assumption; by then its coverage is near nominal); below, the t-interval."""


@dataclass(frozen=True)
class ConfidenceInterval:
    """The mean of some values with a confidence interval."""

    mean: float
    """Sample mean of the values."""
    low: float
    """Lower end of the interval (NaN when ``n < 2``)."""
    high: float
    """Upper end of the interval (NaN when ``n < 2``)."""
    n: int
    """How many values (seeds) went in."""
    confidence: float
    """Nominal coverage, e.g. 0.95."""
    method: str = BOOTSTRAP
    """How the interval was made: :data:`T_INTERVAL` or :data:`BOOTSTRAP`."""

    def to_dict(self) -> dict[str, float | int]:
        """Return a JSON-able dict (NaN stays NaN; ``json.dumps`` writes it as ``NaN``)."""
        return asdict(self)


@dataclass(frozen=True)
class PairedDifference:
    """Mean of ``a - b`` over runs paired by seed, with an interval (:func:`seed_interval`)."""

    ci: ConfidenceInterval
    """Interval of the mean difference ``a - b``."""
    seeds: tuple[int, ...]
    """Seeds present in both conditions, in ascending order."""
    unpaired_seeds: tuple[int, ...]
    """Seeds present in only one of the conditions (left out of the difference)."""

    def to_dict(self) -> dict[str, object]:
        """Return a JSON-able dict."""
        return {**self.ci.to_dict(), "seeds": list(self.seeds), "unpaired_seeds": list(self.unpaired_seeds)}


def _check_values(values: Sequence[float] | np.ndarray, who: str) -> np.ndarray:
    values_N = np.asarray(values, dtype=np.float64).reshape(-1)
    if values_N.size == 0:
        raise MoEAdaptError(f"{who} got no values; it needs at least one (one per seed)")
    if not np.all(np.isfinite(values_N)):
        raise MoEAdaptError(f"{who} got non-finite values {values_N.tolist()}; all must be finite")
    return values_N


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise MoEAdaptError(f"confidence={confidence!r} must lie strictly between 0 and 1 (e.g. 0.95)")


def t_interval(values: Sequence[float] | np.ndarray, *, confidence: float = 0.95) -> ConfidenceInterval:
    """Student t-interval of the mean of ``values``: ``mean ± t_{n-1,(1+confidence)/2} · s / √n``.

    Exact coverage for independent normal values at any n, so it is the interval for a few seeds.
    Identical values give a zero-width interval (the data show no spread); one value gives NaN.

    Raises:
        MoEAdaptError: if ``values`` is empty or holds a non-finite number, or ``confidence`` is invalid.
    """
    _check_confidence(confidence)
    values_N = _check_values(values, "t_interval")
    n = int(values_N.size)
    mean = float(values_N.mean())
    if n < 2:
        return ConfidenceInterval(mean, math.nan, math.nan, n, confidence, T_INTERVAL)
    half = float(scipy_stats.t.ppf((1.0 + confidence) / 2.0, df=n - 1)) * float(
        values_N.std(ddof=1) / math.sqrt(n)
    )
    return ConfidenceInterval(mean, mean - half, mean + half, n, confidence, T_INTERVAL)


def seed_interval(
    values: Sequence[float] | np.ndarray,
    *,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> ConfidenceInterval:
    """The interval of a mean over seeds: :func:`t_interval` below :data:`BOOTSTRAP_MIN_N` values,
    :func:`bootstrap_ci` (``n_resamples``, ``seed``) from there on. The result names its method."""
    values_N = _check_values(values, "seed_interval")
    if values_N.size < BOOTSTRAP_MIN_N:
        _check_settings(n_resamples, confidence)
        return t_interval(values_N, confidence=confidence)
    return bootstrap_ci(values_N, n_resamples=n_resamples, confidence=confidence, seed=seed)


def _check_settings(n_resamples: int, confidence: float) -> None:
    if not isinstance(n_resamples, int) or n_resamples < 1:
        raise MoEAdaptError(f"n_resamples={n_resamples!r} must be a positive integer (e.g. 10000)")
    _check_confidence(confidence)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    *,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> ConfidenceInterval:
    """Percentile bootstrap interval of the mean of ``values``.

    Resamples the values with replacement ``n_resamples`` times using
    ``numpy.random.default_rng(seed)`` and takes the ``(1 - confidence) / 2`` and
    ``(1 + confidence) / 2`` quantiles of the resampled means. The result is a pure function of
    the inputs and ``seed``. For many values (benchmark items); over a few seeds it is too narrow:
    use :func:`seed_interval`.

    Raises:
        MoEAdaptError: if ``values`` is empty or holds a non-finite number, or a setting is invalid.
    """
    _check_settings(n_resamples, confidence)
    values_N = _check_values(values, "bootstrap_ci")
    n = int(values_N.size)
    mean = float(values_N.mean())
    if n < 2:
        return ConfidenceInterval(mean=mean, low=math.nan, high=math.nan, n=n, confidence=confidence)
    rng = np.random.default_rng(seed)
    idx_RN = rng.integers(0, n, size=(n_resamples, n))
    means_R = values_N[idx_RN].mean(axis=1)
    alpha = 1.0 - confidence
    low, high = np.quantile(means_R, [alpha / 2.0, 1.0 - alpha / 2.0])
    return ConfidenceInterval(mean=mean, low=float(low), high=float(high), n=n, confidence=confidence)


def paired_difference(
    a_by_seed: Mapping[int, float],
    b_by_seed: Mapping[int, float],
    *,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedDifference:
    """Interval (:func:`seed_interval`: t below :data:`BOOTSTRAP_MIN_N` pairs) of the mean paired
    difference ``a - b`` over the seeds both conditions ran.

    ``a_by_seed`` and ``b_by_seed`` map a run's seed to its metric value. Seeds present in only one
    condition are listed in ``unpaired_seeds`` and left out.

    Raises:
        MoEAdaptError: if the two conditions share no seed.
    """
    shared = sorted(set(a_by_seed) & set(b_by_seed))
    unpaired = sorted(set(a_by_seed) ^ set(b_by_seed))
    if not shared:
        raise MoEAdaptError(
            f"cannot pair runs by seed: condition A has seeds {sorted(a_by_seed)}, "
            f"condition B has seeds {sorted(b_by_seed)}; they need at least one seed in common"
        )
    diffs_N = np.array([a_by_seed[s] - b_by_seed[s] for s in shared], dtype=np.float64)
    ci = seed_interval(diffs_N, n_resamples=n_resamples, confidence=confidence, seed=seed)
    return PairedDifference(ci=ci, seeds=tuple(shared), unpaired_seeds=tuple(unpaired))
