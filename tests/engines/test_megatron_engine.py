"""The megatron engine against the hf engine on tiny MoE checkpoints (CPU, gloo, the test shim).

Same losses and gradients as the hf engine, the same weights after a step, exact resume, exact
export, EP=2 over two gloo processes equal to EP=1, the NaN skip, and the one error on a CPU-only
machine without the shim.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.engines.conftest import FAMILIES, tiny_hf_model

pytest.importorskip("megatron.core")

from moe_adapt.checkpoint.trainer_state import load_checkpoint, save_checkpoint
from moe_adapt.engines import AutoConfig, objectives
from moe_adapt.engines.batch import TrainBatch
from moe_adapt.engines.hf import HFEngine
from moe_adapt.engines.megatron.engine import MegatronEngine, init_parallel
from moe_adapt.engines.megatron.mapping import megatron_to_hf
from moe_adapt.engines.megatron.routing import packed_attention_mask
from moe_adapt.errors import CheckpointError, MoEAdaptConfigError, MoEAdaptError

VOCAB = 101  # tests.engines.conftest.TINY_MOE
REL = 1e-5
# lr 1e-4: Adam's first step moves every weight by about lr, whatever its gradient, so a gradient
# that differs in the 7th digit can move a weight by a few % of lr where the gradient is near eps.
CFG = dict(lr=1e-4, warmup_steps=0, aux_loss_coef=0.1, z_loss_coef=0.01)
WEIGHT_ATOL = 1e-5  # 10% of lr; the gradients themselves are compared to 1e-5 relative
TOKENIZER_FILE = '{"model": "tiny test tokenizer"}\n'


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An HF checkpoint folder (with a tokenizer file) for every tiny family."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name in FAMILIES:
        tiny_hf_model(name).save_pretrained(str(root / name))
        (root / name / "tokenizer.json").write_text(TOKENIZER_FILE)
        out[name] = root / name
    return out


@pytest.fixture
def deterministic() -> Iterator[None]:
    det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(det)


def _tokens(seed: int, batch: int = 2, seq_len: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq_len + 1), generator=torch.Generator().manual_seed(seed))


def _packed_batch(seed: int) -> TrainBatch:
    """Two rows of packed examples (row 1 starts mid-example, at position 3) and a loss mask."""
    position_ids = np.stack([np.r_[np.arange(5), np.arange(11)], np.r_[np.arange(3, 12), np.arange(7)]])
    mask = np.ones((2, 16), dtype=bool)
    mask[0, :3] = False
    mask[1, 9] = False
    return TrainBatch(tokens=_tokens(seed).numpy(), loss_mask=mask, position_ids=position_ids)


def _hf_weights(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).state_dict()


def _rel(a: torch.Tensor | float, b: torch.Tensor | float) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


# First in the module: the CPU shim (the module-scoped ``megatron_cpu`` fixture) must not be active yet.
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_steps_match_the_hf_engine(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """On one GPU without the shim: the hf engine's losses over two steps, and a close export."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    assert init_parallel()
    try:
        path = checkpoints["qwen3_moe"]
        cfg = AutoConfig(**CFG)
        mc, hf = MegatronEngine(path, cfg), HFEngine(path, cfg, device="cuda")
        assert mc.device.type == "cuda"
        for seed in (3, 4):
            mc_metrics, hf_metrics = mc.step(_packed_batch(seed)), hf.step(_packed_batch(seed))
            for key in ("loss", "lm_loss", "aux_loss", "z_loss", "grad_norm"):
                assert mc_metrics[key] == pytest.approx(hf_metrics[key], rel=1e-4), (seed, key)
        mc.save_hf(tmp_path / "mc")
        exported = _hf_weights(tmp_path / "mc")
        for key, tensor in hf.model.state_dict().items():
            torch.testing.assert_close(exported[key], tensor.cpu(), rtol=0, atol=1e-4, msg=key)
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_first_step_matches_the_hf_engine(
    megatron_cpu: None, checkpoints: dict[str, Path], tmp_path: Path, name: str
) -> None:
    cfg = AutoConfig(**CFG)
    mc, hf = MegatronEngine(checkpoints[name], cfg), HFEngine(checkpoints[name], cfg)
    for batch in (_tokens(1), _packed_batch(2)):
        mc_terms, hf_terms = mc.forward_loss(batch), hf.forward_loss(batch)
        assert mc_terms.keys() == hf_terms.keys() == {"lm_loss", "aux_loss", "z_loss", "loss"}
        for key, value in hf_terms.items():
            assert _rel(mc_terms[key].detach(), value.detach()) < REL, (key, mc_terms[key], value)
        # gradients, mapped back to HF names, before the optimizer touches them
        mc.ddp.zero_grad_buffer()
        hf.model.zero_grad(set_to_none=True)
        mc_terms["loss"].backward()
        hf_terms["loss"].backward()
        grads = megatron_to_hf({k: p.main_grad for k, p in mc.model.named_parameters()}, mc.hf_config)
        for key, param in hf.model.named_parameters():
            assert _rel(grads[key], param.grad) < REL, key

    batch = _packed_batch(3)
    mc_metrics, hf_metrics = mc.step(batch), hf.step(batch)
    assert mc_metrics.keys() == hf_metrics.keys()
    for key, value in hf_metrics.items():
        assert mc_metrics[key] == pytest.approx(value, rel=REL, abs=1e-7), key
    mc.save_hf(tmp_path / "mc")
    exported = _hf_weights(tmp_path / "mc")
    for key, tensor in hf.model.state_dict().items():
        torch.testing.assert_close(exported[key], tensor, rtol=0, atol=WEIGHT_ATOL, msg=key)


def test_anchor_terms_match_the_hf_engine(megatron_cpu: None, checkpoints: dict[str, Path]) -> None:
    path = checkpoints["qwen3_moe"]
    # the first step moves each weight by about lr = 1e-4: a coefficient of 100 makes the anchor's
    # gradient (2 coef (θ − θ0), ~0.02) a visible part of the second step's gradient norm
    cfg = AutoConfig(**CFG, l2_anchor_coef=100.0, kl_anchor_coef=1.0, reference=str(path))
    mc, hf = MegatronEngine(path, cfg), HFEngine(path, cfg)
    for seed in range(2):
        mc_metrics, hf_metrics = mc.step(_tokens(seed)), hf.step(_tokens(seed))
        # grad_norm: the megatron engine adds the L2 anchor's gradient after the reduction itself
        for key in ("l2_anchor", "kl_anchor", "loss", "grad_norm"):
            assert mc_metrics[key] == pytest.approx(hf_metrics[key], rel=1e-4, abs=1e-7), (seed, key)
    assert mc_metrics["l2_anchor"] > 0 and mc_metrics["kl_anchor"] > 0


def _kd_batch(seed: int, rows: int = 2, topk: bool = False) -> TrainBatch:
    """Rows of two languages (row r is language r % 2, the last row half of each) with a loss mask and,
    with ``topk``, a teacher's stored top-4 log-probabilities."""
    tokens = _tokens(seed, batch=rows).numpy()
    lang_ids = np.stack([np.full(16, r % 2) for r in range(rows)])
    lang_ids[-1, 8:] = 1 - lang_ids[-1, 8]
    mask = np.ones((rows, 16), dtype=bool)
    mask[:, :2] = False
    extra: dict[str, Any] = {}
    if topk:
        gen = torch.Generator().manual_seed(seed)
        logits_BTV = torch.randn(rows, 16, VOCAB, generator=gen) * 3
        logp_BTK, ids_BTK = logits_BTV.log_softmax(-1).topk(4, dim=-1)
        extra = {"topk_ids": ids_BTK.numpy(), "topk_logp": logp_BTK.numpy()}
    return TrainBatch(tokens=tokens, loss_mask=mask, lang_ids=lang_ids, langs=("ar", "en"), **extra)


THETA = {"online": 0.021, "topk": 0.3}  # tiny random teachers are nearly uniform over 101 tokens


@pytest.mark.parametrize("teacher", ["online", "topk"])
def test_token_kd_matches_the_hf_engine(
    megatron_cpu: None, checkpoints: dict[str, Path], teacher: str
) -> None:
    """Token KD (SelecTKD mask, per-language selected share) gives the hf engine's terms and step."""
    path, cfg = checkpoints["qwen3_moe"], AutoConfig(**CFG)
    kd = objectives.KDSettings(alpha=0.3, temperature=2.0, theta=THETA[teacher])
    online = checkpoints["qwen2_moe"] if teacher == "online" else None  # same 101-token vocabulary
    mc = MegatronEngine(path, cfg, kd=kd, teacher=online)
    hf = HFEngine(path, cfg, kd=kd, teacher=online)
    batch = _kd_batch(5, topk=teacher == "topk")
    mc_terms, hf_terms = mc.forward_loss(batch), hf.forward_loss(batch)
    assert mc_terms.keys() == hf_terms.keys()
    assert {"kd_loss", "kd_kl", "kd_selected/ar", "kd_selected/en"} <= mc_terms.keys()
    for key, value in hf_terms.items():
        assert _rel(mc_terms[key].detach(), value.detach()) < REL, (key, mc_terms[key], value)
    assert 0 < float(mc_terms["kd_selected"]) < 1  # the mask keeps some positions, not all
    mc_metrics, hf_metrics = mc.step(batch), hf.step(batch)
    for key, value in hf_metrics.items():
        assert mc_metrics[key] == pytest.approx(value, rel=REL, abs=1e-7), key


def test_grouped_gemm_experts(megatron_cpu: None, checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """engine.grouped_gemm builds GroupedMLP experts (bfloat16): the checkpoint's weights exactly, the
    sequential experts' losses up to bf16 rounding, and an exact resume from a sharded checkpoint."""
    path = checkpoints["mixtral"]
    bf16 = dict(CFG, dtype="bfloat16")
    grouped = MegatronEngine(path, AutoConfig(**bf16, grouped_gemm=True))
    sequential = MegatronEngine(path, AutoConfig(**bf16))
    assert type(grouped.model.decoder.layers[0].mlp.experts).__name__ == "GroupedMLP"
    grouped.save_hf(tmp_path / "as_loaded")
    exported = _hf_weights(tmp_path / "as_loaded")
    for key, tensor in _hf_weights(path).items():
        assert torch.equal(exported[key], tensor.to(torch.bfloat16).float()), key
    for batch in (_tokens(1), _packed_batch(2)):
        g_terms, s_terms = grouped.forward_loss(batch), sequential.forward_loss(batch)
        for key, value in s_terms.items():
            assert _rel(g_terms[key].detach().float(), value.detach().float()) < 1e-2, key
    grouped.step(_packed_batch(3))
    state = grouped.save_sharded(tmp_path / "sharded")
    want = grouped.step(_packed_batch(4))
    resumed = MegatronEngine(path, AutoConfig(**bf16, grouped_gemm=True))
    resumed.load_sharded(tmp_path / "sharded", state)
    assert resumed.step(_packed_batch(4)) == want
    with pytest.raises(
        MoEAdaptConfigError, match="engine.grouped_gemm=True is invalid with engine.dtype=float32"
    ):
        MegatronEngine(path, AutoConfig(**CFG, grouped_gemm=True))


def test_resume_is_bit_exact(
    megatron_cpu: None, deterministic: None, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    path = checkpoints["qwen2_moe"]
    cfg = AutoConfig(lr=3e-3, warmup_steps=2, decay_steps=10, bias_update_rate=1e-2)
    straight = MegatronEngine(path, cfg)
    expected = [straight.step(_tokens(seed))["loss"] for seed in range(4)]

    first = MegatronEngine(path, cfg)
    assert [first.step(_tokens(seed))["loss"] for seed in range(2)] == expected[:2]
    save_checkpoint(tmp_path / "ckpt", {"engine": first.state_dict()})
    first.step(_tokens(99))  # the "crashed" run goes on; the resumed one must not see this step

    resumed = MegatronEngine(path, cfg)
    resumed.load_state_dict(load_checkpoint(tmp_path / "ckpt")["engine"])
    assert resumed.steps == 2
    assert [resumed.step(_tokens(seed))["loss"] for seed in range(2, 4)] == expected[2:]
    final, reference = resumed.state_dict(), straight.state_dict()
    assert all(torch.equal(final["model"][k], v) for k, v in reference["model"].items())
    assert torch.equal(final["router_bias"]["expert_bias_LE"], reference["router_bias"]["expert_bias_LE"])


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_aux_loss_free_balancing_matches_the_hf_engine(
    megatron_cpu: None, checkpoints: dict[str, Path], tmp_path: Path, name: str
) -> None:
    cfg = AutoConfig(**CFG, bias_update_rate=0.05)
    mc, hf = MegatronEngine(checkpoints[name], cfg), HFEngine(checkpoints[name], cfg)
    for seed in range(3):  # from step 1 on the biases (±0.05 per step) change which experts are chosen
        mc_metrics, hf_metrics = mc.step(_tokens(seed)), hf.step(_tokens(seed))
        for key in ("loss", "aux_loss", "moe/max_load", "moe/min_load"):
            assert mc_metrics[key] == pytest.approx(hf_metrics[key], rel=REL), (seed, key)
    assert hf.router_bias is not None
    assert torch.equal(mc.state_dict()["router_bias"]["expert_bias_LE"], hf.router_bias.bias_LE())
    mc.save_hf(tmp_path / "mc")
    hf.save_hf(tmp_path / "hf")
    bias_file = "router_bias.json"
    assert (tmp_path / "mc" / bias_file).read_text() == (tmp_path / "hf" / bias_file).read_text()
    # a checkpoint saved with biases routes with them (frozen without bias_update_rate), in both engines
    frozen = AutoConfig(**CFG)
    again_mc, again_hf = MegatronEngine(tmp_path / "mc", frozen), HFEngine(tmp_path / "hf", frozen)
    batch = _tokens(7)
    mc_loss, hf_loss = again_mc.forward_loss(batch)["loss"], again_hf.forward_loss(batch)["loss"]
    assert _rel(mc_loss.detach(), hf_loss.detach()) < REL
    assert again_mc.step(batch)["moe/max_load"] == again_hf.step(batch)["moe/max_load"]
    assert again_mc.expert_bias_LE is not None
    assert torch.equal(again_mc.expert_bias_LE, mc.expert_bias_LE)  # rate 0: not updated


def test_hf_model_is_a_snapshot_of_the_current_weights(
    megatron_cpu: None, checkpoints: dict[str, Path]
) -> None:
    engine = MegatronEngine(checkpoints["qwen3_moe"], AutoConfig(**CFG))
    engine.step(_tokens(0))
    tokens = _tokens(1)
    snapshot = engine.hf_model()
    with torch.no_grad():
        hf_lm = objectives.lm_cross_entropy(snapshot(input_ids=tokens[:, :-1]).logits, tokens[:, 1:])
        assert _rel(engine.forward_loss(tokens)["lm_loss"], hf_lm) < REL
    engine.step(_tokens(2))
    with torch.no_grad():
        again = objectives.lm_cross_entropy(snapshot(input_ids=tokens[:, :-1]).logits, tokens[:, 1:])
    assert torch.equal(again, hf_lm)


def test_bfloat16_parameters_and_exact_export(
    megatron_cpu: None, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    path = checkpoints["qwen2_moe_dense_tied"]
    cfg = AutoConfig(**CFG, dtype="bfloat16")
    mc, hf = MegatronEngine(path, cfg), HFEngine(path, cfg)
    assert {p.dtype for p in mc.model.parameters()} == {torch.bfloat16}
    mc.save_hf(tmp_path / "bf16")
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16")).state_dict()
    for key, tensor in hf.model.state_dict().items():
        assert exported[key].dtype == torch.bfloat16 and torch.equal(exported[key], tensor), key
    mc_metrics, hf_metrics = mc.step(_tokens(0)), hf.step(_tokens(0))
    assert mc_metrics["loss"] == pytest.approx(hf_metrics["loss"], rel=1e-2)


def test_state_of_another_engine_is_refused(megatron_cpu: None, checkpoints: dict[str, Path]) -> None:
    engine = MegatronEngine(checkpoints["qwen3_moe"], AutoConfig())
    state = HFEngine(checkpoints["qwen3_moe"], AutoConfig()).state_dict()
    with pytest.raises(CheckpointError, match="engine=hf"):
        engine.load_state_dict(state)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_export_round_trip_is_exact(
    megatron_cpu: None, checkpoints: dict[str, Path], tmp_path: Path, name: str
) -> None:
    engine = MegatronEngine(checkpoints[name], AutoConfig())
    out = engine.save_hf(tmp_path / "model")
    assert (out / "tokenizer.json").read_text() == TOKENIZER_FILE
    assert not list(tmp_path.glob(".model.tmp-*"))
    original, exported = _hf_weights(checkpoints[name]), _hf_weights(out)
    assert exported.keys() == original.keys()
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
    again = MegatronEngine(out, AutoConfig()).forward_loss(_tokens(5))["loss"]
    assert torch.equal(again, engine.forward_loss(_tokens(5))["loss"])


# -- expert parallel ------------------------------------------------------------------------------
EP = 2


def _ep_worker(rank: int, port: int, checkpoint: str, teacher: str, out_dir: str) -> None:
    from tests.engines.megatron_cpu import megatron_on_cpu

    torch.set_num_threads(1)
    out = Path(out_dir)
    with megatron_on_cpu(rank=rank, world_size=EP, port=port, expert_parallel=EP):
        # every rank gets the global batch and trains on its half of the rows
        engine = MegatronEngine(checkpoint, AutoConfig(**CFG))
        assert engine.ep_size == EP and len(engine.model.decoder.layers[1].mlp.experts.local_experts) == 4
        packed = engine.step(_packed_batch(3))  # masked: the ranks count different positions
        engine.save_hf(out / "packed")
        # token KD: rank 0's rows are Arabic only, so kd_selected/en comes from rank 1 alone
        engine = MegatronEngine(checkpoint, AutoConfig(**CFG), kd=KD, teacher=teacher)
        kd = engine.step(_kd_rows())
        # grouped-GEMM experts (bf16): the export gathers them from their grouped layout
        engine = MegatronEngine(checkpoint, AutoConfig(**GROUPED))
        grouped = engine.step(_packed_batch(3))
        engine.save_hf(out / "grouped")
    (out / f"rank{rank}.json").write_text(json.dumps({"packed": packed, "kd": kd, "grouped": grouped}))


KD = objectives.KDSettings(alpha=0.3, theta=THETA["online"])
GROUPED = dict(CFG, dtype="bfloat16", grouped_gemm=True)


def _kd_rows() -> TrainBatch:
    """Four rows: Arabic, Arabic, English, half and half."""
    batch = _kd_batch(6, rows=4)
    batch.lang_ids = np.stack([np.zeros(16), np.zeros(16), np.ones(16), np.r_[np.zeros(8), np.ones(8)]])
    return batch


def _spawn(fn: Any, args: tuple[Any, ...], nprocs: int, timeout_s: float = 120.0) -> None:
    import torch.multiprocessing as mp

    context: Any = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for proc in context.processes:
                proc.terminate()
            pytest.fail(f"workers did not finish in {timeout_s:.0f} s")


def test_expert_parallel_2_matches_1(
    megatron_cpu: None, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """Two EP ranks on the global batch take the one-process step: the same metrics (token-weighted
    losses, global load-balancing loss, expert loads, per-language KD shares) and weights."""
    from tests.engines.megatron_cpu import free_port

    path = checkpoints["qwen2_moe"]  # routed experts + a gated shared expert
    engine = MegatronEngine(path, AutoConfig(**CFG))
    packed = engine.step(_packed_batch(3))
    engine.save_hf(tmp_path / "ep1_packed")
    teacher = checkpoints["qwen3_moe"]  # same vocabulary, other weights
    engine = MegatronEngine(path, AutoConfig(**CFG), kd=KD, teacher=teacher)
    kd = engine.step(_kd_rows())
    assert 0 < kd["kd_selected/ar"] < 1 and 0 < kd["kd_selected/en"] < 1 and kd["kd_kl"] > 1e-4
    engine = MegatronEngine(path, AutoConfig(**GROUPED))
    grouped = engine.step(_packed_batch(3))
    engine.save_hf(tmp_path / "ep1_grouped")

    _spawn(_ep_worker, (free_port(), str(path), str(teacher), str(tmp_path)), EP)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(EP)]
    for got in ranks:
        assert got["packed"].keys() == packed.keys() and got["kd"].keys() == kd.keys()
        # grad_norm checks the gradient scaling (Adam's first step would hide a factor on the gradients)
        for name, want in (("packed", packed), ("kd", kd)):
            for key, value in want.items():
                assert got[name][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (name, key)
        for key in ("loss", "lm_loss", "aux_loss", "z_loss", "grad_norm"):  # bf16: other summation orders
            assert got["grouped"][key] == pytest.approx(grouped[key], rel=1e-2), ("grouped", key)
    ep1, ep2 = _hf_weights(tmp_path / "ep1_packed"), _hf_weights(tmp_path / "packed")
    for key, tensor in ep1.items():
        torch.testing.assert_close(ep2[key], tensor, rtol=0, atol=WEIGHT_ATOL, msg=key)
    # a misplaced expert would be off by the weights' own scale (~0.02), a bf16 step by ~1e-4
    ep1, ep2 = _hf_weights(tmp_path / "ep1_grouped"), _hf_weights(tmp_path / "grouped")
    for key, tensor in ep1.items():
        torch.testing.assert_close(ep2[key], tensor, rtol=0, atol=1e-3, msg=key)


# -- skips and errors -----------------------------------------------------------------------------
def test_non_finite_steps_are_skipped(megatron_cpu: None, checkpoints: dict[str, Path]) -> None:
    engine = MegatronEngine(checkpoints["mixtral"], AutoConfig(**CFG))
    before = {k: v.clone() for k, v in engine.state_dict()["model"].items()}
    real = engine.forward_loss

    def nan_loss(batch: Any) -> dict[str, torch.Tensor]:
        terms = real(batch)
        terms["loss"] = terms["loss"] * float("nan")
        return terms

    engine.forward_loss = nan_loss  # type: ignore[method-assign]
    metrics = engine.step(_tokens(0))
    assert metrics["skipped"] == 1.0 and np.isnan(metrics["loss"]) and np.isnan(metrics["grad_norm"])
    engine.forward_loss = real  # type: ignore[method-assign]
    router = engine.model.decoder.layers[0].mlp.router.weight
    handle = router.register_hook(lambda grad: grad * float("inf"))  # finite loss, infinite gradient
    metrics = engine.step(_tokens(1))
    handle.remove()
    assert (
        metrics["skipped"] == 1.0 and np.isfinite(metrics["loss"]) and not np.isfinite(metrics["grad_norm"])
    )
    state = engine.state_dict()
    assert all(torch.equal(state["model"][k], v) for k, v in before.items())
    assert state["optimizer"]["state"] == {} and engine.steps == 2
    assert engine.step(_tokens(2))["skipped"] == 0.0
    after = engine.state_dict()["model"]
    assert not all(torch.equal(after[k], v) for k, v in before.items())


def test_refuses_what_it_does_not_support(
    megatron_cpu: None, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    path = checkpoints["qwen3_moe"]
    with pytest.raises(MoEAdaptError, match="without KD settings"):
        MegatronEngine(path, AutoConfig(), teacher=path)
    with pytest.raises(MoEAdaptConfigError, match="device='cuda' is invalid"):
        MegatronEngine(path, AutoConfig(), device="cuda")  # torch.cuda is the shim's CPU stand-in
    with pytest.raises(MoEAdaptError, match="no config.json"):
        MegatronEngine(tmp_path, AutoConfig())
    engine = MegatronEngine(path, AutoConfig())
    with pytest.raises(MoEAdaptError, match="vocab_size is 101"):
        engine.step(torch.full((1, 5), VOCAB))
    with pytest.raises(MoEAdaptError, match="position_ids"):
        engine.forward_loss(
            TrainBatch(tokens=_tokens(0).numpy(), position_ids=np.zeros((2, 3), dtype=np.int64))
        )
    assert init_parallel() is False  # already running (the fixture)
    with pytest.raises(MoEAdaptConfigError, match="expert_parallel=2"):
        init_parallel(expert_parallel=2)


def test_packed_attention_mask() -> None:
    assert packed_attention_mask(torch.arange(4)[None] + 3) is None  # one example per row
    mask = packed_attention_mask(torch.tensor([[0, 1, 0, 1, 2]]))
    assert mask is not None
    allowed = ~mask[0, 0]
    expected = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]],
        dtype=torch.bool,
    )
    assert torch.equal(allowed, expected)


def test_without_cuda_or_shim_one_clear_error(checkpoints: dict[str, Path]) -> None:
    """A fresh interpreter (no shim, no process group): the engine names CUDA, and never loads the shim."""
    code = (
        "import sys\n"
        "from moe_adapt.engines.megatron import MegatronEngine, init_parallel\n"
        "from moe_adapt.errors import MoEAdaptError\n"
        f"for build in (lambda: MegatronEngine({str(checkpoints['qwen3_moe'])!r}), init_parallel):\n"
        "    try:\n"
        "        build()\n"
        "    except MoEAdaptError as err:\n"
        "        print('ERROR', err)\n"
        "print('SHIM', any(name.startswith('tests') for name in sys.modules))\n"
    )
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[2],
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    errors = [line for line in lines if line.startswith("ERROR the megatron engine needs CUDA")]
    assert len(errors) == 2, done.stdout
    assert "SHIM False" in lines


def test_product_code_never_imports_the_shim() -> None:
    root = Path(__file__).parents[2] / "moe_adapt"
    imports_tests = re.compile(r"^\s*(from|import)\s+tests\b", re.MULTILINE)
    offenders = [p for p in root.rglob("*.py") if imports_tests.search(p.read_text(encoding="utf-8"))]
    assert offenders == []
