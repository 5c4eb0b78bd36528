"""Schemas of continued pretraining's config groups: ``cpt`` (the loop, its inputs and its outputs),
``mixture`` (how much of each source the stream holds: :mod:`moe_adapt.cpt.sampler`) and
``curriculum`` (difficulty phases: :mod:`moe_adapt.cpt.curriculum`).

The optimizer and loss terms are configured by the ``engine`` group (``engine=hf|megatron|auto``,
:mod:`moe_adapt.engines`),
anti-forgetting anchors by ``anchor``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NoReturn

from moe_adapt.errors import invalid

EXHAUSTION = ("repeat", "stop_phase")
"""What ``mixture.exhaustion`` may be."""

ORDERS = ("easy_to_hard", "hard_to_easy", "random")
"""What ``curriculum.order`` may be."""

PACINGS = ("step", "linear")
"""What ``curriculum.pacing`` may be."""

BUCKETS = ("by_phase", "all")
"""What ``curriculum.buckets`` may be."""


def _fail(key: str, value: object, allowed: str) -> NoReturn:
    invalid(f"cpt.{key}", value, allowed)


def _fail_mixture(key: str, value: object, allowed: str) -> NoReturn:
    invalid(f"mixture.{key}", value, allowed)


def _fail_curriculum(key: str, value: object, allowed: str) -> NoReturn:
    invalid(f"curriculum.{key}", value, allowed)


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


@dataclass
class MixtureConfig:
    """The ``mixture`` config group: how much of each source the training stream holds."""

    target_ratio: float | None = 0.8
    """Share of training tokens from sources with role target; the rest is split over the other roles'
    sources in proportion to their tokens. Set to null when using weights."""

    weights: dict[str, float] = field(default_factory=dict)
    """Explicit weights per source name or role (normalised to sum 1; a role's weight is split over its
    sources in proportion to their tokens). Needs target_ratio=null."""

    replay: list[str] = field(default_factory=lambda: ["anchor"])
    """Sources or roles read from all their buckets in every phase (continuous replay / anti-forgetting
    anchors) instead of following the curriculum; their share is kept in every phase like any other."""

    phase_weights: list[dict[str, float]] | None = None
    """A source-staged curriculum (nanotron's data stages, OLMo-core's mixtures): one ``{source or role:
    weight}`` per curriculum phase, each resolved like ``weights`` (normalised; a role's weight split
    over its sources by tokens). A source left out of a phase (or given 0) is not read in it. The list
    has one entry per phase (curriculum.phase_steps/phase_tokens), so it needs target_ratio=null and
    weights={}. Shares switch at the phase boundary (whatever curriculum.pacing) and hold exactly
    within each phase: the scheduler restarts its counts at each boundary. Usually with
    curriculum.buckets=all, so that phases change sources only. null: the same weights in every phase."""

    exhaustion: str = "repeat"
    """When a pool runs out: repeat (re-permute, next epoch, up to max_epochs) or stop_phase (end the
    current phase early and move to the next)."""

    max_epochs: int = 4
    """With exhaustion=repeat: most passes over any pool; one more is an error naming the source."""

    seq_len: int = 2048
    """Tokens per training sequence; the sampler yields seq_len + 1 ids (inputs and shifted labels).
    At most the max_position_embeddings of cpt.init_from, checked when the cpt stage starts."""

    def __post_init__(self) -> None:
        if self.target_ratio is not None and not 0.0 < self.target_ratio <= 1.0:
            _fail_mixture(
                "target_ratio", self.target_ratio, "must be in (0, 1], or null to use mixture.weights"
            )
        if self.weights and self.target_ratio is not None:
            _fail_mixture("target_ratio", self.target_ratio, "must be null when mixture.weights is set")
        if self.phase_weights is not None:
            self._check_phase_weights()
        elif not self.weights and self.target_ratio is None:
            _fail_mixture(
                "weights",
                dict(self.weights),
                "set mixture.weights, mixture.target_ratio or mixture.phase_weights",
            )
        for key, w in self.weights.items():
            if not (isinstance(w, int | float) and math.isfinite(w) and w >= 0):
                _fail_mixture(f"weights.{key}", w, "must be a finite number >= 0")
        if self.weights and sum(self.weights.values()) <= 0:
            _fail_mixture("weights", dict(self.weights), "at least one weight must be > 0")
        if self.exhaustion not in EXHAUSTION:
            _fail_mixture("exhaustion", self.exhaustion, f"choose one of {', '.join(EXHAUSTION)}")
        if self.max_epochs < 1:
            _fail_mixture("max_epochs", self.max_epochs, "must be >= 1")
        if self.seq_len < 1:
            _fail_mixture("seq_len", self.seq_len, "must be >= 1")

    def _check_phase_weights(self) -> None:
        phases = self.phase_weights
        assert phases is not None
        if self.target_ratio is not None or self.weights:
            _fail_mixture(
                "phase_weights",
                [dict(p) for p in phases],
                "replaces mixture.target_ratio and mixture.weights: set target_ratio=null and weights={}",
            )
        if not phases:
            _fail_mixture("phase_weights", [], "give one {source or role: weight} per phase, or null")
        for i, spec in enumerate(phases):
            for key, w in spec.items():
                if not (isinstance(w, int | float) and math.isfinite(w) and w >= 0):
                    _fail_mixture(f"phase_weights[{i}].{key}", w, "must be a finite number >= 0")
            if sum(spec.values()) <= 0:
                _fail_mixture(f"phase_weights[{i}]", dict(spec), "at least one weight must be > 0")


@dataclass
class CurriculumConfig:
    """The ``curriculum`` config group: phases over difficulty buckets and per-phase LR re-warming."""

    order: str = "easy_to_hard"
    """easy_to_hard (bucket 0 first), hard_to_easy (reversed) or random (a permutation drawn from the
    seed)."""

    phase_tokens: list[int] | None = None
    """Length in training tokens (sequences x seq_len) of every phase but the last, which runs to the
    end of training: N entries make N + 1 phases. Set this or phase_steps; with neither, one phase
    reads every bucket (no curriculum)."""

    phase_steps: list[int] | None = None
    """Length in optimizer steps of every phase but the last (which runs to the end): N entries make
    N + 1 phases. Needs the global batch size."""

    buckets: str = "by_phase"
    """by_phase: each phase reads its group of difficulty buckets (an easy -> hard curriculum);
    all: every phase reads every bucket, so phases differ only in mixture.phase_weights (a
    source-staged curriculum: broad -> specific, base languages -> added languages)."""

    pacing: str = "step"
    """step (switch buckets at the phase boundary) or linear (blend the next phase in; see blend_fraction)."""

    blend_fraction: float = 0.1
    """With pacing=linear: the last fraction of each phase over which the next phase's share grows
    linearly from 0 to 1. Must be in (0, 1]."""

    rewarm_steps: int = 0
    """Linear learning-rate re-warm-up over this many steps at the start of every phase after the first
    (0: none)."""

    rewarm_start: float = 0.1
    """Learning-rate factor at the first re-warm step (the factor reaches 1 after rewarm_steps). In [0, 1]."""

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            _fail_curriculum("order", self.order, f"choose one of {', '.join(ORDERS)}")
        if self.buckets not in BUCKETS:
            _fail_curriculum("buckets", self.buckets, f"choose one of {', '.join(BUCKETS)}")
        if self.pacing not in PACINGS:
            _fail_curriculum("pacing", self.pacing, f"choose one of {', '.join(PACINGS)}")
        if self.phase_tokens is not None and self.phase_steps is not None:
            _fail_curriculum("phase_steps", self.phase_steps, "set phase_tokens or phase_steps, not both")
        for key in ("phase_tokens", "phase_steps"):
            lengths = getattr(self, key)
            if lengths is not None:
                if len(lengths) == 0:
                    _fail_curriculum(
                        key, lengths, "give the length of every phase but the last (or null for one phase)"
                    )
                if any(int(n) < 1 for n in lengths):
                    _fail_curriculum(key, lengths, "every phase length must be >= 1")
        if not 0.0 < self.blend_fraction <= 1.0:
            _fail_curriculum("blend_fraction", self.blend_fraction, "must be in (0, 1]")
        if self.rewarm_steps < 0:
            _fail_curriculum("rewarm_steps", self.rewarm_steps, "must be >= 0")
        if not 0.0 <= self.rewarm_start <= 1.0:
            _fail_curriculum("rewarm_start", self.rewarm_start, "must be in [0, 1]")

    @property
    def num_phases(self) -> int:
        """Number of phases: one more than the lengths given (the last runs to the end)."""
        lengths = self.phase_tokens if self.phase_tokens is not None else self.phase_steps
        return 1 if lengths is None else len(lengths) + 1
