"""Easy-to-hard curriculum: which difficulty buckets each phase of continued pretraining draws from.

The data stage cuts every language into ``K`` quantile buckets of difficulty (bucket 0 is the
easiest). A curriculum has ``P <= K`` phases; the buckets, ordered by ``order``, are split into ``P``
contiguous groups (``numpy.array_split``), so with ``P == K`` phase ``i`` reads bucket ``i`` alone
(easy_to_hard). With ``pacing=linear`` the next phase's buckets are blended in linearly over the last
``blend_fraction`` of each phase. The lengths of every phase but the last are given, in tokens or in
optimizer steps; the last phase goes on for as long as training does, so ``P - 1`` lengths make
``P`` phases (``[40, 30]``: three phases, easy for 40 steps, medium for 30, then hard).

With ``buckets=all`` every phase reads every bucket (``order`` has nothing to order): the phases then
differ only in the sources' weights (``mixture.phase_weights``, a source-staged curriculum, applied by
:mod:`moe_adapt.cpt.sampler`).

:func:`phase_at` is a pure function of (config, position, number of buckets, seed).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import NoReturn

import numpy as np

from moe_adapt.cpt.config import CurriculumConfig
from moe_adapt.errors import MoEAdaptConfigError, invalid

_RANDOM_ORDER_SALT = 0x63757272  # "curr": keeps the bucket permutation apart from other seeded draws


def _fail(key: str, value: object, allowed: str) -> NoReturn:
    invalid(f"curriculum.{key}", value, allowed)


@dataclass(frozen=True)
class PhasePoint:
    """Where a position falls in the curriculum."""

    phase: int
    """Index of the phase (0-based)."""
    blend: float
    """Share of the next phase's buckets (0 outside a linear blend window)."""
    bucket_weights: tuple[float, ...]
    """Sampling weight of every bucket 0..K-1 (sums to 1; a phase's buckets share its weight equally)."""
    phase_start: int
    """Position where the phase starts, in the curriculum's unit (tokens or steps)."""


class Curriculum:
    """A :class:`CurriculumConfig` resolved against the number of buckets in the shards.

    Positions are in tokens when the phases are given in tokens and in steps when given in steps;
    ``tokens_per_step`` (global batch size x seq_len) converts between them when needed.
    """

    def __init__(
        self, cfg: CurriculumConfig, num_buckets: int, *, tokens_per_step: int | None = None, seed: int = 0
    ) -> None:
        if num_buckets < 1:
            raise MoEAdaptConfigError(f"the shards have {num_buckets} difficulty buckets; need at least 1")
        self.cfg = cfg
        self.num_buckets = num_buckets
        self.tokens_per_step = tokens_per_step
        self.unit = "steps" if cfg.phase_steps is not None else "tokens"
        lengths = cfg.phase_steps if cfg.phase_steps is not None else cfg.phase_tokens
        key = "phase_steps" if cfg.phase_steps is not None else "phase_tokens"
        if cfg.num_phases > num_buckets and cfg.buckets == "by_phase":
            _fail(
                key,
                lengths,
                f"{cfg.num_phases} phases (one per length, and the last, which runs to the end) but the "
                f"shards have only {num_buckets} difficulty buckets",
            )
        if cfg.order == "easy_to_hard":
            ordered = list(range(num_buckets))
        elif cfg.order == "hard_to_easy":
            ordered = list(range(num_buckets))[::-1]
        else:
            ordered = np.random.default_rng([seed, _RANDOM_ORDER_SALT]).permutation(num_buckets).tolist()
        self.groups: list[tuple[int, ...]] = (
            [tuple(range(num_buckets))] * cfg.num_phases
            if cfg.buckets == "all"
            else [tuple(int(b) for b in g) for g in np.array_split(np.asarray(ordered), cfg.num_phases)]
        )
        self.lengths: list[int] = [int(n) for n in lengths] if lengths is not None else []
        """Length of every phase but the last."""
        self.starts: list[int] = [0]
        for n in self.lengths:
            self.starts.append(self.starts[-1] + n)

    @property
    def num_phases(self) -> int:
        """Number of phases."""
        return len(self.groups)

    def describe(self) -> str:
        """One line: each phase's buckets and length, e.g. ``3 phases: buckets [0] for 40 steps, [1] for
        30 steps, [2] to the end``."""
        if self.cfg.buckets == "all":
            ends = ", ".join(f"{n:,}" for n in self.lengths)
            return f"{self.num_phases} source stages, every bucket read (mixture.phase_weights)" + (
                f"; stage lengths {ends} {self.unit}, the last to the end" if self.lengths else ""
            )
        parts = [f"{list(g)} for {n:,} {self.unit}" for g, n in zip(self.groups, self.lengths, strict=False)]
        if self.num_phases == 1:
            return f"1 phase: buckets {list(self.groups[0])}"
        parts.append(f"{list(self.groups[-1])} to the end")
        return f"{self.num_phases} phases ({self.cfg.order}): buckets " + ", ".join(parts)

    def _to_units(self, tokens: int) -> float:
        if self.unit == "tokens":
            return tokens
        if not self.tokens_per_step:
            raise MoEAdaptConfigError(
                "curriculum.phase_steps needs the global batch size to place token positions in phases"
            )
        return tokens / self.tokens_per_step

    def blend_window(self, phase: int) -> tuple[float, float] | None:
        """``(start, length)`` of the phase's linear blend window in units; None with step pacing or in
        the last phase."""
        if self.cfg.pacing != "linear" or phase >= self.num_phases - 1:
            return None
        length = self.cfg.blend_fraction * self.lengths[phase]
        return self.starts[phase] + self.lengths[phase] - length, length

    def phase_end(self, phase: int) -> float:
        """Position (units) where ``phase`` ends; infinite for the last phase."""
        return float("inf") if phase >= self.num_phases - 1 else self.starts[phase] + self.lengths[phase]

    def locate(self, position: float) -> PhasePoint:
        """The phase and bucket blend at ``position`` (in the curriculum's unit)."""
        if position < 0:
            raise ValueError(f"position must be >= 0, got {position}")
        phase = max(0, bisect.bisect_right(self.starts, position) - 1)
        blend = 0.0
        window = self.blend_window(phase)
        if window is not None and position >= window[0]:
            blend = min(1.0, (position - window[0]) / window[1])
        weights = [0.0] * self.num_buckets
        for b in self.groups[phase]:
            weights[b] += (1.0 - blend) / len(self.groups[phase])
        if blend > 0.0:
            for b in self.groups[phase + 1]:
                weights[b] += blend / len(self.groups[phase + 1])
        return PhasePoint(phase, blend, tuple(weights), self.starts[phase])

    def phase_at(self, step: int) -> PhasePoint:
        """The phase and bucket blend at optimizer ``step`` (0-based)."""
        if self.unit == "steps":
            return self.locate(step)
        if not self.tokens_per_step:
            raise MoEAdaptConfigError("curriculum.phase_tokens needs tokens_per_step to locate a step")
        return self.locate(step * self.tokens_per_step)

    def phase_at_tokens(self, tokens: int) -> PhasePoint:
        """The phase and bucket blend after ``tokens`` training tokens."""
        return self.locate(self._to_units(tokens))

    def lr_factor(self, step: int) -> float:
        """Learning-rate multiplier of the per-phase re-warm-up at ``step`` (1.0 outside re-warm windows)."""
        point = self.phase_at(step)
        if self.cfg.rewarm_steps == 0 or point.phase == 0:
            return 1.0
        start = point.phase_start
        if self.unit == "tokens":
            assert self.tokens_per_step  # phase_at checked it
            start = -(-start // self.tokens_per_step)  # first step at or after the phase start
        k = step - start
        if k >= self.cfg.rewarm_steps:
            return 1.0
        s = self.cfg.rewarm_start
        return s + (1.0 - s) * k / self.cfg.rewarm_steps


def unreached_phases(cfg: CurriculumConfig, max_steps: int, tokens_per_step: int) -> str | None:
    """A warning when training ends before the curriculum's last phase starts (the lengths of the
    phases before it add up to ``max_steps`` or more, so the later phases never train), naming both
    numbers; None when every phase trains. ``tokens_per_step`` converts ``phase_tokens``."""
    lengths = cfg.phase_steps if cfg.phase_steps is not None else cfg.phase_tokens
    if not lengths:
        return None
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + int(n))
    if cfg.phase_steps is not None:
        start_steps = starts
        total = f"curriculum.phase_steps {list(lengths)} sum to {starts[-1]:,} steps"
    else:
        start_steps = [-(-s // tokens_per_step) for s in starts]  # the first step at or after it
        total = (
            f"curriculum.phase_tokens {list(lengths)} sum to {starts[-1]:,} tokens "
            f"({start_steps[-1]:,} steps of {tokens_per_step:,} tokens)"
        )
    reached = sum(1 for s in start_steps if s < max_steps)
    if reached == len(start_steps):
        return None
    return (
        f"{total} but cpt.max_steps={max_steps:,}: only {reached} of the curriculum's {len(start_steps)} "
        f"phases train (phase {reached} onward never starts); raise cpt.max_steps or shorten the phases"
    )


def phase_at(
    cfg: CurriculumConfig,
    step: int,
    *,
    num_buckets: int,
    tokens_per_step: int | None = None,
    seed: int = 0,
) -> PhasePoint:
    """Pure function: the phase and blend weights over buckets at optimizer ``step``."""
    return Curriculum(cfg, num_buckets, tokens_per_step=tokens_per_step, seed=seed).phase_at(step)
