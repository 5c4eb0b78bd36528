"""The eval stage end to end on a tiny dense Llama and a tiny Qwen3-MoE, and its bad inputs."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest

from moe_adapt.errors import MoEAdaptError
from moe_adapt.eval.evaluate import evaluate


def run_eval(cfg, out):
    """The eval stage as :mod:`moe_adapt.stages.eval` runs it: ``cfg.eval`` into ``out``, ``cfg.seed``."""
    return evaluate(cfg.eval, out, seed=cfg.seed)


@pytest.fixture(scope="module")
def result(
    tmp_path_factory: pytest.TempPathFactory, run_dir: Path, checkpoints: dict[str, Path], make_cfg
) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("eval_out")
    summary = run_eval(make_cfg(run_dir, checkpoints), out)
    return out, summary


def test_outputs_and_summary(result: tuple[Path, dict]) -> None:
    out, summary = result
    for rel in ("metrics.json", "eval.json", "report.md"):
        assert (out / rel).is_file()
    assert summary["metrics"] == "metrics.json" and summary["models"] == ["dense", "moe"]
    assert summary["malformed_items"] == 2  # one bad line per language, counted and skipped
    json.dumps(summary)


def test_flat_metrics(result: tuple[Path, dict]) -> None:
    metrics = json.loads((result[0] / "metrics.json").read_text())
    for model in ("dense", "moe"):
        for lang in ("ar", "en"):
            loss = metrics[f"{model}/loss_{lang}"]
            assert math.isfinite(loss) and 0 < loss < 10  # random 128-token vocab: about ln 128 = 4.85
            assert math.isclose(metrics[f"{model}/ppl_{lang}"], math.exp(loss), rel_tol=1e-9)
            assert 0 <= metrics[f"{model}/hadith_qa.acc_{lang}"] <= 1
            assert 0 <= metrics[f"{model}/hadith_qa.ece_{lang}"] <= 1
        assert 0 <= metrics[f"{model}/hadith_qa.lpg_ar"] <= 1
        assert 0 <= metrics[f"{model}/hadith_qa.clcs_ar"] <= 1
    assert 0 <= metrics["moe/routing.jsd_ar_en"] <= math.log(2)
    assert not any(k.startswith("dense/routing") for k in metrics)
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())


def test_eval_json_details(result: tuple[Path, dict]) -> None:
    data = json.loads((result[0] / "eval.json").read_text())
    assert data["heldout"]["documents"] == {"ar": 8, "en": 8}
    bench = data["benchmarks"]["hadith_qa"]
    assert bench["ar"]["items"] == 6 and bench["ar"]["malformed"] == 1
    assert "line 3" in bench["ar"]["malformed_examples"][0]
    moe, dense = data["models"]["moe"], data["models"]["dense"]
    assert moe["moe"] and not dense["moe"] and "routing" not in dense
    bil = moe["benchmarks"]["hadith_qa"]["bilingual"]["ar"]
    assert bil["n_pairs"] == 6 and bil["source"] == "en" and bil["answer_mismatch"] == 0
    lo, hi = moe["benchmarks"]["hadith_qa"]["languages"]["en"]["acc_ci"]
    assert lo <= moe["benchmarks"]["hadith_qa"]["languages"]["en"]["acc"] <= hi


def test_routing_files_and_report(result: tuple[Path, dict]) -> None:
    out = result[0]
    assert (out / "routing" / "moe" / "routing.json").is_file()
    for png in ("routing_heatmap.png", "routing_jsd.png"):
        assert (out / "routing" / "moe" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "routing" / "dense").exists()
    md = (out / "report.md").read_text()
    for text in ("Held-out loss", "hadith_qa", "LPG", "routing/moe/routing_heatmap.png", "## Contamination"):
        assert text in md
    assert "| hadith_qa_ar | 6 | 2 | 2 |" in md  # the per-benchmark contamination row


def test_bits_per_byte_beside_the_loss(result: tuple[Path, dict]) -> None:
    """Every held-out loss has its bits per byte/char, from the manifest's tokenizer, in eval.json,
    metrics.json and report.md."""
    out = result[0]
    data = json.loads((out / "eval.json").read_text())
    # the fixture's tokenizer splits on whitespace and has no decoder: sizes by decoding each token
    assert data["heldout"]["bytes_from"] == "decode"
    metrics = json.loads((out / "metrics.json").read_text())
    for name, model in data["models"].items():
        for lang, h in model["heldout"].items():
            assert 0 < h["chars"] <= h["bytes"]
            assert h["bits_per_byte"] == pytest.approx(h["nll_sum"] / math.log(2) / h["bytes"])
            assert h["bits_per_char"] == pytest.approx(h["nll_sum"] / math.log(2) / h["chars"])
            assert metrics[f"{name}/bpb_{lang}"] == h["bits_per_byte"]
        # Arabic letters are two UTF-8 bytes, English ones one
        ar, en = model["heldout"]["ar"], model["heldout"]["en"]
        assert ar["bytes"] / ar["chars"] > 1.5 > en["bytes"] / en["chars"]
    md = (out / "report.md").read_text()
    assert "| model | ar loss (ppl) | ar bits/byte | en loss (ppl) | en bits/byte |" in md
    bpb = data["models"]["dense"]["heldout"]["ar"]["bits_per_byte"]
    assert f"| {bpb:.4f} |" in md


def test_logs_table(run_dir: Path, checkpoints: dict[str, Path], tmp_path: Path, make_cfg, caplog) -> None:
    cfg = make_cfg(run_dir, {"dense": checkpoints["dense"]}, benchmarks=[], max_docs_per_language=2)
    with caplog.at_level(logging.INFO, logger="moe_adapt.eval"):
        run_eval(cfg, tmp_path)
    lines = [r.getMessage() for r in caplog.records if r.name == "moe_adapt.eval"]
    assert any("loss_ar" in m and "bpb_ar" in m and "loss_en" in m and "bpb_en" in m for m in lines)
    assert any(m.startswith("eval: dense ") for m in lines)
    assert json.loads((tmp_path / "eval.json").read_text())["heldout"]["documents"] == {"ar": 2, "en": 2}


def test_missing_checkpoint(run_dir: Path, checkpoints: dict[str, Path], tmp_path: Path, make_cfg) -> None:
    cfg = make_cfg(run_dir, {"dense": checkpoints["dense"], "moe": tmp_path / "nope"})
    with pytest.raises(MoEAdaptError, match=r"eval\.models\[1\]\.path='.*nope' does not exist"):
        run_eval(cfg, tmp_path / "out")


def test_missing_heldout(run_dir: Path, checkpoints: dict[str, Path], tmp_path: Path, make_cfg) -> None:
    cfg = make_cfg(run_dir, checkpoints, heldout=str(tmp_path / "missing"))
    with pytest.raises(MoEAdaptError, match=r"eval\.heldout=.*missing.* does not exist"):
        run_eval(cfg, tmp_path / "out")


def test_unknown_language(run_dir: Path, checkpoints: dict[str, Path], tmp_path: Path, make_cfg) -> None:
    cfg = make_cfg(run_dir, checkpoints, languages=["he"])
    with pytest.raises(MoEAdaptError, match=r"eval\.languages=.*no shard for \['he'\]"):
        run_eval(cfg, tmp_path / "out")


def test_missing_benchmark_file(
    run_dir: Path, checkpoints: dict[str, Path], tmp_path: Path, make_cfg
) -> None:
    cfg = make_cfg(run_dir, checkpoints)
    cfg.eval.benchmarks[0].files["ar"] = str(tmp_path / "none.jsonl")
    with pytest.raises(
        MoEAdaptError, match=r"eval\.benchmarks\[0\]\.files\.ar=.*none\.jsonl' does not exist"
    ):
        run_eval(cfg, tmp_path / "out")


def test_no_heldout_no_contamination(
    run_dir: Path, checkpoints: dict[str, Path], tmp_path: Path, make_cfg
) -> None:
    cfg = make_cfg(
        run_dir, {"moe": checkpoints["moe"]}, heldout=None, contamination=str(tmp_path / "absent.json")
    )
    run_eval(cfg, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert "moe/hadith_qa.acc_ar" in metrics and not any("loss_" in k or "routing" in k for k in metrics)
    assert "No contamination report" in (tmp_path / "report.md").read_text()


def test_checkpoint_without_tokenizer_uses_manifest(
    run_dir: Path, checkpoints: dict[str, Path], tmp_path: Path, make_cfg
) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(checkpoints["dense"], bare)
    for f in bare.glob("tokenizer*"):
        f.unlink()
    cfg = make_cfg(run_dir, {"bare": bare}, routing=False)
    run_eval(cfg, tmp_path / "out")
    assert "bare/hadith_qa.acc_en" in json.loads((tmp_path / "out" / "metrics.json").read_text())
