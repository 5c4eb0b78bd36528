"""build_engine: which engine a config gets, and what the hf fallback does with megatron-only settings."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from moe_adapt.engines import build_engine, resolve_engine_name
from moe_adapt.engines.hf import HFConfig, HFEngine
from moe_adapt.errors import MoEAdaptConfigError
from tests.engines.conftest import tiny_hf_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("qwen3_moe")
    tiny_hf_model("qwen3_moe").save_pretrained(str(path))
    return path


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto picks megatron with CUDA")
def test_auto_without_cuda_trains_on_hf_without_megatron_only_settings(
    checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert resolve_engine_name("auto", checkpoint) == "hf"
    cfg = HFConfig(expert_parallel=2, distributed_optimizer=True)
    with caplog.at_level(logging.WARNING, logger="moe_adapt.engines"):
        engine = build_engine("auto", checkpoint, cfg)
    assert isinstance(engine, HFEngine)
    assert engine.cfg.expert_parallel == 1 and engine.cfg.distributed_optimizer is False
    assert "engine.expert_parallel=2, engine.distributed_optimizer=True" in caplog.text
    assert cfg.expert_parallel == 2  # the caller's config is left as it was


def test_explicit_hf_refuses_megatron_only_settings(checkpoint: Path) -> None:
    with pytest.raises(MoEAdaptConfigError, match="engine.expert_parallel=2 is invalid with the hf engine"):
        build_engine("hf", checkpoint, HFConfig(expert_parallel=2))
    with pytest.raises(MoEAdaptConfigError, match="engine.tensor_parallel=2 is invalid with the hf engine"):
        build_engine("hf", checkpoint, HFConfig(tensor_parallel=2))
    with pytest.raises(MoEAdaptConfigError, match="engine.distributed_optimizer=True is invalid"):
        build_engine("hf", checkpoint, HFConfig(distributed_optimizer=True))
    with pytest.raises(MoEAdaptConfigError, match="engine='tpu' is invalid"):
        build_engine("tpu", checkpoint, HFConfig())
