"""Trainer checkpoints: a damaged newest checkpoint is named, set aside and passed over for the one
before it; with none intact, training starts from scratch (issue 12)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch

from moe_adapt.checkpoint.trainer_state import (
    STATE_FILE,
    TENSORS_FILE,
    checkpoint_problem,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from moe_adapt.errors import CheckpointError

KEYS = ("version", "step", "engine")


def _save(root: Path, step: int) -> Path:
    state = {"version": 1, "step": step, "engine": {"w": torch.full((64, 64), float(step)), "steps": step}}
    return save_checkpoint(root / f"step_{step:06d}", state)


def _truncate(path: Path, keep: int) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(keep)


def test_an_intact_checkpoint_has_no_problem(tmp_path: Path) -> None:
    folder = _save(tmp_path, 3)
    assert checkpoint_problem(folder, KEYS) is None
    assert load_checkpoint(folder)["engine"]["w"][0, 0] == 3


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda f: _truncate(f / TENSORS_FILE, 9000), r"tensors\.safetensors is truncated or corrupt"),
        (lambda f: _truncate(f / TENSORS_FILE, 4), r"tensors\.safetensors .*too short for a header"),
        (lambda f: (f / TENSORS_FILE).unlink(), r"tensors\.safetensors is missing"),
        (lambda f: (f / STATE_FILE).unlink(), r"state\.json is missing"),
        (lambda f: _truncate(f / STATE_FILE, 20), r"state\.json is not valid JSON"),
        (lambda f: (f / STATE_FILE).write_text('{"version": 1, "engine": {}}'), r"state\.json lacks step"),
        (
            lambda f: (f / STATE_FILE).write_text(
                json.dumps({"version": 1, "step": 3, "engine": {"x": {"__tensor__": "engine/x"}}})
            ),
            r"tensors\.safetensors lacks tensor 'engine/x'",
        ),
    ],
)
def test_each_kind_of_damage_is_named(tmp_path: Path, damage, problem: str) -> None:
    folder = _save(tmp_path, 3)
    damage(folder)
    assert re.search(problem, checkpoint_problem(folder, KEYS) or "")
    if "lacks step" not in problem:  # load_checkpoint knows no trainer keys
        with pytest.raises(CheckpointError, match=re.escape(str(folder))):
            load_checkpoint(folder)


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_intact_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for step in (2, 4, 6):
        _save(tmp_path, step)
    _truncate(tmp_path / "step_000006" / TENSORS_FILE, 9000)
    _truncate(tmp_path / "step_000004" / STATE_FILE, 10)
    caplog.set_level(logging.WARNING)
    assert latest_checkpoint(tmp_path) == tmp_path / "step_000002"
    assert (
        f"checkpoint {tmp_path / 'step_000006'} is damaged: tensors.safetensors is truncated" in caplog.text
    )
    assert f"checkpoint {tmp_path / 'step_000004'} is damaged: state.json is not valid JSON" in caplog.text
    # set aside: kept to look at, never resumed, never counted by pruning
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000002"]
    assert (tmp_path / "damaged-step_000006").is_dir() and (tmp_path / "damaged-step_000004").is_dir()


def test_with_no_intact_checkpoint_training_starts_from_scratch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (_save(tmp_path, 2) / TENSORS_FILE).unlink()
    caplog.set_level(logging.WARNING)
    assert latest_checkpoint(tmp_path) is None
    assert "no intact checkpoint" in caplog.text and "starts from scratch" in caplog.text
    assert latest_checkpoint(tmp_path / "none") is None
