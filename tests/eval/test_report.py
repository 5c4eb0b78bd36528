"""The sweep report renders from a synthetic Hydra multirun directory with one failed run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_adapt.errors import MoEAdaptError
from moe_adapt.eval.report import build_report, load_sweep

# condition -> seed -> metrics; easy_to_hard is better (lower loss) by a known paired amount.
RESULTS = {
    "easy_to_hard": {1: {"target_loss": 2.50, "acc": 0.61}, 2: {"target_loss": 2.47, "acc": 0.63},
                     3: {"target_loss": 2.52, "acc": 0.60}},
    "hard_to_easy": {1: {"target_loss": 2.53, "acc": 0.60}, 2: {"target_loss": 2.51, "acc": 0.61},
                     3: {"target_loss": 2.55, "acc": 0.59}},
}  # fmt: skip


def write_run(
    root: Path, idx: int, order: str, seed: int, metrics: object | None, raw: str | None = None
) -> None:
    run = root / str(idx)
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(
        f"- +recipe=hebatron\n- curriculum.order={order}\n- seed={seed}\n"
    )
    if metrics is not None or raw is not None:
        (run / "eval").mkdir()
        (run / "eval" / "metrics.json").write_text(raw if raw is not None else json.dumps(metrics))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "multirun"
    idx = 0
    for seed in (1, 2, 3):
        for order, by_seed in RESULTS.items():
            write_run(root, idx, order, seed, by_seed[seed])
            idx += 1
    write_run(root, idx, "easy_to_hard", 4, None)  # crashed before eval: no metrics file
    write_run(root, idx + 1, "hard_to_easy", 4, None, raw='{"target_loss": 2.5,')  # truncated JSON
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def test_load_sweep_reads_runs_and_failures(sweep: Path) -> None:
    s = load_sweep(sweep)
    assert [r.name for r in s.runs] == ["0", "1", "2", "3", "4", "5"]
    assert s.runs[1].overrides == {"recipe": "hebatron", "curriculum.order": "hard_to_easy", "seed": "1"}
    assert s.runs[1].seed == 1
    assert [(f.name, f.reason.split()[0]) for f in s.failed] == [("6", "no"), ("7", "unparsable")]


def test_report_renders_with_cis_paired_differences_and_failed_runs(sweep: Path, tmp_path: Path) -> None:
    contamination = tmp_path / "contamination.json"
    contamination.write_text(json.dumps({"summary": {"arabic_mmlu": {"items": 100, "contaminated": 3}}}))
    md_path = build_report(sweep, contamination=contamination, n_resamples=2000)
    md = md_path.read_text()
    assert md_path == sweep / "report.md"
    assert "8 runs: 6 used, 2 failed." in md
    assert "Swept: `curriculum.order`" in md and "`recipe=hebatron`" in md
    # Paired differences of target_loss: -0.03, -0.04, -0.03 -> mean -0.0333.
    line = next(x for x in md.splitlines() if x.startswith("| easy_to_hard vs hard_to_easy | target_loss"))
    assert "Δ target_loss −0.033 [" in line and "| 3 |" in line
    report = json.loads((sweep / "report.json").read_text())
    diff = next(c for c in report["comparisons"] if c["metric"] == "target_loss")
    assert diff["mean"] == pytest.approx(-0.1 / 3)
    # a Student t-interval over the 3 seeds: mean ± t(2) · s/√3 with t(2) = 4.303 and s = 0.00577
    half = 4.302652729911275 * 0.005773502691896257 / 3**0.5
    assert (diff["low"], diff["high"]) == pytest.approx((-0.1 / 3 - half, -0.1 / 3 + half))
    assert diff["method"] == "Student t" and report["interval_methods"] == ["Student t"]
    assert "Intervals: Student t-interval over seeds" in md and "bootstrap (" not in md
    agg = report["conditions"]["easy_to_hard"]["metrics"]["acc"]
    assert agg["mean"] == pytest.approx((0.61 + 0.63 + 0.60) / 3) and agg["n"] == 3
    assert "## Failed runs" in md and "| 6 | no metrics file 6/eval/metrics.json |" in md
    assert "unparsable JSON in 7/eval/metrics.json" in md
    assert "| arabic_mmlu | 100 | 3 |" in md
    for metric in ("acc", "target_loss"):
        assert f"![{metric}](plots/{metric}.png)" in md
        assert (sweep / "plots" / f"{metric}.png").read_bytes()[:4] == b"\x89PNG"


def test_single_seed_and_output_dir(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    write_run(root, 0, "a", 1, {"loss": 1.0})
    write_run(root, 1, "b", 1, {"loss": 1.5})
    md = build_report(root, out_dir=tmp_path / "out", n_resamples=100).read_text()
    assert "(n=1, no CI)" in md and "Δ loss −0.500 (n=1, no CI)" in md
    assert (tmp_path / "out" / "report.json").is_file()


def test_errors_name_the_problem(tmp_path: Path, sweep: Path) -> None:
    with pytest.raises(MoEAdaptError, match="does not exist"):
        build_report(tmp_path / "missing")
    with pytest.raises(MoEAdaptError, match=r"contamination file .* does not exist"):
        build_report(sweep, contamination=tmp_path / "nope.json", n_resamples=10)
    write_run(sweep, 20, "easy_to_hard", 1, {"target_loss": 2.0})
    with pytest.raises(MoEAdaptError, match=r"several runs with seed=\[1\]"):
        build_report(sweep, n_resamples=10)
    only_failed = tmp_path / "bad"
    write_run(only_failed, 0, "a", 1, None)
    with pytest.raises(MoEAdaptError, match=r"every run .* failed"):
        build_report(only_failed)
