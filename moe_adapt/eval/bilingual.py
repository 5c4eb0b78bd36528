"""Bilingual metrics on parallel multiple-choice items (the same question asked in two languages).

Given one prediction per item and language, we report:

- accuracy per language, on the items both languages answered (so the two are comparable);
- the language performance gap ``LPG = |acc_source - acc_target|``;
- cross-lingual consistency ``CLCS``: the share of parallel pairs answered with the same choice
  index, right or wrong;
- expected calibration error ``ECE`` per language with equal-width confidence bins:
  ``ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)|``. Bin ``b`` of ``n_bins`` holds confidences in
  ``(b / n_bins, (b + 1) / n_bins]``; a confidence of exactly 0 goes into the first bin.

Array legend: ``scores_C`` (one score per answer choice), ``conf_N`` / ``correct_N`` (one entry per
item), ``bin_N`` (bin index per item).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from moe_adapt.errors import MoEAdaptError

__all__ = ["MCPrediction", "bilingual_metrics", "expected_calibration_error"]


@dataclass(frozen=True)
class MCPrediction:
    """A model's answer to one multiple-choice item in one language."""

    item_id: str
    """Identifier shared by the parallel versions of the item (pairs are matched on it)."""
    answer: int
    """Index of the correct choice."""
    choice: int
    """Index of the choice the model picked."""
    confidence: float
    """Probability the model gives its pick, in [0, 1]."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.confidence <= 1.0 or math.isnan(self.confidence):
            raise MoEAdaptError(
                f"item {self.item_id!r}: confidence={self.confidence!r} must be a probability in [0, 1]"
            )
        if self.answer < 0 or self.choice < 0:
            raise MoEAdaptError(
                f"item {self.item_id!r}: answer={self.answer} and choice={self.choice} must be >= 0"
            )

    @property
    def correct(self) -> bool:
        """Whether the pick is the right answer."""
        return self.choice == self.answer

    @classmethod
    def from_scores(
        cls, item_id: str, answer: int, scores: Sequence[float] | np.ndarray, *, are_probs: bool = False
    ) -> MCPrediction:
        """Build a prediction from one score per choice.

        By default ``scores`` are log-likelihoods (any real numbers) and are turned into
        probabilities with a softmax; with ``are_probs=True`` they must already sum to 1. The pick
        is the arg-max (first one on ties) and the confidence its probability.
        """
        scores_C = np.asarray(scores, dtype=np.float64).reshape(-1)
        if scores_C.size < 2:
            raise MoEAdaptError(
                f"item {item_id!r}: needs a score for at least 2 choices, got {scores_C.size}"
            )
        if not 0 <= answer < scores_C.size:
            raise MoEAdaptError(
                f"item {item_id!r}: answer={answer} is outside choices 0..{scores_C.size - 1}"
            )
        if are_probs:
            if np.any(scores_C < 0) or not math.isclose(float(scores_C.sum()), 1.0, abs_tol=1e-4):
                raise MoEAdaptError(
                    f"item {item_id!r}: probabilities {scores_C.tolist()} must be >= 0, sum 1"
                )
            probs_C = scores_C
        else:
            shifted_C = scores_C - scores_C.max()
            probs_C = np.exp(shifted_C) / np.exp(shifted_C).sum()
        choice = int(np.argmax(probs_C))
        confidence = min(1.0, max(0.0, float(probs_C[choice])))
        return cls(item_id=item_id, answer=int(answer), choice=choice, confidence=confidence)


def expected_calibration_error(
    confidences: Sequence[float] | np.ndarray, correct: Sequence[bool] | np.ndarray, *, n_bins: int = 10
) -> dict[str, object]:
    """Expected calibration error with ``n_bins`` equal-width bins over [0, 1].

    Returns ``{"ece": float, "n_bins": int, "bins": [{"low", "high", "count", "accuracy",
    "confidence"}, ...]}``; empty bins have count 0 and NaN accuracy/confidence and add nothing.
    """
    if not isinstance(n_bins, int) or n_bins < 1:
        raise MoEAdaptError(f"n_bins={n_bins!r} must be a positive integer (e.g. 10)")
    conf_N = np.asarray(confidences, dtype=np.float64).reshape(-1)
    correct_N = np.asarray(correct, dtype=np.float64).reshape(-1)
    if conf_N.size != correct_N.size:
        raise MoEAdaptError(f"got {conf_N.size} confidences but {correct_N.size} correctness flags")
    if conf_N.size == 0:
        raise MoEAdaptError("expected_calibration_error needs at least one prediction")
    if np.any((conf_N < 0) | (conf_N > 1)) or np.any(np.isnan(conf_N)):
        raise MoEAdaptError("confidences must lie in [0, 1]")
    # Right-closed bins: (b/n, (b+1)/n]; ceil(c * n) - 1, with c == 0 sent to bin 0.
    bin_N = np.clip(np.ceil(conf_N * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    total = conf_N.size
    ece = 0.0
    bins: list[dict[str, float | int]] = []
    for b in range(n_bins):
        in_bin = bin_N == b
        count = int(in_bin.sum())
        acc = float(correct_N[in_bin].mean()) if count else math.nan
        conf = float(conf_N[in_bin].mean()) if count else math.nan
        if count:
            ece += count / total * abs(acc - conf)
        bins.append(
            {"low": b / n_bins, "high": (b + 1) / n_bins, "count": count, "accuracy": acc, "confidence": conf}
        )
    return {"ece": ece, "n_bins": n_bins, "bins": bins}


def _index(preds: Sequence[MCPrediction], lang: str) -> dict[str, MCPrediction]:
    by_id: dict[str, MCPrediction] = {}
    for p in preds:
        if p.item_id in by_id:
            raise MoEAdaptError(f"language {lang!r}: item_id {p.item_id!r} appears more than once")
        by_id[p.item_id] = p
    return by_id


def bilingual_metrics(
    predictions: Mapping[str, Sequence[MCPrediction]],
    *,
    source: str = "en",
    target: str,
    n_bins: int = 10,
    allow_unmatched: bool = False,
) -> dict[str, object]:
    """Accuracy, LPG, CLCS and ECE for the parallel items of ``source`` and ``target``.

    ``predictions`` maps a language code to its predictions; items are paired on ``item_id``.
    Every metric is computed on the paired items only. Items without a partner raise an error,
    unless ``allow_unmatched`` is set, in which case they are counted in ``unmatched`` and left out.
    A pair whose two versions name different correct answers is an error in the data.

    Returns a JSON-able dict::

        {"source": "en", "target": "ar", "n_pairs": int,
         "accuracy": {"en": float, "ar": float}, "lpg": float, "clcs": float,
         "ece": {"en": float, "ar": float}, "unmatched": {"en": int, "ar": int},
         "calibration": {"en": <expected_calibration_error(...)>, "ar": ...}}
    """
    for lang in (source, target):
        if lang not in predictions:
            raise MoEAdaptError(f"no predictions for language {lang!r}; have {sorted(predictions)}")
    if source == target:
        raise MoEAdaptError(f"source and target must differ, both are {source!r}")
    src, tgt = _index(predictions[source], source), _index(predictions[target], target)
    shared = sorted(set(src) & set(tgt))
    only_src, only_tgt = sorted(set(src) - set(tgt)), sorted(set(tgt) - set(src))
    if (only_src or only_tgt) and not allow_unmatched:
        raise MoEAdaptError(
            f"{len(only_src)} {source!r} items and {len(only_tgt)} {target!r} items have no parallel "
            f"partner (first ones: {(only_src + only_tgt)[:5]}); fix the data or pass allow_unmatched=True"
        )
    if not shared:
        raise MoEAdaptError(f"languages {source!r} and {target!r} share no item_id; nothing to compare")
    for item_id in shared:
        if src[item_id].answer != tgt[item_id].answer:
            raise MoEAdaptError(
                f"item {item_id!r}: correct answer is {src[item_id].answer} in {source!r} but "
                f"{tgt[item_id].answer} in {target!r}; parallel items must keep the choice order"
            )
    accuracy: dict[str, float] = {}
    calibration: dict[str, dict[str, object]] = {}
    for lang, by_id in ((source, src), (target, tgt)):
        pairs = [by_id[i] for i in shared]
        accuracy[lang] = float(np.mean([p.correct for p in pairs]))
        calibration[lang] = expected_calibration_error(
            [p.confidence for p in pairs], [p.correct for p in pairs], n_bins=n_bins
        )
    clcs = float(np.mean([src[i].choice == tgt[i].choice for i in shared]))
    return {
        "source": source,
        "target": target,
        "n_pairs": len(shared),
        "accuracy": accuracy,
        "lpg": abs(accuracy[source] - accuracy[target]),
        "clcs": clcs,
        "ece": {lang: calibration[lang]["ece"] for lang in (source, target)},
        "unmatched": {source: len(only_src), target: len(only_tgt)},
        "calibration": calibration,
    }
