"""The training loop: take a batch from the sampler, let the engine step, tell the callbacks.

Everything optional (checkpoints, metrics, NaN guard, later eval and logging) is a
:class:`~moe_adapt.train.callbacks.Callback` that saves its own state; the engine owns
forward/backward/optimizer. :meth:`Trainer.state_dict` gathers the step, the engine, the sampler and
every callback, so :meth:`Trainer.resume` continues a run exactly where its checkpoint left it.

Every engine is checkpointed the same way (:meth:`~moe_adapt.engines.base.Engine.save` /
:meth:`~moe_adapt.engines.base.Engine.load`): what it keeps on disk (the megatron engine: every
rank's part of the model and optimizer) goes into the checkpoint's ``engine/`` folder, and the
trainer state holds the rest of the engine's state (the hf engine: all of it); see
:class:`~moe_adapt.train.callbacks.CheckpointCallback`.

Shape legend: ``B`` sequences per batch, ``T1`` seq_len + 1 packed tokens.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from moe_adapt.checkpoint.trainer_state import STATE_FILE, checkpoint_problem, load_checkpoint
from moe_adapt.engines.base import Engine
from moe_adapt.errors import CheckpointError, MoEAdaptConfigError
from moe_adapt.train.callbacks import Callback

log = logging.getLogger(__name__)

STATE_VERSION = 1
STATE_KEYS = ("version", "step", "engine", "sampler")
"""What every trainer checkpoint's ``state.json`` holds (checked before a resume picks it)."""


class HasTokens(Protocol):
    """A batch: ``tokens`` is ``tokens_BT1`` (inputs ``[:, :-1]``, labels ``[:, 1:]``)."""

    @property
    def tokens(self) -> np.ndarray | torch.Tensor: ...


class BatchSource(Protocol):
    """What the trainer needs from a sampler (:class:`~moe_adapt.cpt.sampler.MixtureSampler` is one)."""

    def next_batch(self, batch_size: int) -> HasTokens: ...

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
            relabel = getattr(batch, "relabel", None)  # e.g. a distill replay batch: replay/<term>
            if relabel is not None:
                metrics = relabel(metrics)
            describe = getattr(batch, "metrics", None)  # the sampler's batches: phase, source shares
            if describe is not None:
                metrics.update(describe())
            self.step += 1
            for cb in self.callbacks:
                cb.on_step_end(self, self.step, metrics)
        for cb in self.callbacks:
            cb.on_train_end(self)
        return self.step

    def state_dict(self, engine_dir: str | Path | None = None) -> dict[str, Any]:
        """Step, engine, sampler and callbacks' states (tensors and JSON values).

        With ``engine_dir`` (a folder inside the checkpoint being written, which every rank sees) the
        call is collective and the engine saves itself for a checkpoint (:meth:`Engine.save`): what
        it keeps on disk goes into ``engine_dir``, whose last component the state then records as
        ``engine_dir`` (resolved against the checkpoint folder on :meth:`resume`), and ``engine`` is
        the rest. Without it ``engine`` is the engine's in-memory ``state_dict()``.
        """
        state: dict[str, Any] = {"version": STATE_VERSION, "step": self.step}
        if engine_dir is not None:
            folder = Path(engine_dir)
            state["engine"] = self.engine.save(folder)
            if self.engine.writes_folder:
                state["engine_dir"] = folder.name
        else:
            state["engine"] = self.engine.state_dict()
        state["sampler"] = self.sampler.state_dict()
        state["callbacks"] = {cb.name: cb.state_dict() for cb in self.callbacks}
        return state

    def load_state_dict(self, state: dict[str, Any], checkpoint_dir: str | Path | None = None) -> None:
        """Restore a :meth:`state_dict` into a trainer built with the same engine, sampler and callbacks.

        A state whose engine wrote a folder (``engine_dir``) needs the checkpoint folder it lies in,
        ``checkpoint_dir``; the engine loads collectively (:meth:`Engine.load`).
        """
        if state.get("version") != STATE_VERSION:
            raise CheckpointError(f"trainer state version {state.get('version')!r} is not {STATE_VERSION}")
        where = str(checkpoint_dir) if checkpoint_dir is not None else "this trainer state"
        sharded = state.get("engine_dir")
        folder = None
        if sharded is not None:
            if checkpoint_dir is None:
                if not self.engine.writes_folder:
                    self.engine.load(state["engine"], Path(str(sharded)))  # refuses, naming the engine
                raise CheckpointError(
                    "this trainer state's engine part is sharded: restore it with Trainer.resume(folder) "
                    "or pass checkpoint_dir"
                )
            if str(sharded) in ("", ".", "..") or Path(str(sharded)).name != str(sharded):
                raise CheckpointError(f"{where}: engine_dir={sharded!r} is not a folder name inside it")
            folder = Path(checkpoint_dir) / str(sharded)
        self.engine.load(
            state["engine"], folder, Path(checkpoint_dir) if checkpoint_dir is not None else None
        )
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

    def checkpoint_problem(self, checkpoint_dir: str | Path) -> str | None:
        """What is wrong with the checkpoint ``checkpoint_dir`` for this trainer (one phrase), or None:
        its files are opened and checked (:func:`~moe_adapt.checkpoint.trainer_state.checkpoint_problem`
        with the trainer's keys), and so is the engine's folder when it wrote one
        (:meth:`Engine.checkpoint_problem`). Nothing is loaded; for :func:`latest_checkpoint`."""
        folder = Path(checkpoint_dir)
        problem = checkpoint_problem(folder, STATE_KEYS)
        if problem is not None:
            return problem
        sharded = json.loads((folder / STATE_FILE).read_text(encoding="utf-8")).get("engine_dir")
        if sharded is None:
            return None
        if str(sharded) in ("", ".", "..") or Path(str(sharded)).name != str(sharded):
            return f"engine_dir={sharded!r} is not a folder name inside it"
        return self.engine.checkpoint_problem(folder / str(sharded))

    def resume(self, checkpoint_dir: str | Path) -> None:
        """Restore everything from a ``step_NNNNNN`` folder written by ``CheckpointCallback``.

        Every rank calls it with the same folder (collective where the engine's load is)."""
        self.load_state_dict(load_checkpoint(checkpoint_dir), checkpoint_dir)
        log.info("resumed from %s at step %d", checkpoint_dir, self.step)
