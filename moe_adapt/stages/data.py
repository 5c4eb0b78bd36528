"""The ``data`` stage: raw bilingual text -> decontaminated, difficulty-bucketed token shards
(:func:`moe_adapt.data.pipeline.build_corpus`, which lists its steps and outputs).

Finished steps are kept in the stage's scratch folder, so a re-run after a crash continues from the
last one.
"""

from __future__ import annotations

from typing import Any

from moe_adapt.data.pipeline import build_corpus
from moe_adapt.errors import MoEAdaptConfigError
from moe_adapt.stages.base import StageContext

KEYS = ("data", "model", "seed")
DISTRIBUTED = False


def run(ctx: StageContext) -> dict[str, Any]:
    """Build the shards into the stage folder with ``data.tokenize.tokenizer`` (else ``model.dense``'s)."""
    cfg = ctx.cfg
    tokenizer = cfg.data.tokenize.tokenizer or cfg.model.dense
    if not tokenizer:
        raise MoEAdaptConfigError(
            "data.tokenize.tokenizer is required (or set model.dense to take its tokenizer)"
        )
    return build_corpus(cfg.data, ctx.out, ctx.work, tokenizer=tokenizer, seed=cfg.seed)
