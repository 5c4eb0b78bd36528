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


class PerplexityScorer:
    """Mean token NLL (log-perplexity) of a text under a local HF causal LM, scored in batches.

    Loads with :func:`~moe_adapt.checkpoint.hf.load_causal_lm` (never downloads, safetensors weights
    only, no ``trust_remote_code``): a folder of pickle weights (``pytorch_model.bin``) is refused.
    Calling it scores one text; :meth:`batch` scores many with one padded forward per ``batch_size``.
    Texts are cut to ``max_tokens`` tokens.
    """

    def __init__(
        self, model_path: str | Path, *, max_tokens: int = 512, batch_size: int = 16, device: str = "cpu"
    ) -> None:
        from transformers import AutoTokenizer

        from moe_adapt.checkpoint.hf import load_causal_lm

        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise MoEAdaptConfigError(
                f"data.difficulty.reference_model={str(model_path)!r} is not a local HF checkpoint folder"
            )
        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        model: Any = load_causal_lm(path, device=device, what="data.difficulty.reference_model")
        self.model = model
        self.device, self.max_tokens, self.batch_size = device, max_tokens, batch_size

    def __call__(self, text: str) -> float:
        return self.batch([text])[0]

    def batch(self, texts: Sequence[str]) -> list[float]:
        """Log-perplexity of each text (0.0 for a text of fewer than two tokens)."""
        import torch
        import torch.nn.functional as F

        out: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tok(
                list(texts[i : i + self.batch_size]),
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_tokens,
            )
            ids_BT, mask_BT = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
            with torch.no_grad():
                logits_BTV = self.model(input_ids=ids_BT, attention_mask=mask_BT).logits.float()
            nll_BT = F.cross_entropy(logits_BTV[:, :-1].transpose(1, 2), ids_BT[:, 1:], reduction="none")
            valid_BT = (mask_BT[:, 1:] * mask_BT[:, :-1]).float()
            counts_B = valid_BT.sum(dim=1)
            means_B = (nll_BT * valid_BT).sum(dim=1) / counts_B.clamp_min(1)
            out += [
                float(m) if c > 0 else 0.0 for m, c in zip(means_B.tolist(), counts_B.tolist(), strict=True)
            ]
        return out


def perplexity_scorer(
    model_path: str | Path, *, max_tokens: int = 512, device: str = "cpu"
) -> PerplexityScorer:
    """A :class:`PerplexityScorer` for ``model_path`` (kept for callers of the function form)."""
    return PerplexityScorer(model_path, max_tokens=max_tokens, device=device)


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
        scorer = scorers[name]
        texts = [str(d.get("text", "")) for d in docs]
        batch = getattr(scorer, "batch", None)  # scorers that can score many texts at once
        values = np.array(batch(texts) if batch is not None else [scorer(t) for t in texts], dtype=np.float64)
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
