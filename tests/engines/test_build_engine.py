"""build_engine: which engine a config gets, and what the hf fallback does with megatron-only settings."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from moe_adapt.config import compose
from moe_adapt.engines import AutoConfig, build_engine, resolve_engine_name
from moe_adapt.engines.base import EngineConfig
from moe_adapt.engines.hf import HFEngine
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
    cfg = AutoConfig(expert_parallel=2, distributed_optimizer=True)
    with caplog.at_level(logging.WARNING, logger="moe_adapt.engines"):
        engine = build_engine(cfg, checkpoint)
    assert isinstance(engine, HFEngine)
    assert engine.cfg.expert_parallel == 1 and engine.cfg.distributed_optimizer is False
    assert "engine.expert_parallel=2, engine.distributed_optimizer=True" in caplog.text
    assert cfg.expert_parallel == 2  # the caller's config is left as it was


def test_explicit_hf_refuses_megatron_only_settings() -> None:
    # the hf schema has no megatron layout settings: they fail while composing, naming hf's settings
    for key in ("expert_parallel=2", "tensor_parallel=2", "distributed_optimizer=true"):
        with pytest.raises(Exception, match=f"Could not override 'engine.{key.split('=')[0]}'"):
            compose(["engine=hf", f"engine.{key}", "run_dir=/tmp/unused"])
    with pytest.raises(MoEAdaptConfigError, match="engine.name='tpu' is invalid"):
        EngineConfig(name="tpu")


def test_engine_group_options_compose_to_their_schema() -> None:
    from moe_adapt.config import to_config
    from moe_adapt.engines.hf import HFConfig
    from moe_adapt.engines.megatron.config import MegatronConfig

    for option, schema in (("auto", AutoConfig), ("hf", HFConfig), ("megatron", MegatronConfig)):
        cfg = to_config(compose([f"engine={option}", "stages=[]", "run_dir=/tmp/unused"]))
        assert type(cfg.engine) is schema and cfg.engine.name == option
    cfg = to_config(
        compose(["engine=megatron", "engine.expert_parallel=2", "stages=[]", "run_dir=/tmp/unused"])
    )
    assert isinstance(cfg.engine, MegatronConfig) and cfg.engine.expert_parallel == 2


def test_removed_engine_keys_point_to_the_group() -> None:
    from moe_adapt.__main__ import describe

    for key in ("cpt.engine", "distill.engine"):
        with pytest.raises(Exception) as info:
            compose([f"{key}=hf", "run_dir=/tmp/unused"])
        assert describe(info.value) == f"{key} is gone: choose the engine with engine=hf|megatron|auto"
