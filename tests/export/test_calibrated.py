"""gptq, sparsegpt and wanda on tiny MoE and dense models, on CPU: the compressed-tensors artefacts
load in transformers (its compressed-tensors integration) with the logits of our compressed model,
GPTQ W8A16 keeps >= 99% of a trained model's held-out log-likelihood and beats round-to-nearest on
its calibration objective, the sparsity patterns hold exactly, every expert is calibrated on tokens
(too few routed -> all tokens, reported), and bad input is one line that leaves nothing behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from moe_adapt.errors import MoEAdaptConfigError, MoEAdaptError
from moe_adapt.export.calibrate import InputStats, calibrate_layers, calibration_batches
from moe_adapt.export.compressed import dequantized_checkpoint
from moe_adapt.export.config import CalibrationConfig, ExportConfig, GPTQConfig, SparseConfig
from moe_adapt.export.gptq import SCHEMES, gptq_quantize, quant_dequant
from moe_adapt.export.run import _calibrated, export
from moe_adapt.export.sparsegpt import sparsegpt_prune
from moe_adapt.export.wanda import wanda_prune

pytest.importorskip("compressed_tensors")


def _cfg(heldout: Path, **kw: Any) -> ExportConfig:
    kw.setdefault("calibration", CalibrationConfig(samples=8, seq_len=32, batch_size=4))
    kw.setdefault("gptq", GPTQConfig(group_size=32))
    return ExportConfig(
        heldout=str(heldout), window=32, stride=16, batch_size=4, max_docs_per_language=4, **kw
    )


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory, checkpoints: dict[str, Path], heldout_dir: Path
) -> Path:
    """The tiny Mixtral trained for 40 steps on the held-out text, so quantization error shows."""
    from transformers import AutoModelForCausalLM

    ids, _ = calibration_batches(heldout_dir, {}, samples=16, seq_len=32, seed=0)
    model = AutoModelForCausalLM.from_pretrained(str(checkpoints["mixtral"]))
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(40):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("trained") / "model"
    model.eval().save_pretrained(out)
    for f in checkpoints["mixtral"].iterdir():
        if f.name.startswith(("tokenizer", "special")):
            shutil.copy2(f, out / f.name)
    return out


def _hessian(x: torch.Tensor) -> torch.Tensor:
    st = InputStats(x.shape[1])
    st.add(x)
    return st.hessian()


def test_gptq_beats_round_to_nearest_on_its_objective() -> None:
    torch.manual_seed(0)
    x = torch.randn(512, 64) @ torch.randn(64, 64)  # correlated inputs: where GPTQ helps
    w = torch.randn(48, 64)
    h = _hessian(x)
    for name in ("W4A16", "W8A8"):
        s = SCHEMES[name]
        for act_order in (False, True):
            q, scales = gptq_quantize(w, h, s, group_size=32, act_order=act_order, block=16)
            gs = 32 if s.grouped else 64
            rtn = quant_dequant(
                w.reshape(48, -1, gs), (w.reshape(48, -1, gs).abs().amax(-1, keepdim=True) / s.qmax), s.qmax
            )
            err_q = ((x @ (q - w).T) ** 2).sum()
            err_r = ((x @ (rtn.reshape(48, 64) - w).T) ** 2).sum()
            assert err_q < 0.8 * err_r, (name, act_order)
            ints = q.reshape(48, -1, gs) / scales.unsqueeze(-1)
            assert torch.allclose(ints, ints.round(), atol=1e-3) and ints.abs().max() <= s.qmax + 1


def test_pruning_patterns_are_exact() -> None:
    torch.manual_seed(0)
    # inputs of unequal scale (outlier features) and correlated: where activations and Hessians matter
    x = (torch.randn(256, 64) * torch.logspace(-1, 1, 64)) @ (torch.eye(64) + 0.3 * torch.randn(64, 64))
    w = torch.randn(16, 64)
    h = _hessian(x)
    for prune in (
        lambda p: sparsegpt_prune(w, h, p, block=24),
        lambda p: wanda_prune(w, torch.diag(h), p),
    ):
        u = prune("unstructured")
        assert ((u == 0).sum(1) == 32).all()
        t = prune("2:4").reshape(16, 16, 4)
        assert ((t == 0).sum(-1) == 2).all()

    # on the layer's output: SparseGPT (mask + reconstruction) < Wanda (mask) < magnitude pruning
    def err(q: torch.Tensor) -> float:
        return float(((x @ (q - w).T) ** 2).sum())

    mag = torch.where(w.abs() < w.abs().median(dim=1, keepdim=True).values, 0.0, w)
    sg, wa = sparsegpt_prune(w, h, "unstructured"), wanda_prune(w, torch.diag(h), "unstructured")
    assert err(sg) < 0.5 * err(wa) and err(wa) < err(mag)


def test_every_expert_gets_tokens_and_rare_ones_all_tokens(
    checkpoints: dict[str, Path], heldout_dir: Path
) -> None:
    from moe_adapt.checkpoint.hf import load_causal_lm

    model = load_causal_lm(checkpoints["mixtral"])
    ids, _ = calibration_batches(heldout_dir, {"ar": 0.75, "en": 0.25}, samples=8, seq_len=32, seed=0)
    seen: dict[str, int] = {}

    def keep(name: str, w: torch.Tensor, st: InputStats) -> torch.Tensor:
        seen[name] = st.rows
        return w

    least = ids.numel() * 2 // 8 + 1  # above the mean share: some expert of each layer falls short
    rep = calibrate_layers(model, ids, keep, batch_size=4, min_expert_tokens=least)
    for lid in ("0", "1"):
        counts = rep["expert_tokens"][lid]["mlp.experts"]
        assert sum(counts) == ids.numel() * 2  # top-2
        low = [e for e, c in enumerate(counts) if c < least]
        assert low and rep["topped_up"][lid]["mlp.experts"] == low
        for e in range(8):
            want = ids.numel() if e in low else counts[e]
            assert seen[f"model.layers.{lid}.mlp.experts.gate_up_proj.{e}"] == want
            assert seen[f"model.layers.{lid}.mlp.experts.down_proj.{e}"] == want


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "llama"])
def test_artefacts_load_in_transformers_with_our_logits(
    tmp_path: Path, kind: str, checkpoints: dict[str, Path], heldout_dir: Path
) -> None:
    from transformers import AutoModelForCausalLM

    import moe_adapt.export.run as run

    captured: dict[str, torch.nn.Module] = {}
    real = run.load_causal_lm

    def spy(*a: Any, **k: Any) -> torch.nn.Module:
        captured["m"] = real(*a, **k)
        return captured["m"]

    cfg = _cfg(
        heldout_dir,
        methods=["gptq", "sparsegpt", "wanda"],
        gptq=GPTQConfig(schemes=["W4A16", "W8A8"], group_size=32),
    )
    ids, _ = calibration_batches(heldout_dir, {}, samples=4, seq_len=32, seed=0)
    x = ids[:2]
    run.load_causal_lm = spy  # type: ignore[assignment]
    try:
        for method, variant in (
            ("gptq", "W4A16"),
            ("gptq", "W8A8"),
            ("sparsegpt", "2:4"),
            ("wanda", "unstructured"),
        ):
            dst = tmp_path / method / variant.replace(":", "of") / "model"
            info = _calibrated(method, variant, cfg, checkpoints[kind], dst, ids, torch.device("cpu"))
            ours = captured["m"]
            with torch.no_grad():
                want = ours(x).logits
            doc = json.loads((dst / "config.json").read_text())["quantization_config"]
            assert doc["quant_method"] == "compressed-tensors"
            if (variant == "W8A8" or method != "gptq") and kind != "llama":
                # transformers 5.23 fuses the experts of pack-quantized checkpoints only
                with pytest.raises(RuntimeError, match="conversion"):
                    AutoModelForCausalLM.from_pretrained(str(dst))
                deq = dequantized_checkpoint(dst, tmp_path / "deq" / kind)
                with torch.no_grad():
                    got = AutoModelForCausalLM.from_pretrained(str(deq))(x).logits
                assert torch.allclose(got, want, atol=1e-4)
                continue
            loaded, li = AutoModelForCausalLM.from_pretrained(str(dst), output_loading_info=True)
            assert not li["missing_keys"] and not li["unexpected_keys"]
            with torch.no_grad():
                got = loaded(x).logits
            if variant == "W8A8":  # transformers may also quantize activations per token: close, not equal
                assert doc["format"] == "int-quantized"
                assert (got - want).abs().max() < 0.05 * want.abs().max()
            else:
                assert torch.allclose(got, want, atol=1e-4), (method, variant, (got - want).abs().max())
            if method == "gptq":
                want_fmt = "int-quantized" if variant == "W8A8" else "pack-quantized"
                assert doc["format"] == want_fmt and info["quantized_matrices"] > 0
            else:
                assert doc["sparsity_config"]["sparsity_structure"] == variant
                w = loaded.model.layers[0].self_attn.o_proj.weight
                if variant == "2:4":
                    assert ((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all()
                else:
                    assert ((w == 0).sum(1) == w.shape[1] // 2).all()
    finally:
        run.load_causal_lm = real  # type: ignore[assignment]


def test_gptq_w8a16_keeps_99pct_of_a_trained_model(tmp_path: Path, trained: Path, heldout_dir: Path) -> None:
    out = tmp_path / "export"
    out.mkdir()
    cfg = _cfg(
        heldout_dir,
        methods=["gptq", "sparsegpt", "wanda"],
        gptq=GPTQConfig(schemes=["W8A16", "W4A16"], group_size=32),
        sparsegpt=SparseConfig(patterns=["unstructured"]),
        wanda=SparseConfig(patterns=["2:4"]),
    )
    export(cfg, trained, out, seed=0)
    doc = json.loads((out / "retention.json").read_text())
    rows = {r["name"]: r for r in doc["rows"]}
    assert set(rows) == {"source", "gptq-W8A16", "gptq-W4A16", "sparsegpt-unstructured", "wanda-2of4"}
    src = rows["source"]["heldout"]
    for lang in ("ar", "en"):
        ll0 = src[lang]["mean_loss"]
        assert rows["gptq-W8A16"]["heldout"][lang]["mean_loss"] <= ll0 / 0.99  # >= 99% of the log-likelihood
        assert rows["gptq-W8A16"]["retention_pct"][lang] >= 99.0
    # the measure is sensitive here: 50% pruning costs this model measurably (92-99% when written)
    assert min(rows["sparsegpt-unstructured"]["retention_pct"].values()) < 99.5
    assert rows["gptq-W4A16"]["compression"] > rows["gptq-W8A16"]["compression"] > 1.0
    cal = doc["gptq"]["W8A16"]["calibration"]
    assert set(cal["expert_tokens"]) == {"0", "1"}
    assert doc["calibration"]["heldout_is_calibration"] is True
    report = (out / "report.md").read_text()
    assert "| gptq-W4A16 |" in report and "Calibration" in report


def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, tokenizer: Any, heldout_dir: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    src = tmp_path / "odd"
    conf = AutoConfig.for_model(
        "llama",
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=126,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    AutoModelForCausalLM.from_config(conf).save_pretrained(src)
    out = tmp_path / "export"
    out.mkdir()
    for m in ("sparsegpt", "wanda"):
        with pytest.raises(MoEAdaptConfigError, match=r"2:4 needs input widths divisible by 4; .*126") as e:
            export(_cfg(heldout_dir, methods=[m]), src, out, seed=0)
        assert "\n" not in str(e.value)
    with pytest.raises(MoEAdaptConfigError, match="group_size"):
        export(_cfg(heldout_dir, methods=["gptq"], gptq=GPTQConfig(group_size=32)), src, out, seed=0)
    assert list(out.iterdir()) == []
    missing = ExportConfig(methods=["wanda"], calibration=CalibrationConfig(data=str(tmp_path / "none")))
    with pytest.raises(MoEAdaptConfigError, match=r"^export.calibration.data=.* holds no manifest.json"):
        export(missing, src, out, seed=0)
    assert list(out.iterdir()) == []
    with pytest.raises(MoEAdaptConfigError, match=r"export.gptq.schemes=\['W3A16'\] is invalid"):
        GPTQConfig(schemes=["W3A16"])
    with pytest.raises(MoEAdaptConfigError, match="export.calibration.data"):
        ExportConfig(methods=["wanda"], heldout=None)
    with pytest.raises(MoEAdaptError, match="no manifest.json"):
        calibration_batches(tmp_path, {}, samples=2, seq_len=8, seed=0)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_w8a8_activation_rounding_is_the_experts_forward(kind: str, checkpoints: dict[str, Path]) -> None:
    """Our experts forward (used to measure W8A8 where transformers cannot load it) equals
    transformers' without rounding, and int8 per-token rounding moves the logits a little."""
    from moe_adapt.checkpoint.hf import load_causal_lm
    from moe_adapt.export.gptq import quantize_activations

    x = torch.randint(3, 300, (2, 24))
    with torch.no_grad():
        ref = load_causal_lm(checkpoints[kind])(x).logits
        plain = load_causal_lm(checkpoints[kind])
        quantize_activations(plain, None)
        same = plain(x).logits
        q = load_causal_lm(checkpoints[kind])
        handles = quantize_activations(q, 8)
        rounded = q(x).logits
    assert torch.allclose(same, ref, atol=1e-5)
    assert handles and 0 < (rounded - ref).abs().max() < 0.05 * ref.abs().max()
