"""The onnx method on tiny MoEs: torch.onnx.export (dynamo) with transformers' batched_mm experts,
run by onnxruntime on CPU; fp32 matches the HF model; int4 (MatMulNBits for the 2-D weights, blocked
int4 DequantizeLinear for the 3-D experts) is smaller and keeps most; both are measured."""

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
    # 2 layers x attention (q, o: 64x64; k, v: 32x64) + lm_head (64 x vocab): the 2-D MatMuls;
    # then the experts (2 layers x 8 x 3 matrices of 64x64)
    vocab = json.loads((checkpoints["mixtral"] / "config.json").read_text())["vocab_size"]
    experts = 2 * 8 * 3 * 64 * 64
    assert int4["expert_params"] == int4["expert_params_quantized"] == experts
    assert int4["quantized_params"] == 2 * (2 * 64 * 64 + 2 * 32 * 64) + 64 * vocab + experts
    import onnx

    graph = onnx.load(str(out / "onnx" / "int4" / "model.onnx")).graph
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) == 9
    assert sum(n.op_type == "DequantizeLinear" for n in graph.node) == 4
    expert_w = [i for i in graph.initializer if len(i.dims) == 3 and i.dims[0] == 8 and i.dims[2] == 64]
    assert len(expert_w) == 4 and all(i.data_type == onnx.TensorProto.INT4 for i in expert_w)
    assert np.isfinite(rows["onnx-int4"]["heldout"]["ar"]["ppl"])
    assert "| onnx-int4 |" in (out / "report.md").read_text()


def test_int4_experts_can_stay_float(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    import onnx

    from moe_adapt.export.onnx import OrtCausalLM, export_onnx

    with_q = export_onnx(checkpoints["qwen3_moe"], tmp_path / "a", ["int4"])["int4"]
    without = export_onnx(checkpoints["qwen3_moe"], tmp_path / "b", ["int4"], experts_int4=False)["int4"]
    assert without["expert_params_quantized"] == 0 < with_q["expert_params_quantized"]
    graph = onnx.load(str(tmp_path / "b" / "int4" / "model.onnx")).graph
    assert not any(n.op_type == "DequantizeLinear" for n in graph.node)
    a = (tmp_path / "a" / "int4" / "model.onnx").stat().st_size
    assert a < (tmp_path / "b" / "int4" / "model.onnx").stat().st_size
    ids = torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(0))
    la = OrtCausalLM(tmp_path / "a" / "int4")(input_ids=ids).logits
    lb = OrtCausalLM(tmp_path / "b" / "int4")(input_ids=ids).logits
    assert 0 < float((la - lb).abs().max() / lb.abs().max()) < 0.2
