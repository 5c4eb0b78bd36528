"""The trainer loop with the hf engine on a tiny Qwen3-MoE: exact resume, NaN guard, metrics, learning."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from moe_adapt.checkpoint.trainer_state import latest_checkpoint, list_checkpoints, load_checkpoint
from moe_adapt.cpt import CurriculumConfig, MixtureBatch, MixtureConfig, MixtureSampler
from moe_adapt.engines.hf import HFConfig, HFEngine
from moe_adapt.engines.optim import lr_at
from moe_adapt.errors import MoEAdaptError
from moe_adapt.train.callbacks import Callback, CheckpointCallback, MetricsCallback, NaNGuardCallback
from moe_adapt.train.phase import train_into_folder
from moe_adapt.train.trainer import Trainer
from tests.cpt.conftest import bilingual, save_tiny_qwen3_moe

MakeShards = Callable[..., Path]
VOCAB = 101
SEQ_LEN = 16
BATCH = 4


@pytest.fixture(autouse=True)
def deterministic() -> Iterator[None]:
    """One thread and deterministic kernels, restored afterwards."""
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(det)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen3-MoE checkpoint (hidden 64, 2 layers, 8 experts, top-2, vocab 101)."""
    return save_tiny_qwen3_moe(tmp_path_factory.mktemp("tiny_moe"), VOCAB, tie_word_embeddings=False)


class ModVocab:
    """The mixture sampler with token ids folded into the tiny model's vocabulary."""

    def __init__(self, sampler: MixtureSampler) -> None:
        self.sampler = sampler

    def next_batch(self, batch_size: int) -> MixtureBatch:
        batch = self.sampler.next_batch(batch_size)
        batch.tokens = batch.tokens % VOCAB
        return batch

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


class Record(Callback):
    """Keeps every step's metrics (not saved: each trainer records its own steps)."""

    name = "record"

    def __init__(self) -> None:
        self.steps: list[tuple[int, dict[str, float]]] = []

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        self.steps.append((step, dict(metrics)))

    def losses(self) -> list[float]:
        return [m["loss"] for _, m in self.steps]


def _sampler(shards: Path) -> ModVocab:
    mix = MixtureConfig(seq_len=SEQ_LEN, target_ratio=0.8, max_epochs=50)
    return ModVocab(MixtureSampler(shards, mix, CurriculumConfig(), seed=3))


def _engine(model: Path, **kw: Any) -> HFEngine:
    cfg = HFConfig(**{"lr": 3e-3, "warmup_steps": 2, "decay_steps": 40, **kw})
    return HFEngine(model, cfg)


def _params(engine: HFEngine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.model.state_dict().items()}


def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(
    tiny_moe: Path, make_shards: MakeShards, tmp_path: Path
) -> None:
    shards = make_shards(bilingual(docs=60, buckets=1))
    full = Record()
    ref = Trainer(_engine(tiny_moe), _sampler(shards), [full], max_steps=8, batch_size=BATCH)
    ref.fit()
    assert len(full.steps) == 8

    run = tmp_path / "run"
    first = Record()
    cbs: list[Callback] = [
        CheckpointCallback(run / "ckpt", every=4, keep_last=2),
        MetricsCallback(run / "m.jsonl"),
    ]
    # the "crashed" run goes on to step 6 after the step-4 checkpoint; resume must forget steps 5-6
    Trainer(_engine(tiny_moe), _sampler(shards), [*cbs, first], max_steps=6, batch_size=BATCH).fit()
    assert [p.name for p in list_checkpoints(run / "ckpt")] == ["step_000004", "step_000006"]
    assert first.losses() == full.losses()[:6]

    second = Record()
    cbs = [CheckpointCallback(run / "ckpt", every=4, keep_last=2), MetricsCallback(run / "m.jsonl")]
    engine = _engine(tiny_moe)
    trainer = Trainer(engine, _sampler(shards), [*cbs, second], max_steps=8, batch_size=BATCH)
    trainer.resume(run / "ckpt" / "step_000004")
    assert trainer.step == 4
    trainer.fit()
    assert [s for s, _ in second.steps] == [5, 6, 7, 8]
    assert second.losses() == full.losses()[4:]  # exact float equality
    for k, v in _params(engine).items():
        assert torch.equal(v, ref.engine.model.state_dict()[k]), k  # type: ignore[attr-defined]

    lines = [json.loads(x) for x in (run / "m.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 9))
    assert [x["loss"] for x in lines] == full.losses()
    assert latest_checkpoint(run / "ckpt") == run / "ckpt" / "step_000008"


def test_checkpoint_is_safetensors_and_json_only(
    tiny_moe: Path, make_shards: MakeShards, tmp_path: Path
) -> None:
    shards = make_shards(bilingual(docs=30, buckets=1))
    ckpt = CheckpointCallback(tmp_path / "ckpt", every=1, keep_last=2)
    Trainer(_engine(tiny_moe), _sampler(shards), [ckpt], max_steps=3, batch_size=2).fit()
    kept = list_checkpoints(tmp_path / "ckpt")
    assert [p.name for p in kept] == ["step_000002", "step_000003"]
    assert sorted(p.name for p in kept[-1].iterdir()) == ["state.json", "tensors.safetensors"]
    state = load_checkpoint(kept[-1])
    assert state["step"] == 3 and state["engine"]["steps"] == 3
    assert isinstance(state["engine"]["model"]["lm_head.weight"], torch.Tensor)
    with pytest.raises(MoEAdaptError, match="not a training checkpoint"):
        load_checkpoint(tmp_path)


def test_a_crashed_phase_resumes_from_the_newest_intact_checkpoint(
    tiny_moe: Path, make_shards: MakeShards, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A newest checkpoint cut short (a full disk, a copy that died) is named in a warning and
    passed over: train_into_folder resumes from the one before it (issue 12)."""
    shards = make_shards(bilingual(docs=30, buckets=1))
    work = tmp_path / "work"

    def phase(max_steps: int) -> Record:
        record = Record()
        cbs: list[Callback] = [CheckpointCallback(work / "checkpoints", every=1, keep_last=None), record]
        train_into_folder(
            "phase", _engine(tiny_moe), _sampler(shards), cbs,
            max_steps=max_steps, batch_size=2, work=work, model_dir=work / "model", curves=None,
        )  # fmt: skip
        return record

    phase(3)
    newest = work / "checkpoints" / "step_000003"
    with open(newest / "tensors.safetensors", "r+b") as fh:
        fh.truncate(1000)
    caplog.set_level("WARNING")
    resumed = phase(4)
    assert f"checkpoint {newest} is damaged: tensors.safetensors" in caplog.text
    assert [s for s, _ in resumed.steps] == [3, 4]  # from step 2, the newest intact one
    assert (work / "checkpoints" / "damaged-step_000003").is_dir()
    assert [p.name for p in list_checkpoints(work / "checkpoints")][-2:] == ["step_000003", "step_000004"]


def test_nan_guard_skips_a_bad_step_and_stops_after_k(tiny_moe: Path, make_shards: MakeShards) -> None:
    shards = make_shards(bilingual(docs=30, buckets=1))
    engine = _engine(tiny_moe)
    real = engine.forward_loss
    bad_steps: set[int] = {2}
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def forward_loss(tokens_BT1: Any) -> dict[str, torch.Tensor]:
        terms = real(tokens_BT1)
        snapshots[engine.steps] = _params(engine)
        if engine.steps in bad_steps:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    engine.forward_loss = forward_loss  # type: ignore[method-assign]
    rec, guard = Record(), NaNGuardCallback(max_consecutive=2)
    trainer = Trainer(engine, _sampler(shards), [guard, rec], max_steps=5, batch_size=2)
    trainer.fit()
    assert [m["skipped"] for _, m in rec.steps] == [0.0, 0.0, 1.0, 0.0, 0.0]
    assert math.isnan(rec.steps[2][1]["loss"])
    for k, v in snapshots[3].items():  # the NaN step (engine step 2) changed nothing
        assert torch.equal(v, snapshots[2][k]), k
    assert guard.state_dict() == {"consecutive": 0, "total": 1}

    bad_steps.update({5, 6})
    trainer.max_steps = 10
    with pytest.raises(MoEAdaptError, match="2 consecutive steps up to step 7"):
        trainer.fit()
    assert trainer.step == 7


def test_loss_falls_on_a_repetitive_stream(tiny_moe: Path, make_shards: MakeShards) -> None:
    shards = make_shards(bilingual(docs=40, buckets=1))
    rec = Record()
    Trainer(_engine(tiny_moe), _sampler(shards), [rec], max_steps=30, batch_size=BATCH).fit()
    lm = [m["lm_loss"] for _, m in rec.steps]
    assert np.mean(lm[-5:]) < 0.75 * np.mean(lm[:3])  # 4.6 -> 3.2 in practice
    assert all(m["aux_loss"] > 0.9 and m["z_loss"] > 0 for _, m in rec.steps)  # balanced routing gives 1.0


def test_save_hf_round_trips(tiny_moe: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    engine = _engine(tiny_moe)
    tokens = torch.randint(0, VOCAB, (2, SEQ_LEN + 1), generator=torch.Generator().manual_seed(0))
    engine.step(tokens)
    out = engine.save_hf(tmp_path / "hf")
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    engine.model.eval()
    with torch.no_grad():
        a = engine.model(input_ids=tokens).logits
        b = reloaded(input_ids=tokens).logits
    assert torch.equal(a, b)


def test_lr_schedule_and_multiplier(tiny_moe: Path) -> None:
    cfg = HFConfig(lr=1.0, warmup_steps=4, decay_steps=14, min_lr_ratio=0.1)
    assert [lr_at(cfg, s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(cfg, 9) == pytest.approx(0.55)  # half-way through the cosine
    assert lr_at(cfg, 14) == pytest.approx(0.1) and lr_at(cfg, 100) == pytest.approx(0.1)
    engine = HFEngine(tiny_moe, cfg, lr_multiplier=lambda step: 0.5 if step == 0 else 1.0)
    tokens = torch.zeros(1, 5, dtype=torch.long)
    assert engine.step(tokens)["lr"] == 0.125
    assert engine.step(tokens)["lr"] == 0.5


def test_clear_errors(tiny_moe: Path, tmp_path: Path) -> None:
    engine = _engine(tiny_moe)
    with pytest.raises(MoEAdaptError, match="vocab_size is 101"):
        engine.step(torch.full((1, 5), VOCAB))
    with pytest.raises(MoEAdaptError, match="no config.json"):
        HFEngine(tmp_path)
    with pytest.raises(MoEAdaptError, match="engine.reference=None"):
        HFConfig(kl_anchor_coef=0.1)
    with pytest.raises(MoEAdaptError, match="appear twice"):
        Trainer(engine, None, [NaNGuardCallback(), NaNGuardCallback()], max_steps=1, batch_size=1)  # type: ignore[arg-type]


def test_anchor_terms(tiny_moe: Path) -> None:
    engine = _engine(tiny_moe, l2_anchor_coef=1.0, kl_anchor_coef=1.0, reference=str(tiny_moe))
    tokens = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    first = engine.step(tokens)
    assert first["l2_anchor"] == 0.0 and first["kl_anchor"] == pytest.approx(0.0, abs=1e-6)
    second = engine.step(tokens)
    assert second["l2_anchor"] > 0 and second["kl_anchor"] > 0


class _CountingEngine:
    """Just enough of an engine for the loop: a loss that counts steps."""

    def __init__(self) -> None:
        self.steps = 0

    def step(self, batch: object) -> dict[str, float]:
        self.steps += 1
        return {"loss": float(self.steps), "skipped": 0.0}


class _Batches:
    def next_batch(self, batch_size: int) -> np.ndarray:
        return np.zeros((batch_size, 2), dtype=np.int64)

    def state_dict(self) -> dict[str, int]:
        return {}

    def load_state_dict(self, state: dict[str, int]) -> None:
        pass


def test_a_fresh_start_does_not_list_a_dead_attempts_steps_twice(tmp_path: Path) -> None:
    """An attempt that died before its first checkpoint left steps 1-5 in metrics.jsonl; the next
    attempt starts from step 0, so the file must start anew."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 9.0}) + "\n" for s in range(1, 6)))
    trainer = Trainer(_CountingEngine(), _Batches(), [MetricsCallback(path)], max_steps=3, batch_size=2)  # type: ignore[arg-type]
    trainer.fit()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3] and [r["loss"] for r in lines] == [1.0, 2.0, 3.0]
