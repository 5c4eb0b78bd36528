"""The ``distill`` stage: chain-of-thought distillation in the phases ``distill.phases`` lists
(:func:`moe_adapt.distill.pipeline.run_distill`: each phase resumable in the scratch folder, the
artifacts, ``model/``, ``summary.json`` and ``report.md`` collected in the stage folder). The
``mixture`` group gives ``distill.replay`` its sources and ratio and the held-out loss its window.

Under torchrun every rank runs the stage: the training phases train data-parallel (the engine's DDP,
token-weighted losses as in cpt), the hf backend's generate phase splits its prompt shards across
the ranks (the same traces as one process), and verify, held-out accuracy and loss run on rank 0 alone
while the other ranks wait (:func:`moe_adapt.distill.pipeline.run_distill`)."""

from __future__ import annotations

from typing import Any

from moe_adapt.distill.pipeline import run_distill
from moe_adapt.stages.base import StageContext

KEYS = ("distill", "engine", "mixture", "seed")
DISTRIBUTED = True


def run(ctx: StageContext) -> dict[str, Any]:
    """Run ``distill.phases`` into the stage folder with the ``engine`` and ``mixture`` groups' settings."""
    cfg = ctx.cfg
    return run_distill(
        cfg.distill,
        cfg.engine,
        ctx.out,
        ctx.work,
        seed=cfg.seed,
        logging_callbacks=ctx.logging_callbacks,
        mixture=cfg.mixture,
    )
