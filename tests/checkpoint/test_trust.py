"""Trust edges of loading a checkpoint: pickle weights are refused, not unpickled; code shipped with a
checkpoint runs only when asked, and then with a warning."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from moe_adapt.checkpoint import hf
from moe_adapt.checkpoint.hf import load_causal_lm
from moe_adapt.errors import CheckpointError
from tests.conftest import build_dense, pickle_checkpoint


@pytest.fixture(scope="module")
def pickled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint saved with pickle weights (``pytorch_model.bin``) and no safetensors."""
    root = tmp_path_factory.mktemp("pickled")
    pickle_checkpoint(build_dense(root / "safe", "llama"), root / "bin")
    assert (root / "bin" / "pytorch_model.bin").is_file() and not list((root / "bin").glob("*.safetensors"))
    return root / "bin"


def one_line_refusal(err: BaseException, path: Path, what: str) -> None:
    line = str(err)
    assert "\n" not in line and f"{what}={path}" in line, line
    assert "safetensors only" in line and "save_pretrained(dir, safe_serialization=True)" in line, line


def test_the_one_loader_refuses_pickle_weights(pickled: Path) -> None:
    with pytest.raises(CheckpointError) as info:
        load_causal_lm(pickled, what="cpt.init_from")
    one_line_refusal(info.value, pickled, "cpt.init_from")


def test_the_upcycle_check_refuses_pickle_weights(pickled: Path) -> None:
    """upcycle's logit check loaded the dense model with from_pretrained, which unpickles a .bin."""
    from moe_adapt.upcycle.verify import load_fp32

    with pytest.raises(CheckpointError) as info:
        load_fp32(pickled, what="model.dense")
    one_line_refusal(info.value, pickled, "model.dense")


def test_trusting_remote_code_warns_once_naming_the_checkpoint(
    dense_factory, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moe_adapt.upcycle.layouts import load_source_config

    monkeypatch.setattr(hf, "_warned_remote_code", set())
    dense = dense_factory("llama")
    with caplog.at_level(logging.WARNING, logger="moe_adapt"):
        load_causal_lm(dense)
        assert not caplog.records  # no trust, no warning
        load_causal_lm(dense, torch.float32, trust_remote_code=True)
        load_source_config(str(dense), trust_remote_code=True)
        load_causal_lm(dense, trust_remote_code=True)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]  # once per process and checkpoint
    message = warnings[0].getMessage()
    assert str(Path(dense).absolute()) in message and "trust_remote_code" in message
    assert "Python code shipped with the checkpoint" in message and "will run" in message

    monkeypatch.setattr(hf, "_warned_remote_code", set())
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="moe_adapt"):
        load_source_config(str(dense), trust_remote_code=True)  # the config's code runs too
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
