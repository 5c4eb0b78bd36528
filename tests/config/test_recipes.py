"""The paper recipes (issue 14): each prints with ``--cfg job`` without the user's paths, refuses to run
without them in one line naming the first and what to pass, keeps its stages and methods at
``scale=smoke``, and ships a sweep over keys that exist. One recipe runs end to end at smoke scale
(slow)."""

from __future__ import annotations

import json
import time

import pytest
from omegaconf import OmegaConf

from moe_adapt.config import compose, conf_dir, recipes_dir, required_keys, to_config
from moe_adapt.errors import MoEAdaptConfigError
from moe_adapt.resume import MARKER
from tests.test_cli import cli

PAPER_RECIPES = ("acai", "arabic_r1", "hebatron", "marco_moe")

FIRST_REQUIRED = {
    "acai": "model.dense",
    "arabic_r1": "model.dense",
    "hebatron": "data.sources[0].path",
    "marco_moe": "model.dense",
}


def test_the_paper_recipes_ship():
    assert set(PAPER_RECIPES) <= {p.stem for p in recipes_dir().glob("*.yaml")}


@pytest.mark.parametrize("recipe", PAPER_RECIPES)
def test_cfg_job_prints_a_recipe_without_paths(recipe):
    proc = cli(f"+recipe={recipe}", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    assert "stages:" in proc.stdout and "${required:}" in proc.stdout


@pytest.mark.parametrize("recipe", PAPER_RECIPES)
def test_a_missing_path_is_one_line_naming_it(tmp_path, recipe):
    raw = compose([f"+recipe={recipe}", f"run_dir={tmp_path}"])
    first = FIRST_REQUIRED[recipe]
    assert required_keys(raw)[0] == first
    with pytest.raises(MoEAdaptConfigError) as err:
        to_config(raw)
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"{first}")
    assert f"pass {first.replace('[0]', '.0')}=/path/to/" in line and "scale=smoke" in line


def test_the_cli_refuses_a_missing_path_before_any_stage(tmp_path):
    proc = cli("+recipe=hebatron", f"run_dir={tmp_path}", "data.sources.0.path=/a", "data.sources.1.path=/b")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    # (only the error line: other lines would be another package's warnings, e.g. a Hydra plugin's)
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        "error: cpt.init_from is required: pass cpt.init_from=/path/to/hf_checkpoint (continued pretraining "
        "starts from it: a local HF folder with config.json and *.safetensors); also required: "
        "distill.prompts (or add scale=smoke to run the "
        "recipe on the demo)"
    ]
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("recipe", PAPER_RECIPES)
def test_smoke_scale_keeps_the_stages_and_methods(tmp_path, recipe):
    full = compose([f"+recipe={recipe}", f"run_dir={tmp_path}"])
    smoke = to_config(compose([f"+recipe={recipe}", f"run_dir={tmp_path}", "scale=smoke"]))
    # the recipe's stages in order; the demo's init_dense (and teacher) make what the user would pass
    assert [s for s in smoke.stages if s not in ("init_dense", "teacher", "upcycle")] == [
        s for s in full.stages if s != "upcycle"
    ]
    assert smoke.distill.phases == list(full.distill.phases)
    assert smoke.upcycle.method.name == full.upcycle.method
    assert smoke.upcycle.granularity <= full.upcycle.granularity
    assert smoke.curriculum.num_phases == len(full.curriculum.phase_steps or []) + 1
    assert (
        smoke.curriculum.order == full.curriculum.order
        and smoke.curriculum.buckets == full.curriculum.buckets
    )
    assert (smoke.mixture.phase_weights is None) == (full.mixture.phase_weights is None)
    assert smoke.distill.select.theta == full.distill.select.theta
    assert smoke.data.demo.enabled and not smoke.data.sources
    assert smoke.run_name == f"smoke_{recipe}"
    assert smoke.cpt.max_steps < full.cpt.max_steps


@pytest.mark.parametrize("recipe", PAPER_RECIPES)
def test_each_recipe_ships_a_sweep_that_composes_at_smoke_scale(tmp_path, recipe):
    params = OmegaConf.load(recipes_dir() / f"{recipe}.yaml").hydra.sweeper.params
    assert "seed" in params and len(params) >= 2
    smoke = conf_dir() / "scale" / "smoke" / f"{recipe}.yaml"
    if smoke.is_file() and OmegaConf.select(OmegaConf.load(smoke), "hydra.sweeper.params"):
        params = OmegaConf.merge(params, OmegaConf.load(smoke).hydra.sweeper.params)
    base = [f"+recipe={recipe}", f"run_dir={tmp_path}", "scale=smoke"]
    for key, values in params.items():
        if key == "seed":
            continue
        for value in str(values).split(","):
            overrides = [f"{k}={str(v).split(',')[0]}" for k, v in params.items() if k not in (key, "seed")]
            cfg = to_config(compose([*base, *overrides, f"{key}={value}"]))
            got = OmegaConf.select(OmegaConf.structured(cfg), str(key))
            assert ("null" if got is None else str(got)) == value, (key, value)


@pytest.mark.slow
def test_hebatron_runs_end_to_end_at_smoke_scale(tmp_path):
    """``python -m moe_adapt +recipe=hebatron scale=smoke`` as the README gives it (in a run_dir)."""
    start = time.monotonic()
    proc = cli("+recipe=hebatron", "scale=smoke", f"run_dir={tmp_path}")
    seconds = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("init_dense", "data", "upcycle", "cpt", "teacher", "distill", "eval"):
        assert (tmp_path / stage / MARKER).is_file(), stage
    summary = json.loads((tmp_path / "cpt" / "summary.json").read_text())
    assert "forgetting" in summary
    assert (tmp_path / "distill" / "model" / "config.json").is_file()
    assert (tmp_path / "eval" / "metrics.json").is_file()
    print(f"hebatron smoke: {seconds:.0f} s")
