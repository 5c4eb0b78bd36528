"""The exception family for user-facing errors.

Anything raised as a :class:`MoEAdaptError` is the user's to fix (a bad setting, a missing file,
a checkpoint we cannot read). The CLI prints its message on one line and exits with status 2,
without a traceback. Everything else is a bug and keeps its traceback.
"""

from typing import NoReturn


class MoEAdaptError(Exception):
    """A problem with the user's input: the message says what is wrong and what is allowed."""


class MoEAdaptConfigError(MoEAdaptError):
    """A configuration value is invalid. Name the key, the value and what is allowed."""

    key: str | None = None
    """The dotted key of the value, when raised by :func:`invalid` (lets the config loader name the key
    the user set when the value came to this key by interpolation)."""
    value: object = None
    """The value refused (with :attr:`key`)."""
    allowed: str = ""
    """What is allowed (with :attr:`key`)."""


class CheckpointError(MoEAdaptError):
    """A checkpoint on disk is missing, corrupt or of an unsupported kind."""


def config_error(key: str, value: object, allowed: str) -> MoEAdaptConfigError:
    """The one-line config error every schema uses: ``KEY=VALUE is invalid: ALLOWED``."""
    err = MoEAdaptConfigError(f"{key}={value!r} is invalid: {allowed}")
    err.key, err.value, err.allowed = key, value, allowed
    return err


def invalid(key: str, value: object, allowed: str) -> NoReturn:
    """Raise :func:`config_error` (``KEY=VALUE is invalid: ALLOWED``)."""
    raise config_error(key, value, allowed)


def check_path_component(key: str, value: object) -> None:
    """Refuse a user-given name that becomes one component of a path (``run_name``, a benchmark's
    name), so it cannot reach outside its folder: not empty, not ``.`` or ``..``, no ``/``, ``\\`` or
    NUL. Raises the one-line :func:`invalid` error naming ``key``."""
    if not isinstance(value, str) or value in ("", ".", "..") or any(c in value for c in "/\\\0"):
        invalid(
            key, value, "must be a single file name: not empty, not '.' or '..', without '/', '\\' or NUL"
        )
