"""The training loop: take a batch from the sampler, let the engine step, tell the callbacks.

Everything optional (checkpoints, metrics, NaN guard, later eval and logging) is a
:class:`~moe_adapt.train.callbacks.Callback` that saves its own state; the engine owns
forward/backward/optimizer. :meth:`Trainer.state_dict` gathers the step, the engine, the sampler and
every callback, so :meth:`Trainer.resume` continues a run exactly where its checkpoint left it.

Shape legend: ``B`` sequences per batch, ``T1`` seq_len + 1 packed tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from moe_adapt.errors import CheckpointError, MoEAdaptConfigError
from moe_adapt.train.callbacks import Callback, load_checkpoint

log = logging.getLogger(__name__)

STATE_VERSION = 1


class HasTokens(Protocol):
    """A batch: ``tokens`` is ``tokens_BT1`` (inputs ``[:, :-1]``, labels ``[:, 1:]``)."""

    @property
    def tokens(self) -> np.ndarray | torch.Tensor: ...


@dataclass
class Batch:
    """A batch with everything an engine may use besides the tokens (fine-tuning, distillation).

    Shape legend: ``B`` rows, ``T`` label positions (``T1 - 1``), ``K`` teacher top-k entries.
    """

    tokens: np.ndarray
    """``tokens_BT1``: inputs are ``[:, :-1]``, labels ``[:, 1:]``."""

    loss_mask: np.ndarray | None = None
    """``[B, T]`` bool: which labels count (e.g. response tokens only); None: all."""

    position_ids: np.ndarray | None = None
    """``[B, T]`` positions of the inputs, restarting at 0 where a packed example starts."""

    lang_ids: np.ndarray | None = None
    """``[B, T]`` index into ``langs`` of the example each label belongs to."""

    langs: tuple[str, ...] = ()
    """Language names that ``lang_ids`` index."""

    topk_ids: np.ndarray | None = None
    """``[B, T, K]`` the teacher's most likely next tokens at each label position (offline KD)."""

    topk_logp: np.ndarray | None = None
    """``[B, T, K]`` their log-probabilities."""


class BatchSource(Protocol):
    """What the trainer needs from a sampler (:class:`~moe_adapt.train.sampler.MixtureSampler` is one)."""

    def next_batch(self, batch_size: int) -> HasTokens: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Engine(Protocol):
    """What the trainer needs from an engine (:class:`~moe_adapt.engines.hf.HFEngine` is one)."""

    def step(self, batch: HasTokens) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Trainer:
    """A small loop over ``max_steps`` optimizer steps of ``batch_size`` sequences each.

    Callbacks run after every step in ascending ``order`` (stable), so checkpointing (order 100)
    sees the state the other callbacks reached at that step.
    """

    def __init__(
        self,
        engine: Engine,
        sampler: BatchSource,
        callbacks: Sequence[Callback] = (),
        *,
        max_steps: int,
        batch_size: int,
    ) -> None:
        if max_steps < 0:
            raise MoEAdaptConfigError(f"train.max_steps={max_steps!r} is invalid: must be >= 0")
        if batch_size < 1:
            raise MoEAdaptConfigError(f"train.batch_size={batch_size!r} is invalid: must be >= 1")
        names = [cb.name for cb in callbacks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise MoEAdaptConfigError(f"callbacks {dupes} appear twice; give each a distinct name")
        self.engine, self.sampler = engine, sampler
        self.callbacks: list[Callback] = sorted(callbacks, key=lambda cb: cb.order)
        self.max_steps, self.batch_size = int(max_steps), int(batch_size)
        self.step = 0  # optimizer steps done (skipped ones included)
        self.should_stop = False  # a callback may set it to end training after the current step

    def fit(self) -> int:
        """Train until ``max_steps`` (or a callback stops it); returns the step reached."""
        for cb in self.callbacks:
            cb.on_train_start(self)
        while self.step < self.max_steps and not self.should_stop:
            batch = self.sampler.next_batch(self.batch_size)
            metrics = self.engine.step(batch)
            self.step += 1
            for cb in self.callbacks:
                cb.on_step_end(self, self.step, metrics)
        for cb in self.callbacks:
            cb.on_train_end(self)
        return self.step

    def state_dict(self) -> dict[str, Any]:
        """Step, engine, sampler and callbacks' states (tensors and JSON values)."""
        return {
            "version": STATE_VERSION,
            "step": self.step,
            "engine": self.engine.state_dict(),
            "sampler": self.sampler.state_dict(),
            "callbacks": {cb.name: cb.state_dict() for cb in self.callbacks},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` into a trainer built with the same engine, sampler and callbacks."""
        if state.get("version") != STATE_VERSION:
            raise CheckpointError(f"trainer state version {state.get('version')!r} is not {STATE_VERSION}")
        self.step = int(state["step"])
        self.engine.load_state_dict(state["engine"])
        self.sampler.load_state_dict(state["sampler"])
        saved = state.get("callbacks", {})
        for cb in self.callbacks:
            if cb.name in saved:
                cb.load_state_dict(saved[cb.name])
            else:
                log.warning("resume: no saved state for callback %s; it starts fresh", cb.name)
        extra = sorted(set(saved) - {cb.name for cb in self.callbacks})
        if extra:
            log.warning("resume: the checkpoint has state for callbacks %s that this run does not use", extra)

    def resume(self, checkpoint_dir: str | Path) -> None:
        """Restore everything from a ``step_NNNNNN`` folder written by ``CheckpointCallback``."""
        self.load_state_dict(load_checkpoint(checkpoint_dir))
        log.info("resumed from %s at step %d", checkpoint_dir, self.step)
