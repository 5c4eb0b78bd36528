"""The ``server`` teacher backend's client: an OpenAI-compatible ``/chat/completions`` endpoint over httpx.

:class:`TeacherServer` probes the endpoint before any work (``GET /models``: a bad URL, a server that
is not OpenAI-compatible or one that does not serve ``model`` is a one-line error), then asks for one
completion per (prompt, sample), ``concurrency`` requests in flight at once. A request that fails with
a connection error, a timeout, 429 or a 5xx is retried ``retries`` times with exponential backoff
(``backoff_s``, doubled each time), so a server that restarts mid-shard costs a wait, not the shard;
other HTTP errors are one-line errors with the server's message.

Per-token log-probabilities (``logprobs`` / ``top_logprobs``) are asked for when ``store_topk > 0``.
They are usable for token KD only with the teacher's token ids, which OpenAI's format leaves out:
llama.cpp's own server (llama-server, or the xllamacpp wheel) adds an ``id`` per token and vLLM writes
``token_id:<id>`` as the token with ``return_tokens_as_token_ids`` (``distill.generate.server.
extra_body``); llama-cpp-python's Python server gives text pieces only (tests/distill/
test_llamacpp_server.py). :meth:`TeacherServer.
supports_token_logprobs` finds out with a one-token request before any work.

The API key is read from the environment variable ``api_key_env`` names, and only into the request
header: it is never a setting, never logged and never written.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from moe_adapt.distill.backends import ServerConfig
from moe_adapt.errors import MoEAdaptConfigError, MoEAdaptError

log = logging.getLogger(__name__)

KEY = "distill.generate.server"
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
"""HTTP statuses worth another try (overload, restarts, gateway hiccups)."""


@dataclass
class Completion:
    """One sampled response."""

    text: str
    """The response text as the server returns it."""

    finished: bool
    """The server stopped because the model ended its turn (``finish_reason == "stop"``)."""

    token_ids: list[int] | None
    """The response's token ids in the served model's vocabulary, when the server gives them."""

    topk_ids: np.ndarray | None
    """``[R, K]`` int32: the top-k token ids before each response token (with ``token_ids`` only)."""

    topk_logp: np.ndarray | None
    """``[R, K]`` float16: their log-probabilities as the server reports them."""


def _token_id(entry: dict[str, Any]) -> int | None:
    """The token id of one log-probability entry: llama.cpp's ``id``, ``token_id``, or vLLM's
    ``token_id:<id>`` token (return_tokens_as_token_ids); None when the server gives none."""
    for name in ("id", "token_id"):
        if isinstance(entry.get(name), int):
            return int(entry[name])
    token = entry.get("token")
    if isinstance(token, str) and token.startswith("token_id:") and token[9:].lstrip("-").isdigit():
        return int(token[9:])
    return None


def parse_choice(choice: dict[str, Any], k: int) -> Completion:
    """A :class:`Completion` from one ``choices[i]`` of a chat-completions response; ``k``: how many top
    log-probabilities to keep per token (0: none)."""
    text = (choice.get("message") or {}).get("content") or ""
    finished = choice.get("finish_reason") == "stop"
    content = (choice.get("logprobs") or {}).get("content") or []
    ids = [_token_id(e) for e in content]
    if not content or any(i is None for i in ids):
        return Completion(text, finished, None, None, None)
    token_ids = [int(i) for i in ids if i is not None]
    if not k:
        return Completion(text, finished, token_ids, None, None)
    top_ids = np.zeros((len(content), k), dtype=np.int32)
    top_logp = np.zeros((len(content), k), dtype=np.float16)
    for r, entry in enumerate(content):
        top = sorted(entry.get("top_logprobs") or [], key=lambda e: -float(e["logprob"]))[:k]
        tids = [_token_id(e) for e in top]
        if len(top) < k or any(i is None for i in tids):
            raise MoEAdaptError(
                f"the server returned {len(top)} top log-probabilities with token ids at response token "
                f"{r}, fewer than distill.generate.store_topk={k}: lower store_topk "
                "(servers cap it, often at 20)"
            )
        top_ids[r] = [int(i) for i in tids if i is not None]
        top_logp[r] = [max(float(e["logprob"]), -65504.0) for e in top]
    return Completion(text, finished, token_ids, top_ids, top_logp)


class TeacherServer:
    """A client of one OpenAI-compatible endpoint with the settings of :class:`ServerConfig`."""

    def __init__(self, cfg: ServerConfig) -> None:
        import httpx

        cfg.validate(KEY)
        self.cfg = cfg
        self.base_url = str(cfg.base_url).rstrip("/")
        headers = {"Content-Type": "application/json"}
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise MoEAdaptConfigError(
                    f"{KEY}.api_key_env={cfg.api_key_env!r}: that environment variable is not set; "
                    "export it with the API key (or set api_key_env=null for a server without one)"
                )
            headers["Authorization"] = f"Bearer {key}"
        self._client = httpx.Client(
            timeout=httpx.Timeout(cfg.timeout_s),
            headers=headers,
            limits=httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency),
        )
        self._pool = ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix="teacher-server")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._client.close()

    def __enter__(self) -> TeacherServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def probe(self) -> None:
        """One ``GET /models`` (no retries): a one-line config error when nothing OpenAI-compatible
        answers at ``base_url``, or when it lists models and ``model`` is not among them."""
        import httpx

        url = f"{self.base_url}/models"
        where = f"{KEY}.base_url={self.cfg.base_url!r}"
        try:
            resp = self._client.get(url)
        except httpx.HTTPError as err:
            raise MoEAdaptConfigError(
                f"{where}: no server answers at {url} ({type(err).__name__}: {err}); start the teacher "
                "server or fix the URL (it is the API root, e.g. http://host:8000/v1)"
            ) from None
        if resp.status_code in (401, 403):
            raise MoEAdaptConfigError(
                f"{where}: the server refused the API key (HTTP {resp.status_code}); set {KEY}.api_key_env "
                "to the name of the environment variable that holds the right key"
            )
        try:
            listed = resp.json()["data"] if resp.status_code == 200 else None
            served = [str(m["id"]) for m in listed] if isinstance(listed, list) else None
        except (ValueError, KeyError, TypeError):
            served = None
        if served is None:
            raise MoEAdaptConfigError(
                f"{where}: GET {url} gave HTTP {resp.status_code} without an OpenAI model list; "
                "is this the API root of an OpenAI-compatible server (it usually ends in /v1)?"
            )
        if served and self.cfg.model not in served:  # an empty list: a server that loads on demand
            raise MoEAdaptConfigError(
                f"{KEY}.model={self.cfg.model!r} is not served at {self.base_url}; "
                f"it serves: {', '.join(served)}"
            )

    def supports_token_logprobs(self, k: int) -> bool:
        """Whether a one-token request with ``logprobs`` comes back with ``k`` top log-probabilities
        and token ids (what token KD needs)."""
        body = self._body("Hi", seed=0, max_tokens=1, temperature=1.0, top_p=1.0, top_k=0, logprobs=k)
        choice = self._post(body)["choices"][0]
        try:
            return parse_choice(choice, k).topk_ids is not None
        except MoEAdaptError:
            return False

    def _body(
        self,
        prompt: str,
        *,
        seed: int,
        max_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        logprobs: int,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.cfg.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": temperature,
            "seed": seed,
        }
        if temperature > 0:
            body["top_p"] = top_p
            if top_k:
                body["top_k"] = top_k  # not OpenAI's; vLLM, SGLang, llama.cpp and TGI accept it
        if logprobs:
            body.update(logprobs=True, top_logprobs=logprobs)
        body.update(self.cfg.extra_body)
        return body

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``/chat/completions``; retried with exponential backoff on connection errors, timeouts,
        429 and 5xx."""
        import httpx

        url = f"{self.base_url}/chat/completions"
        tries = self.cfg.retries + 1
        for attempt in range(tries):
            try:
                resp = self._client.post(url, json=body)
                if resp.status_code == 200:
                    data: dict[str, Any] = resp.json()
                    return data
                why = f"HTTP {resp.status_code}: {resp.text[:300]!r}"
                if resp.status_code not in RETRY_STATUS:
                    raise MoEAdaptError(f"the teacher server refused a request to {url} ({why})")
            except httpx.HTTPError as err:  # connection refused or reset, timeouts, protocol errors
                why = f"{type(err).__name__}: {err}"
            if attempt + 1 < tries:
                wait = self.cfg.backoff_s * 2**attempt
                log.warning(
                    "teacher server: try %d/%d failed (%s); retrying in %.1f s", attempt + 1, tries, why, wait
                )
                time.sleep(wait)
        raise MoEAdaptError(
            f"the teacher server at {url} failed {tries} tries (last: {why}); raise "
            f"{KEY}.retries/backoff_s or check the server"
        )

    def complete(self, requests: list[dict[str, Any]], *, k: int) -> list[Completion]:
        """One completion per request (keyword arguments of :meth:`_body`), in order, at most
        ``concurrency`` in flight."""
        futures = [self._pool.submit(self._post, self._body(**r)) for r in requests]
        return [parse_choice(f.result()["choices"][0], k) for f in futures]
