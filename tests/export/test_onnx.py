"""The onnx method on tiny MoEs: torch.onnx.export (dynamo) with transformers' batched_mm experts,
run by onnxruntime on CPU; fp32 matches the HF model, int4 (MatMulNBits) is smaller, keeps most and
leaves the 3-D expert weights in float; both are measured in the retention report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_adapt.export.config import ExportConfig, ONNXConfig
from moe_adapt.export.run import export

pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_fp32_graph_matches_transformers_at_any_batch_and_length(
    tmp_path: Path, checkpoints: dict[str, Path], kind: str
) -> None:
    from moe_adapt.checkpoint.hf import load_causal_lm
    from moe_adapt.export.onnx import OrtCausalLM, export_onnx

    info = export_onnx(checkpoints[kind], tmp_path / "onnx", ["fp32"])
    assert info["fp32"]["expert_params"] > 0 and not (tmp_path / "onnx" / "int4").exists()
    ort_model = OrtCausalLM(tmp_path / "onnx" / "fp32")
    hf = load_causal_lm(checkpoints[kind])
    gen = torch.Generator().manual_seed(1)
    for shape in [(1, 5), (3, 17)]:
        ids = torch.randint(3, hf.config.vocab_size, shape, generator=gen)
        with torch.no_grad():
            ref = hf(input_ids=ids).logits
        got = ort_model(input_ids=ids).logits
        assert got.shape == ref.shape
        assert float((got - ref).abs().max() / ref.abs().max()) < 1e-4


def test_onnx_artefacts_are_measured(tmp_path: Path, checkpoints: dict[str, Path], heldout_dir: Path) -> None:
    out = tmp_path / "export"
    out.mkdir()
    cfg = ExportConfig(
        methods=["onnx"],
        heldout=str(heldout_dir),
        window=32,
        stride=16,
        batch_size=4,
        max_docs_per_language=4,
        onnx=ONNXConfig(types=["fp32", "int4"]),
    )
    export(cfg, checkpoints["mixtral"], out, seed=0)
    doc = json.loads((out / "retention.json").read_text())
    rows = {r["name"]: r for r in doc["rows"]}
    for lang in ("ar", "en"):
        assert rows["onnx-fp32"]["retention_pct"][lang] == pytest.approx(100.0, abs=0.01)
        assert 90.0 < rows["onnx-int4"]["retention_pct"][lang] < 101.0
    assert rows["onnx-int4"]["bytes"] < rows["onnx-fp32"]["bytes"]
    int4 = doc["onnx"]["int4"]
    # 2 layers x attention (q, o: 64x64; k, v: 32x64) + lm_head (64 x vocab): the 2-D MatMuls
    vocab = json.loads((checkpoints["mixtral"] / "config.json").read_text())["vocab_size"]
    assert int4["quantized_params"] == 2 * (2 * 64 * 64 + 2 * 32 * 64) + 64 * vocab
    assert int4["expert_params"] == 2 * 8 * 3 * 64 * 64
    import onnx

    graph = onnx.load(str(out / "onnx" / "int4" / "model.onnx")).graph
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) == 9
    experts_fp32 = [i for i in graph.initializer if len(i.dims) == 3 and i.dims[0] == 8]
    assert len(experts_fp32) == 4 and all(i.data_type == onnx.TensorProto.FLOAT for i in experts_fp32)
    assert np.isfinite(rows["onnx-int4"]["heldout"]["ar"]["ppl"])
    assert "| onnx-int4 |" in (out / "report.md").read_text()
