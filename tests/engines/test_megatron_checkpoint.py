"""Sharded checkpoints of the megatron engine (megatron-core dist_checkpointing, CPU, gloo, the shim).

Through the trainer and ``CheckpointCallback``: exact resume in one process and under EP=2 (fresh
processes), resharding in both directions (EP=2 -> EP=1 gives the same weights and AdamW moments,
and the same next losses to fp32 rounding), atomic step folders, and clear errors for bad folders.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.engines.conftest import tiny_hf_model

pytest.importorskip("megatron.core")

from moe_adapt.checkpoint.trainer_state import (
    ENGINE_DIR,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
)
from moe_adapt.engines import AutoConfig
from moe_adapt.engines.batch import TrainBatch
from moe_adapt.engines.hf import HFEngine
from moe_adapt.engines.megatron.engine import MegatronEngine
from moe_adapt.errors import CheckpointError
from moe_adapt.train.callbacks import Callback, CheckpointCallback
from moe_adapt.train.trainer import Trainer

FAMILY = "qwen2_moe"  # routed experts + a gated shared expert
VOCAB = 101  # tests.engines.conftest.TINY_MOE
EP = 2
STEPS = 4
# aux-loss-free balancing on, so the router biases travel through the checkpoint too
CFG = dict(
    lr=3e-3, warmup_steps=2, decay_steps=10, aux_loss_coef=0.1, z_loss_coef=0.01, bias_update_rate=1e-2
)
RESHARD_REL = 1e-5  # EP=2 -> EP=1 reorders sums (alltoall, gradient reduction): fp32 rounding only
_EXPERT = re.compile(r"^(.*\.local_experts\.)(\d+)(\..*)$")


# -- helpers (also used by the spawned workers) ------------------------------------------------------
class Stream:
    """A deterministic batch source: batch ``n`` is a pure function of ``n`` (the same on every rank,
    so EP=2 steps reproduce the one-process step)."""

    def __init__(self) -> None:
        self.pos = 0

    def next_batch(self, batch_size: int) -> TrainBatch:
        gen = torch.Generator().manual_seed(1000 + self.pos)
        self.pos += 1
        return TrainBatch(tokens=torch.randint(0, VOCAB, (batch_size, 17), generator=gen).numpy())

    def state_dict(self) -> dict[str, Any]:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pos = int(state["pos"])


class Record(Callback):
    """Keeps every step's loss (not saved); with ``dump``, writes the engine's state after step 2."""

    name = "record"

    def __init__(self, dump: Path | None = None) -> None:
        self.losses: dict[int, float] = {}
        self.dump = dump

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        self.losses[step] = metrics["loss"]
        if self.dump is not None and step == 2:
            engine: Any = trainer.engine
            full = engine._full_model_tensors()  # collective: the experts are gathered
            if engine.ep_rank == 0:
                torch.save({k: v.detach().clone() for k, v in full.items()}, self.dump / "full_model.pt")
            torch.save(_moments(engine), self.dump / f"moments_rank{engine.ep_rank}.pt")


def _global_name(engine: Any, name: str) -> str:
    match = _EXPERT.match(name)
    if match is None:
        return name
    per_rank = engine.moe[0] // engine.ep_size
    return f"{match.group(1)}{engine.ep_rank * per_rank + int(match.group(2))}{match.group(3)}"


def _moments(engine: Any) -> dict[str, Any]:
    """This rank's AdamW state by parameter name (experts numbered globally), and the common step."""
    out: dict[str, Any] = {}
    steps = set()
    for name, param in engine.model.named_parameters():
        state = engine.optimizer.state[param]
        steps.add(float(state["step"]))
        for key in ("exp_avg", "exp_avg_sq"):
            out[f"{key}/{_global_name(engine, name)}"] = state[key].detach().clone()
    assert len(steps) == 1
    out["step"] = steps.pop()
    return out


def _trainer(checkpoint: str | Path, callbacks: list[Callback], max_steps: int = STEPS) -> Trainer:
    engine = MegatronEngine(checkpoint, AutoConfig(**CFG))  # type: ignore[arg-type]
    return Trainer(engine, Stream(), callbacks, max_steps=max_steps, batch_size=2)


def _worker(rank: int, port: int, mode: str, checkpoint: str, root: str) -> None:
    """EP=2: ``straight`` trains 4 steps saving at 2 and 4; ``resume`` continues the EP=2 and the EP=1
    step-2 checkpoints to step 4 in these fresh processes."""
    from tests.engines.megatron_cpu import megatron_on_cpu

    torch.set_num_threads(1)
    out = Path(root)
    results: dict[str, dict[int, float]] = {}
    with megatron_on_cpu(rank=rank, world_size=EP, port=port, expert_parallel=EP):
        if mode == "straight":
            record = Record(dump=out)
            saver = CheckpointCallback(out / "ep2", every=2, keep_last=None, save_final=False)
            _trainer(checkpoint, [saver, record]).fit()
            results["straight"] = record.losses
        else:
            for name in ("ep2", "ep1"):
                record = Record()
                trainer = _trainer(checkpoint, [record])
                trainer.resume(out / name / "step_000002")
                assert trainer.step == 2 and trainer.engine.steps == 2  # type: ignore[attr-defined]
                trainer.fit()
                results[name] = record.losses
    (out / f"{mode}_rank{rank}.json").write_text(json.dumps(results))


def _spawn(mode: str, checkpoint: Path, root: Path, timeout_s: float = 120.0) -> None:
    """Run :func:`_worker` on 2 gloo processes."""
    import torch.multiprocessing as mp

    from tests.engines.megatron_cpu import free_port

    start = time.monotonic()
    context: Any = mp.spawn(
        _worker, args=(free_port(), mode, str(checkpoint), str(root)), nprocs=EP, join=False
    )
    while not context.join(timeout=1.0):
        if time.monotonic() - start > timeout_s:
            for proc in context.processes:
                proc.terminate()
            pytest.fail(f"{mode} workers did not finish in {timeout_s:.0f} s")


def _losses(path: Path, key: str) -> list[dict[int, float]]:
    """Each rank's ``{step: loss}`` under ``key`` of the worker result files ``path`` names."""
    return [
        {int(s): v for s, v in json.loads(Path(str(path).format(rank=r)).read_text())[key].items()}
        for r in range(EP)
    ]


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name in (FAMILY, "qwen3_moe"):
        tiny_hf_model(name).save_pretrained(str(root / name))
        out[name] = root / name
    return out


@pytest.fixture
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ep1_run(
    megatron_cpu: None, hf_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """One process (EP=1): an uninterrupted run of 4 steps, and one that saves every step (keeping 2)
    and is cut after step 3."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("ep1")
        straight = Record()
        reference = _trainer(hf_checkpoints[FAMILY], [straight])
        reference.fit()
        cut = Record()
        saver = CheckpointCallback(root / "ckpt", every=1, keep_last=2)
        _trainer(hf_checkpoints[FAMILY], [saver, cut], max_steps=3).fit()
    finally:
        torch.set_num_threads(threads)
    return {"root": root / "ckpt", "losses": straight.losses, "cut": cut.losses, "reference": reference}


@pytest.fixture(scope="module")
def ep2_straight(hf_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """EP=2 over two gloo processes: 4 steps, saving at steps 2 and 4; its folder."""
    root = tmp_path_factory.mktemp("ep2")
    _spawn("straight", hf_checkpoints[FAMILY], root)
    return root


@pytest.fixture(scope="module")
def ep2_resumed(hf_checkpoints: dict[str, Path], ep1_run: dict[str, Any], ep2_straight: Path) -> Path:
    """Fresh EP=2 processes resuming the EP=2 run's step-2 checkpoint and the EP=1 run's; the folder."""
    shutil.copytree(ep1_run["root"], ep2_straight / "ep1")
    _spawn("resume", hf_checkpoints[FAMILY], ep2_straight)
    return ep2_straight


# -- one process ------------------------------------------------------------------------------------
def test_resume_through_the_trainer_is_bit_exact(
    ep1_run: dict[str, Any], hf_checkpoints: dict[str, Path], one_thread: None
) -> None:
    root: Path = ep1_run["root"]
    assert ep1_run["cut"] == {s: ep1_run["losses"][s] for s in (1, 2, 3)}
    # keep_last=2 after the step-3 save; no hidden temporary folder is left behind
    assert [p.name for p in list_checkpoints(root)] == ["step_000002", "step_000003"]
    assert sorted(p.name for p in root.iterdir()) == ["step_000002", "step_000003"]
    step2 = root / "step_000002"
    assert sorted(p.name for p in step2.iterdir()) == [ENGINE_DIR, "state.json", "tensors.safetensors"]
    state = load_checkpoint(step2)
    assert state["engine_dir"] == ENGINE_DIR and state["engine"]["engine"] == "megatron"
    assert "model" not in state["engine"] and state["engine"]["steps"] == 2
    assert state["engine"]["rng"]["torch_RN"].shape[0] == 1  # one row per rank

    record = Record()
    trainer = _trainer(hf_checkpoints[FAMILY], [record])
    trainer.resume(step2)  # the cut run went on to step 3; the resumed one must not see it
    assert trainer.step == 2 and trainer.sampler.state_dict() == {"pos": 2}
    trainer.fit()
    assert record.losses == {s: ep1_run["losses"][s] for s in (3, 4)}  # exact float equality
    reference: Trainer = ep1_run["reference"]
    got, want = trainer.engine.state_dict(), reference.engine.state_dict()
    assert all(torch.equal(got["model"][k], v) for k, v in want["model"].items())
    for i, moments in want["optimizer"]["state"].items():
        for key, value in moments.items():
            assert torch.equal(got["optimizer"]["state"][i][key], value), (i, key)
    assert torch.equal(got["router_bias"]["expert_bias_LE"], want["router_bias"]["expert_bias_LE"])


def test_a_crashed_save_leaves_no_checkpoint(
    ep1_run: dict[str, Any], hf_checkpoints: dict[str, Path], tmp_path: Path, one_thread: None
) -> None:
    root = tmp_path / "ckpt"
    shutil.copytree(ep1_run["root"] / "step_000002", root / "step_000002")
    trainer = _trainer(hf_checkpoints[FAMILY], [], max_steps=3)
    trainer.resume(root / "step_000002")
    trainer.fit()
    engine: Any = trainer.engine
    real = engine.save_sharded

    def dies_midway(path: Path) -> dict[str, Any]:
        real(path)  # every shard is written, the trainer's files are not
        raise RuntimeError("killed")

    engine.save_sharded = dies_midway
    saver = CheckpointCallback(root, every=1, keep_last=2)
    with pytest.raises(RuntimeError, match="killed"):
        saver.save(trainer)
    assert sorted(p.name for p in root.iterdir()) == ["step_000002"]
    # a hard crash (no cleanup) leaves a hidden folder: ignored by latest_checkpoint, removed next save
    engine.save_sharded = real
    (root / ".step_000001.tmp-shared" / ENGINE_DIR).mkdir(parents=True)
    assert latest_checkpoint(root) == root / "step_000002"
    saver.save(trainer)
    assert sorted(p.name for p in root.iterdir()) == ["step_000002", "step_000003"]
    assert latest_checkpoint(root) == root / "step_000003"


def test_bad_folders_raise_clear_errors(
    ep1_run: dict[str, Any], hf_checkpoints: dict[str, Path], tmp_path: Path, one_thread: None
) -> None:
    good = ep1_run["root"] / "step_000002"
    megatron = _trainer(hf_checkpoints[FAMILY], [])
    assert megatron.checkpoint_problem(good) is None  # what a resume checks before picking it

    missing = tmp_path / "missing" / "step_000002"
    shutil.copytree(good, missing)
    shutil.rmtree(missing / ENGINE_DIR)
    assert megatron.checkpoint_problem(missing) == "its sharded model and optimizer folder engine/ is missing"
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(missing / ENGINE_DIR))} is missing"):
        megatron.resume(missing)

    empty = tmp_path / "empty" / "step_000002"
    shutil.copytree(good, empty)
    shutil.rmtree(empty / ENGINE_DIR)
    (empty / ENGINE_DIR).mkdir()
    assert megatron.checkpoint_problem(empty) == "engine/metadata.json is missing"
    with pytest.raises(CheckpointError, match="not a megatron dist_checkpointing folder"):
        megatron.resume(empty)

    torn = tmp_path / "torn" / "step_000002"
    shutil.copytree(good, torn)
    for shard in (torn / ENGINE_DIR).glob("*.distcp"):
        shard.unlink()
    assert megatron.checkpoint_problem(torn) == "engine/ holds no *.distcp shard"
    with pytest.raises(CheckpointError, match=rf"cannot read the sharded checkpoint {re.escape(str(torn))}"):
        megatron.resume(torn)

    # a checkpoint written by the hf engine, given to the megatron engine, and the other way round
    hf_root = tmp_path / "hf"
    hf_engine = HFEngine(hf_checkpoints[FAMILY], AutoConfig(**CFG))  # type: ignore[arg-type]
    hf_trainer = Trainer(
        hf_engine, Stream(), [CheckpointCallback(hf_root, every=1)], max_steps=1, batch_size=2
    )
    hf_trainer.fit()
    with pytest.raises(CheckpointError, match=rf"cannot resume from {re.escape(str(hf_root))}.*engine=hf"):
        megatron.resume(hf_root / "step_000001")
    with pytest.raises(
        CheckpointError, match=rf"{re.escape(str(good))}: its engine state is sharded.*engine=megatron"
    ):
        hf_trainer.resume(good)

    # another model (Qwen3-MoE: other shapes) refuses the Qwen2-MoE checkpoint before reading it
    other = _trainer(hf_checkpoints["qwen3_moe"], [])
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(good / ENGINE_DIR))} holds another model"):
        other.resume(good)
    assert other.step == 0


# -- expert parallel ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_ep2_checkpoint_resumes_at_ep1_with_the_same_state(
    ep2_straight: Path, ep1_run: dict[str, Any], hf_checkpoints: dict[str, Path], one_thread: None
) -> None:
    root = ep2_straight
    straight = _losses(root / "straight_rank{rank}.json", "straight")
    assert straight[0] == straight[1]  # the metrics are reduced over the ranks
    # every rank's batch is the same: the EP=2 run reproduces the one-process run to fp32 rounding
    for step, loss in straight[0].items():
        assert loss == pytest.approx(ep1_run["losses"][step], rel=RESHARD_REL), step
    assert [p.name for p in list_checkpoints(root / "ep2")] == ["step_000002", "step_000004"]
    state = load_checkpoint(root / "ep2" / "step_000002")
    assert state["engine"]["expert_parallel"] == {"size": EP}
    assert state["engine"]["rng"]["torch_RN"].shape[0] == EP  # every rank's RNG state

    record = Record()
    trainer = _trainer(hf_checkpoints[FAMILY], [record])
    trainer.resume(root / "ep2" / "step_000002")
    engine: Any = trainer.engine
    assert engine.ep_size == 1 and trainer.step == 2

    full = torch.load(root / "full_model.pt", weights_only=True)  # the EP=2 run's gathered weights
    here = engine._full_model_tensors()
    assert here.keys() == full.keys()
    for key, tensor in full.items():
        assert torch.equal(here[key], tensor), key
    saved = [torch.load(root / f"moments_rank{r}.pt", weights_only=True) for r in range(EP)]
    moments = _moments(engine)
    assert moments["step"] == saved[0]["step"] == saved[1]["step"] == 2.0
    for key, value in moments.items():
        if key == "step":
            continue
        held = [s[key] for s in saved if key in s]  # dense: both ranks; an expert: its own rank
        assert held and all(torch.equal(value, h) for h in held), key
    assert len(moments) - 1 == len({k for s in saved for k in s} - {"step"})

    trainer.fit()
    for step in (3, 4):
        assert record.losses[step] == pytest.approx(straight[0][step], rel=RESHARD_REL), step


@pytest.mark.slow
def test_ep2_resume_in_fresh_processes_is_exact(ep2_resumed: Path) -> None:
    straight = _losses(ep2_resumed / "straight_rank{rank}.json", "straight")
    resumed = _losses(ep2_resumed / "resume_rank{rank}.json", "ep2")
    assert resumed[0] == {s: straight[0][s] for s in (3, 4)}  # exact float equality
    assert resumed[1] == resumed[0]


@pytest.mark.slow
def test_ep1_checkpoint_resumes_at_ep2(ep2_resumed: Path, ep1_run: dict[str, Any]) -> None:
    resumed = _losses(ep2_resumed / "resume_rank{rank}.json", "ep1")
    for step in (3, 4):
        assert resumed[0][step] == pytest.approx(ep1_run["losses"][step], rel=RESHARD_REL), step
    assert resumed[1] == resumed[0]
