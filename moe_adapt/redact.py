"""Secrets never reach a file or a log: config keys that look like secrets and the redaction of their
values (the run's ``config.json``, stage markers, the wandb mirror, the command line it records)."""

from __future__ import annotations

import re
from typing import Any

SECRET_KEY = re.compile(
    r"(secret|password|passwd|passphrase|api_?key|access_?key|private_?key|credential|(^|_)(token|auth)$)",
    re.IGNORECASE,
)
"""Config keys whose values never reach a file or a log: hf_token, wandb_api_key, aws_access_key,
ssh_private_key, ... (not tokenizer, max_new_tokens)."""

VOCABULARY_TOKEN = re.compile(r"^(bos|eos|eod|pad|unk|sep|cls|mask)_token$", re.IGNORECASE)
"""Keys that name a token of the vocabulary (data.tokenize.eod_token): settings, not credentials."""


def is_secret(key: str) -> bool:
    """Whether the value of config key ``key`` (its last component) must be hidden."""
    return bool(SECRET_KEY.search(key)) and not VOCABULARY_TOKEN.match(key)


def redact(obj: Any) -> Any:
    """A copy of a plain config tree with values of secret-looking keys replaced."""
    if isinstance(obj, dict):
        return {k: "***" if is_secret(str(k)) and v else redact(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj
