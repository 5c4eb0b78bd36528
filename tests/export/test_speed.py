"""CPU tokens/s in the retention report: transformers, llama.cpp (both bindings, each skipped when not
installed) and onnxruntime (skipped without the onnx extra) time greedy decoding of a tiny Mixtral
built in the test; the stage fills the column per artefact, says why a cell is empty, and with
``export.speed.enabled=false`` writes no column and starts no runtime."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import pytest

from moe_adapt.errors import MoEAdaptConfigError
from moe_adapt.export import speed as export_speed
from moe_adapt.export.config import ExportConfig, GGUFConfig, SpeedConfig
from moe_adapt.export.run import export

FAST = SpeedConfig(new_tokens=4, repeats=2)


def _positive(row: dict[str, Any], langs: set[str]) -> None:
    assert row["runtime"], row
    assert set(row["tokens_per_s"]) == langs
    for lang, v in row["tokens_per_s"].items():
        assert math.isfinite(v) and v > 0, (lang, v)
        assert len(row["runs"][lang]) == FAST.repeats


@pytest.fixture(scope="module")
def ids(checkpoints: dict[str, Path]) -> dict[str, list[int]]:
    return export_speed.prompt_ids(checkpoints["mixtral"], FAST.prompts)


@pytest.fixture(scope="module")
def gguf_file(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from moe_adapt.export.gguf import write_gguf

    file = tmp_path_factory.mktemp("speed") / "model-f16.gguf"
    write_gguf(checkpoints["mixtral"], file, "f16")
    return file


def test_transformers_generate_is_timed(checkpoints: dict[str, Path], ids: dict[str, list[int]]) -> None:
    row = export_speed.hf_speed(checkpoints["mixtral"], ids, FAST)
    _positive(row, {"ar", "en"})
    assert row["runtime"].startswith("transformers") and row["new_tokens"] == 4


@pytest.mark.parametrize("runtime", ["xllamacpp", "llama_cpp"])
def test_llama_cpp_is_timed(runtime: str, gguf_file: Path, ids: dict[str, list[int]]) -> None:
    if importlib.util.find_spec(runtime) is None:
        pytest.skip(f"{runtime} is not installed")
    row = export_speed.gguf_speed(gguf_file, ids, FAST, runtime=runtime)
    _positive(row, {"ar", "en"})
    binding = {"xllamacpp": "xllamacpp", "llama_cpp": "llama-cpp-python"}[runtime]
    assert row["runtime"].startswith(f"llama.cpp ({binding} ")


def test_onnxruntime_is_timed(
    checkpoints: dict[str, Path], ids: dict[str, list[int]], tmp_path: Path
) -> None:
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from moe_adapt.export.onnx import export_onnx

    export_onnx(checkpoints["mixtral"], tmp_path / "onnx", ["fp32"], 32, experts_int4=False)
    row = export_speed.onnx_speed(tmp_path / "onnx" / "fp32", ids, FAST)
    _positive(row, {"ar", "en"})
    assert row["note"] == export_speed.ONNX_NOTE


def _cfg(**kw: Any) -> ExportConfig:
    return ExportConfig(heldout=None, methods=["gguf"], gguf=GGUFConfig(types=["f16"]), **kw)


def test_stage_fills_the_column_and_says_why_a_cell_is_empty(
    checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if export_speed.gguf_runtime() is None:
        pytest.skip("no llama.cpp binding (xllamacpp or llama-cpp-python) installed")
    out = tmp_path / "export"
    out.mkdir()
    export(_cfg(speed=FAST), checkpoints["mixtral"], out, seed=0)
    rows = {r["name"]: r for r in json.loads((out / "retention.json").read_text())["rows"]}
    _positive(rows["source"]["speed"], {"ar", "en"})
    _positive(rows["gguf-f16"]["speed"], {"ar", "en"})
    report = (out / "report.md").read_text()
    assert "## CPU tokens/s" in report and "| gguf-f16 | llama.cpp (" in report

    monkeypatch.setattr(export_speed, "gguf_runtime", lambda: None)
    out2 = tmp_path / "export2"
    out2.mkdir()
    export(_cfg(speed=FAST), checkpoints["mixtral"], out2, seed=0)
    rows = {r["name"]: r for r in json.loads((out2 / "retention.json").read_text())["rows"]}
    assert rows["gguf-f16"]["speed"]["runtime"] is None
    assert rows["gguf-f16"]["speed"]["tokens_per_s"] == {}
    assert "| gguf-f16 | - | - | - | no llama.cpp binding installed" in (out2 / "report.md").read_text()


def test_disabled_writes_no_column_and_runs_nothing(
    checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*_: Any, **__: Any) -> Any:
        raise AssertionError("tokens/s measured although export.speed.enabled=false")

    for name in ("prompt_ids", "hf_speed", "gguf_speed", "onnx_speed"):
        monkeypatch.setattr(export_speed, name, boom)
    export(_cfg(speed=SpeedConfig(enabled=False)), checkpoints["mixtral"], tmp_path, seed=0)
    rows = json.loads((tmp_path / "retention.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["source", "gguf-f16"]
    assert all("speed" not in r for r in rows)
    assert "tokens/s" not in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize(
    ("kw", "key"),
    [({"new_tokens": 0}, "new_tokens"), ({"threads": 0}, "threads"), ({"repeats": 0}, "repeats")],
)
def test_bad_settings_are_one_line(kw: dict[str, int], key: str) -> None:
    with pytest.raises(MoEAdaptConfigError, match=rf"export\.speed\.{key}"):
        SpeedConfig(**kw)
