"""eval.models=[] (the default) follows the pipeline: model.dense and the run's newest model (issue 13)."""

from __future__ import annotations

import pytest

from moe_adapt.config import compose, to_config
from moe_adapt.errors import MoEAdaptError
from moe_adapt.stages.eval import default_models


def _checkpoint(folder):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    return folder


def test_default_models_follow_the_newest_stage_output(tmp_path):
    dense = _checkpoint(tmp_path / "dense")
    run = tmp_path / "run"
    cfg = to_config(compose([f"run_dir={run}", f"model.dense={dense}", "stages=[eval]"]))
    assert cfg.eval.models == []
    assert [(m.name, m.path) for m in default_models(cfg)] == [("dense", str(dense))]
    _checkpoint(run / "upcycle" / "model")
    assert [m.name for m in default_models(cfg)] == ["dense", "moe"]
    _checkpoint(run / "cpt" / "model")
    assert [m.name for m in default_models(cfg)] == ["dense", "cpt"]
    _checkpoint(run / "distill" / "model")
    models = default_models(cfg)
    assert [m.name for m in models] == ["dense", "distill"]
    assert models[1].path == str(run / "distill" / "model")


def test_default_models_without_any_model_is_one_line(tmp_path):
    cfg = to_config(compose([f"run_dir={tmp_path}", "stages=[eval]"]))
    with pytest.raises(MoEAdaptError, match=r"eval.models=\[\] \(auto\) found no model") as err:
        default_models(cfg)
    assert "upcycle/model" in str(err.value) and "\n" not in str(err.value)
