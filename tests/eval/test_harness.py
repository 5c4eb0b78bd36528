"""lm-evaluation-harness integration: the shipped local-file tasks run in-process on a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_adapt.errors import MoEAdaptConfigError, MoEAdaptError
from moe_adapt.eval.harness import render_tasks, run_harness, shipped_tasks

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def model_and_tokenizer(checkpoints: dict[str, Path]):
    from transformers import AutoTokenizer

    from moe_adapt.checkpoint.hf import load_causal_lm

    path = checkpoints["moe"]
    return load_causal_lm(path), AutoTokenizer.from_pretrained(path, local_files_only=True)


def test_shipped_tasks_render(run_dir: Path, tmp_path: Path) -> None:
    assert shipped_tasks() == ["hadith_qa_ar", "hadith_qa_en"]
    skipped = render_tasks(tmp_path / "tasks", run_dir / "data" / "benchmarks")
    assert skipped == {"hadith_qa_ar": 1, "hadith_qa_en": 1}  # the malformed line is left out of the copy
    text = (tmp_path / "tasks" / "hadith_qa_ar.yaml").read_text()
    assert (
        f"{(tmp_path / 'tasks' / 'data').resolve()}/hadith_qa_ar.jsonl" in text
        and "@BENCHMARKS_DIR@" not in text
    )
    assert len((tmp_path / "tasks" / "data" / "hadith_qa_ar.jsonl").read_text().splitlines()) == 6
    assert render_tasks(tmp_path / "none", tmp_path / "empty") == {}


def test_harness_task_scores(model_and_tokenizer, run_dir: Path, tmp_path: Path) -> None:
    model, tok = model_and_tokenizer
    scores = run_harness(
        model,
        tok,
        ["hadith_qa_ar", "hadith_qa_en"],
        tmp_path,
        data_dir=run_dir / "data" / "benchmarks",
        batch_size=4,
    )
    assert set(scores) == {"hadith_qa_ar", "hadith_qa_en"}
    for task in scores.values():
        assert 0.0 <= task["acc"] <= 1.0 and 0.0 <= task["acc_norm"] <= 1.0


def test_unknown_task(model_and_tokenizer, run_dir: Path, tmp_path: Path) -> None:
    model, tok = model_and_tokenizer
    with pytest.raises(
        MoEAdaptConfigError, match=r"eval\.harness_tasks=.*unknown task\(s\) \['arabicmmlu'\]"
    ):
        run_harness(model, tok, ["arabicmmlu"], tmp_path, data_dir=run_dir / "data" / "benchmarks")


def test_missing_data(model_and_tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok = model_and_tokenizer
    monkeypatch.delenv("MOE_ADAPT_BENCHMARKS", raising=False)
    with pytest.raises(MoEAdaptConfigError, match=r"eval\.harness_data_dir=None"):
        run_harness(model, tok, ["hadith_qa_ar"], tmp_path)
    with pytest.raises(MoEAdaptError, match=r"data file .*hadith_qa_ar\.jsonl' does not exist"):
        run_harness(model, tok, ["hadith_qa_ar"], tmp_path, data_dir=tmp_path / "empty")


def test_eval_stage_runs_harness(
    run_dir: Path, checkpoints: dict[str, Path], tmp_path: Path, make_cfg
) -> None:
    import json

    from moe_adapt.eval.evaluate import evaluate

    cfg = make_cfg(
        run_dir,
        {"moe": checkpoints["moe"]},
        heldout=None,
        benchmarks=[],
        harness_tasks=["hadith_qa"],  # the tag: both languages
        harness_data_dir=str(run_dir / "data" / "benchmarks"),
    )
    evaluate(cfg.eval, tmp_path, seed=cfg.seed)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for lang in ("ar", "en"):
        assert 0.0 <= metrics[f"moe/harness.hadith_qa_{lang}.acc"] <= 1.0
    assert "## lm-evaluation-harness" in (tmp_path / "report.md").read_text()
