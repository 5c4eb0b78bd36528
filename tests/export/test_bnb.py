"""bitsandbytes' int8 (LLM.int8) and nf4 on a tiny Mixtral, on CPU: the artefact reloads quantized in
transformers, what is quantized is counted (attention Linear layers; the fused 3-D experts are not
Linear modules and stay in float), retention is measured; a backend that cannot run is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_adapt.errors import MoEAdaptError
from moe_adapt.export.config import ExportConfig
from moe_adapt.export.run import export

bnb = pytest.importorskip("bitsandbytes")


def test_int8_and_nf4_artefacts_reload_quantized_and_keep_most(
    tmp_path: Path, checkpoints: dict[str, Path], heldout_dir: Path
) -> None:
    from moe_adapt.checkpoint.hf import load_causal_lm

    out = tmp_path / "export"
    out.mkdir()
    cfg = ExportConfig(
        methods=["int8", "nf4"],
        heldout=str(heldout_dir),
        window=32,
        stride=16,
        batch_size=4,
        max_docs_per_language=4,
        device="cpu",
    )
    summary = export(cfg, checkpoints["mixtral"], out, seed=0)
    assert set(summary["artefacts"]) == {"source", "int8", "nf4"}
    doc = json.loads((out / "retention.json").read_text())
    rows = {r["name"]: r for r in doc["rows"]}
    for m, kind in (("int8", bnb.nn.Linear8bitLt), ("nf4", bnb.nn.Linear4bit)):
        share = doc[m]["quantized_share"]
        # 2 layers x attention (64x64 q/o, 32x64 k/v): the only Linear layers bitsandbytes takes
        assert share["quantized"] == 2 * (2 * 64 * 64 + 2 * 32 * 64)
        assert share["expert_params_quantized"] == 0
        assert share["expert_params"] == 2 * 8 * (3 * 64 * 64)
        assert 0 < share["share"] < 0.5 and share["total"] == sum(
            p.numel() for p in load_causal_lm(checkpoints["mixtral"]).parameters()
        )
        model = load_causal_lm(out / m / "model")
        assert isinstance(model.model.layers[0].self_attn.q_proj, kind)
        assert model.model.layers[0].mlp.experts.down_proj.dtype == torch.float32
        for lang in ("ar", "en"):
            assert 95.0 < rows[m]["retention_pct"][lang] < 101.0
    assert rows["nf4"]["bytes"] < rows["int8"]["bytes"] < rows["source"]["bytes"]
    report = (out / "report.md").read_text()
    assert (
        "| int8 |" in report and "| nf4 |" in report and "routed-expert parameters quantized: 0 of" in report
    )


def test_a_backend_that_cannot_run_is_refused_by_method_and_device() -> None:
    from moe_adapt.export.bnb import check_backend

    assert check_backend("nf4", torch.device("cpu"))  # runs here: returns the version
    with pytest.raises(
        MoEAdaptError, match=r"^export\.methods: int8 \(bitsandbytes .*\) does not run on meta: .*CUDA"
    ):
        check_backend("int8", torch.device("meta"))
