"""Secrets never reach a file or a log: config keys that look like secrets and the redaction of their
values (the run's ``config.json``, stage markers, the wandb mirror, the command line it records,
Hydra's ``.hydra/*.yaml`` and ``multirun.yaml``: :mod:`moe_adapt.hydra_dumps`)."""

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


def redact_override(arg: str) -> str:
    """``+model.hf_token=abc`` -> ``+model.hf_token=***`` (by the key's last component, as
    :func:`is_secret` decides); ``--wandb-api-key=abc`` likewise; other arguments unchanged."""
    key, sep, value = arg.partition("=")
    return f"{key}=***" if sep and value and is_secret(_last_component(key)) else arg


def secret_override_keys(args: list[str]) -> list[str]:
    """The config keys of the overrides among ``args`` whose values :func:`redact_override` hides, as
    Hydra names them (``+a.hf_token=x`` -> ``a.hf_token``)."""
    return [
        arg.partition("=")[0].lstrip("+~").split("@", 1)[0]
        for arg in args
        if not arg.startswith("-") and redact_override(arg) != arg
    ]


def redact_dump(tree: Any) -> Any:
    """A copy of a plain tree of a config dump (Hydra's ``config.yaml``, ``hydra.yaml``,
    ``overrides.yaml``, ``multirun.yaml``) with its secrets hidden: values of secret-looking keys,
    overrides of them in a list (``a.b.hf_token=x`` -> ``a.b.hf_token=***``), and every other copy of
    such an override's value in a string (``hydra.job.override_dirname`` joins the overrides into one)."""
    hidden = sorted({_override_value(s) for s in _listed_strings(tree)} - {""}, key=len, reverse=True)

    def walk(obj: Any, listed: bool) -> Any:
        if isinstance(obj, dict):
            return {k: "***" if is_secret(str(k)) and v else walk(v, False) for k, v in obj.items()}
        if isinstance(obj, list):
            return [walk(v, True) for v in obj]
        if isinstance(obj, str):
            if listed and redact_override(obj) != obj:
                return redact_override(obj)
            for value in hidden:
                obj = obj.replace(value, "***")
        return obj

    return walk(tree, False)


def _last_component(key: str) -> str:
    return key.lstrip("+~-").split("@", 1)[0].rsplit(".", 1)[-1].replace("-", "_")


def _override_value(arg: str) -> str:
    """The value of ``arg`` when it is an override :func:`redact_override` hides, else ``""``."""
    return arg.partition("=")[2] if redact_override(arg) != arg else ""


def _listed_strings(obj: Any) -> list[str]:
    """The strings that are items of a list in ``obj`` (where Hydra keeps the overrides)."""
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _listed_strings(v)]
    if isinstance(obj, list):
        return [v for v in obj if isinstance(v, str)] + [s for v in obj for s in _listed_strings(v)]
    return []
