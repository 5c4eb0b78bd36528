"""Training curves: what the trainer logs about the stream, and the picture drawn from metrics.jsonl."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

from moe_adapt.cpt.sampler import MixtureBatch
from moe_adapt.train.curves import (
    ema,
    phase_starts,
    plot_training_curves,
    running_mean,
    write_training_curves,
)

PNG = b"\x89PNG\r\n\x1a\n"


def test_batch_metrics_are_the_phase_and_each_sources_share() -> None:
    batch = MixtureBatch(
        np.zeros((4, 3), np.int64), np.array([0, 0, 1, 0]), np.array([1, 1, 2, 2]), ["ar", "en", "he"]
    )
    assert batch.metrics() == {"phase": 1.5, "data/ar": 0.75, "data/en": 0.25, "data/he": 0.0}


def test_ema_skips_non_finite_values_and_phase_starts_follow_the_phase() -> None:
    assert ema([2.0, math.nan, 2.0], 0.5) == [2.0, 2.0, 2.0]  # bias-corrected: no drift from 0
    assert ema([0.0, 4.0], 0.5) == [0.0, 8.0 / 3.0]
    assert running_mean([0.75, 0.875, 0.75, 0.875]) == [
        0.75,
        0.8125,
        0.125 * 19 / 3,
        0.8125,
    ]  # (0.5·0.5·0 + 0.5·4) / (0.5·0.5 + 0.5)
    rows = [{"step": s, "phase": p} for s, p in enumerate([0, 0, 0.5, 1, 1, 2, 2], 1)]
    assert phase_starts(rows) == [(3, 1), (6, 2)]  # a batch across the boundary belongs to the new phase


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_curves_are_drawn_from_the_metrics_and_heldout_files(tmp_path: Path) -> None:
    rows = [
        {"step": s, "loss": 5 / s, "lm_loss": 4 / s, "lr": 1e-3, "grad_norm": "nan" if s == 3 else 1.0,
         "phase": float(s > 5), "data/ar": 0.75, "data/en": 0.25, "moe/load_cv": 0.5, "moe/max_load": 2.0}
        for s in range(1, 11)
    ]  # fmt: skip
    metrics = _write(tmp_path / "metrics.jsonl", rows)
    heldout = _write(tmp_path / "heldout.jsonl", [{"step": 0, "loss_ar": 9.0}, {"step": 10, "loss_ar": 3.0}])
    out = plot_training_curves(metrics, tmp_path / "curves.png", heldout=heldout, title="cpt")
    assert out == tmp_path / "curves.png" and out.read_bytes().startswith(PNG)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left

    assert plot_training_curves(_write(tmp_path / "empty.jsonl", []), tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_a_failed_plot_is_a_warning_not_a_lost_stage(tmp_path: Path, caplog) -> None:
    bad = tmp_path / "metrics.jsonl"
    bad.write_text('{"step": 1, "loss": 2.0}\nnot json\n')
    with caplog.at_level(logging.WARNING):
        assert write_training_curves(bad, tmp_path / "curves.png", title="seq_kd") is None
    assert (
        "seq_kd: could not draw curves.png" in caplog.text
        and "metrics.jsonl:2 is not a JSON line" in caplog.text
    )
    assert write_training_curves(tmp_path / "missing.jsonl", tmp_path / "curves.png") is None
    assert not (tmp_path / "curves.png").exists()
