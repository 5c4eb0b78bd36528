"""The training loop: take a batch from the sampler, let the engine step, tell the callbacks.

Everything optional (checkpoints, metrics, NaN guard, later eval and logging) is a
:class:`~moe_adapt.train.callbacks.Callback` that saves its own state; the engine owns
forward/backward/optimizer. :meth:`Trainer.state_dict` gathers the step, the engine, the sampler and
every callback, so :meth:`Trainer.resume` continues a run exactly where its checkpoint left it.

An engine with ``save_sharded`` / ``load_sharded`` (:class:`ShardedEngine`: the megatron engine) is
checkpointed differently: every rank writes its part of the model and optimizer into the
checkpoint's ``engine/`` folder together, and the trainer state holds only the rest of the engine's
state (see :class:`~moe_adapt.train.callbacks.CheckpointCallback`).

Shape legend: ``B`` sequences per batch, ``T1`` seq_len + 1 packed tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from moe_adapt.checkpoint.trainer_state import load_checkpoint
from moe_adapt.engines.base import Engine
from moe_adapt.errors import CheckpointError, MoEAdaptConfigError
from moe_adapt.train.callbacks import Callback

log = logging.getLogger(__name__)

STATE_VERSION = 1


class HasTokens(Protocol):
    """A batch: ``tokens`` is ``tokens_BT1`` (inputs ``[:, :-1]``, labels ``[:, 1:]``)."""

    @property
    def tokens(self) -> np.ndarray | torch.Tensor: ...


class BatchSource(Protocol):
    """What the trainer needs from a sampler (:class:`~moe_adapt.train.sampler.MixtureSampler` is one)."""

    def next_batch(self, batch_size: int) -> HasTokens: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class ShardedEngine(Protocol):
    """An engine whose model and optimizer every rank saves together, each its own part
    (:class:`~moe_adapt.engines.megatron.engine.MegatronEngine`, with megatron's dist_checkpointing).

    ``save_sharded(path)`` is collective: it writes into folder ``path`` and returns the rest of the
    engine state (tensors and JSON values) for rank 0 to write; ``load_sharded(path, state)`` is
    collective and restores both. ``state_dict`` / ``load_state_dict`` stay the in-memory state.
    """

    def save_sharded(self, path: Path) -> dict[str, Any]: ...

    def load_sharded(self, path: Path, state: dict[str, Any]) -> None: ...


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
            describe = getattr(batch, "metrics", None)  # the sampler's batches: phase, source shares
            if describe is not None:
                metrics.update(describe())
            self.step += 1
            for cb in self.callbacks:
                cb.on_step_end(self, self.step, metrics)
        for cb in self.callbacks:
            cb.on_train_end(self)
        return self.step

    @property
    def sharded_engine(self) -> bool:
        """Whether the engine checkpoints sharded (:class:`ShardedEngine`)."""
        return isinstance(self.engine, ShardedEngine)

    def state_dict(self, engine_dir: str | Path | None = None) -> dict[str, Any]:
        """Step, engine, sampler and callbacks' states (tensors and JSON values).

        With ``engine_dir`` and a :class:`ShardedEngine` the call is collective: the engine writes its
        model and optimizer into ``engine_dir`` (a folder every rank sees), the state holds the rest of
        the engine's state, and ``engine_dir`` names that folder (its last component: it is
        resolved against the checkpoint folder on :meth:`resume`). Otherwise ``engine`` is the
        engine's whole ``state_dict()``.
        """
        state: dict[str, Any] = {"version": STATE_VERSION, "step": self.step}
        if engine_dir is not None and isinstance(self.engine, ShardedEngine):
            folder = Path(engine_dir)
            state["engine"] = self.engine.save_sharded(folder)
            state["engine_dir"] = folder.name
        else:
            state["engine"] = self.engine.state_dict()
        state["sampler"] = self.sampler.state_dict()
        state["callbacks"] = {cb.name: cb.state_dict() for cb in self.callbacks}
        return state

    def load_state_dict(self, state: dict[str, Any], checkpoint_dir: str | Path | None = None) -> None:
        """Restore a :meth:`state_dict` into a trainer built with the same engine, sampler and callbacks.

        A state whose engine part is sharded (``engine_dir``) needs the checkpoint folder it lies in,
        ``checkpoint_dir``, and a :class:`ShardedEngine`; the engine loads collectively.
        """
        if state.get("version") != STATE_VERSION:
            raise CheckpointError(f"trainer state version {state.get('version')!r} is not {STATE_VERSION}")
        where = str(checkpoint_dir) if checkpoint_dir is not None else "this trainer state"
        sharded = state.get("engine_dir")
        if sharded is not None:
            if not isinstance(self.engine, ShardedEngine):
                raise CheckpointError(
                    f"{where}: its engine state is sharded (folder {sharded}/, written by the megatron "
                    f"engine) and {type(self.engine).__name__} cannot read it: resume with the engine "
                    "that wrote it (engine=megatron)"
                )
            if checkpoint_dir is None:
                raise CheckpointError(
                    "this trainer state's engine part is sharded: restore it with Trainer.resume(folder) "
                    "or pass checkpoint_dir"
                )
            if str(sharded) in ("", ".", "..") or Path(str(sharded)).name != str(sharded):
                raise CheckpointError(f"{where}: engine_dir={sharded!r} is not a folder name inside it")
            self.engine.load_sharded(Path(checkpoint_dir) / str(sharded), state["engine"])
        elif isinstance(self.engine, ShardedEngine) and checkpoint_dir is not None:
            try:
                self.engine.load_state_dict(state["engine"])
            except CheckpointError as err:
                raise CheckpointError(f"cannot resume from {checkpoint_dir}: {err}") from None
        else:
            self.engine.load_state_dict(state["engine"])
        self.step = int(state["step"])
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
        """Restore everything from a ``step_NNNNNN`` folder written by ``CheckpointCallback``.

        Every rank calls it with the same folder (collective for a :class:`ShardedEngine`)."""
        self.load_state_dict(load_checkpoint(checkpoint_dir), checkpoint_dir)
        log.info("resumed from %s at step %d", checkpoint_dir, self.step)
