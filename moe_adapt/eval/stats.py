"""Bootstrap confidence intervals for results over seeds, and paired differences between conditions.

A multi-seed sweep gives a handful of numbers per condition (one per seed). We report their mean
with a percentile bootstrap interval, and compare two conditions on the *paired* differences
(run A and run B with the same seed share data order and initialisation, so the difference removes
that source of variance).

Array legend: ``values_N`` (one value per seed), ``idx_RN`` (resample × seed index),
``means_R`` (one mean per bootstrap resample).

With a single value there is no spread to resample: the interval is reported as NaN, never as a
zero-width interval that would look like certainty.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from moe_adapt.errors import MoEAdaptError

__all__ = ["ConfidenceInterval", "PairedDifference", "bootstrap_ci", "paired_difference"]


@dataclass(frozen=True)
class ConfidenceInterval:
    """The mean of some values with a percentile bootstrap interval."""

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

    def to_dict(self) -> dict[str, float | int]:
        """Return a JSON-able dict (NaN stays NaN; ``json.dumps`` writes it as ``NaN``)."""
        return asdict(self)


@dataclass(frozen=True)
class PairedDifference:
    """Mean of ``a - b`` over runs paired by seed, with a bootstrap interval."""

    ci: ConfidenceInterval
    """Interval of the mean difference ``a - b``."""
    seeds: tuple[int, ...]
    """Seeds present in both conditions, in ascending order."""
    unpaired_seeds: tuple[int, ...]
    """Seeds present in only one of the conditions (left out of the difference)."""

    def to_dict(self) -> dict[str, object]:
        """Return a JSON-able dict."""
        return {**self.ci.to_dict(), "seeds": list(self.seeds), "unpaired_seeds": list(self.unpaired_seeds)}


def _check_settings(n_resamples: int, confidence: float) -> None:
    if not isinstance(n_resamples, int) or n_resamples < 1:
        raise MoEAdaptError(f"n_resamples={n_resamples!r} must be a positive integer (e.g. 10000)")
    if not 0.0 < confidence < 1.0:
        raise MoEAdaptError(f"confidence={confidence!r} must lie strictly between 0 and 1 (e.g. 0.95)")


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
    the inputs and ``seed``.

    Raises:
        MoEAdaptError: if ``values`` is empty or holds a non-finite number, or a setting is invalid.
    """
    _check_settings(n_resamples, confidence)
    values_N = np.asarray(values, dtype=np.float64).reshape(-1)
    n = int(values_N.size)
    if n == 0:
        raise MoEAdaptError("bootstrap_ci got no values; it needs at least one (one per seed)")
    if not np.all(np.isfinite(values_N)):
        raise MoEAdaptError(f"bootstrap_ci got non-finite values {values_N.tolist()}; all must be finite")
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
    """Bootstrap interval of the mean paired difference ``a - b`` over the seeds both conditions ran.

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
    ci = bootstrap_ci(diffs_N, n_resamples=n_resamples, confidence=confidence, seed=seed)
    return PairedDifference(ci=ci, seeds=tuple(shared), unpaired_seeds=tuple(unpaired))
