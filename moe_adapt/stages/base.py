"""The stage contract: what the runner hands a stage, and what a stage tells the runner.

A stage is one module of :mod:`moe_adapt.stages` with three names beside its code:

- ``KEYS``: the config keys its output depends on (``"a.b"`` picks one entry of a group); the runner
  fingerprints their values and skips a complete stage made with the same ones;
- ``DISTRIBUTED``: whether every rank runs it under torchrun (else rank 0 alone, the others waiting);
- ``run(ctx: StageContext) -> dict``: writes the stage's artifacts into ``ctx.out`` and returns its
  summary (JSON-able, paths relative to ``ctx.out``), which goes into the completion marker;
- optionally ``after(cfg: Config) -> None``: run by rank 0 once every stage is done and the run
  directory unlocked, whether this stage ran or was complete already (the export stage serves its
  browser page there).

Stages are the only modules (with :mod:`moe_adapt.config` and the runner) that read the root
:class:`~moe_adapt.config.schema.Config`: they pick the groups and values the library packages need
and pass them on as typed arguments.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_adapt.config.schema import Config
from moe_adapt.distributed import DistContext
from moe_adapt.redact import redact
from moe_adapt.train.callbacks import Callback
from moe_adapt.train.progress import logging_callbacks


@dataclass(frozen=True)
class StageContext:
    """Everything a stage runs with."""

    cfg: Config
    """The whole (typed) config of the run."""

    out: Path
    """The stage folder being written: a temporary folder the runner renames to ``<run_dir>/<name>``
    once ``run`` returns (on ranks other than 0 of a distributed stage, a scratch folder thrown away)."""

    work: Path
    """The stage's scratch folder ``<run_dir>/.work/<name>``, for what must survive a crash (checkpoints,
    finished steps): the runner creates it (on rank 0) before the stage and removes it after the stage
    succeeds, and leaves it in place when the stage fails, so the same command resumes from it."""

    dist: DistContext
    """Where this process stands among the processes of the run (one process: rank 0 of 1)."""

    def logging_callbacks(self, stage: str) -> list[Callback]:
        """The trainer callbacks the ``logger`` group asks for (progress, wandb), for a training phase
        called ``stage``; the run's config, redacted, goes to wandb."""
        config_dict = redact(json.loads(json.dumps(dataclasses.asdict(self.cfg), default=str)))
        return logging_callbacks(self.cfg.logger, Path(self.cfg.run_dir), config_dict, stage=stage)


@dataclass(frozen=True)
class Stage:
    """A stage as the runner sees it: its name, its code, its fingerprint keys and how it runs."""

    name: str
    """The stage's name: its folder under the run directory and its entry in ``stages``."""

    run: Callable[[StageContext], dict[str, Any]]
    """Writes the stage into ``ctx.out``; returns its summary."""

    keys: tuple[str, ...]
    """Config keys its output depends on (the fingerprint of a complete stage)."""

    distributed: bool = False
    """Every rank runs it under torchrun (else rank 0 alone while the others wait)."""

    after: Callable[[Config], None] | None = None
    """Run by rank 0 after the whole pipeline, the run directory unlocked, whether the stage ran or
    was skipped as complete; None = nothing."""
