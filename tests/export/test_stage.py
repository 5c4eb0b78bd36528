"""The export stage end to end on a tiny run directory: the source is found, expert_prune decides on
the eval stage's routing (or counts it), every artefact is measured per language, the report names
sizes, ratios and retention; bad input is one line and leaves nothing behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from moe_adapt.errors import MoEAdaptConfigError, MoEAdaptError
from moe_adapt.export.config import ExpertPruneConfig, ExportConfig, GGUFConfig
from moe_adapt.export.run import export
from moe_adapt.stages.export import source_model


def _cfg(heldout: Path | None, **kw: Any) -> ExportConfig:
    return ExportConfig(
        heldout=str(heldout) if heldout else None,
        window=32,
        stride=16,
        batch_size=4,
        max_docs_per_language=4,
        **kw,
    )


@pytest.fixture()
def run_dir(tmp_path: Path, checkpoints: dict[str, Path]) -> Path:
    shutil.copytree(checkpoints["mixtral"], tmp_path / "cpt" / "model")
    return tmp_path


def test_export_measures_every_artefact(tmp_path: Path, run_dir: Path, heldout_dir: Path) -> None:
    src = source_model(None, run_dir)
    assert src == run_dir / "cpt" / "model"
    out = tmp_path / "export"
    out.mkdir()
    cfg = _cfg(
        heldout_dir, expert_prune=ExpertPruneConfig(drop_per_layer=2), gguf=GGUFConfig(types=["f16", "q4_0"])
    )
    summary = export(cfg, src, out, seed=0, eval_dir=run_dir / "eval")
    assert set(summary["artefacts"]) == {"source", "expert_prune", "gguf-f16", "gguf-q4_0"}
    doc = json.loads((out / "retention.json").read_text())
    rows = {r["name"]: r for r in doc["rows"]}
    assert rows["source"]["retention_pct"] == pytest.approx({"ar": 100.0, "en": 100.0})
    assert rows["gguf-f16"]["retention_pct"]["ar"] == pytest.approx(100.0, abs=0.01)
    assert rows["gguf-q4_0"]["compression"] > rows["gguf-f16"]["compression"] > 1.0
    assert rows["expert_prune"]["compression"] > 1.0
    prune = doc["expert_prune"]
    assert prune["routed_mass_lost"]["source"] == "counted on held-out documents"
    assert set(prune["routed_mass_lost"]["per_language"]) == {"ar", "en"}
    assert prune["num_experts"] == {"before": 8, "after": 6}
    assert (out / "expert_prune" / "model" / "config.json").is_file()
    report = (out / "report.md").read_text()
    assert "| gguf-q4_0 |" in report and "routed mass lost" in report


def test_expert_prune_reads_the_eval_stages_routing(tmp_path: Path, run_dir: Path, heldout_dir: Path) -> None:
    src = run_dir / "cpt" / "model"
    routing = {
        "layer_ids": [0, 1],
        "counts": {"ar": [[9, 0, 9, 9, 9, 9, 9, 9]] * 2, "en": [[9, 0, 9, 9, 9, 9, 9, 1]] * 2},
    }
    (run_dir / "eval" / "routing" / "cpt").mkdir(parents=True)
    (run_dir / "eval" / "routing" / "cpt" / "routing.json").write_text(json.dumps(routing))
    models = {"cpt": {"path": str(src), "routing": {"json": "routing/cpt/routing.json"}}}
    (run_dir / "eval" / "eval.json").write_text(json.dumps({"models": models}))
    out = tmp_path / "export"
    out.mkdir()
    cfg = _cfg(
        None, methods=["expert_prune"], expert_prune=ExpertPruneConfig(drop_per_layer=2, languages=["en"])
    )
    export(cfg, src, out, seed=0, eval_dir=run_dir / "eval")
    report = json.loads((out / "expert_prune" / "report.json").read_text())
    assert report["dropped"] == {"0": [1, 7], "1": [1, 7]}
    assert report["routed_mass_lost"]["per_language"] == {"en": pytest.approx(1 / 55)}  # 1 of 55 per layer
    assert report["routed_mass_lost"]["source"].endswith("routing/cpt/routing.json")


def test_bad_input_is_one_line_and_writes_nothing(
    tmp_path: Path, checkpoints: dict[str, Path], heldout_dir: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(
        MoEAdaptError, match=r"^expert_prune needs an MoE checkpoint: .*'llama'.* no routed experts$"
    ):
        export(_cfg(heldout_dir), checkpoints["llama"], out, seed=0)
    with pytest.raises(
        MoEAdaptConfigError, match=r"^export.expert_prune.drop_per_layer=7 is invalid: leaves fewer"
    ):
        export(
            _cfg(heldout_dir, expert_prune=ExpertPruneConfig(drop_per_layer=7)),
            checkpoints["mixtral"],
            out,
            seed=0,
        )
    with pytest.raises(MoEAdaptConfigError, match=r"^export.heldout=None is invalid with expert_prune"):
        export(_cfg(None, methods=["expert_prune"]), checkpoints["mixtral"], out, seed=0)
    assert list(out.iterdir()) == []
    with pytest.raises(MoEAdaptError, match=r"^export.model=None \(auto\) found no model: none of"):
        source_model(None, tmp_path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "export.methods=[zip]",
            r"^export.methods=\['zip'\] is invalid: unknown method 'zip'; "
            r"methods: expert_prune, gguf, gptq, int8, nf4, onnx, sparsegpt, wanda$",
        ),
        (
            "export.gptq.schemes=[W3A16]",
            r"^export.gptq.schemes=\['W3A16'\] is invalid: one or more of W4A16, W8A16, W8A8, once each$",
        ),
        (
            "export.wanda.patterns=[4:8]",
            r"^export.<sparsegpt\|wanda>.patterns=\['4:8'\] is invalid: one or more of unstructured, 2:4$",
        ),
        (
            "export.gguf.types=[q2_k]",
            r"^export.gguf.types=\['q2_k'\] is invalid: pick one or more of f32, f16, q8_0, q4_0$",
        ),
        ("export.stride=999", r"^export.stride=999 is invalid: must be in \[1, export.window=256\]$"),
    ],
)
def test_config_errors_are_one_line(tmp_path: Path, override: str, message: str) -> None:
    from moe_adapt.config import compose, to_config

    with pytest.raises(MoEAdaptConfigError, match=message):
        to_config(compose([f"run_dir={tmp_path}", "stages=[export]", override]))


def test_the_runner_runs_the_stage_and_skips_it_when_complete(
    tmp_path: Path, run_dir: Path, heldout_dir: Path
) -> None:
    from moe_adapt.config import compose, to_config
    from moe_adapt.runner import MARKER, run_pipeline

    overrides = [
        f"run_dir={run_dir}",
        "stages=[export]",
        f"export.heldout={heldout_dir}",
        "export.window=32",
        "export.stride=16",
        "export.max_docs_per_language=2",
        "export.gguf.types=[q8_0]",
        "logger=none",
    ]
    raw = compose(overrides)
    run_pipeline(to_config(raw), raw)
    stage = run_dir / "export"
    assert (stage / MARKER).is_file() and (stage / "gguf" / "model-q8_0.gguf").is_file()
    assert (stage / "expert_prune" / "model" / "model.safetensors").is_file()
    before = (stage / "retention.json").stat().st_mtime_ns
    raw = compose(overrides)
    run_pipeline(to_config(raw), raw)  # complete with the same settings: skipped
    assert (stage / "retention.json").stat().st_mtime_ns == before


def test_benchmark_accuracy_per_artefact(tmp_path: Path, run_dir: Path, heldout_dir: Path) -> None:
    """export.benchmarks=true scores every artefact with the eval stage's benchmarks and scoring."""
    from moe_adapt.eval.config import BenchmarkEntry, EvalConfig
    from tests.eval.conftest import write_benchmark

    files = write_benchmark(tmp_path / "bench", malformed=False)
    ecfg = EvalConfig(
        benchmarks=[BenchmarkEntry(name="hadith_qa", files={k: str(v) for k, v in files.items()})],
        bootstrap_resamples=50,
        batch_size=4,
    )
    out = tmp_path / "export"
    out.mkdir()
    cfg = _cfg(
        None,
        methods=["expert_prune", "gguf"],
        benchmarks=True,
        expert_prune=ExpertPruneConfig(routing=str(_routing_file(tmp_path))),
        gguf=GGUFConfig(types=["f16"]),
    )
    export(cfg, run_dir / "cpt" / "model", out, seed=0, eval_cfg=ecfg)
    rows = {r["name"]: r for r in json.loads((out / "retention.json").read_text())["rows"]}
    src = rows["source"]["accuracy"]["hadith_qa"]
    assert set(src) == {"ar", "en"} and src["ar"]["items"] == 6 and len(src["ar"]["acc_ci"]) == 2
    assert rows["gguf-f16"]["accuracy"]["hadith_qa"]["en"]["acc"] == src["en"]["acc"]
    assert set(rows["expert_prune"]["accuracy_retention_pct"]) <= {"hadith_qa.ar", "hadith_qa.en"}
    assert "## Benchmark accuracy" in (out / "report.md").read_text()
    with pytest.raises(
        MoEAdaptConfigError, match=r"^export.benchmarks=true is invalid: eval.benchmarks is empty"
    ):
        export(cfg, run_dir / "cpt" / "model", tmp_path, seed=0, eval_cfg=EvalConfig())


def _routing_file(folder: Path) -> Path:
    path = folder / "routing.json"
    counts = [[5, 4, 3, 2, 1, 1, 1, 1]] * 2
    path.write_text(json.dumps({"layer_ids": [0, 1], "counts": {"ar": counts, "en": counts}}))
    return path


def test_gguf_from_the_pruned_model(tmp_path: Path, run_dir: Path) -> None:
    import gguf

    out = tmp_path / "export"
    out.mkdir()
    cfg = _cfg(
        None,
        expert_prune=ExpertPruneConfig(drop_per_layer=3, routing=str(_routing_file(tmp_path))),
        gguf=GGUFConfig(types=["q8_0"], from_pruned=True),
    )
    summary = export(cfg, run_dir / "cpt" / "model", out, seed=0)
    assert set(summary["artefacts"]) == {"source", "expert_prune", "expert_prune+gguf-q8_0"}
    reader = gguf.GGUFReader(str(out / "gguf" / "model-q8_0.gguf"))
    assert int(reader.fields["llama.expert_count"].parts[-1][0]) == 5
    with pytest.raises(MoEAdaptConfigError, match=r"^export.gguf.from_pruned=True is invalid: needs both"):
        ExportConfig(methods=["gguf"], gguf=GGUFConfig(from_pruned=True))


def test_report_plots_size_against_retention_and_counts_tokens_per_expert(
    tmp_path: Path, run_dir: Path, heldout_dir: Path
) -> None:
    out = tmp_path / "export"
    out.mkdir()
    cfg = _cfg(heldout_dir, methods=["gguf"], gguf=GGUFConfig(types=["q8_0"]))
    export(cfg, run_dir / "cpt" / "model", out, seed=0)
    png = out / "retention.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    report = (out / "report.md").read_text()
    assert "](retention.png)" in report and "Routed tokens per expert" in report
    tok = json.loads((out / "retention.json").read_text())["expert_tokens"]
    assert tok["layer_ids"] == [0, 1] and set(tok["per_language"]) == {"ar", "en"}
    total = [
        [a + e for a, e in zip(ra, re_, strict=True)]
        for ra, re_ in zip(tok["per_language"]["ar"], tok["per_language"]["en"], strict=True)
    ]
    assert tok["total"] == total and all(len(r) == 8 for r in total)
    # the counts are top-k (k=2) assignments of the measured tokens: the same sum in every layer
    assert total[0] and sum(total[0]) == sum(total[1]) > 0 and sum(total[0]) % 2 == 0
    assert tok["zero"] == {
        str(i): [e for e, c in enumerate(r) if c == 0] for i, r in enumerate(total) if 0 in r
    }


def test_no_plot_and_no_token_counts_without_heldout_text(tmp_path: Path, run_dir: Path) -> None:
    out = tmp_path / "export"
    out.mkdir()
    export(
        _cfg(None, methods=["gguf"], gguf=GGUFConfig(types=["q8_0"])), run_dir / "cpt" / "model", out, seed=0
    )
    assert not (out / "retention.png").exists()
    assert "expert_tokens" not in json.loads((out / "retention.json").read_text())
    assert "retention.png" not in (out / "report.md").read_text()


def test_an_expert_no_token_reached_is_flagged() -> None:
    import numpy as np

    from moe_adapt.export.expert_prune import RoutingCounts
    from moe_adapt.export.retention import expert_tokens, render_report, retention_table

    routing = RoutingCounts(
        [0, 3], {"ar": np.array([[3, 0, 1], [2, 2, 0]]), "en": np.array([[1, 0, 0], [0, 1, 3]])}, "x"
    )
    tok = expert_tokens(routing)
    assert tok["total"] == [[4, 0, 1], [2, 3, 3]]
    assert tok["zero"] == {"0": [1]}
    rows = retention_table([{"name": "source", "path": "s", "bytes": 10}])
    report = render_report(rows, {"expert_tokens": tok})
    assert "| 0 | 3 | 0 | 1 | 4 | 1 |" in report and "| 3 | 3 | 2 | 3 | 3 | - |" in report
