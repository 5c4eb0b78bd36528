"""Teacher backends of the generate phase (``distill.generate.backend``) and the server backend's settings.

- ``hf``: the teacher is an HF checkpoint folder (``distill.teacher``) run with transformers
  ``generate()`` in this process (:mod:`moe_adapt.distill.decoding`); CPU tests and small teachers.
- ``server``: the teacher is served behind an OpenAI-compatible endpoint (vLLM, SGLang, llama.cpp, TGI,
  ``transformers serve``), reached over HTTP by :mod:`moe_adapt.distill.server` with
  :class:`ServerConfig`'s settings.

Both write the same shards (:mod:`moe_adapt.distill.generate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moe_adapt.errors import invalid

BACKENDS: dict[str, str] = {
    "hf": "transformers generate() on distill.teacher (an HF folder) in this process",
    "server": "an OpenAI-compatible endpoint (distill.generate.server.base_url / model)",
}
"""Every teacher backend, and what it runs."""

TRANSPORT_KEYS = ("base_url", "api_key_env", "concurrency", "timeout_s", "retries", "backoff_s")
"""Server settings that change how traces are fetched, not what they are: left out of the generate
phase's fingerprint, so moving the server or tuning the client keeps the finished shards."""


@dataclass
class ServerConfig:
    """The ``server`` backend: an OpenAI-compatible chat-completions endpoint."""

    base_url: str | None = None
    """Endpoint root including the API version, e.g. ``http://localhost:8000/v1``."""

    model: str | None = None
    """Model name the server knows the teacher by (the ``model`` field of each request)."""

    api_key_env: str | None = None
    """Name of the environment variable that holds the API key (sent as ``Authorization: Bearer``);
    null: no key. The key itself is never a setting, so it never reaches a config dump or a log."""

    tokenizer: str | None = None
    """HF folder of the served model's tokenizer: the trace's ``response_ids`` are in its vocabulary,
    read from the server's log-probabilities when it gives token ids, else the response text encoded
    with it. Null: the student's (distill.student). Token KD needs the served model's own tokenizer
    here, identical to the student's."""

    concurrency: int = 8
    """Requests in flight at once."""

    timeout_s: float = 300.0
    """Seconds one request may take (connect, and each read) before it is retried."""

    retries: int = 5
    """Further tries of a request that failed with a connection error, a timeout, 429 or 5xx."""

    backoff_s: float = 1.0
    """Wait before the first retry; doubled after each further one (exponential backoff)."""

    extra_body: dict[str, Any] = field(default_factory=dict)
    """Fields added to every request as they are, e.g. vLLM's ``{return_tokens_as_token_ids: true}``
    (token ids with the log-probabilities, which token KD needs)."""

    def validate(self, key: str = "distill.generate.server") -> None:
        """Refuse settings the server backend cannot run with (called when backend=server)."""
        if not self.base_url or not str(self.base_url).startswith(("http://", "https://")):
            invalid(
                f"{key}.base_url", self.base_url, "an http(s) URL of the API root, e.g. http://host:8000/v1"
            )
        if not self.model:
            invalid(f"{key}.model", self.model, "the model name the server serves the teacher under")
        if self.concurrency < 1:
            invalid(f"{key}.concurrency", self.concurrency, "must be >= 1")
        if self.retries < 0:
            invalid(f"{key}.retries", self.retries, "must be >= 0")
        if not self.timeout_s > 0 or self.backoff_s < 0:
            invalid(
                f"{key}.timeout_s/backoff_s", (self.timeout_s, self.backoff_s), "timeout > 0, backoff >= 0"
            )
