"""The cpt stage's plan, without training: logged as a block and returned for the summary, the
curriculum-longer-than-max_steps warning, and the memory refusal naming its override."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from moe_adapt.config import compose, to_config
from moe_adapt.distributed import DistContext
from moe_adapt.engines import plan as plan_mod
from moe_adapt.errors import MoEAdaptConfigError
from moe_adapt.stages import cpt
from moe_adapt.stages.base import StageContext
from tests.stages.test_cpt import SMALL


@pytest.fixture
def moe_dir(tmp_path: Path) -> Path:
    from transformers import AutoConfig

    # the shape the tiny recipe upcycles to (SMALL: 8 experts of granularity 4); config.json only
    AutoConfig.for_model(
        "qwen3_moe",
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=4,
        moe_intermediate_size=32,
        intermediate_size=128,
        max_position_embeddings=512,
    ).save_pretrained(tmp_path / "moe")
    return tmp_path / "moe"


def context(tmp_path: Path, moe_dir: Path, *overrides: str) -> StageContext:
    raw = compose(["+recipe=tiny", f"run_dir={tmp_path}", *SMALL, f"cpt.init_from={moe_dir}", *overrides])
    return StageContext(to_config(raw), tmp_path / "out", tmp_path / "work", DistContext())


def test_cpt_logs_its_plan(tmp_path, moe_dir, caplog):
    with caplog.at_level(logging.INFO):
        plan = cpt.plan(context(tmp_path, moe_dir, "engine=hf"))
    assert "cpt: training plan" in caplog.text and "active per token (8 experts, top-4)" in caplog.text
    assert "4 x 64 = 256 per step, 6 steps" in caplog.text
    assert plan["tokens_per_step"] == 256 and plan["total_tokens"] == 6 * 256
    assert plan["params_active"] < plan["params_total"] and plan["layout"]["engine"] == "hf"
    assert "cpt.max_steps" not in caplog.text  # SMALL's curriculum ([2, 2]) fits its 6 steps


def test_a_curriculum_longer_than_max_steps_warns(tmp_path, moe_dir, caplog):
    with caplog.at_level(logging.WARNING):
        cpt.plan(context(tmp_path, moe_dir, "engine=hf", "curriculum.phase_steps=[4,4]"))
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("sum to 8 steps but cpt.max_steps=6" in w and "only 2 of" in w for w in warning), warning


def test_cpt_refuses_a_plan_that_does_not_fit(tmp_path, moe_dir, monkeypatch):
    monkeypatch.setattr(plan_mod, "available_memory_bytes", lambda: 1024)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(MoEAdaptConfigError, match=r"engine.check_memory=false"):
        cpt.plan(context(tmp_path, moe_dir, "engine=hf"))
    plan = cpt.plan(context(tmp_path, moe_dir, "engine=hf", "engine.check_memory=false"))
    assert plan["bytes_per_rank"]["total"] > 1024
