"""``python -m moe_adapt [+recipe=NAME] [key=value ...]`` — the one entry point.

Hydra composes the config (``--cfg job`` prints it and exits; ``-m`` sweeps); the runner executes
the requested stages. Under torchrun every process runs this entry point; ranks other than 0 keep
Hydra from writing its output folder and log file and log warnings only (``launch/README.md``).

A user error — a bad setting, a missing file — is printed on one line
(``error: ...``) and the process exits with status 2, without a traceback. Set
``HYDRA_FULL_ERROR=1`` to see the full trace of any error.

Hydra prints the errors it meets while composing the config (an unknown key, a missing group
option) over several lines, and raises them to the caller only with ``HYDRA_FULL_ERROR=1``. So
:func:`main` sets that variable while Hydra composes, turns what comes up into one line with
:func:`describe`, and puts the user's value back as soon as the job starts (:func:`_app`): crashes
inside the pipeline keep Hydra's usual report. This uses only Hydra's documented switch and adds
no composition of its own: every path Hydra takes (``--cfg``, ``--help``, ``-m`` sweeps, ``hydra.*``
overrides, the quiet ranks under torchrun) reports its composition errors the same way.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from moe_adapt.config import REMOVED_KEYS, Config, conf_dir, register, to_config
from moe_adapt.distributed import multirun_refusal
from moe_adapt.errors import MoEAdaptError
from moe_adapt.redact import secret_override_keys

_FULL_ERROR = "HYDRA_FULL_ERROR"
_USERS_FULL_ERROR = "MOE_ADAPT_USERS_HYDRA_FULL_ERROR"
"""While :func:`main` holds ``HYDRA_FULL_ERROR=1``: the user's own value ("" = unset), in the
environment, so that the jobs the torchrun sweep launcher starts get it back
(``hydra_plugins/moe_adapt_launchers/torchrun_launcher.py``: same name)."""
_users_full_error: list[str | None] = []
"""While :func:`main` has set ``HYDRA_FULL_ERROR=1`` for composing: the user's own value (None: unset).
Empty otherwise."""


def _full_error_asked() -> bool:
    """Whether the user asked for full traces (``HYDRA_FULL_ERROR=1``); ask after giving it back."""
    return os.environ.get(_FULL_ERROR) == "1"


def _give_back_full_error() -> None:
    """Put the user's ``HYDRA_FULL_ERROR`` back (a no-op once done, or when main() did not set it)."""
    if _users_full_error:
        os.environ.pop(_USERS_FULL_ERROR, None)
        asked = _users_full_error.pop()
        if asked is None:
            os.environ.pop(_FULL_ERROR, None)
        else:
            os.environ[_FULL_ERROR] = asked


@hydra.main(version_base=None, config_path=str(conf_dir()), config_name="config")
def _app(cfg: DictConfig) -> None:
    from moe_adapt.runner import run_pipeline

    _give_back_full_error()  # composed: from here on Hydra reports crashes as the user asked
    try:
        run_pipeline(to_config(cfg), raw=cfg)
    except Exception as e:  # caught here, before Hydra logs it as a crash
        line = describe(e) if isinstance(e, MoEAdaptError) or not _full_error_asked() else None
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        sys.exit(2)


def _settings_under(path: str, schema: object = None) -> list[str]:
    """The settings of the config node at ``path``: those of ``schema`` (the dataclass the node was
    composed with, e.g. the chosen engine's) when it is one, else the root schema's node there."""
    if dataclasses.is_dataclass(schema) and isinstance(schema, type):
        return [f.name for f in dataclasses.fields(schema)]
    node: Any = OmegaConf.structured(Config)
    for part in [p for p in path.split(".") if p]:
        node = node.get(part) if isinstance(node, DictConfig) else None
    return [str(k) for k in node] if isinstance(node, DictConfig) else []


def describe(ex: BaseException) -> str | None:
    """One line for an error the user can fix, or None for anything else."""
    from hydra.errors import HydraException, MissingConfigException

    inner: BaseException | None = ex
    for _ in range(8):  # ours, or ours wrapped by Hydra/OmegaConf: raised in a resolver (${run_name:...})
        if isinstance(inner, MoEAdaptError):
            return str(inner)
        if not isinstance(inner, HydraException | OmegaConfBaseException):
            break
        inner = inner.__cause__ or inner.__context__

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
            known = _settings_under(parent, getattr(cause, "object_type", None))
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


_DIRNAME_EXCLUDE = "hydra.job.config.override_dirname.exclude_keys"


def _secrets_out_of_dirnames(args: list[str]) -> list[str]:
    """Keep the keys of secret-looking overrides (``+hf_token=...``) out of ``${hydra.job.override_dirname}``,
    which a run or sweep directory's name may use: added to Hydra's ``exclude_keys``, to the user's own
    list when the command line gives one (one given in a YAML file is replaced)."""
    keys = secret_override_keys(args)
    if not keys:
        return args
    for i, arg in enumerate(args):
        key, _, value = arg.partition("=")
        if key.lstrip("+") == _DIRNAME_EXCLUDE and value.startswith("[") and value.endswith("]"):
            merged = ",".join([value[1:-1].strip(), *keys] if value[1:-1].strip() else keys)
            return [*args[:i], f"{key}=[{merged}]", *args[i + 1 :]]
    return [*args, f"{_DIRNAME_EXCLUDE}=[{','.join(keys)}]"]


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


def _multirun_asked(args: list[str]) -> bool:
    """Whether the command line asks for a multirun (``-m``, ``--multirun``, ``hydra.mode=MULTIRUN``)."""
    return any(a in ("-m", "--multirun") or a.replace(" ", "") == "hydra.mode=MULTIRUN" for a in args)


def main() -> None:
    """Console entry point (``moe-adapt``)."""
    _exit_on_sigterm()
    if _multirun_asked(sys.argv[1:]) and (line := multirun_refusal()) is not None:
        print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [sys.argv[0], *_secrets_out_of_dirnames(_quiet_other_ranks(sys.argv[1:]))]
    # Hydra prints composition errors over several lines; with HYDRA_FULL_ERROR=1 it raises them to
    # us instead, and the user gets one line. _app gives the user's value back once composed.
    _users_full_error.append(os.environ.get(_FULL_ERROR))
    os.environ[_USERS_FULL_ERROR] = os.environ.get(_FULL_ERROR) or ""
    os.environ[_FULL_ERROR] = "1"
    try:
        register()
        _app()
    except Exception as ex:
        _give_back_full_error()
        line = None if _full_error_asked() else describe(ex)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
    finally:
        _give_back_full_error()


if __name__ == "__main__":
    main()
