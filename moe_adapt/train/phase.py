"""Train into a folder: the one wiring every training phase of the pipeline shares.

The cpt stage, the distill training phases (sft, seq_kd, token_kd, select_kd), the teacher stage and
init_dense's pretraining all do the same: build a :class:`~moe_adapt.train.trainer.Trainer` from an
engine, a batch source and callbacks (the caller picks them: metrics, NaN guard, checkpoints in
``<work>/checkpoints``, progress, held-out loss), resume from the latest checkpoint in ``work`` when a
crashed attempt left one (else start fresh), train to ``max_steps``, write the model as an HF
checkpoint folder and draw ``metrics.jsonl`` as a curves picture (:mod:`moe_adapt.train.curves`).
:func:`train_into_folder` is that sequence, once.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from moe_adapt import distributed
from moe_adapt.checkpoint.trainer_state import latest_checkpoint
from moe_adapt.engines.base import Engine
from moe_adapt.train.callbacks import Callback
from moe_adapt.train.curves import write_training_curves
from moe_adapt.train.trainer import BatchSource, Trainer

log = logging.getLogger(__name__)


def train_into_folder(
    name: str,
    engine: Engine,
    batches: BatchSource,
    callbacks: Sequence[Callback],
    *,
    max_steps: int,
    batch_size: int,
    work: Path,
    model_dir: Path,
    curves: Path | None,
    heldout: Path | None = None,
    dist: distributed.DistContext | None = None,
    on_fresh_start: Callable[[], None] | None = None,
) -> Trainer:
    """Train ``engine`` on ``batches`` for ``max_steps`` steps of ``batch_size`` sequences, resuming
    from the latest checkpoint in ``work/checkpoints``; write the model to ``model_dir`` and, when
    ``curves`` is given, draw ``work/metrics.jsonl`` (with the held-out losses of ``heldout``) there.

    A damaged newest checkpoint (a file cut short, missing or not parseable) is logged, set aside and
    passed over for the one before it; with none intact, training starts from scratch
    (:func:`~moe_adapt.checkpoint.trainer_state.latest_checkpoint`).
    ``on_fresh_start`` runs when no checkpoint was found (e.g. a held-out measurement at step 0).
    With ``dist`` (several processes) every rank resumes from the checkpoint rank 0 found (the work
    folder must be on a shared disk) and only rank 0 draws the curves; ``save_hf`` writes on rank 0
    and returns on every rank once the folder is there. Returns the trainer (its ``step`` reached).
    """
    trainer = Trainer(engine, batches, callbacks, max_steps=max_steps, batch_size=batch_size)
    latest: str | Path | None = None
    if dist is None or dist.is_main:  # one process checks the candidates and sets damaged ones aside
        latest = latest_checkpoint(work / "checkpoints", trainer.checkpoint_problem)
    if dist is not None:
        latest = distributed.broadcast_from_main(str(latest) if latest is not None else None, dist)
    if latest is not None:
        log.info("%s: resuming from %s", name, latest)
        trainer.resume(latest)
    elif on_fresh_start is not None:
        on_fresh_start()
    trainer.fit()
    engine.save_hf(model_dir)
    if curves is not None and (dist is None or dist.is_main):
        write_training_curves(work / "metrics.jsonl", curves, heldout=heldout, title=name)
    return trainer


def move_outputs(work: Path, out: Path) -> None:
    """Move what :func:`train_into_folder` left in ``work`` (``model/``, ``metrics.jsonl`` and, when it
    was drawn, ``curves.png``) into the stage folder ``out``."""
    shutil.move(str(work / "model"), str(out / "model"))
    shutil.move(str(work / "metrics.jsonl"), str(out / "metrics.jsonl"))
    if (work / "curves.png").is_file():
        shutil.move(str(work / "curves.png"), str(out / "curves.png"))
