"""Secrets never reach a file or a log: config keys that look like secrets and the redaction of their
values (the run's ``config.json``, stage markers, the wandb mirror, the command line it records)."""

from __future__ import annotations

import re
from typing import Any

SECRET_KEY = re.compile(r"(secret|password|passwd|api_?key|credential|(^|_)(token|auth)$)", re.IGNORECASE)
"""Config keys whose values never reach a file or a log (hf_token, wandb_api_key, ...; not tokenizer)."""


def redact(obj: Any) -> Any:
    """A copy of a plain config tree with values of secret-looking keys replaced."""
    if isinstance(obj, dict):
        return {k: "***" if SECRET_KEY.search(str(k)) and v else redact(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj
