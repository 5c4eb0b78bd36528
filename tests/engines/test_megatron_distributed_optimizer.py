"""megatron's DistributedOptimizer in the megatron engine (``engine.distributed_optimizer``; CPU, gloo,
the test shim).

Two gloo processes against the one-process torch-AdamW megatron engine on the same global batches:
data parallel 2 (EP=1) and expert parallel 2 take the same steps (metrics, exported weights); a NaN
loss or an infinite gradient on one rank skips the update on both; ``save_sharded`` at step 2 and
``load_sharded`` in fresh processes continue bit-identically; and the refusals: the hf engine, a
torch-AdamW checkpoint, another EP size, the in-memory ``state_dict``. A DP=2 checkpoint also
continues on one process (megatron's ``dp_reshardable`` format reshards over data-parallel ranks).

Two spawns in all (each process imports torch, transformers and megatron-core once): ``straight``
runs EP=2 and then DP=2 in the same processes, ``resume`` loads the EP=2 checkpoint.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.engines.conftest import tiny_hf_model

pytest.importorskip("megatron.core")

from moe_adapt.checkpoint.trainer_state import load_checkpoint, save_checkpoint
from moe_adapt.engines import AutoConfig
from moe_adapt.engines.batch import TrainBatch
from moe_adapt.engines.hf import HFEngine
from moe_adapt.engines.megatron.engine import MegatronEngine
from moe_adapt.errors import CheckpointError, MoEAdaptConfigError, MoEAdaptError

FAMILY = "qwen2_moe"  # routed experts + a gated shared expert
VOCAB = 101  # tests.engines.conftest.TINY_MOE
RANKS = 2
LR = 3e-3
# a schedule (a different LR every step), both anchors of the engine that touch the optimizer's
# parameters or the routing (L2 anchor, aux-loss-free router biases), weight decay and clipping
CFG: dict[str, Any] = dict(
    lr=LR,
    warmup_steps=1,
    decay_steps=10,
    aux_loss_coef=0.1,
    z_loss_coef=0.01,
    l2_anchor_coef=1.0,
    bias_update_rate=1e-2,
    weight_decay=0.1,
    grad_clip=0.5,  # below the first steps' norms (about 1-3): clipping is exercised
)
METRIC_REL = 1e-6  # fp32 summation order (reduce-scatter, alltoall) only; the probe saw <= 1e-7
# Adam moves every weight by about lr per step whatever the size of its gradient, so where a gradient
# is near zero, fp32 noise in it (the probe: DP=2 against the same one-process maths with the batch in
# two halves, 1.2e-6 apart) can move a weight by a visible share of lr. The probe measured at most
# 0.006 lr after 3 steps; 0.05 lr still catches any wrong LR, weight decay or clipping (each >= 0.1 lr
# on some weight here).
WEIGHT_ATOL = 0.05 * LR


def _batch(n: int) -> TrainBatch:
    """Global batch ``n``: 4 rows of 16 positions, a loss mask leaving the ranks different token counts."""
    gen = torch.Generator().manual_seed(100 + n)
    tokens = torch.randint(0, VOCAB, (4, 17), generator=gen).numpy()
    mask = np.ones((4, 16), dtype=bool)
    mask[0, :5] = False
    mask[3, 10:] = False
    return TrainBatch(tokens=tokens, loss_mask=mask)


def _engine(checkpoint: str | Path, distributed_optimizer: bool = True) -> MegatronEngine:
    return MegatronEngine(checkpoint, AutoConfig(**CFG, distributed_optimizer=distributed_optimizer))


def _error(fn: Callable[[], Any]) -> str:
    """The message of the MoEAdaptError ``fn`` raises (the workers report, the test asserts)."""
    try:
        fn()
    except MoEAdaptError as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


def _dump_weights(engine: MegatronEngine, path: Path) -> None:
    """Collective: rank 0 saves the whole model (experts gathered) and the router biases."""
    full = engine._full_model_tensors()
    if torch.distributed.get_rank() == 0:
        assert engine.expert_bias_LE is not None
        torch.save({**{k: v.detach().clone() for k, v in full.items()}, "bias": engine.expert_bias_LE}, path)


def _skips(engine: MegatronEngine, rank: int) -> list[dict[str, float]]:
    """A NaN loss on rank 1 only, then an infinite router gradient on rank 1 only: two skipped steps."""
    out = []
    real = engine.forward_loss

    def nan_loss(batch: Any) -> dict[str, torch.Tensor]:
        terms = real(batch)
        terms["loss"] = terms["loss"] * float("nan")
        return terms

    if rank == 1:
        engine.forward_loss = nan_loss  # type: ignore[method-assign]
    out.append(engine.step(_batch(10)))
    engine.forward_loss = real  # type: ignore[method-assign]
    router = engine.model.decoder.layers[0].mlp.router.weight
    handle = router.register_hook(lambda grad: grad * (float("inf") if rank == 1 else 1.0))
    out.append(engine.step(_batch(11)))
    handle.remove()
    return out


def _worker(rank: int, ports: list[int], mode: str, checkpoint: str, root_dir: str) -> None:
    from tests.engines.megatron_cpu import megatron_on_cpu

    torch.set_num_threads(1)
    root = Path(root_dir)
    out: dict[str, Any] = {}
    if mode == "straight":
        with megatron_on_cpu(rank=rank, world_size=RANKS, port=ports[0], expert_parallel=2):
            engine = _engine(checkpoint)
            out["optimizers"] = [type(o).__name__ for o in engine.optimizer.chained_optimizers]
            out["ep2"] = [engine.step(_batch(n)) for n in range(2)]
            state = engine.save_sharded(root / "ckpt")
            if rank == 0:
                save_checkpoint(root / "state", {"engine": state})
            out["ep2"].append(engine.step(_batch(2)))
            engine.save_hf(root / "ep2_hf")
            out["ep2"].append(engine.step(_batch(3)))
            _dump_weights(engine, root / "straight.pt")
            out["skips"] = _skips(engine, rank)
            _dump_weights(engine, root / "after_skips.pt")
            adamw = load_checkpoint(root / "adamw_state")["engine"]
            out["adamw_refused"] = _error(lambda: engine.load_sharded(root / "adamw_ckpt", adamw))
            out["state_dict_refused"] = _error(engine.state_dict)
        with megatron_on_cpu(rank=rank, world_size=RANKS, port=ports[1], expert_parallel=1):
            engine = _engine(checkpoint)
            out["dp2"] = [engine.step(_batch(n)) for n in range(2)]
            state = engine.save_sharded(root / "dp2_ckpt")
            if rank == 0:
                save_checkpoint(root / "dp2_state", {"engine": state})
            out["dp2"].append(engine.step(_batch(2)))
            engine.save_hf(root / "dp2_hf")
            saved = load_checkpoint(root / "state")["engine"]
            out["ep_refused"] = _error(lambda: engine.load_sharded(root / "ckpt", saved))
    else:
        with megatron_on_cpu(rank=rank, world_size=RANKS, port=ports[0], expert_parallel=2):
            engine = _engine(checkpoint)
            engine.load_sharded(root / "ckpt", load_checkpoint(root / "state")["engine"])
            out["steps_after_load"] = engine.steps
            out["resumed"] = [engine.step(_batch(n)) for n in (2, 3)]
            _dump_weights(engine, root / "resumed.pt")
    (root / f"{mode}_rank{rank}.json").write_text(json.dumps(out))


def _spawn(mode: str, checkpoint: Path, root: Path, timeout_s: float = 180.0) -> list[dict[str, Any]]:
    """Run :func:`_worker` on 2 gloo processes; each rank's results."""
    import torch.multiprocessing as mp

    from tests.engines.megatron_cpu import free_port

    context: Any = mp.spawn(
        _worker, args=([free_port(), free_port()], mode, str(checkpoint), str(root)), nprocs=RANKS, join=False
    )
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for proc in context.processes:
                proc.terminate()
            pytest.fail(f"{mode} workers did not finish in {timeout_s:.0f} s")
    return [json.loads((root / f"{mode}_rank{r}.json").read_text()) for r in range(RANKS)]


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(megatron_cpu: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The one-process torch-AdamW reference (3 steps, its HF export, a step-2 sharded checkpoint),
    then the ``straight`` and ``resume`` spawns; everything the tests compare."""
    root = tmp_path_factory.mktemp("dopt")
    checkpoint = root / "hf"
    tiny_hf_model(FAMILY).save_pretrained(str(checkpoint))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = _engine(checkpoint, distributed_optimizer=False)
        metrics = [reference.step(_batch(n)) for n in range(2)]
        save_checkpoint(root / "adamw_state", {"engine": reference.save_sharded(root / "adamw_ckpt")})
        metrics.append(reference.step(_batch(2)))
        reference.save_hf(root / "ref_hf")
    finally:
        torch.set_num_threads(threads)
    straight = _spawn("straight", checkpoint, root)
    resumed = _spawn("resume", checkpoint, root)
    return {
        "root": root,
        "checkpoint": checkpoint,
        "reference": metrics,
        "straight": straight,
        "resumed": resumed,
    }


@pytest.fixture
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _hf_weights(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).state_dict()


# -- tests ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["ep2", "dp2"])
def test_steps_match_the_one_process_torch_adamw_engine(run: dict[str, Any], layout: str) -> None:
    """DP=2 (one DistributedOptimizer, every tensor sharded over 2 ranks) and EP=2 (dense and expert
    optimizers, chained) take the one-process torch-AdamW steps: same metrics, same weights."""
    straight = run["straight"]
    if layout == "ep2":
        assert straight[0]["optimizers"] == ["DistributedOptimizer", "DistributedOptimizer"]
    for rank in straight:
        assert rank[layout][:3] == straight[0][layout][:3]  # every metric is the global batch's
        for step, (got, want) in enumerate(zip(rank[layout], run["reference"], strict=False)):
            assert got.keys() == want.keys()
            assert got["skipped"] == 0.0 and got["grad_norm"] > CFG["grad_clip"]  # clipped
            for key, value in want.items():
                assert got[key] == pytest.approx(value, rel=METRIC_REL, abs=1e-9), (layout, step, key)
    reference, exported = _hf_weights(run["root"] / "ref_hf"), _hf_weights(run["root"] / f"{layout}_hf")
    assert exported.keys() == reference.keys()
    for key, tensor in reference.items():
        torch.testing.assert_close(exported[key], tensor, rtol=0, atol=WEIGHT_ATOL, msg=key)
    biases = [(run["root"] / name / "router_bias.json").read_text() for name in (f"{layout}_hf", "ref_hf")]
    assert biases[0] == biases[1]


def test_a_non_finite_step_on_one_rank_is_skipped_everywhere(run: dict[str, Any]) -> None:
    root = run["root"]
    for rank in run["straight"]:
        nan_loss, inf_grad = rank["skips"]
        assert nan_loss["skipped"] == 1.0 and np.isnan(nan_loss["loss"]) and np.isnan(nan_loss["grad_norm"])
        assert inf_grad["skipped"] == 1.0 and np.isfinite(inf_grad["loss"])
        assert not np.isfinite(inf_grad["grad_norm"])
    before = torch.load(root / "straight.pt", weights_only=True)
    after = torch.load(root / "after_skips.pt", weights_only=True)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # weights and router biases


def test_resume_in_fresh_processes_is_bit_identical(run: dict[str, Any]) -> None:
    straight, resumed = run["straight"], run["resumed"]
    for rank_straight, rank_resumed in zip(straight, resumed, strict=True):
        assert rank_resumed["steps_after_load"] == 2
        assert rank_resumed["resumed"] == rank_straight["ep2"][2:4]  # exact float equality, every metric
    want = torch.load(run["root"] / "straight.pt", weights_only=True)
    got = torch.load(run["root"] / "resumed.pt", weights_only=True)
    assert got.keys() == want.keys()
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor), key


def test_a_checkpoint_resumes_on_another_number_of_data_parallel_ranks(
    run: dict[str, Any], one_thread: None
) -> None:
    """megatron's dp_reshardable format: the DP=2 step-2 checkpoint continues in this one process."""
    engine = _engine(run["checkpoint"])
    engine.load_sharded(run["root"] / "dp2_ckpt", load_checkpoint(run["root"] / "dp2_state")["engine"])
    assert engine.steps == 2
    got, want = engine.step(_batch(2)), run["straight"][0]["dp2"][2]
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=METRIC_REL, abs=1e-9), key


def test_clear_refusals(run: dict[str, Any], one_thread: None) -> None:
    for rank in run["straight"]:
        assert rank["adamw_refused"].startswith("CheckpointError")
        assert "engine.distributed_optimizer=false (torch AdamW)" in rank["adamw_refused"]
        assert "resume with engine.distributed_optimizer=false" in rank["adamw_refused"]
        assert rank["ep_refused"].startswith("CheckpointError")
        assert "saved at engine.expert_parallel=2" in rank["ep_refused"]
        assert "engine.distributed_optimizer=true" in rank["state_dict_refused"]
        assert "save_sharded" in rank["state_dict_refused"]
    adamw = _engine(run["checkpoint"], distributed_optimizer=False)  # and the other way round
    with pytest.raises(CheckpointError, match=r"distributed_optimizer=true \(megatron's Distrib.*=false"):
        adamw.load_sharded(run["root"] / "dp2_ckpt", load_checkpoint(run["root"] / "dp2_state")["engine"])
    with pytest.raises(
        MoEAdaptConfigError, match="engine.distributed_optimizer=True is invalid.*engine=megatron"
    ):
        HFEngine(run["checkpoint"], AutoConfig(distributed_optimizer=True))
    with pytest.raises(MoEAdaptConfigError, match="engine.distributed_optimizer='yes' is invalid"):
        AutoConfig(distributed_optimizer="yes")  # type: ignore[arg-type]
