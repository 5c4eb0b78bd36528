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


class CheckpointError(MoEAdaptError):
    """A checkpoint on disk is missing, corrupt or of an unsupported kind."""


def invalid(key: str, value: object, allowed: str) -> NoReturn:
    """Raise the one-line config error every schema uses: ``KEY=VALUE is invalid: ALLOWED``."""
    raise MoEAdaptConfigError(f"{key}={value!r} is invalid: {allowed}")
