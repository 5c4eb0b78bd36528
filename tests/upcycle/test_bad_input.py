"""Bad input gets one clear error and nothing is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from moe_adapt.config import compose, to_config
from moe_adapt.errors import CheckpointError, MoEAdaptConfigError, MoEAdaptError
from moe_adapt.runner import run_pipeline


def run_upcycle(tmp_path: Path, dense: Path | str, *overrides: str) -> Path:
    run_dir = tmp_path / "run"
    raw = compose([f"run_dir={run_dir}", f"model.dense={dense}", "stages=[upcycle]", *overrides])
    run_pipeline(to_config(raw), raw)
    return run_dir


def assert_nothing_written(run_dir: Path) -> None:
    leftovers = [p.name for p in run_dir.iterdir() if p.name != "config.json"] if run_dir.exists() else []
    assert leftovers == []


def copy_dense(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d, t: t / "missing", "does not exist"),
        (lambda d, t: (t / "file").write_text("x") and t / "file", "is a file"),
        (lambda d, t: (t / "empty").mkdir() or t / "empty", "has no config.json"),
    ],
    ids=["missing", "file", "no-config"],
)
def test_missing_checkpoint(dense_factory, tmp_path, make, message):
    with pytest.raises(CheckpointError, match=message):
        run_upcycle(tmp_path, make(dense_factory("llama"), tmp_path))
    assert_nothing_written(tmp_path / "run")


def test_pickle_only_checkpoint_is_refused(dense_factory, tmp_path):
    dense = copy_dense(dense_factory("llama"), tmp_path / "d")
    (dense / "model.safetensors").rename(dense / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        run_upcycle(tmp_path, dense)


@pytest.mark.parametrize("damage", ["truncate", "garbage-header", "short-header"])
def test_corrupt_checkpoint(dense_factory, tmp_path, damage):
    dense = copy_dense(dense_factory("llama"), tmp_path / "d")
    weights = dense / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "garbage-header":
        weights.write_bytes(data[:8] + b"{not json" + data[17:])
    else:
        weights.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        run_upcycle(tmp_path, dense)
    assert_nothing_written(tmp_path / "run")


def test_corrupt_config_json(dense_factory, tmp_path):
    dense = copy_dense(dense_factory("llama"), tmp_path / "d")
    (dense / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="config.json"):
        run_upcycle(tmp_path, dense)


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50)).save_pretrained(path)
    with pytest.raises(MoEAdaptConfigError, match="model_type='gpt2'.*supported families are llama, mistral"):
        run_upcycle(tmp_path, path)
    # naming the target does not make GPT-2's FFN upcyclable: its tensor names are checked
    with pytest.raises(CheckpointError, match="no model.layers.0.mlp.gate_proj.weight"):
        run_upcycle(tmp_path, path, "upcycle.target=mixtral")
    assert_nothing_written(tmp_path / "run")


@pytest.mark.parametrize(
    ("family", "overrides", "message"),
    [
        ("llama", ["upcycle.granularity=3", "upcycle.num_experts=6"], "must divide"),
        ("llama", ["upcycle.shared_experts=1", "upcycle.num_experts=6"], "mixtral has no shared expert"),
        ("qwen3", ["upcycle.target=mixtral"], "q/k norms"),
        ("qwen2", ["upcycle.target=mixtral"], "q/k/v projection biases"),
        ("llama", ["upcycle.target=qwen3_moe"], "always applies q/k norms"),
        ("qwen3", ["upcycle.shared_experts=1", "upcycle.num_experts=6"], "qwen3_moe has no shared expert"),
    ],
)
def test_target_that_cannot_express_the_source(dense_factory, tmp_path, family, overrides, message):
    with pytest.raises(MoEAdaptError, match=message):
        run_upcycle(tmp_path, dense_factory(family), *overrides)
    assert_nothing_written(tmp_path / "run")


def test_allow_inexact_writes_and_reports(dense_factory, tmp_path):
    run_dir = run_upcycle(
        tmp_path, dense_factory("qwen3"), "upcycle.target=mixtral", "upcycle.allow_inexact=true"
    )
    report = json.loads((run_dir / "upcycle" / "report.json").read_text())
    assert not report["exact"] and any("q/k norms" in r for r in report["inexact_reasons"])
    assert report["verify"]["max_rel_diff"] > 1e-3  # measured and reported, not enforced


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["upcycle.top_k=6"],
            "upcycle.top_k=6 is invalid: must be a multiple of .* = 4 \\(got remainder 2\\)",
        ),
        (["upcycle=copy", "upcycle.granularity=2"], "upcycle=copy makes whole-FFN experts"),
        (["upcycle.shared_experts=4"], "shared_experts=4 is invalid"),
        (["upcycle.active_fraction=0.05"], "give num_experts or active_fraction, not both"),
        (["upcycle.num_experts=null", "upcycle.active_fraction=1.5"], "must be in \\(0, 1\\)"),
        (["upcycle.drop_ratio=0.5"], "only upcycle=drop"),
        (["upcycle=drop", "upcycle.drop_ratio=2"], "must be in \\[0, 1\\]"),
        (["upcycle.target=llama"], "choose one of auto, mixtral, qwen2_moe, qwen3_moe"),
        (["upcycle.router_init=random"], "random rows cannot keep the 4 shards"),
        (["upcycle.dtype=int8"], "choose one of auto, float32"),
    ],
)
def test_config_errors_at_compose_time(tmp_path, overrides, message):
    raw = compose([f"run_dir={tmp_path}", "model.dense=/x", *overrides])
    with pytest.raises(MoEAdaptConfigError, match=message):
        to_config(raw)


def test_model_dense_required_only_by_upcycle(tmp_path):
    with pytest.raises(MoEAdaptConfigError, match="model.dense is required by stage upcycle"):
        to_config(compose([f"run_dir={tmp_path}"]))
    to_config(compose([f"run_dir={tmp_path}", "stages=[init_dense]"]))
