"""Bilingual metrics on constructed predictions whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moe_adapt.errors import MoEAdaptError
from moe_adapt.eval.bilingual import MCPrediction, bilingual_metrics, expected_calibration_error


def preds(rows: list[tuple[str, int, int, float]]) -> list[MCPrediction]:
    return [MCPrediction(item_id=i, answer=a, choice=c, confidence=p) for i, a, c, p in rows]


EN = preds([("q1", 0, 0, 0.9), ("q2", 1, 1, 0.8), ("q3", 2, 2, 0.7), ("q4", 3, 0, 0.6)])
AR = preds([("q4", 3, 3, 0.55), ("q1", 0, 1, 0.5), ("q2", 1, 1, 0.95), ("q3", 2, 0, 0.4)])


def test_accuracy_gap_and_consistency() -> None:
    m = bilingual_metrics({"en": EN, "ar": AR}, source="en", target="ar", n_bins=10)
    assert m["n_pairs"] == 4
    assert m["accuracy"] == {"en": 0.75, "ar": 0.5}
    assert m["lpg"] == pytest.approx(0.25)
    assert m["clcs"] == pytest.approx(0.25)  # only q2 has the same choice (1) in both
    assert m["unmatched"] == {"en": 0, "ar": 0}


def test_ece_by_hand() -> None:
    m = bilingual_metrics({"en": EN, "ar": AR}, target="ar", n_bins=2)
    # en, bins (0, .5] and (.5, 1]: all four in bin 1, acc 0.75, conf 0.75 -> ECE 0.
    assert m["ece"]["en"] == pytest.approx(0.0)
    # ar: bin 0 = {0.5 wrong, 0.4 wrong}: |0 - 0.45|; bin 1 = {0.55 right, 0.95 right}: |1 - 0.75|.
    assert m["ece"]["ar"] == pytest.approx(0.5 * 0.45 + 0.5 * 0.25)
    bins = m["calibration"]["ar"]["bins"]
    assert [b["count"] for b in bins] == [2, 2]


def test_ece_edges_and_empty_bins() -> None:
    r = expected_calibration_error([0.0, 1.0, 0.25], [False, True, True], n_bins=4)
    assert [b["count"] for b in r["bins"]] == [2, 0, 0, 1]  # 0.25 belongs to (0, 0.25]
    assert math.isnan(r["bins"][1]["accuracy"])
    assert r["ece"] == pytest.approx(2 / 3 * abs(0.5 - 0.125) + 0.0)
    perfect = expected_calibration_error(np.full(10, 0.7), np.arange(10) < 7, n_bins=10)
    assert perfect["ece"] == pytest.approx(0.0)


def test_from_scores_softmax_and_probs() -> None:
    p = MCPrediction.from_scores("q", 2, [math.log(0.2), math.log(0.1), math.log(0.7)])
    assert p.choice == 2 and p.correct and p.confidence == pytest.approx(0.7)
    q = MCPrediction.from_scores("q", 0, [0.25, 0.5, 0.25], are_probs=True)
    assert q.choice == 1 and not q.correct and q.confidence == 0.5
    with pytest.raises(MoEAdaptError, match="answer=5"):
        MCPrediction.from_scores("q", 5, [0.0, 1.0])
    with pytest.raises(MoEAdaptError, match="sum 1"):
        MCPrediction.from_scores("q", 0, [0.5, 0.6], are_probs=True)


def test_unmatched_and_bad_data() -> None:
    extra = [*AR, MCPrediction("q9", 0, 0, 0.5)]
    with pytest.raises(MoEAdaptError, match="no parallel partner"):
        bilingual_metrics({"en": EN, "ar": extra}, target="ar")
    m = bilingual_metrics({"en": EN, "ar": extra}, target="ar", allow_unmatched=True)
    assert m["unmatched"] == {"en": 0, "ar": 1} and m["n_pairs"] == 4
    with pytest.raises(MoEAdaptError, match="no predictions for language 'he'"):
        bilingual_metrics({"en": EN, "ar": AR}, target="he")
    with pytest.raises(MoEAdaptError, match="appears more than once"):
        bilingual_metrics({"en": [*EN, EN[0]], "ar": AR}, target="ar")
    with pytest.raises(MoEAdaptError, match="must keep the choice order"):
        bilingual_metrics({"en": EN, "ar": preds([(p.item_id, 1, p.choice, 0.5) for p in AR])}, target="ar")
    with pytest.raises(MoEAdaptError, match=r"confidence=1\.2"):
        MCPrediction("q", 0, 0, 1.2)
    with pytest.raises(MoEAdaptError, match="n_bins=0"):
        expected_calibration_error([0.5], [True], n_bins=0)
