"""Schema of the ``logger`` config group: where training metrics go besides ``metrics.jsonl`` (the
wandb mirror, :class:`~moe_adapt.train.progress.WandbCallback`) and the progress display
(:class:`~moe_adapt.train.progress.ProgressCallback`); see docs/logging.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NoReturn

from moe_adapt.errors import invalid

KINDS = ("none", "wandb")
"""What ``logger.kind`` may be."""

MODES = ("offline", "online", "disabled")
"""What ``logger.mode`` may be."""

PROGRESS = ("auto", "rich", "log", "none")
"""What ``logger.progress`` may be."""

_PROJECT_FORBIDDEN = "/\\#?%:"  # characters wandb refuses in a project name


def _fail(key: str, value: object, allowed: str) -> NoReturn:
    invalid(f"logger.{key}", value, allowed)


@dataclass
class LoggerConfig:
    """The ``logger`` config group: the wandb mirror of the metrics stream and the progress display.

    ``metrics.jsonl`` (one line per step, in the stage folder) is always written; this group decides
    where else the metrics go. Options: ``logger=offline`` (default), ``logger=wandb`` (online),
    ``logger=none``.
    """

    kind: str = "wandb"
    """wandb (mirror every step's metrics and the run's config to Weights & Biases) or none
    (metrics.jsonl only)."""

    mode: str = "offline"
    """offline (the wandb run is written under dir and never touches the network; upload it later with
    `wandb sync`), online (stream to the wandb server; needs `wandb login` or WANDB_API_KEY) or
    disabled (no wandb run at all)."""

    project: str = "moe_adapt"
    """wandb project the run belongs to."""

    entity: str | None = None
    """wandb user or team that owns the project (null: your default entity)."""

    group: str | None = None
    """wandb run group, e.g. one per sweep, so its runs are shown together (null: none)."""

    tags: list[str] = field(default_factory=list)
    """wandb tags of the run, e.g. [arabic, curriculum] (1 to 64 characters each)."""

    name: str | None = None
    """Display name of the wandb run (null: wandb makes one up)."""

    dir: str | None = None
    """Folder the wandb/ directory is written under (null: the run directory)."""

    progress: str = "auto"
    """auto (a rich progress bar on a terminal, a log line every log_every steps otherwise), rich,
    log or none."""

    log_every: int = 10
    """Steps between progress log lines when progress is log (or auto without a terminal)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            _fail("kind", self.kind, f"choose one of {', '.join(KINDS)}")
        if self.mode not in MODES:
            _fail("mode", self.mode, f"choose one of {', '.join(MODES)}")
        if self.kind == "none" and self.mode == "online":
            _fail("mode", self.mode, "logger.kind=none writes no wandb run; use logger=wandb to go online")
        if self.progress not in PROGRESS:
            _fail("progress", self.progress, f"choose one of {', '.join(PROGRESS)}")
        if self.log_every < 1:
            _fail("log_every", self.log_every, "must be >= 1")
        if not self.project or any(c in self.project for c in _PROJECT_FORBIDDEN):
            _fail("project", self.project, f"must be a non-empty name without any of {_PROJECT_FORBIDDEN}")
        for key in ("entity", "group", "name", "dir"):
            if getattr(self, key) == "":
                _fail(key, "", "give a value, or null for the default")
        bad = [t for t in self.tags if not 1 <= len(str(t)) <= 64]
        if bad:
            _fail("tags", list(self.tags), f"every tag must have 1 to 64 characters (got {bad[0]!r})")
