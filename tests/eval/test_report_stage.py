"""The report stage on a synthetic multirun sweep directory, with failed runs skipped."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from moe_adapt.errors import MoEAdaptConfigError
from moe_adapt.eval.config import ReportConfig
from moe_adapt.eval.report import write_report


def _job(root: Path, num: int, overrides: list[str], metrics: dict | str | None) -> None:
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if metrics is not None:
        (job / "eval").mkdir()
        text = metrics if isinstance(metrics, str) else json.dumps(metrics)
        (job / "eval" / "metrics.json").write_text(text)


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "tiny-multirun" / "2025-01-01_00-00-00"
    num = 0
    for order, base in (("easy_to_hard", 2.0), ("hard_to_easy", 2.2)):
        for seed in (1, 2, 3):
            metrics = {"moe/loss_ar": base + 0.01 * seed, "moe/hadith_qa.acc_ar": 0.5 + 0.02 * seed}
            _job(root, num, [f"curriculum.order={order}", f"seed={seed}"], metrics)
            num += 1
    _job(root, num, ["curriculum.order=easy_to_hard", "seed=4"], None)  # crashed before eval
    _job(root, num + 1, ["curriculum.order=hard_to_easy", "seed=4"], "{not json")
    return root


def _cfg(**kw) -> SimpleNamespace:
    return SimpleNamespace(report=ReportConfig(**kw), seed=0)


def run_report(cfg: SimpleNamespace, out: Path) -> dict:
    """The report stage as :mod:`moe_adapt.stages.report` runs it."""
    return write_report(cfg.report, out, seed=cfg.seed)


def test_report_renders_and_skips_failed(sweep: Path, tmp_path: Path) -> None:
    contamination = tmp_path / "contamination.json"
    contamination.write_text(json.dumps({"docs_removed": 5, "benchmarks": {"hadith_qa_ar": {"items": 50}}}))
    out = tmp_path / "report"
    out.mkdir()
    summary = run_report(_cfg(sweep_dir=str(sweep), n_resamples=500, contamination=str(contamination)), out)
    assert summary["runs"] == 6 and summary["failed"] == ["6", "7"]
    assert summary["report"] == "report.md" and len(summary["plots"]) == 2
    for p in summary["plots"]:
        assert (out / p).read_bytes()[:4] == b"\x89PNG"
    md = (out / "report.md").read_text()
    assert (
        "easy_to_hard (3 seeds)" in md
        and "`curriculum.order`" in md
        and "Failed runs" in md
        and "no metrics file" in md
    )
    assert "## Contamination" in md and "| hadith_qa_ar | 50 |" in md
    data = json.loads((out / "report.json").read_text())
    assert len(data["comparisons"]) == 2 and data["bootstrap"]["n_resamples"] == 500


def test_report_metric_subset(sweep: Path, tmp_path: Path) -> None:
    summary = run_report(_cfg(sweep_dir=str(sweep), metrics=["moe/loss_ar"], n_resamples=100), tmp_path)
    assert summary["plots"] == ["plots/moe_loss_ar.png"]


def test_report_needs_sweep_dir(tmp_path: Path) -> None:
    with pytest.raises(MoEAdaptConfigError, match=r"report\.sweep_dir=None is invalid"):
        run_report(_cfg(), tmp_path)
    with pytest.raises(MoEAdaptConfigError, match=r"report\.sweep_dir='.*nowhere' is invalid"):
        run_report(_cfg(sweep_dir=str(tmp_path / "nowhere")), tmp_path)
