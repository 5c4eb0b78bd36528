"""``python -m moe_adapt [+recipe=NAME] [key=value ...]`` — the one entry point.

Hydra composes the config (``--cfg job`` prints it and exits; ``-m`` sweeps); the runner executes
the requested stages. Under torchrun every process runs this entry point; ranks other than 0 keep
Hydra from writing its output folder and log file and log warnings only (``launch/README.md``).

A user error — a bad setting, a missing file — is printed on one line
(``error: ...``) and the process exits with status 2, without a traceback. Set
``HYDRA_FULL_ERROR=1`` to see the full trace of any error.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from moe_adapt.config import REMOVED_KEYS, Config, conf_dir, register, to_config
from moe_adapt.errors import MoEAdaptError


@hydra.main(version_base=None, config_path=str(conf_dir()), config_name="config")
def _app(cfg: DictConfig) -> None:
    from moe_adapt.runner import run_pipeline

    try:
        run_pipeline(to_config(cfg), raw=cfg)
    except MoEAdaptError as e:  # caught here, before Hydra logs it as a crash
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _settings_under(path: str) -> list[str]:
    node: Any = OmegaConf.structured(Config)
    for part in [p for p in path.split(".") if p]:
        node = node.get(part) if isinstance(node, DictConfig) else None
    return [str(k) for k in node] if isinstance(node, DictConfig) else []


def describe(ex: BaseException) -> str | None:
    """One line for an error the user can fix, or None for anything else."""
    if isinstance(ex, MoEAdaptError):
        return str(ex)
    from hydra.errors import HydraException, MissingConfigException

    if isinstance(ex, MissingConfigException):
        options = ", ".join(ex.options or [])
        head = str(ex).splitlines()[0].rstrip(".")
        return f"{head}; available: {options}" if options else head
    cause = ex if isinstance(ex, OmegaConfBaseException) else ex.__cause__
    if isinstance(cause, OmegaConfBaseException):
        key = cause.full_key or ""
        msg = cause.msg.splitlines()[0] if cause.msg else type(cause).__name__
        if isinstance(cause, ConfigKeyError | ConfigAttributeError) and key in REMOVED_KEYS:
            return REMOVED_KEYS[key]
        if isinstance(cause, ConfigKeyError | ConfigAttributeError) and key:
            parent = key.rpartition(".")[0]
            known = _settings_under(parent)
            where = parent or "the top level"
            return (
                f"{key} is not a setting; {where} has: {', '.join(known)}"
                if known
                else f"{key} is not a setting"
            )
        return f"{key}: {msg}" if key else msg
    if isinstance(ex, HydraException):
        return " ".join(str(ex).split())
    return None


def _report_user_errors(original: Callable[[Callable[[], Any]], Any]) -> Callable[[Callable[[], Any]], Any]:
    def run_and_report(func: Callable[[], Any]) -> Any:
        try:
            return func()
        except Exception as ex:
            line = None if os.environ.get("HYDRA_FULL_ERROR") == "1" else describe(ex)
            if line is None:
                return original(_reraise(ex))
            print(f"error: {line}", file=sys.stderr)
            sys.exit(2)

    return run_and_report


def _reraise(ex: BaseException) -> Callable[[], NoReturn]:
    def again() -> NoReturn:
        raise ex

    return again


def _quiet_other_ranks(args: list[str]) -> list[str]:
    """Hydra overrides for ranks other than 0 under torchrun: no ``.hydra/`` folder, no log file, warnings
    only (rank 0 writes the run directory). Left alone when the user sets Hydra's logging themselves."""
    rank = os.environ.get("RANK", "").strip()
    own = ("hydra/job_logging=", "hydra.job_logging", "hydra.output_subdir=")
    if rank in ("", "0") or any(arg.lstrip("+~").startswith(own) for arg in args):
        return args
    return [
        *args,
        "hydra.output_subdir=null",
        "hydra/job_logging=stdout",
        "hydra.job_logging.root.level=WARNING",
    ]


def _exit_on_sigterm() -> None:
    """Leave through ``SystemExit`` on SIGTERM, as on Ctrl-C.

    torchrun stops the other processes with SIGTERM when one fails, and so does Slurm at the time
    limit. Without this a process dies where it stands, and ``finally`` blocks never run: rank 1's
    scratch folder and the hidden temporary folder of a checkpoint half written stay on disk.
    Processes forked from this one (data workers) keep the default, so a pool can still stop them.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    owner = os.getpid()

    def leave(signum: int, frame: object) -> None:
        if os.getpid() != owner:  # a forked child: die as SIGTERM means by default
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, leave)


def main() -> None:
    """Console entry point (``moe-adapt``)."""
    register()
    _exit_on_sigterm()
    sys.argv = [sys.argv[0], *_quiet_other_ranks(sys.argv[1:])]
    # Hydra prints composition errors over several lines (or with a trace); give the user one line.
    import hydra._internal.utils as hydra_utils

    if not getattr(hydra_utils.run_and_report, "_moe_adapt", False):
        wrapped = _report_user_errors(hydra_utils.run_and_report)
        wrapped._moe_adapt = True  # type: ignore[attr-defined]
        hydra_utils.run_and_report = wrapped  # type: ignore[assignment]
    _app()


if __name__ == "__main__":
    main()
