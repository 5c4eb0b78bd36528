"""The export stage's work: every method of ``export.methods`` on one checkpoint, then the retention
report. Outputs (paths relative to the stage folder):

- ``expert_prune/model/`` (pruned HF checkpoint) + ``expert_prune/report.json``;
- ``gguf/model-<type>.gguf`` for each of ``export.gguf.types``;
- ``int8/model/``, ``nf4/model/`` (bitsandbytes checkpoints, :mod:`moe_adapt.export.bnb`);
- ``onnx/<type>/model.onnx`` for each of ``export.onnx.types`` (:mod:`moe_adapt.export.onnx`);
- ``retention.json`` and ``report.md`` (:mod:`moe_adapt.export.retention`), with CPU tokens/s per
  artefact when ``export.speed.enabled`` (:mod:`moe_adapt.export.speed`).

Every method is checked against the model before anything is written (an MoE for expert_prune, a
layout llama.cpp can hold for gguf), so a refusal leaves nothing behind.
"""

from __future__ import annotations

import gc
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from moe_adapt.checkpoint.hf import HFCheckpoint, load_causal_lm
from moe_adapt.errors import MoEAdaptConfigError, MoEAdaptError, config_error
from moe_adapt.eval.config import EvalConfig
from moe_adapt.eval.heldout import HeldOut, load_heldout
from moe_adapt.export.bnb import BNB_METHODS, check_backend
from moe_adapt.export.config import CALIBRATED, ExportConfig
from moe_adapt.export.expert_prune import RoutingCounts, choose_experts, find_eval_routing, moe_layout, prune
from moe_adapt.export.retention import (
    accuracy,
    device_of,
    disk_bytes,
    expert_tokens,
    gguf_as_checkpoint,
    load_benchmarks,
    measure,
    measure_model,
    retention_table,
    write_outputs,
)
from moe_adapt.fs import atomic_write_json

log = logging.getLogger(__name__)

__all__ = ["export"]


def _precheck(ecfg: ExportConfig, source: Path) -> None:
    """Refuse a method the model cannot take, before anything is written."""
    ckpt = HFCheckpoint(source, "export.model")
    try:
        if "expert_prune" in ecfg.methods:
            layout = moe_layout(ckpt)
            if ecfg.expert_prune.drop_per_layer > layout.num_experts - layout.top_k:
                raise config_error(
                    "export.expert_prune.drop_per_layer",
                    ecfg.expert_prune.drop_per_layer,
                    f"leaves fewer experts than num_experts_per_tok={layout.top_k} of {layout.num_experts} "
                    f"(at most {layout.num_experts - layout.top_k})",
                )
        if "gguf" in ecfg.methods:
            from moe_adapt.export.gguf import check_expressible

            check_expressible(ckpt)
        if any(m in CALIBRATED for m in ecfg.methods):
            _check_calibrated(ecfg, ckpt)
    finally:
        ckpt.close()
    for m in ecfg.methods:
        if m in BNB_METHODS:
            check_backend(m, device_of(ecfg.device))
    if "onnx" in ecfg.methods:
        from moe_adapt.export.onnx import check_onnx

        check_onnx()


def _routing(
    ecfg: ExportConfig, source: Path, heldout: HeldOut | None, eval_dir: Path | None
) -> RoutingCounts:
    """The routing counts expert_prune decides on: ``export.expert_prune.routing``, else the eval
    stage's of the same model, else counted here on held-out documents."""
    pcfg = ecfg.expert_prune
    if pcfg.routing:
        return RoutingCounts.from_json(pcfg.routing)
    found = find_eval_routing(eval_dir, source) if eval_dir is not None else None
    if found is not None:
        log.info("export: expert_prune uses the eval stage's routing %s", found)
        return RoutingCounts.from_json(found)
    if heldout is None:
        raise MoEAdaptConfigError(
            "export.heldout=None is invalid with expert_prune: no routing.json of this model was found "
            "(export.expert_prune.routing=null and the eval stage did not analyse it), so routing must be "
            "counted on held-out data; set export.heldout or export.expert_prune.routing"
        )
    return _count_routing(ecfg, source, heldout)


def _count_routing(ecfg: ExportConfig, source: Path, heldout: HeldOut) -> RoutingCounts:
    """Top-k assignments per language, layer and expert of ``source`` on the held-out documents."""
    from moe_adapt.eval.routing import collect_routing_counts

    log.info("export: counting routing on held-out documents (%s)", ", ".join(heldout.docs))
    model = load_causal_lm(source, device=device_of(ecfg.device))
    try:
        layer_ids, counts = collect_routing_counts(
            model, heldout.docs, batch_size=ecfg.batch_size, max_length=ecfg.expert_prune.routing_max_tokens
        )
    finally:
        del model
    return RoutingCounts(layer_ids, counts, "counted on held-out documents")


def _quantizes(ecfg: ExportConfig) -> bool:
    """Whether some method of ``ecfg`` stores weights in fewer bits than 16."""
    if any(m in BNB_METHODS for m in ecfg.methods) or ("onnx" in ecfg.methods and "int4" in ecfg.onnx.types):
        return True
    return "gguf" in ecfg.methods and any(t not in ("f32", "f16") for t in ecfg.gguf.types)


def _is_moe(source: Path) -> bool:
    ckpt = HFCheckpoint(source, "export.model")
    try:
        moe_layout(ckpt)
    except MoEAdaptError:
        return False
    finally:
        ckpt.close()
    return True


def export(
    ecfg: ExportConfig,
    source: str | Path,
    out: Path,
    *,
    seed: int,
    eval_dir: str | Path | None = None,
    eval_cfg: EvalConfig | None = None,
) -> dict[str, Any]:
    """Run ``ecfg.methods`` on the checkpoint ``source`` into ``out``; returns the stage summary.

    ``eval_dir`` is the eval stage's folder, where expert_prune looks for this model's routing;
    ``eval_cfg`` the eval stage's settings, whose benchmarks ``export.benchmarks`` scores.
    """
    source = Path(source)
    _precheck(ecfg, source)
    heldout = None
    if ecfg.heldout is not None:
        heldout = load_heldout(
            ecfg.heldout,
            languages=ecfg.languages,
            max_docs=ecfg.max_docs_per_language,
            seed=seed,
            key="export.heldout",
        )
    settings: dict[str, Any] = dict(
        window=ecfg.window, stride=ecfg.stride, batch_size=ecfg.batch_size, device=ecfg.device
    )
    benches: dict[str, Any] = {}
    if ecfg.benchmarks:
        if eval_cfg is None or not eval_cfg.benchmarks:
            raise MoEAdaptConfigError(
                "export.benchmarks=true is invalid: eval.benchmarks is empty; list benchmarks there or set "
                "export.benchmarks=false"
            )
        benches = load_benchmarks(eval_cfg)

    def quality(folder: Path, prepare: Any = None) -> dict[str, Any]:
        """Held-out measures and, with export.benchmarks, accuracy of one HF folder (``prepare``:
        applied to the model before the held-out measure, see :func:`measure`)."""
        row: dict[str, Any] = {}
        if heldout is not None:
            row["heldout"] = measure(folder, heldout, prepare=prepare, **settings)
        if benches:
            assert eval_cfg is not None
            row["accuracy"] = accuracy(folder, eval_cfg, benches, seed=seed, device=ecfg.device)
        return row

    speed = _Speed(ecfg, source)
    rows: list[dict[str, Any]] = [{"name": "source", "path": str(source), "bytes": disk_bytes(source)}]
    rows[0].update(quality(source) | speed.hf("source", source))
    extra: dict[str, Any] = {}
    routing: RoutingCounts | None = None
    if "expert_prune" in ecfg.methods:
        pcfg = ecfg.expert_prune
        routing = _routing(ecfg, source, heldout, Path(eval_dir) if eval_dir else None)
        ckpt = HFCheckpoint(source, "export.model")
        try:
            layout = moe_layout(ckpt)
        finally:
            ckpt.close()
        dropped, mass = choose_experts(routing, layout, pcfg.drop_per_layer, pcfg.languages)
        folder = out / "expert_prune"
        report = prune(source, folder / "model", dropped)
        report["routed_mass_lost"] = mass
        atomic_write_json(folder / "report.json", report)
        extra["expert_prune"] = report
        for lang, v in mass["per_language"].items():
            log.info("export: expert_prune loses %.2f%% of %s's routed mass", 100 * v, lang)
        row = {"name": "expert_prune", "path": "expert_prune/model", "bytes": disk_bytes(folder / "model")}
        rows.append(row | quality(folder / "model") | speed.hf("expert_prune", folder / "model"))
    if "gguf" in ecfg.methods:
        from moe_adapt.export.gguf import write_gguf

        extra["gguf"] = []
        gguf_src = out / "expert_prune" / "model" if ecfg.gguf.from_pruned else source
        label = "expert_prune+gguf" if ecfg.gguf.from_pruned else "gguf"
        for t in ecfg.gguf.types:
            file = out / "gguf" / f"model-{t}.gguf"
            g = write_gguf(gguf_src, file, t, pre_tokenizer=ecfg.gguf.pre_tokenizer)
            extra["gguf"].append(g | {"from": str(gguf_src)})
            row = {"name": f"{label}-{t}", "path": f"gguf/{file.name}", "bytes": g["bytes"]}
            if heldout is not None or benches:
                with tempfile.TemporaryDirectory(prefix="gguf-measure-") as tmp:
                    row |= quality(gguf_as_checkpoint(file, gguf_src, Path(tmp) / "model"))
            rows.append(row | speed.gguf(str(row["name"]), file))
    for m in ecfg.methods:
        if m not in BNB_METHODS:
            continue
        from moe_adapt.export.bnb import quantize_bnb

        folder = out / m / "model"
        extra[m] = quantize_bnb(source, folder, m, device_of(ecfg.device))
        rows.append(
            {"name": m, "path": f"{m}/model", "bytes": disk_bytes(folder)}
            | quality(folder)
            | speed.hf(m, folder)
        )
    if "onnx" in ecfg.methods:
        from moe_adapt.export.onnx import OrtCausalLM, export_onnx

        extra["onnx"] = export_onnx(
            source, out / "onnx", ecfg.onnx.types, ecfg.onnx.block_size, experts_int4=ecfg.onnx.experts
        )
        for t in ecfg.onnx.types:
            folder = out / "onnx" / t
            row = {"name": f"onnx-{t}", "path": f"onnx/{t}/model.onnx", "bytes": disk_bytes(folder)}
            if heldout is not None:  # onnxruntime on CPU; benchmarks need an HF model: not scored
                row["heldout"] = measure_model(
                    OrtCausalLM(folder),
                    heldout,
                    window=ecfg.window,
                    stride=ecfg.stride,
                    batch_size=ecfg.batch_size,
                )
            rows.append(row | speed.onnx(str(row["name"]), folder))
    if any(m in CALIBRATED for m in ecfg.methods):
        rows += _run_calibrated(ecfg, source, out, seed, extra, quality, speed)
    if _quantizes(ecfg) and heldout is not None and _is_moe(source):
        # The round-to-nearest methods (gguf, bitsandbytes, MatMulNBits) do not calibrate, so what
        # each expert saw is the routing of the held-out text: an expert no token reaches is unchecked.
        if routing is None or routing.source != "counted on held-out documents":
            routing = _count_routing(ecfg, source, heldout)
        extra["expert_tokens"] = expert_tokens(routing)
        for lid, experts in extra["expert_tokens"]["zero"].items():
            log.warning(
                "export: layer %s experts %s routed no held-out token (quantized unchecked)", lid, experts
            )
    rows = retention_table(rows)
    write_outputs(out, rows, extra)
    for r in rows:
        log.info(
            "export: %-16s %9.3f MiB  x%.2f  retention %s%s",
            r["name"],
            r["bytes"] / 2**20,
            r["compression"] or 0.0,
            {k: round(v, 2) for k, v in r["retention_pct"].items() if v is not None},
            f"  accuracy retention { ({k: round(v, 1) for k, v in r['accuracy_retention_pct'].items()}) }"
            if r["accuracy_retention_pct"]
            else "",
        )
    return {
        "source": str(source),
        "methods": list(ecfg.methods),
        "report": "report.md",
        "retention": "retention.json",
        "artefacts": {
            r["name"]: {"path": r["path"], "bytes": r["bytes"], "retention_pct": r["retention_pct"]}
            for r in rows
        },
    }


class _Speed:
    """The ``speed`` entry of each retention row (:mod:`moe_adapt.export.speed`), or nothing at all
    when ``export.speed.enabled`` is false (then no prompt is tokenized and no runtime started)."""

    def __init__(self, ecfg: ExportConfig, source: Path) -> None:
        self.cfg = ecfg.speed
        self.ids: dict[str, list[int]] = {}
        self.why_not: str | None = None
        if not self.cfg.enabled:
            return
        from moe_adapt.export.speed import prompt_ids

        try:
            self.ids = prompt_ids(source, self.cfg.prompts)
        except (OSError, ValueError) as err:  # no tokenizer in the source: no prompt to time
            self.why_not = f"the source's tokenizer does not load ({type(err).__name__}: {err})"
            log.warning("export: no tokens/s: %s", self.why_not)

    def _row(self, name: str, measure: Any) -> dict[str, Any]:
        from moe_adapt.export.speed import absent, guarded

        if not self.cfg.enabled:
            return {}
        if self.why_not is not None:
            return {"speed": absent(self.why_not)}
        return {"speed": guarded(name, measure)}

    def hf(self, name: str, folder: Path) -> dict[str, Any]:
        from moe_adapt.export.speed import hf_speed

        return self._row(name, lambda: hf_speed(folder, self.ids, self.cfg))

    def gguf(self, name: str, file: Path) -> dict[str, Any]:
        from moe_adapt.export.speed import gguf_speed

        return self._row(name, lambda: gguf_speed(file, self.ids, self.cfg))

    def onnx(self, name: str, folder: Path) -> dict[str, Any]:
        from moe_adapt.export.speed import onnx_speed

        return self._row(name, lambda: onnx_speed(folder, self.ids, self.cfg))

    def none(self, reason: str) -> dict[str, Any]:
        from moe_adapt.export.speed import absent

        return {"speed": absent(reason)} if self.cfg.enabled else {}


def _variants(ecfg: ExportConfig, method: str) -> list[str]:
    if method == "gptq":
        return list(ecfg.gptq.schemes)
    return list((ecfg.sparsegpt if method == "sparsegpt" else ecfg.wanda).patterns)


def _run_calibrated(
    ecfg: ExportConfig,
    source: Path,
    out: Path,
    seed: int,
    extra: dict[str, Any],
    quality: Any,
    speed: _Speed,
) -> list[dict[str, Any]]:
    """Every artefact of gptq, sparsegpt and wanda, each measured: their retention rows."""
    from moe_adapt.export.calibrate import calibration_batches
    from moe_adapt.export.compressed import dequantized_checkpoint
    from moe_adapt.export.gptq import quantize_activations

    cal = ecfg.calibration
    data = cal.data or ecfg.heldout
    assert data is not None  # ExportConfig refuses calibrated methods without one
    ckpt = HFCheckpoint(source, "export.model")
    try:
        max_pos = int(ckpt.config.get("max_position_embeddings") or cal.seq_len)
    finally:
        ckpt.close()
    ids, tokens = calibration_batches(
        data, cal.mix, samples=cal.samples, seq_len=min(cal.seq_len, max_pos), seed=seed
    )
    same = cal.data is None or (ecfg.heldout is not None and Path(cal.data) == Path(ecfg.heldout))
    extra["calibration"] = {
        "data": str(data),
        "tokens_per_language": tokens,
        "windows": int(ids.shape[0]),
        "seq_len": int(ids.shape[1]),
        "min_expert_tokens": cal.min_expert_tokens,
        "heldout_is_calibration": same,
    }
    rows = []
    for m in ecfg.methods:
        if m not in CALIBRATED:
            continue
        for v in _variants(ecfg, m):
            sub = v.replace(":", "of")
            folder = out / m / sub / "model"
            log.info(
                "export: %s %s, calibrating on %d windows of %d tokens", m, v, ids.shape[0], ids.shape[1]
            )
            info = _calibrated(m, v, ecfg, source, folder, ids, device_of(ecfg.device))
            extra.setdefault(m, {})[v] = info
            row = {"name": f"{m}-{sub}", "path": f"{m}/{sub}/model", "bytes": disk_bytes(folder)}
            if (v == "W8A8" or m != "gptq") and _is_moe(source):
                # transformers 5.23 fuses MoE experts of pack-quantized checkpoints only (int-quantized
                # and sparse-only ones fail in its conversion): measure the decompressed weights
                # and for W8A8 round the activations per token ourselves, as the int8 kernels do
                info["measured"] = "weights decompressed by compressed-tensors" + (
                    "; activations rounded to int8 per token by moe_adapt (held-out only)"
                    if v == "W8A8"
                    else ""
                )
                prep = quantize_activations if v == "W8A8" else None
                with tempfile.TemporaryDirectory(prefix="ct-measure-") as tmp:
                    row |= quality(dequantized_checkpoint(folder, Path(tmp) / "model"), prep)
                row |= speed.none(
                    "transformers cannot run this MoE compressed-tensors checkpoint as written (its "
                    "quality is measured on decompressed weights, whose speed is not the artefact's); "
                    "vLLM, its runtime, is not installable here"
                )
            else:
                info["measured"] = "loaded by transformers' compressed-tensors integration"
                row |= quality(folder) | speed.hf(str(row["name"]), folder)
            rows.append(row)
    return rows


def _calibrated(
    method: str,
    variant: str,
    ecfg: ExportConfig,
    source: Path,
    dst: Path,
    ids: torch.Tensor,
    device: torch.device,
) -> dict[str, Any]:
    """One artefact of gptq (``variant`` = scheme), sparsegpt or wanda (``variant`` = pattern): the
    source loaded in float32, compressed layer by layer on ``ids``, written as compressed-tensors."""
    from moe_adapt.export.calibrate import InputStats, calibrate_layers
    from moe_adapt.export.compressed import write_compressed
    from moe_adapt.export.gptq import gptq_quantize, scheme_of
    from moe_adapt.export.sparsegpt import sparsegpt_prune
    from moe_adapt.export.wanda import wanda_prune

    model = load_causal_lm(source, torch.float32, device=device)
    scales: dict[str, torch.Tensor] = {}
    zeros = [0, 0]
    gcfg = ecfg.gptq
    scfg = ecfg.sparsegpt if method == "sparsegpt" else ecfg.wanda

    def compress(name: str, w: torch.Tensor, st: InputStats) -> torch.Tensor:
        if method == "gptq":
            scheme = scheme_of(variant)
            q, s = gptq_quantize(
                w,
                st.hessian().to(w.device),
                scheme,
                group_size=gcfg.group_size,
                act_order=gcfg.act_order,
                damp=gcfg.damp,
                block=gcfg.block,
            )
            scales[name] = s.cpu()
            return q
        if method == "sparsegpt":
            new = sparsegpt_prune(w, st.hessian().to(w.device), variant, damp=scfg.damp, block=scfg.block)
        else:
            new = wanda_prune(w, st.hessian().to(w.device), variant)
        zeros[0] += int((new == 0).sum())
        zeros[1] += new.numel()
        return new

    try:
        cal = calibrate_layers(
            model,
            ids,
            compress,
            batch_size=ecfg.calibration.batch_size,
            min_expert_tokens=ecfg.calibration.min_expert_tokens,
            full=method != "wanda",
        )
        if method == "gptq":
            info = write_compressed(
                model.cpu(), source, dst, scheme=scheme_of(variant), group_size=gcfg.group_size, scales=scales
            )
        else:
            sparsity = {"structure": variant, "global_sparsity": zeros[0] / max(zeros[1], 1)}
            info = write_compressed(model.cpu(), source, dst, sparsity=sparsity) | {"sparsity": sparsity}
    finally:
        del model
        gc.collect()
    for lid, mods in cal["topped_up"].items():
        log.warning(
            "export: %s %s layer %s: experts %s calibrated on all tokens (too few routed)",
            method,
            variant,
            lid,
            mods,
        )
    return info | {"calibration": cal}


def _check_calibrated(ecfg: ExportConfig, ckpt: HFCheckpoint) -> None:
    """Refuse, before anything is written, a GPTQ group size or a 2:4 pattern some weight's width
    does not divide, and a missing compressed-tensors."""
    from moe_adapt.export.compressed import check_compressed_tensors

    check_compressed_tensors()
    data = ecfg.calibration.data or ecfg.heldout
    if data is not None and not (Path(data) / "manifest.json").is_file():
        key = "export.calibration.data" if ecfg.calibration.data else "export.heldout"
        raise config_error(
            key,
            data,
            "holds no manifest.json: run the data stage or point it at shards (gptq, sparsegpt and "
            "wanda calibrate on them)",
        )
    widths: set[int] = set()
    for name, (_f, info) in ckpt.index.items():
        if name.startswith("model.layers.") and name.endswith(".weight"):
            shape = info.shape
            if len(shape) >= 2 and shape[-2] > 1 and not name.endswith(("gate.weight", "norm.weight")):
                widths.add(int(shape[-1]))
    for m, pats in (("sparsegpt", ecfg.sparsegpt.patterns), ("wanda", ecfg.wanda.patterns)):
        if m in ecfg.methods and "2:4" in pats:
            bad = sorted(w for w in widths if w % 4)
            if bad:
                raise config_error(
                    f"export.{m}.patterns",
                    list(pats),
                    f"2:4 needs input widths divisible by 4; this model has {bad}",
                )
    if "gptq" in ecfg.methods and any(s != "W8A8" for s in ecfg.gptq.schemes):
        bad = sorted(w for w in widths if w % ecfg.gptq.group_size)
        if bad:
            raise config_error(
                "export.gptq.group_size",
                ecfg.gptq.group_size,
                f"must divide every input width (this model has {bad})",
            )
