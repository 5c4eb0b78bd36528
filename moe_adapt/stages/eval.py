"""The ``eval`` stage: every checkpoint of ``eval.models`` on held-out text, benchmarks and routing
(:func:`moe_adapt.eval.evaluate.evaluate`, which lists the files it writes)."""

from __future__ import annotations

from typing import Any

from moe_adapt.eval.evaluate import evaluate
from moe_adapt.stages.base import StageContext

KEYS = ("eval", "seed")
DISTRIBUTED = False


def run(ctx: StageContext) -> dict[str, Any]:
    """Evaluate ``eval.models`` into the stage folder, drawing samples with ``seed``."""
    return evaluate(ctx.cfg.eval, ctx.out, seed=ctx.cfg.seed)
