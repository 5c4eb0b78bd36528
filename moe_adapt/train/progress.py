"""Where a training run's metrics go besides ``metrics.jsonl``: a wandb mirror and a progress display.

The metrics stream is the JSONL file :class:`~moe_adapt.train.callbacks.MetricsCallback` writes; it is
always on. The ``logger`` config group (:class:`~moe_adapt.train.config.LoggerConfig`) adds, through
:func:`logging_callbacks`:

- :class:`WandbCallback`: every step's metrics and the run's (redacted) config, mirrored to Weights &
  Biases. Offline by default: the run is written under ``<run_dir>/wandb/`` and nothing goes over the
  network; ``logger=wandb`` streams it online. A resumed training run continues the same wandb run.
  wandb failing never stops training: it warns once and the mirror stops.
- :class:`ProgressCallback`: a rich progress bar on a terminal (step, loss, lr, tokens/s, curriculum
  phase, ETA), or one log line every ``log_every`` steps through the ``moe_adapt`` logger otherwise.

wandb (about a second to import) and rich are imported only when training starts and asks for them.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import sys
import time
from collections import deque
from collections.abc import Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NoReturn

from moe_adapt.errors import invalid
from moe_adapt.train.callbacks import Callback
from moe_adapt.train.config import PROGRESS, LoggerConfig

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

    from moe_adapt.train.trainer import Trainer

log = logging.getLogger("moe_adapt")

_RICH_WINDOW = 20  # steps the bar's tokens/s is averaged over
_OPEN_RUNS: dict[str, Any] = {}  # wandb runs of this process not finished yet, by id


def _fail(key: str, value: object, allowed: str) -> NoReturn:
    invalid(f"logger.{key}", value, allowed)


# -- wandb ----------------------------------------------------------------------------------------
def _redact(config: Mapping[str, Any]) -> dict[str, Any]:
    from moe_adapt.redact import redact

    redacted: dict[str, Any] = redact(dict(config))
    return redacted


@contextlib.contextmanager
def _redacted_argv() -> Iterator[None]:
    """wandb records ``sys.argv`` in the run's metadata: hide secret-looking overrides meanwhile."""
    from moe_adapt.redact import redact_override

    original = sys.argv
    sys.argv = [redact_override(a) for a in original]
    try:
        yield
    finally:
        sys.argv = original


class WandbCallback(Callback):
    """Mirror each step's metrics (``{"step": n, <metrics>}``) and the run's config to a wandb run.

    The run starts in :meth:`on_train_start` and finishes in :meth:`on_train_end`. Its id is this
    callback's checkpoint state, so a resumed training run continues the same wandb run
    (``resume="allow"``; offline, a new ``offline-run-*`` folder with the same id). Charts use the
    ``step`` metric as their x axis, so steps that a crashed run logged after its last checkpoint are
    logged again (rather than dropped) after the resume.

    If wandb cannot start or stops working, one warning is logged and training goes on without it.
    """

    name = "wandb"
    order = 10

    def __init__(
        self,
        cfg: LoggerConfig,
        run_dir: str | Path,
        config: Mapping[str, Any] | None = None,
        *,
        job_type: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.dir = Path(cfg.dir) if cfg.dir else Path(run_dir)
        self.config = _redact(config or {})  # the caller redacts too; this is the last line of defence
        self.job_type = job_type
        self.run_id: str | None = None
        self.run: Any = None  # the wandb Run while one is open
        self.failed = False
        self.last_logged: dict[str, float] = {}

    def _give_up(self, what: str, err: BaseException) -> None:
        self.failed, self.run = True, None
        log.warning(
            "wandb %s (%s: %s); training goes on without the wandb mirror (metrics.jsonl has every step)",
            what, type(err).__name__, err,
        )  # fmt: skip

    def _init(self) -> Any:
        import wandb

        # wandb logs its internals (the config included) to the "wandb" logger; they belong in its own
        # debug.log under the run folder, not in our console and log file
        logging.getLogger("wandb").propagate = False
        if self.cfg.mode == "offline":
            # the mode given to wandb.init covers the run; wandb's process-wide telemetry follows these
            # global settings, and would otherwise still contact api.wandb.ai
            wandb.setup(settings=wandb.Settings(mode="offline", silent=True))
        stale = _OPEN_RUNS.pop(self.run_id, None) if self.run_id else None
        if stale is not None:  # its trainer died in this process without finishing it; wandb refuses the id
            with contextlib.suppress(Exception):
                stale.finish(exit_code=1)
        self.dir.mkdir(parents=True, exist_ok=True)
        with _redacted_argv():
            run = wandb.init(
                project=self.cfg.project,
                entity=self.cfg.entity,
                group=self.cfg.group,
                tags=list(self.cfg.tags) or None,
                name=self.cfg.name,
                job_type=self.job_type,
                dir=str(self.dir),
                mode=self.cfg.mode,  # type: ignore[arg-type]  # checked by LoggerConfig
                id=self.run_id,
                resume="allow" if self.run_id else None,
                config=self.config,
                reinit="create_new",
                # silent: nothing on stdout; console off: stdout/stderr are not copied into the run
                settings=wandb.Settings(silent=True, console="off"),
            )
        run.define_metric("step")
        run.define_metric("*", step_metric="step")
        return run

    def on_train_start(self, trainer: Trainer) -> None:
        if self.run is not None or self.failed or self.cfg.mode == "disabled":
            return
        start = time.perf_counter()
        try:
            self.run = self._init()
        except Exception as err:
            self._give_up("could not start", err)
            return
        self.run_id = str(self.run.id)
        _OPEN_RUNS[self.run_id] = self.run
        took = time.perf_counter() - start
        if self.cfg.mode == "offline":
            folder = Path(self.run.dir).parent
            log.info("wandb: offline run %s in %s (%.1f s to start; `wandb sync %s` uploads it)",
                     self.run_id, folder, took, folder)  # fmt: skip
        else:
            log.info("wandb: run %s at %s", self.run_id, self.run.url)

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        if self.run is None:
            return
        record = {"step": step, **metrics}
        try:
            self.run.log(record)
        except Exception as err:
            self._give_up("stopped working", err)
            return
        self.last_logged = record

    def on_train_end(self, trainer: Trainer) -> None:
        run, self.run = self.run, None
        if run is None:
            return
        _OPEN_RUNS.pop(str(run.id), None)
        try:
            run.finish()
        except Exception as err:
            log.warning("wandb could not finish run %s (%s: %s)", self.run_id, type(err).__name__, err)

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        run_id = state.get("run_id")
        self.run_id = str(run_id) if run_id else None


# -- progress -------------------------------------------------------------------------------------
def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


class ProgressCallback(Callback):
    """Shows how training goes: a rich bar on a terminal, or a log line every ``log_every`` steps.

    ``mode``: auto (rich if the console is a terminal, log otherwise), rich, log or none. Log lines go
    through the ``moe_adapt`` logger, never straight to stdout. While the bar is shown, logging
    handlers that write to the terminal are routed through it, so their lines appear above the bar.
    A resumed run starts at the restored step; ETA and tokens/s only count the steps of this run.
    """

    name = "progress"
    order = 90  # after the others, so a step's progress line follows what they logged for it

    def __init__(
        self,
        mode: str = "auto",
        log_every: int = 10,
        *,
        description: str = "train",
        console: Console | None = None,
    ) -> None:
        if mode not in PROGRESS:
            _fail("progress", mode, f"choose one of {', '.join(PROGRESS)}")
        if log_every < 1:
            _fail("log_every", log_every, "must be >= 1")
        self.mode, self.log_every, self.description = mode, log_every, description
        self.console = console
        self.active = "none"  # the mode in use once training started (auto resolved)
        self.max_steps = 0
        self.last_logged_step: int | None = None
        self._window: deque[tuple[float, int, float]] = deque()  # (time, step, tokens so far)
        self._tokens = 0.0
        self._last: tuple[int, Mapping[str, float]] | None = None  # the latest step and its metrics
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._swapped: list[tuple[logging.StreamHandler[IO[str]], IO[str]]] = []

    def _console(self) -> Console:
        if self.console is None:
            from rich.console import Console

            self.console = Console(stderr=True)
        return self.console

    def _resolve(self) -> str:
        if self.mode != "auto":
            return self.mode
        return "rich" if self._console().is_terminal else "log"

    # statistics over the recent window
    def _rates(self) -> tuple[float | None, float | None]:
        """(tokens per second, seconds per step) over the window, or None where unknown."""
        (t0, s0, k0), (t1, s1, k1) = self._window[0], self._window[-1]
        if t1 <= t0 or s1 <= s0:
            return None, None
        return (k1 - k0) / (t1 - t0), (t1 - t0) / (s1 - s0)

    def _stats(self, metrics: Mapping[str, float]) -> list[str]:
        parts = []
        if "loss" in metrics:
            parts.append(f"loss {metrics['loss']:.4f}")
        if "lr" in metrics:
            parts.append(f"lr {metrics['lr']:.2e}")
        tokens_per_s, _ = self._rates()
        if tokens_per_s is not None and "tokens" in metrics:
            parts.append(f"{_si(tokens_per_s)} tok/s")
        if "phase" in metrics:
            parts.append(f"phase {metrics['phase']:g}")
        if metrics.get("skipped"):
            parts.append("skipped")
        return parts

    def _line(self, step: int, metrics: Mapping[str, float]) -> str:
        pct = 100.0 * step / self.max_steps if self.max_steps else 100.0
        parts = [f"{self.description} step {step}/{self.max_steps} ({pct:.0f}%)", *self._stats(metrics)]
        _, seconds_per_step = self._rates()
        if seconds_per_step is not None:
            eta = timedelta(seconds=round(seconds_per_step * max(self.max_steps - step, 0)))
            parts += [f"{seconds_per_step:.3g} s/step", f"eta {eta}"]
        return " | ".join(parts)

    # the rich bar
    def _start_bar(self, step: int) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        # fits an 80-column terminal: rich shortens the widest column when it does not
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=12),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self._console(),
            refresh_per_second=2,
        )
        self._task = self._progress.add_task(self.description, total=self.max_steps, completed=step, stats="")
        self._progress.start()
        self._route_log_handlers()
        atexit.register(self._stop_bar)  # training may die before on_train_end: give the cursor back

    def _route_log_handlers(self) -> None:
        """Point handlers that write to the terminal at the bar's stand-ins for stdout/stderr."""
        proxies = {
            id(s.rich_proxied_file): s for s in (sys.stdout, sys.stderr) if hasattr(s, "rich_proxied_file")
        }
        if not proxies:
            return
        loggers = [logging.getLogger()]
        loggers += [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
        for logger in loggers:
            for handler in logger.handlers:
                if isinstance(handler, logging.StreamHandler) and id(handler.stream) in proxies:
                    old = handler.setStream(proxies[id(handler.stream)])
                    if old is not None:
                        self._swapped.append((handler, old))

    def _stop_bar(self) -> None:
        atexit.unregister(self._stop_bar)
        for handler, old in self._swapped:
            handler.setStream(old)
        self._swapped = []
        progress, self._progress = self._progress, None
        if progress is not None:
            progress.stop()

    # hooks
    def on_train_start(self, trainer: Trainer) -> None:
        self.max_steps = trainer.max_steps
        self.active = self._resolve()
        maxlen = (self.log_every if self.active == "log" else _RICH_WINDOW) + 1
        self._tokens = 0.0
        self._window = deque([(time.perf_counter(), trainer.step, 0.0)], maxlen=maxlen)
        self.last_logged_step, self._last = None, None
        if self.active == "rich":
            self._start_bar(trainer.step)
        elif self.active == "log":
            resumed = f" (resumed at step {trainer.step})" if trainer.step else ""
            log.info("%s: %d steps to go of %d%s", self.description, self.max_steps - trainer.step,
                     self.max_steps, resumed)  # fmt: skip

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        self._tokens += float(metrics.get("tokens", 0.0))
        self._window.append((time.perf_counter(), step, self._tokens))
        self._last = (step, metrics)
        if self.active == "rich" and self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=step, stats="  ".join(self._stats(metrics)))
        elif self.active == "log" and (step % self.log_every == 0 or step == self.max_steps):
            log.info("%s", self._line(step, metrics))
            self.last_logged_step = step

    def on_train_end(self, trainer: Trainer) -> None:
        if self.active == "rich":
            self._stop_bar()
        elif self.active == "log" and self._last is not None and self._last[0] != self.last_logged_step:
            # stopped early (a callback set should_stop): still report where training ended
            log.info("%s", self._line(*self._last))
            self.last_logged_step = self._last[0]


def logging_callbacks(
    cfg: LoggerConfig,
    run_dir: Path,
    config_dict: Mapping[str, Any] | None,
    *,
    stage: str = "train",
    rank: int = 0,
) -> list[Callback]:
    """The callbacks the ``logger`` group asks for, for a trainer of stage ``stage``.

    ``config_dict`` is the run's config as plain data, already redacted (it is redacted again).
    Only rank 0 logs: other ranks get no callbacks.
    """
    if rank != 0:
        return []
    callbacks: list[Callback] = []
    if cfg.kind == "wandb" and cfg.mode != "disabled":
        callbacks.append(WandbCallback(cfg, run_dir, config_dict, job_type=stage))
    if cfg.progress != "none":
        callbacks.append(ProgressCallback(cfg.progress, cfg.log_every, description=stage))
    return callbacks
