"""The ``report`` stage: one Markdown report (with plots) over a Hydra multirun sweep directory.

Reads ``<sweep_dir>/<job>/<report.metrics_path>`` (the eval stage's ``metrics.json``) of every job,
groups runs by their overrides other than the seed, and writes ``report.md``, ``report.json`` and
``plots/<metric>.png`` into the stage folder (:func:`moe_adapt.eval.report.write_report`). Jobs
whose metrics are missing or unreadable are listed as failed and skipped.
"""

from __future__ import annotations

from typing import Any

from moe_adapt.eval.report import write_report
from moe_adapt.stages.base import StageContext

KEYS = ("report", "seed")
DISTRIBUTED = False


def run(ctx: StageContext) -> dict[str, Any]:
    """Aggregate ``report.sweep_dir`` into the stage folder (``seed`` seeds the bootstrap, which is used
    from 30 seeds on)."""
    return write_report(ctx.cfg.report, ctx.out, seed=ctx.cfg.seed)
