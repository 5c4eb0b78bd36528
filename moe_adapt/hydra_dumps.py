"""Hydra's dumps of a run's config, with secrets hidden: the callback :class:`RedactHydraDumps`.

Hydra writes what it composed to the run directory before the job starts: ``.hydra/config.yaml`` (the
config), ``.hydra/hydra.yaml`` (its own config, the overrides among it) and ``.hydra/overrides.yaml``
(the command line's overrides), and in a sweep ``<sweep dir>/multirun.yaml``. A secret given on the
command line (``+hf_token=...``) would stay there in clear text, even when the config then refuses the
key. ``conf/config.yaml`` registers this callback under ``hydra.callbacks``: as each job starts, before
the task runs, it rewrites those files, each atomically, with the values of secret-looking keys
replaced by ``***`` (:func:`moe_adapt.redact.redact_dump`, the one rule of :mod:`moe_adapt.redact`).
``multirun.yaml`` is written before any job, so it is also redacted when the process exits, should no
job start (a sweep whose composition fails). Nothing else is changed: the job gets its config, secrets
included, and ``overrides.yaml`` stays a list of ``key=value`` strings the report stage reads.

Hydra's local launcher also prints each job's overrides (``#0 : seed=1 +hf_token=...``) to stdout,
which a cluster's job log keeps: the callback hides secret ones there too (:class:`RedactOverrides`).
"""

from __future__ import annotations

import atexit
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from moe_adapt.fs import atomic_write_text
from moe_adapt.redact import redact_dump, redact_override

DUMPS = ("config.yaml", "hydra.yaml", "overrides.yaml")
"""The files Hydra writes into ``<run dir>/<hydra.output_subdir>`` (``.hydra``) for each job."""

SWEEP_DUMP = "multirun.yaml"
"""The file Hydra's sweeper writes into the sweep directory before the first job."""

LAUNCHER_LOGGER = "hydra._internal.core_plugins.basic_launcher"
"""The logger of Hydra's local launcher, which logs each job's overrides as it launches it."""


def redact_yaml(path: Path) -> bool:
    """Rewrite the YAML file ``path`` with its secrets hidden; whether it changed (a missing file: no)."""
    if not path.is_file():
        return False
    tree = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    redacted = redact_dump(tree)
    if redacted == tree:
        return False
    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(redacted), resolve=False))
    return True


class RedactOverrides(logging.Filter):
    """Hide the values of secret overrides in a log line made of space-separated overrides."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = " ".join(redact_override(word) for word in message.split(" "))
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


class RedactHydraDumps(Callback):
    """Hide secrets in the config files Hydra writes into the run and sweep directories."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # the sweeper writes multirun.yaml next; a sweep that fails before its first job starts
        # leaves it for the process's exit (hydra.sweep.dir's ${now:} is cached on `config`)
        atexit.register(redact_yaml, Path(str(config.hydra.sweep.dir)).absolute() / SWEEP_DUMP)
        launcher = logging.getLogger(LAUNCHER_LOGGER)
        if not any(isinstance(f, RedactOverrides) for f in launcher.filters):
            launcher.addFilter(RedactOverrides())

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        hydra = config.hydra
        if hydra.output_subdir is not None:  # null under torchrun on ranks other than 0
            folder = Path(str(hydra.runtime.output_dir)) / str(hydra.output_subdir)
            for name in DUMPS:
                redact_yaml(folder / name)
        if hydra.mode == RunMode.MULTIRUN:
            redact_yaml(Path(str(hydra.sweep.dir)) / SWEEP_DUMP)
