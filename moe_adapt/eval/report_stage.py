"""The ``report`` stage: one Markdown report (with plots) over a Hydra multirun sweep directory.

Reads ``<sweep_dir>/<job>/<report.metrics_path>`` (the eval stage's ``metrics.json``) of every job,
groups runs by their overrides other than the seed, and writes ``report.md``, ``report.json`` and
``plots/<metric>.png`` into the stage folder (see :func:`moe_adapt.eval.report.build_report`). Jobs
whose metrics are missing or unreadable are listed as failed and skipped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from moe_adapt.errors import MoEAdaptConfigError
from moe_adapt.eval.config import ReportConfig
from moe_adapt.eval.report import build_report

__all__ = ["run"]

log = logging.getLogger("moe_adapt.eval")


def run(cfg: Any, out: Path) -> dict[str, Any]:
    """Aggregate ``cfg.report.sweep_dir`` into ``out``; returns the stage summary (relative paths).

    ``cfg`` needs ``.report`` (:class:`ReportConfig`) and ``.seed`` (the bootstrap seed).
    """
    rcfg: ReportConfig = cfg.report
    if not rcfg.sweep_dir:
        raise MoEAdaptConfigError(
            "report.sweep_dir=None is invalid: stage report needs the multirun folder, "
            "e.g. report.sweep_dir=runs/tiny-multirun/2025-01-01_12-00-00"
        )
    sweep = Path(rcfg.sweep_dir)
    if not sweep.is_dir():
        raise MoEAdaptConfigError(f"report.sweep_dir={str(sweep)!r} is invalid: no such folder")
    build_report(
        sweep,
        out_dir=out,
        contamination=rcfg.contamination,
        metrics=list(rcfg.metrics) or None,
        metrics_path=rcfg.metrics_path,
        seed_key=rcfg.seed_key,
        n_resamples=rcfg.n_resamples,
        confidence=rcfg.confidence,
        bootstrap_seed=int(getattr(cfg, "seed", 0)),
    )
    data = json.loads((out / "report.json").read_text(encoding="utf-8"))
    failed = data["failed"]
    for f in failed:
        log.warning("report: run %s skipped: %s", f["run"], f["reason"])
    used = sum(len(c["runs"]) for c in data["conditions"].values())
    log.info("report: %d runs used, %d failed -> %s", used, len(failed), out / "report.md")
    return {
        "report": "report.md",
        "json": "report.json",
        "plots": sorted(str(p.relative_to(out)) for p in (out / "plots").glob("*.png")),
        "runs": used,
        "failed": [f["run"] for f in failed],
        "conditions": list(data["conditions"]),
    }
