"""Difficulty scores and curriculum buckets (easy -> hard phases that keep the language mix).

A scorer maps a text to a float where higher means harder. Built in:

- ``compression``: zlib compressed size / raw size of the UTF-8 bytes (repetitive, formulaic text
  compresses well and is easy; dense, varied text is hard);
- ``ttr``: type-token ratio of the words (lexical diversity), over the first 1,000 words;
- ``length``: log(1 + words);
- ``perplexity``: optional, :func:`perplexity_scorer` wraps a local HF causal LM (needs torch and
  transformers; never used unless asked for).

:func:`score_documents` z-scores each scorer over the corpus and sums them with weights into one
``difficulty`` value. :func:`assign_buckets` cuts each language at its own quantiles into K phases,
so every phase keeps the corpus' language ratio and, within a language, phases are ordered by score.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moe_adapt.errors import MoEAdaptConfigError

Scorer = Callable[[str], float]


def compression_ratio(text: str) -> float:
    """zlib (level 6) compressed size over raw size of ``text``'s UTF-8 bytes; 0.0 for empty text."""
    raw = text.encode("utf-8")
    return len(zlib.compress(raw, 6)) / len(raw) if raw else 0.0


def type_token_ratio(text: str, max_words: int = 1000) -> float:
    """Distinct lowercased words over words, on the first ``max_words`` words; 0.0 for no words."""
    words = text.lower().split()[:max_words]
    return len(set(words)) / len(words) if words else 0.0


def log_length(text: str) -> float:
    """log(1 + number of whitespace-separated words)."""
    return math.log1p(len(text.split()))


SCORERS: dict[str, Scorer] = {"compression": compression_ratio, "ttr": type_token_ratio, "length": log_length}
"""Built-in scorers by name."""


def perplexity_scorer(model_path: str | Path, *, max_tokens: int = 512, device: str = "cpu") -> Scorer:
    """Return a scorer giving log-perplexity of a text under the local HF causal LM at ``model_path``.

    Loads with ``local_files_only=True`` (never downloads) and without ``trust_remote_code``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    model: Any = AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True)
    model = model.to(device).eval()

    def score(text: str) -> float:
        ids = tok(text, return_tensors="pt", truncation=True, max_length=max_tokens)["input_ids"].to(device)
        if ids.shape[1] < 2:
            return 0.0
        with torch.no_grad():
            return float(model(ids, labels=ids).loss)

    return score


def _zscore(values: np.ndarray) -> np.ndarray:
    std = values.std()
    return (values - values.mean()) / std if std > 0 else np.zeros_like(values)


def score_documents(
    docs: Sequence[dict[str, Any]],
    weights: Mapping[str, float] | None = None,
    *,
    extra_scorers: Mapping[str, Scorer] | None = None,
) -> np.ndarray:
    """Return one combined difficulty per document: the weighted sum of z-scored scorer values.

    ``weights`` maps scorer names (built-in :data:`SCORERS` or ``extra_scorers``) to weights; the
    default is ``{"compression": 1, "ttr": 1, "length": 1}``.
    """
    scorers = {**SCORERS, **(extra_scorers or {})}
    weights = dict(weights) if weights is not None else {"compression": 1.0, "ttr": 1.0, "length": 1.0}
    unknown = sorted(set(weights) - set(scorers))
    if unknown:
        raise MoEAdaptConfigError(
            f"difficulty.weights has unknown scorer(s) {', '.join(unknown)}; "
            f"available: {', '.join(sorted(scorers))}"
        )
    total = np.zeros(len(docs))
    for name, weight in weights.items():
        if weight == 0:
            continue
        values = np.array([scorers[name](str(d.get("text", ""))) for d in docs], dtype=np.float64)
        total += weight * _zscore(values)
    return total


def assign_buckets(
    docs: Sequence[dict[str, Any]], scores: Sequence[float] | np.ndarray, k: int, *, lang_key: str = "lang"
) -> list[int]:
    """Return a bucket in ``0..k-1`` per document: per language, rank by score and cut into ``k`` equal parts.

    Ties are broken by position, so the result is deterministic. Bucket 0 is the easiest.
    """
    if k < 1:
        raise MoEAdaptConfigError(f"difficulty.buckets={k} must be >= 1")
    if len(scores) != len(docs):
        raise MoEAdaptConfigError(f"got {len(scores)} scores for {len(docs)} documents")
    by_lang: dict[str, list[int]] = {}
    for i, doc in enumerate(docs):
        by_lang.setdefault(str(doc.get(lang_key, "und")), []).append(i)
    buckets = [0] * len(docs)
    for idx in by_lang.values():
        order = sorted(idx, key=lambda i: (scores[i], i))
        n = len(order)
        for rank, i in enumerate(order):
            buckets[i] = min(rank * k // n, k - 1)
    return buckets


def bucket_documents(
    docs: Sequence[dict[str, Any]], k: int, weights: Mapping[str, float] | None = None
) -> list[dict[str, Any]]:
    """Return copies of ``docs`` with ``difficulty`` (combined score) and ``bucket`` (0..k-1) fields added."""
    scores = score_documents(docs, weights)
    buckets = assign_buckets(docs, scores, k)
    return [{**d, "difficulty": float(s), "bucket": b} for d, s, b in zip(docs, scores, buckets, strict=True)]
