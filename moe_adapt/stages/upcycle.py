"""The ``upcycle`` stage: ``model.dense`` -> ``<run_dir>/upcycle/model`` (+ ``report.json``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from moe_adapt.checkpoint.hf import check_seq_len
from moe_adapt.config.schema import Config
from moe_adapt.errors import MoEAdaptError
from moe_adapt.fs import atomic_write_json
from moe_adapt.stages.base import StageContext
from moe_adapt.upcycle.config import VerifyMode
from moe_adapt.upcycle.convert import Upcycler
from moe_adapt.upcycle.verify import available_memory_bytes, verify_checkpoints

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
    report["verify"] = _verify(cfg, report, model_dir)
    atomic_write_json(out / "report.json", report)
    return {"model": "model", "params": report["params"], "verify": report["verify"]}


def _verify(cfg: Config, report: dict[str, Any], model_dir: Path) -> dict[str, Any]:
    ucfg = cfg.upcycle
    mode = ucfg.verify
    if mode == VerifyMode.auto:
        need = 4 * (report["params"]["total"] + report["params"]["total_dense"])
        avail = available_memory_bytes()
        if avail is not None and need > avail / 2:
            log.warning(
                "upcycle: skipping the logit check: both models in fp32 need %.1f GiB, %.1f GiB "
                "available (upcycle.verify=logits forces it)",
                need / 2**30,
                avail / 2**30,
            )
            return {"skipped": "not enough memory for both models in fp32"}
    elif mode == VerifyMode.none:
        return {"skipped": "upcycle.verify=none"}
    assert cfg.model.dense is not None
    result = verify_checkpoints(
        cfg.model.dense,
        model_dir,
        ucfg.verify_probes,
        ucfg.verify_seq_len,
        seed=cfg.seed,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    log.info(
        "upcycle: logits vs dense on %d x %d probe tokens: max |diff| %.3g, relative %.3g, "
        "top-1 agreement %.4f",
        ucfg.verify_probes,
        ucfg.verify_seq_len,
        result["max_abs_diff"],
        result["max_rel_diff"],
        result["top1_agreement"],
    )
    if report["exact"] and report["rounded_to"]:
        # The MoE equals the dense model with its weights rounded to upcycle.dtype; the check above
        # compares it with the unrounded model, so its difference is that rounding's, not a fault.
        log.info(
            "upcycle: upcycle.dtype=%s rounds the dense weights: the difference above is that rounding's "
            "(the MoE reproduces %s)",
            report["rounded_to"],
            report["reference"],
        )
        result["reference"] = "model.dense (unrounded)"
    elif report["exact"]:
        result["tolerance"] = ucfg.verify_tolerance
        if result["max_rel_diff"] > ucfg.verify_tolerance:
            raise MoEAdaptError(
                f"upcycle: the MoE's logits differ from the dense model's by "
                f"{result['max_rel_diff']:.3g} (relative), "
                f"above upcycle.verify_tolerance={ucfg.verify_tolerance}; nothing was written. "
                "Please report this "
                "with the dense checkpoint's config.json"
            )
    return result


def log_param_report(report: dict[str, Any]) -> None:
    """Print the parameter report: totals, active share, expert shapes."""
    p, s = report["params"], report["sizing"]
    lines = [
        f"target {report['target']} ({report['method']}, {'exact' if report['exact'] else 'inexact'}), "
        f"dtype {report['dtype']}",
        f"experts: {s['num_experts']} routed (top-{s['top_k']}), granularity {s['granularity']}, "
        f"{s['shared_experts']} shared shard(s), {s['copies']:g} copies of the FFN",
        f"params: total {p['total']:,}  active {p['active']:,}  active fraction {p['active_fraction']:.4f} "
        f"({p['active_fraction_excl_embedding']:.4f} without embeddings)",
        "per-layer shapes: " + ", ".join(f"{k} {tuple(v)}" for k, v in report["layer_shapes"].items()),
    ]
    for line in lines:
        log.info("upcycle: %s", line)
