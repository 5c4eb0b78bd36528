"""The megatron engine's part of a trainer checkpoint: a damaged dist_checkpointing folder is named
without reading any tensor, so a resume passes over it for the checkpoint before (issue 12)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

from moe_adapt.engines.megatron.checkpoint import folder_problem


def _engine_dir(root: Path) -> Path:
    """The files megatron-core's torch_dist strategy writes (contents stand-ins: nothing is read)."""
    folder = root / "engine"
    folder.mkdir(parents=True)
    (folder / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    (folder / ".metadata").write_bytes(b"pickled plan")
    (folder / "__0_0.distcp").write_bytes(b"tensor bytes")
    (folder / "common.pt").write_bytes(b"common")
    return folder


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (
            lambda f: (f / "metadata.json").write_text('{"sharded_back'),
            "engine/metadata.json is not valid JSON",
        ),
        (lambda f: (f / "metadata.json").unlink(), "engine/metadata.json is missing"),
        (lambda f: (f / ".metadata").unlink(), "engine/.metadata is missing"),
        (lambda f: (f / ".metadata").write_bytes(b""), "engine/.metadata is empty"),
        (lambda f: (f / "__0_0.distcp").unlink(), r"engine/ holds no \*.distcp shard"),
    ],
)
def test_a_damaged_engine_folder_is_named(tmp_path: Path, damage, problem: str) -> None:
    folder = _engine_dir(tmp_path)
    assert folder_problem(folder) is None
    damage(folder)
    assert re.search(problem, folder_problem(folder) or "")


def test_a_missing_engine_folder_is_named(tmp_path: Path) -> None:
    assert "folder engine/ is missing" in (folder_problem(tmp_path / "engine") or "")
