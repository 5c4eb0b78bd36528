"""The one HF loader: weights cut short are named in one CheckpointError, whoever loads them (the
engines' ``init_from``, the teacher, evaluation), not a safetensors traceback (issue 12)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from moe_adapt.checkpoint.hf import load_causal_lm
from moe_adapt.engines.hf import HFConfig, HFEngine
from moe_adapt.errors import CheckpointError


@pytest.mark.parametrize(
    ("keep", "message"),
    [
        (0.5, "is truncated or corrupt: tensor"),
        (100, "is corrupt: header length"),
        (5, "is not a safetensors file: 5 bytes"),
    ],
)
def test_truncated_weights_are_named(dense_factory, tmp_path: Path, keep: float, message: str) -> None:
    folder = Path(shutil.copytree(dense_factory("llama"), tmp_path / "model"))
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep) if keep < 1 else int(keep)])
    with pytest.raises(CheckpointError, match=f"{weights} {message}"):
        load_causal_lm(folder)
    with pytest.raises(CheckpointError, match=f"{weights} {message}"):  # cpt.init_from, the distill student
        HFEngine(folder, HFConfig())
