"""The ``upcycle`` stage: ``model.dense`` -> ``<run_dir>/upcycle/model`` (+ ``report.json``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from moe_adapt.checkpoint.hf import check_seq_len
from moe_adapt.config.schema import Config
from moe_adapt.engines.plan import available_memory_bytes
from moe_adapt.errors import MoEAdaptError
from moe_adapt.fs import atomic_write_json
from moe_adapt.stages.base import StageContext
from moe_adapt.upcycle.config import VerifyMode
from moe_adapt.upcycle.convert import Upcycler
from moe_adapt.upcycle.verify import (
    EPS32,
    judge,
    streaming_bytes,
    tolerances,
    verify_checkpoints,
    verify_layerwise,
)

log = logging.getLogger(__name__)

KEYS = ("model", "upcycle", "seed")
DISTRIBUTED = False


def run(ctx: StageContext) -> dict[str, Any]:
    """Write the MoE checkpoint to ``out/model``, verify it, and report its parameters.

    Returns the stage summary; paths in it are relative to the stage folder.
    """
    cfg, out = ctx.cfg, ctx.out
    ucfg = cfg.upcycle
    assert cfg.model.dense is not None  # Config checks it when the upcycle stage is selected
    up = Upcycler(cfg.model.dense, ucfg, seed=cfg.seed, trust_remote_code=cfg.model.trust_remote_code)
    if ucfg.verify != VerifyMode.none:  # before the conversion, not after it
        check_seq_len("upcycle.verify_seq_len", ucfg.verify_seq_len, cfg.model.dense, "model.dense")
    try:
        log.info(
            "upcycle: %s -> %s, %s", up.source_config.model_type, up.layout.model_type, ucfg.method.value
        )
        model_dir = out / "model"
        model_dir.mkdir(parents=True)
        report = up.write(model_dir)
    finally:
        up.close()
    log_param_report(report)
    report["num_layers"] = up.layers
    verify = _verify(cfg, report, model_dir)
    # "exact" is what was verified (None: not checked); what the construction promises is kept apart
    report["exact_by_construction"] = report.pop("exact")
    report = {"exact": verify["exact"], **report, "verify": verify}
    atomic_write_json(out / "report.json", report)
    summary = {k: v for k, v in verify.items() if k != "layers"}  # the per-layer list is in report.json
    return {"model": "model", "params": report["params"], "verify": summary}


def _verify(cfg: Config, report: dict[str, Any], model_dir: Path) -> dict[str, Any]:
    """Compare the written MoE with the dense model (see ``upcycle.verify``); raise when an exact
    conversion is not reproduced. ``exact`` in the result is what was measured: True within the
    bounds, False beyond them, None when nothing was checked."""
    ucfg = cfg.upcycle
    mode = ucfg.verify
    expected = bool(report["exact"])
    if mode == VerifyMode.none:
        log.warning("upcycle: upcycle.verify=none: the output is not checked and not reported as exact")
        return {"mode": "none", "exact": None, "expected_exact": expected}
    assert cfg.model.dense is not None
    dense = cfg.model.dense
    trust = cfg.model.trust_remote_code
    tol = tolerances(ucfg.verify_tolerance, report["num_layers"])
    if mode == VerifyMode.logits:
        stats = verify_checkpoints(dense, model_dir, ucfg.verify_probes, ucfg.verify_seq_len, cfg.seed, trust)
        reference = stats.pop("reference")
        result: dict[str, Any] = {"logits": {"random": stats}, "reference": reference}
    else:  # auto and layers: streaming, bounded by about one layer of each model, fits at any size
        need = streaming_bytes(dense, model_dir)
        whole = 4 * (report["params"]["total"] + report["params"]["total_dense"])
        avail = available_memory_bytes()
        log.info(
            "upcycle: verify layer by layer (upcycle.verify=%s): holds ~%.2f GiB of weights in fp32 "
            "(largest layer of each model + embeddings and heads) instead of %.2f GiB for both whole "
            "models; %s available",
            mode.value,
            need / 2**30,
            whole / 2**30,
            "?" if avail is None else f"{avail / 2**30:.1f} GiB",
        )
        result = verify_layerwise(dense, model_dir, ucfg.verify_probes, ucfg.verify_seq_len, cfg.seed, trust)
        result["memory"] = {"streaming_weights_bytes": need, "whole_models_bytes": whole}
        for layer in result["layers"]:
            log.info(
                "upcycle: layer %d vs dense on the same input: max |diff| %.3g, relative %.3g (%.1f eps)",
                layer["layer"],
                layer["max_abs_diff"],
                layer["max_rel_diff"],
                layer["max_rel_diff"] / EPS32,
            )
        worst = max(result["layers"], key=lambda x: x["max_rel_diff"], default=None)
        result["worst_layer"] = worst
    for kind, stats in result["logits"].items():
        log.info(
            "upcycle: logits vs %s on %s probes %s: max |diff| %.3g, relative %.3g (%.1f eps), "
            "top-1 agreement %.4f",
            result["reference"],
            kind,
            stats["probes"],
            stats["max_abs_diff"],
            stats["max_rel_diff"],
            stats["max_rel_diff"] / EPS32,
            stats["top1_agreement"],
        )
    bad = judge(result, tol)
    # headline numbers: the worst over probe kinds
    result["max_rel_diff"] = max(s["max_rel_diff"] for s in result["logits"].values())
    result["max_abs_diff"] = max(s["max_abs_diff"] for s in result["logits"].values())
    result["top1_agreement"] = min(s["top1_agreement"] for s in result["logits"].values())
    result = {"mode": "logits" if mode == VerifyMode.logits else "layers", "exact": not bad} | result
    result |= {"expected_exact": expected, "tolerance": tol, "failures": bad}
    log.info(
        "upcycle: tolerance %g eps: %.3g relative per layer, %.3g for the logits (%d layers): %s",
        tol["multiple"],
        tol["layer"],
        tol["logits"],
        report["num_layers"],
        "within" if not bad else "exceeded: " + "; ".join(bad),
    )
    if expected and bad:
        raise MoEAdaptError(
            "upcycle: the MoE does not reproduce the dense model although the conversion is exact: "
            f"{'; '.join(bad)} (bounds: upcycle.verify_tolerance={ucfg.verify_tolerance} fp32 eps, i.e. "
            f"{tol['layer']:.3g} per layer and {tol['logits']:.3g} for the logits); nothing was "
            "written. Please report this with the dense checkpoint's config.json"
        )
    return result


def log_param_report(report: dict[str, Any]) -> None:
    """Print the parameter report: totals, active share, expert shapes."""
    p, s = report["params"], report["sizing"]
    lines = [
        f"target {report['target']} ({report['method']}, "
        f"{'exact' if report['exact'] else 'inexact'} by construction), "
        f"dtype {report['dtype']}",
        f"experts: {s['num_experts']} routed (top-{s['top_k']}), granularity {s['granularity']}, "
        f"{s['shared_experts']} shared shard(s), {s['copies']:g} copies of the FFN",
        f"params: total {p['total']:,}  active {p['active']:,}  active fraction {p['active_fraction']:.4f} "
        f"({p['active_fraction_excl_embedding']:.4f} without embeddings)",
        "per-layer shapes: " + ", ".join(f"{k} {tuple(v)}" for k, v in report["layer_shapes"].items()),
    ]
    for line in lines:
        log.info("upcycle: %s", line)
