"""The runner: stages in order, atomic stage folders, skip when complete, refuse stale settings."""

from __future__ import annotations

import json

import pytest

from moe_adapt import runner
from moe_adapt.config import compose, to_config
from moe_adapt.errors import MoEAdaptConfigError
from moe_adapt.redact import redact
from moe_adapt.runner import MARKER, run_pipeline

FAST = [
    "stages=[init_dense,upcycle]",
    "init_dense.tokenizer_corpus=builtin",
    "init_dense.vocab_size=384",
    "init_dense.pretrain.steps=0",  # a random model: the runner's behaviour is what is tested here
]


def run(tmp_path, *overrides):
    raw = compose(["+recipe=tiny", f"run_dir={tmp_path}", *FAST, *overrides])
    return run_pipeline(to_config(raw), raw)


def test_tiny_pipeline_skips_complete_stages_and_refuses_changed_settings(tmp_path, caplog):
    first = run(tmp_path)
    assert first["upcycle"]["verify"]["max_rel_diff"] < 1e-5
    marker = json.loads((tmp_path / "upcycle" / MARKER).read_text())
    assert marker["settings"]["upcycle"]["granularity"] == 4
    stamp = (tmp_path / "upcycle" / MARKER).stat().st_mtime_ns

    caplog.set_level("INFO")
    second = run(tmp_path)
    assert (tmp_path / "upcycle" / MARKER).stat().st_mtime_ns == stamp
    assert "upcycle: complete" in caplog.text and second["upcycle"] == first["upcycle"]

    with pytest.raises(
        MoEAdaptConfigError, match=r"stage upcycle .* other settings \(upcycle.num_experts: 16 -> 8"
    ):
        run(tmp_path, "upcycle.num_experts=8")

    third = run(tmp_path, "upcycle.num_experts=8", "force=[upcycle]")
    assert third["upcycle"]["params"]["total"] < first["upcycle"]["params"]["total"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "init_dense", "upcycle"]


def test_rebuilding_a_stage_reruns_the_stages_after_it(tmp_path, caplog):
    run(tmp_path)
    caplog.set_level("INFO")
    run(tmp_path, "force=[init_dense]")
    assert "upcycle: its inputs were just rebuilt" in caplog.text


def test_a_crashing_stage_leaves_no_folder(tmp_path, monkeypatch):
    def boom(ctx):
        (ctx.out / "partial").write_text("half")
        raise RuntimeError("killed")

    monkeypatch.setitem(runner.STAGES, "init_dense", runner.Stage("init_dense", boom, ("seed",)))
    with pytest.raises(RuntimeError, match="killed"):
        run(tmp_path, "stages=[init_dense]")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_secrets_are_redacted():
    cfg = {"logger": {"wandb_api_key": "abc", "project": "p"}, "hf_token": "t", "x": [{"password": "pw"}]}
    assert redact(cfg) == {
        "logger": {"wandb_api_key": "***", "project": "p"},
        "hf_token": "***",
        "x": [{"password": "***"}],
    }
    kept = {"data": {"tokenize": {"tokenizer": "/tok"}}, "max_tokens": 5, "auth": "", "access_token": None}
    assert redact(kept) == kept  # tokenizer settings are not secrets; empty values stay as they are
