"""Tensor parallel 2 (with sequence parallel) in the megatron engine: the one-process step (also with
the distributed optimizer), the same weights on export, and a sharded checkpoint that resumes at
tensor parallel 1 (CPU, gloo, the shim)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.engines.conftest import tiny_hf_model

pytest.importorskip("megatron.core")

from moe_adapt.checkpoint.trainer_state import load_checkpoint, save_checkpoint
from moe_adapt.engines import AutoConfig, objectives
from moe_adapt.engines.batch import TrainBatch
from moe_adapt.engines.megatron.engine import MegatronEngine
from moe_adapt.errors import MoEAdaptConfigError, MoEAdaptError

VOCAB = 128  # tensor parallel splits the vocabulary evenly (conftest's 101 is prime)
TP = 2
# aux-loss-free biases on: the expert loads must be summed over the sequence-parallel parts; the L2
# anchor: its value sums slices over TP, and its gradient must not be summed over the replicas
CFG = dict(
    lr=1e-4, warmup_steps=0, aux_loss_coef=0.1, z_loss_coef=0.01, bias_update_rate=1e-3, l2_anchor_coef=1.0
)
KEYS = ("loss", "lm_loss", "aux_loss", "z_loss", "l2_anchor", "grad_norm", "tokens", "moe/max_load",
        "moe/load_cv")  # fmt: skip
# token KD against an online teacher and the KL anchor: computed on the gathered logits
KD = objectives.KDSettings(alpha=0.3, theta=0.02)
KD_CFG = dict(CFG, kl_anchor_coef=1.0)
WEIGHT_ATOL = 1e-5  # 10% of lr (Adam's first steps move every weight by about lr)


def _batch(seed: int) -> TrainBatch:
    """Two packed rows of 16 positions (row 1 starts mid-example) with a loss mask."""
    gen = torch.Generator().manual_seed(seed)
    position_ids = np.stack([np.r_[np.arange(5), np.arange(11)], np.r_[np.arange(3, 12), np.arange(7)]])
    mask = np.ones((2, 16), dtype=bool)
    mask[0, :3] = False
    return TrainBatch(tokens=torch.randint(0, VOCAB, (2, 17), generator=gen).numpy(), loss_mask=mask,
                 position_ids=position_ids)  # fmt: skip


def _steps(engine: MegatronEngine, root: Path, name: str) -> list[dict[str, float]]:
    """Step 1, a sharded checkpoint, step 2, the HF export."""
    metrics = [engine.step(_batch(3))]
    state = engine.save_sharded(root / f"{name}_ckpt")
    if torch.distributed.get_rank() == 0:
        save_checkpoint(root / f"{name}_state", {"engine": state})
    metrics.append(engine.step(_batch(4)))
    engine.save_hf(root / f"{name}_hf")
    return metrics


def _worker(rank: int, port: int, checkpoint: str, teacher: str, root: str) -> None:
    from tests.engines.megatron_cpu import megatron_on_cpu

    torch.set_num_threads(1)
    with megatron_on_cpu(rank=rank, world_size=TP, port=port, tensor_parallel=TP):
        engine = MegatronEngine(checkpoint, AutoConfig(**CFG))
        assert engine.tp_size == TP and engine.model.embedding.word_embeddings.weight.shape[0] == VOCAB // TP
        metrics = _steps(engine, Path(root), "tp2")
        engine = MegatronEngine(checkpoint, AutoConfig(**CFG, distributed_optimizer=True))
        zero1 = [engine.step(_batch(3)), engine.step(_batch(4))]
        engine.save_hf(Path(root) / "tp2_zero1_hf")
        engine = MegatronEngine(
            checkpoint, AutoConfig(**KD_CFG, reference=checkpoint), kd=KD, teacher=teacher
        )
        kd = [engine.step(_batch(3)), engine.step(_batch(4))]
        try:
            engine.step(TrainBatch(tokens=np.zeros((2, 16), dtype=np.int64)))  # 15 positions
        except MoEAdaptError as err:
            error = str(err)
    (Path(root) / f"rank{rank}.json").write_text(
        json.dumps({"metrics": metrics, "zero1": zero1, "kd": kd, "error": error})
    )


def _spawn(args: tuple[Any, ...], timeout_s: float = 180.0) -> None:
    import torch.multiprocessing as mp

    context: Any = mp.spawn(_worker, args=args, nprocs=TP, join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for proc in context.processes:
                proc.terminate()
            pytest.fail(f"tensor-parallel workers did not finish in {timeout_s:.0f} s")


def _hf_weights(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).state_dict()


@pytest.mark.parametrize("family", ["qwen2_moe"])  # qkv bias, a gated shared expert, dense + MoE blocks
def test_tensor_parallel_2_matches_1(megatron_cpu: None, tmp_path: Path, family: str) -> None:
    from tests.engines.megatron_cpu import free_port

    checkpoint = tmp_path / family
    tiny_hf_model(family, vocab_size=VOCAB).save_pretrained(str(checkpoint))
    teacher = tmp_path / "teacher"
    tiny_hf_model("qwen3_moe", vocab_size=VOCAB).save_pretrained(str(teacher))
    one = MegatronEngine(checkpoint, AutoConfig(**CFG))
    want = _steps(one, tmp_path, "tp1")
    assert want[1]["l2_anchor"] > 1e-6  # step 2 moved away from the anchor
    one = MegatronEngine(checkpoint, AutoConfig(**KD_CFG, reference=str(checkpoint)), kd=KD, teacher=teacher)
    kd = [one.step(_batch(3)), one.step(_batch(4))]
    assert kd[1]["kl_anchor"] > 1e-6 and kd[1]["kd_kl"] > 1e-4 and 0 < kd[1]["kd_selected"] < 1

    _spawn((free_port(), str(checkpoint), str(teacher), str(tmp_path)))
    for rank in range(TP):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for step, (g, w) in enumerate(zip(got["metrics"], want, strict=True), 1):
            for key in KEYS:
                assert g[key] == pytest.approx(w[key], rel=1e-6, abs=1e-9), (rank, step, key)
        for step, (g, w) in enumerate(zip(got["zero1"], want, strict=True), 1):  # distributed optimizer
            for key in KEYS:
                assert g[key] == pytest.approx(w[key], rel=1e-6, abs=1e-9), ("zero1", rank, step, key)
        for step, (g, w) in enumerate(zip(got["kd"], kd, strict=True), 1):
            for key in (*KEYS, "kd_loss", "kd_ce", "kd_kl", "kd_selected", "kl_anchor"):
                assert g[key] == pytest.approx(w[key], rel=1e-6, abs=1e-7), ("kd", rank, step, key)
        assert "make mixture.seq_len a multiple of it" in got["error"]
    tp1, tp2 = _hf_weights(tmp_path / "tp1_hf"), _hf_weights(tmp_path / "tp2_hf")
    assert (tmp_path / "tp2_hf" / "router_bias.json").read_text() == (
        tmp_path / "tp1_hf" / "router_bias.json"
    ).read_text()
    zero1 = _hf_weights(tmp_path / "tp2_zero1_hf")
    for key, tensor in tp1.items():
        torch.testing.assert_close(tp2[key], tensor, rtol=0, atol=WEIGHT_ATOL, msg=key)
        torch.testing.assert_close(zero1[key], tensor, rtol=0, atol=WEIGHT_ATOL, msg=f"zero1 {key}")

    # the TP=2 checkpoint of step 1 resumes in one process: step 2 as the TP=1 run took it
    resumed = MegatronEngine(checkpoint, AutoConfig(**CFG))
    resumed.load_sharded(tmp_path / "tp2_ckpt", load_checkpoint(tmp_path / "tp2_state")["engine"])
    again = resumed.step(_batch(4))
    for key in KEYS:
        assert again[key] == pytest.approx(want[1][key], rel=1e-6, abs=1e-9), key


def test_tensor_parallel_refusals(megatron_cpu: None, tmp_path: Path) -> None:
    tiny_hf_model("qwen3_moe", vocab_size=VOCAB).save_pretrained(str(tmp_path))
    with pytest.raises(MoEAdaptConfigError, match="expert_parallel=1, tensor_parallel=2 is invalid"):
        from moe_adapt.engines.megatron.engine import init_parallel

        init_parallel(tensor_parallel=2)  # the fixture's parallel_state has TP = 1
    with pytest.raises(MoEAdaptConfigError, match="engine.tensor_parallel=0 is invalid"):
        AutoConfig(tensor_parallel=0)
