"""The distill stage with replay on, run twice in separate processes with the same config, seed and
thread count, writes bit-identical artifacts: every phase's metrics, held-out losses, accuracy, the
traces and their top-k, and the weights (design.md: "same config, seed and thread count give
bit-identical metrics across processes")."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.distill.test_pipeline import overrides
from tests.distill.test_replay import write_shards

PHASE = "{steps: 4, batch_size: 2, seq_len: 128, lr: 1.0e-3, warmup_steps: 1, checkpoint_every: 2}"
TIMES = {"time", "seconds", "finished"}
"""Keys whose values are wall-clock readings (metrics' ``time``, the stage marker's ``seconds`` and
``finished``): the only values allowed to differ."""


def distill_process(args: list[str], run_dir: Path) -> subprocess.CompletedProcess[str]:
    """``python -m moe_adapt`` on the distill stage as its own process, at two threads whatever the
    machine (two threads: a reduction that depends on the thread schedule would show)."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(Path(__file__).parents[2])}
    env.pop("WORLD_SIZE", None)
    return subprocess.run(
        [sys.executable, "-m", "moe_adapt", *args, f"hydra.run.dir={run_dir}"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )


def _drop_times(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_times(v) for k, v in value.items() if k not in TIMES}
    if isinstance(value, list):
        return [_drop_times(v) for v in value]
    return value


def artifacts(out: Path) -> dict[str, Any]:
    """Every file the stage wrote under ``out``: JSON and JSONL parsed (wall-clock keys dropped),
    safetensors by SHA-256, the rest (reports, traces, tokenizer files) as text; images left out (their
    encoder may stamp them)."""
    found: dict[str, Any] = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        name = str(path.relative_to(out))
        if path.suffix == ".png":
            continue
        if path.suffix == ".safetensors":
            found[name] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.suffix == ".json":
            found[name] = _drop_times(json.loads(path.read_text(encoding="utf-8")))
        elif path.suffix == ".jsonl":
            lines = path.read_text(encoding="utf-8").splitlines()
            found[name] = [_drop_times(json.loads(line)) for line in lines if line.strip()]
        else:
            found[name] = path.read_text(encoding="utf-8", errors="replace")
    return found


@pytest.mark.slow
def test_separate_processes_with_replay_give_bit_identical_artifacts(
    lm_factory: Callable[..., Path], prompt_files: tuple[Path, Path], tmp_path: Path
) -> None:
    shards = write_shards(tmp_path / "shards", 60, 0)
    heldout = write_shards(tmp_path / "heldout", 4, 1)
    outs = {}
    for name in ("first", "second"):
        run_dir = tmp_path / name
        args = [
            a
            for a in overrides(
                lm_factory,
                prompt_files,
                run_dir,
                "distill.phases=[generate,verify,sft,seq_kd,token_kd]",
                *[f"distill.{p}={PHASE}" for p in ("sft", "seq_kd", "token_kd")],
                "distill.seq_kd.kl_anchor_coef=1.0",
                "distill.token_kd.l2_anchor_coef=0.5",
                "distill.replay=0.25",
                f"distill.shards={shards}",
                f"distill.heldout={heldout}",
                "mixture.target_ratio=0.8",
                "mixture.seq_len=64",
                "engine.aux_loss_coef=0.01",
            )
            if a != "distill.heldout=null"
        ]
        done = distill_process(args, run_dir)
        assert done.returncode == 0, done.stdout[-4000:]
        outs[name] = artifacts(run_dir / "distill")
    first, second = outs["first"], outs["second"]
    summary = first["summary.json"]
    # what is compared is real: replay ran in every phase, held-out and accuracy were measured
    for phase in ("sft", "seq_kd", "token_kd"):
        assert summary[phase]["replay"]["realised"] == pytest.approx(0.25, abs=0.01)
        assert {"loss_ar", "loss_en"} <= set(summary["heldout"][f"after_{phase}"])
        assert f"after_{phase}" in summary["accuracy"]
        assert any("replay/lm_loss" in r for r in first[f"{phase}/metrics.jsonl"])
    assert "model/model.safetensors" in first and any(k.startswith("generate/shard-") for k in first)
    assert sorted(first) == sorted(second)
    differ = {
        k: sorted(x for x in first[k] if first[k][x] != second[k].get(x))
        if isinstance(first[k], dict)
        else []
        for k in first
        if first[k] != second[k]
    }
    assert not differ, f"the two processes wrote different files (and keys): {differ}"
