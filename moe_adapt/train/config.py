"""Schema of the ``cpt`` config group (continued pretraining): the loop, its inputs and its outputs.

The data stream is configured by the ``mixture`` and ``curriculum`` groups
(:mod:`moe_adapt.train.sampler`, :mod:`moe_adapt.train.curriculum`), the optimizer and loss terms
by the ``engine`` group (``engine=hf|megatron|auto``, :mod:`moe_adapt.engines`), anti-forgetting
anchors by ``anchor``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NoReturn

from moe_adapt.errors import invalid


def _fail(key: str, value: object, allowed: str) -> NoReturn:
    invalid(f"cpt.{key}", value, allowed)


@dataclass
class CptConfig:
    """The ``cpt`` stage: continued pretraining of the upcycled MoE on the data stage's shards."""

    init_from: str | None = None
    """HF checkpoint folder to start from (the recipes set ${run_dir}/upcycle/model)."""

    shards: str | None = None
    """Training shards folder with manifest.json (the recipes set ${run_dir}/data/shards)."""

    heldout: str | None = None
    """Held-out shards for the per-language eval hook (null: no eval hook)."""

    max_steps: int = 100
    """Optimizer steps."""

    batch_size: int = 8
    """Sequences per step (each of mixture.seq_len + 1 tokens)."""

    checkpoint_every: int = 50
    """Steps between checkpoints (kept in <run_dir>/.work/cpt until the stage finishes)."""

    keep_last: int = 2
    """Checkpoints kept."""

    eval_every: int = 50
    """Steps between held-out per-language loss evaluations (0: only before and after training)."""

    eval_docs: int = 32
    """Held-out documents per language for the eval hook (a fixed sample)."""

    max_bad_steps: int = 3
    """Stop with an error after this many consecutive steps with a non-finite loss (each is skipped)."""

    forgetting_bound: dict[str, float] = field(default_factory=dict)
    """The stated bound on forgetting: per language, the largest rise of its held-out loss over the stage
    (after minus before, in nats per token) the run claims, e.g. {en: 0.1}. summary.json reports for
    each language whether it held (``forgetting``); a breach is logged as a warning, not an error.
    Needs cpt.heldout. {}: no bound."""

    def __post_init__(self) -> None:
        for key in ("max_steps", "batch_size", "checkpoint_every", "keep_last", "eval_docs", "max_bad_steps"):
            if getattr(self, key) < 1:
                _fail(key, getattr(self, key), "must be >= 1")
        if self.eval_every < 0:
            _fail("eval_every", self.eval_every, "must be >= 0")
        for lang, bound in self.forgetting_bound.items():
            if not lang or not math.isfinite(bound) or bound < 0:
                _fail(
                    "forgetting_bound",
                    dict(self.forgetting_bound),
                    f"each entry is a language and the largest held-out loss rise allowed, a number >= 0 "
                    f"(got {lang}: {bound})",
                )
        if self.forgetting_bound and not self.heldout:
            _fail(
                "forgetting_bound",
                dict(self.forgetting_bound),
                "a bound on forgetting is checked on the held-out loss: set cpt.heldout too",
            )
