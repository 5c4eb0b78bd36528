"""Trainer callbacks: checkpointing, the metrics stream and the NaN guard, each saving its own state.

A checkpoint is a folder ``step_NNNNNN/`` written atomically (:func:`moe_adapt.fs.atomic_dir`):
``tensors.safetensors`` holds every tensor of the trainer state and ``state.json`` the rest, with
``{"__tensor__": "<key>"}`` where a tensor was. Nothing is pickled, so loading a checkpoint never
runs code.

With several processes every rank has the same callbacks (so each resumes from rank 0's checkpoint
without complaint) but only rank 0 writes: :class:`CheckpointCallback` takes a ``dist`` context, and
callbacks that only rank 0 should run at all (the metrics file, wandb, the progress bar) are swapped
for a :class:`Placeholder` on the other ranks by :func:`main_only`.

An engine that keeps files of its own (:meth:`~moe_adapt.engines.base.Engine.save`, the megatron
engine) adds a folder ``engine/`` to the checkpoint, which every rank writes together (megatron-core's
``dist_checkpointing``: ``torch.distributed.checkpoint`` files, whose ``.metadata`` is pickled; a run
resumes only checkpoints it wrote in its own work directory). The two files above then hold the
rest of the trainer state, with ``"engine_dir": "engine"``. The step folder is assembled under a
hidden temporary name and renamed by rank 0 once every rank has written, so it appears complete
or not at all.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moe_adapt import distributed
from moe_adapt.checkpoint.trainer_state import (
    ENGINE_DIR,
    SHARED_TMP,
    list_checkpoints,
    write_state_files,
)
from moe_adapt.distributed import DistContext
from moe_adapt.errors import MoEAdaptConfigError, MoEAdaptError
from moe_adapt.fs import replace_dir

if TYPE_CHECKING:
    from moe_adapt.train.trainer import Trainer

log = logging.getLogger(__name__)


# -- callbacks ----------------------------------------------------------------------------------
class Callback:
    """Base class: every hook does nothing; ``state_dict`` is empty.

    ``name`` keys the callback's state in a checkpoint; ``order`` sorts callbacks (ascending, stable).
    """

    name: str = "callback"
    order: int = 0

    def on_train_start(self, trainer: Trainer) -> None:
        """Before the first step of :meth:`Trainer.fit`."""

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        """After optimizer step ``step`` (1-based) with the engine's metrics."""

    def on_train_end(self, trainer: Trainer) -> None:
        """After the last step of :meth:`Trainer.fit`."""

    def state_dict(self) -> dict[str, Any]:
        """This callback's state (tensors and JSON values)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


class CheckpointCallback(Callback):
    """Every ``every`` steps, write the whole trainer state to ``root/step_NNNNNN/``; keep the last
    ``keep_last`` (None keeps all). ``save_final`` also writes the last step of training.

    With several processes (``dist``, default :func:`moe_adapt.distributed.current`) every rank
    builds the state and rank 0 writes and prunes. The engine saves itself
    (:meth:`~moe_adapt.engines.base.Engine.save`, every rank) into ``engine/`` of a hidden temporary
    folder ``.step_NNNNNN.tmp-shared`` that rank 0 made (the megatron engine writes there, the hf
    engine nothing); after a barrier rank 0 adds the trainer's files, renames the folder to
    ``step_NNNNNN`` and prunes, and the ranks meet again. A crash before the rename leaves only the
    hidden folder, which :func:`latest_checkpoint` ignores and the next save removes.
    """

    name = "checkpoint"
    order = 100  # after every other callback, so their state at this step is saved

    def __init__(
        self,
        root: str | Path,
        every: int,
        keep_last: int | None = 3,
        save_final: bool = True,
        *,
        dist: DistContext | None = None,
    ) -> None:
        if every < 1:
            raise MoEAdaptConfigError(f"checkpoint.every={every!r} is invalid: must be >= 1")
        if keep_last is not None and keep_last < 1:
            raise MoEAdaptConfigError(f"checkpoint.keep_last={keep_last!r} is invalid: must be >= 1, or null")
        self.root, self.every, self.keep_last, self.save_final = Path(root), every, keep_last, save_final
        self.dist = dist or distributed.current()
        self.last_saved: int | None = None

    def save(self, trainer: Trainer) -> Path:
        """Collective: write a checkpoint of the trainer's current state and prune old ones. Every
        rank lets the engine write its part into a shared temporary folder (:meth:`Engine.save`;
        nothing for the hf engine), rank 0 the rest, then renames it into place."""
        path = self.root / f"step_{trainer.step:06d}"
        self.last_saved = trainer.step
        tmp = self.root / f".{path.name}.tmp-shared"
        if self.dist.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)  # left by a crash during an earlier save of this step
            tmp.mkdir(parents=True)
        distributed.barrier(self.dist)
        try:
            state = trainer.state_dict(engine_dir=tmp / ENGINE_DIR)
            distributed.barrier(self.dist)  # every rank's files are written
            if self.dist.is_main:
                write_state_files(tmp, state)
                replace_dir(tmp, path)
                log.info("checkpoint: step %d -> %s", trainer.step, path)
                self._prune()
        except BaseException:
            if self.dist.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        distributed.barrier(self.dist)  # the step folder is in place before any rank goes on
        return path

    def _prune(self) -> None:
        """Remove all but the newest ``keep_last`` checkpoints, and hidden folders of crashed sharded
        saves (rank 0)."""
        if self.keep_last is not None:
            for old in list_checkpoints(self.root)[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.iterdir():
            if stale.is_dir() and SHARED_TMP.match(stale.name):
                shutil.rmtree(stale, ignore_errors=True)

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        if step % self.every == 0:
            self.save(trainer)

    def on_train_end(self, trainer: Trainer) -> None:
        if self.save_final and trainer.step > 0 and self.last_saved != trainer.step:
            self.save(trainer)


class MetricsCallback(Callback):
    """Appends one JSON line per step to ``path`` (``{"step": n, "time": ..., <metrics>}``).

    Its state is the file's length; on resume the file is cut back to it, so steps run after the
    checkpoint by a crashed run are not listed twice. A run that starts fresh (no checkpoint to resume
    from) starts the file anew, so the steps of an attempt that died before its first checkpoint are
    not listed twice either.
    """

    name = "metrics"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.bytes = 0

    def on_train_start(self, trainer: Trainer) -> None:
        if self.path.is_file() and self.path.stat().st_size > self.bytes:
            log.info("metrics: cutting %s back to the %d bytes it resumes from", self.path, self.bytes)
            with open(self.path, "r+b") as fh:
                fh.truncate(self.bytes)

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        record: dict[str, float | str] = {"step": step, "time": round(time.time(), 3)}
        record.update({k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            self.bytes = fh.tell()

    def state_dict(self) -> dict[str, Any]:
        return {"bytes": self.bytes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bytes = int(state["bytes"])
        if self.path.is_file() and self.path.stat().st_size > self.bytes:
            with open(self.path, "r+b") as fh:
                fh.truncate(self.bytes)
        elif not self.path.is_file() and self.bytes > 0:
            log.warning("metrics: %s is missing; the resumed run starts it anew", self.path)
            self.bytes = 0


class NaNGuardCallback(Callback):
    """Counts steps the engine skipped for a non-finite loss or gradient; after ``max_consecutive``
    in a row, stops training with a :class:`MoEAdaptError`."""

    name = "nan_guard"

    def __init__(self, max_consecutive: int = 3) -> None:
        if max_consecutive < 1:
            raise MoEAdaptConfigError(
                f"nan_guard.max_consecutive={max_consecutive!r} is invalid: must be >= 1"
            )
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total = 0

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        if "skipped" not in metrics:
            raise MoEAdaptError("nan_guard: the engine reports no 'skipped' metric, so the guard cannot work")
        if metrics["skipped"]:
            self.consecutive += 1
            self.total += 1
            log.warning(
                "nan_guard: step %d skipped (loss %s); %d in a row of %d allowed",
                step, metrics.get("loss"), self.consecutive, self.max_consecutive,
            )  # fmt: skip
            if self.consecutive >= self.max_consecutive:
                raise MoEAdaptError(
                    f"training diverged: {self.consecutive} consecutive steps up to step {step} had a "
                    "non-finite loss or gradient; lower the learning rate, check the data, or resume "
                    "from an earlier checkpoint"
                )
        else:
            self.consecutive = 0

    def state_dict(self) -> dict[str, Any]:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consecutive, self.total = int(state["consecutive"]), int(state["total"])


class Placeholder(Callback):
    """Stands in for a callback that only rank 0 runs: the same name and order, no action; it keeps the
    state it is given, so every rank resumes from rank 0's checkpoint without a warning."""

    def __init__(self, name: str, order: int) -> None:
        self.name, self.order = name, order
        self.state: dict[str, Any] = {}

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = state


def main_only(callbacks: list[Callback], dist: DistContext | None = None) -> list[Callback]:
    """``callbacks`` on rank 0 (or with one process); a :class:`Placeholder` for each on the other ranks.

    For callbacks that write files or talk to services and keep no state the training depends on
    (the metrics file, wandb, the progress display).
    """
    if (dist or distributed.current()).is_main:
        return list(callbacks)
    return [Placeholder(cb.name, cb.order) for cb in callbacks]
