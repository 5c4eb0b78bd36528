"""Per-language loss and perplexity of a Hugging Face causal LM (dense or MoE) on token sequences.

Documents longer than the context are scored with the standard strided sliding window (as in the
Hugging Face perplexity guide): windows of ``window`` tokens start every ``stride`` tokens, and each
window scores only the tokens not scored by an earlier window, so every token is counted at most
once. With ``stride < window`` every token after a document's first is scored, each with at least
``window - stride`` tokens of context. With ``stride == window`` the windows are disjoint chunks and
the first token of every chunk is not scored (it has no context inside its window).

Losses are natural-log negative log-likelihoods: ``mean_loss = nll_sum / tokens`` (nats per token)
and ``ppl = exp(mean_loss)``. Given the tokenizer's :class:`~moe_adapt.eval.bits.TokenSizes`, the
same ``nll_sum`` is also divided by the size of the text the scored tokens spell:
``bits_per_byte = nll_sum / ln 2 / bytes`` and ``bits_per_char = nll_sum / ln 2 / chars`` (a token
that is not scored adds neither loss nor bytes; EOD and other special tokens add no bytes). These
compare across languages and tokenizers; nats per token does not.

Tensor legend: ``B`` batch of windows, ``T`` time (positions in a window), ``V`` vocabulary.
``input_ids_BT``, ``attention_mask_BT``, ``score_mask_BT`` (which targets to count),
``logits_BTV``, ``nll_BT``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from moe_adapt.errors import MoEAdaptError
from moe_adapt.eval.bits import TokenSizes, bits
from moe_adapt.eval.lm import target_logprobs

__all__ = [
    "LanguagePerplexity",
    "Window",
    "evaluate_perplexity",
    "sliding_windows",
]

TokenSequence = torch.Tensor | np.ndarray | Sequence[int]


@dataclass(frozen=True)
class Window:
    """One evaluation window over a document: tokens ``[begin, end)``; targets ``[score_from, end)``."""

    doc: int
    """Index of the document in its language's list."""
    begin: int
    """First position fed to the model."""
    end: int
    """One past the last position fed to the model."""
    score_from: int
    """First target position counted in this window (always ``> begin``)."""


@dataclass(frozen=True)
class LanguagePerplexity:
    """Loss summary of one language."""

    tokens: int
    """Number of scored target tokens."""
    nll_sum: float
    """Sum of the negative log-likelihoods (nats) of the scored tokens."""
    mean_loss: float
    """``nll_sum / tokens``, nats per token."""
    ppl: float
    """``exp(mean_loss)``."""
    bytes: int | None = None
    """UTF-8 bytes of the text the scored tokens spell (None without token sizes)."""
    chars: int | None = None
    """Characters of that text (None without token sizes)."""
    bits_per_byte: float | None = None
    """``nll_sum / ln 2 / bytes``: comparable across languages and tokenizers."""
    bits_per_char: float | None = None
    """``nll_sum / ln 2 / chars``."""

    def to_dict(self) -> dict[str, float | int]:
        """Return a JSON-able dict."""
        return asdict(self)


def sliding_windows(n_tokens: int, window: int, stride: int, doc: int = 0) -> list[Window]:
    """Strided windows over a document of ``n_tokens`` tokens that score every token at most once.

    Targets scored by the windows are the positions ``1 .. n_tokens - 1`` (or, with
    ``stride == window``, all of them except the first of each chunk). A document with fewer than
    two tokens has nothing to score and gives no window.
    """
    if window < 2:
        raise MoEAdaptError(f"window={window} must be at least 2 tokens (one context, one target)")
    if not 1 <= stride <= window:
        raise MoEAdaptError(f"stride={stride} must be between 1 and window={window}")
    windows: list[Window] = []
    prev_end = 0
    for begin in range(0, max(n_tokens - 1, 0), stride):
        end = min(begin + window, n_tokens)
        score_from = max(prev_end, begin + 1)
        if score_from < end:
            windows.append(Window(doc=doc, begin=begin, end=end, score_from=score_from))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def _as_ids(seq: TokenSequence, lang: str, i: int, vocab_size: int | None) -> torch.Tensor:
    ids = torch.as_tensor(np.asarray(seq) if not isinstance(seq, torch.Tensor) else seq)
    if ids.dim() != 1:
        raise MoEAdaptError(
            f"language {lang!r} sequence {i}: expected a 1-D token array, got shape {tuple(ids.shape)}"
        )
    if ids.numel() and (ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool):
        raise MoEAdaptError(f"language {lang!r} sequence {i}: token ids must be integers, got {ids.dtype}")
    ids = ids.to(torch.long)
    if ids.numel() and (int(ids.min()) < 0 or (vocab_size is not None and int(ids.max()) >= vocab_size)):
        raise MoEAdaptError(
            f"language {lang!r} sequence {i}: token ids span [{int(ids.min())}, {int(ids.max())}] "
            f"but the model's vocabulary is 0..{vocab_size - 1 if vocab_size else '?'}"
        )
    return ids


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _window_nll(
    model: torch.nn.Module, docs: Sequence[torch.Tensor], batch: Sequence[Window], pad_id: int
) -> tuple[float, int]:
    """Sum of NLL and count of scored targets for one batch of windows (right-padded)."""
    device = _model_device(model)
    max_len = max(w.end - w.begin for w in batch)
    input_ids_BT = torch.full((len(batch), max_len), pad_id, dtype=torch.long)
    attention_mask_BT = torch.zeros((len(batch), max_len), dtype=torch.long)
    score_mask_BT = torch.zeros((len(batch), max_len), dtype=torch.bool)  # over target positions
    for b, w in enumerate(batch):
        length = w.end - w.begin
        input_ids_BT[b, :length] = docs[w.doc][w.begin : w.end]
        attention_mask_BT[b, :length] = 1
        score_mask_BT[b, w.score_from - w.begin : length] = True
    predict_BT = torch.zeros_like(score_mask_BT)  # position t predicts token t + 1
    predict_BT[:, :-1] = score_mask_BT[:, 1:]
    token_lp_N, _ = target_logprobs(
        model, input_ids_BT.to(device), attention_mask_BT.to(device), predict_BT.to(device)
    )
    return float(-token_lp_N.double().sum()), int(token_lp_N.numel())


def evaluate_perplexity(
    model: torch.nn.Module,
    sequences: Mapping[str, Sequence[TokenSequence]],
    *,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    pad_id: int = 0,
    token_sizes: TokenSizes | None = None,
) -> dict[str, LanguagePerplexity]:
    """Per-language loss and perplexity of ``model`` on tokenised documents.

    Args:
        model: any HF causal LM (``AutoModelForCausalLM``): called as
            ``model(input_ids=..., attention_mask=...)`` and must return ``.logits``.
        sequences: language label -> list of documents, each a 1-D integer tensor/array of token ids.
        window: tokens per window; default ``model.config.max_position_embeddings``.
        stride: step between window starts, ``1 <= stride <= window``; default ``window``
            (disjoint chunks). Use e.g. ``window // 2`` so every token has context.
        batch_size: windows per forward pass (windows are right-padded with ``pad_id``, masked out).
        pad_id: token id used for padding; any valid id works since padded positions are masked.
        token_sizes: bytes and characters per token id of the tokenizer that made ``sequences``
            (:func:`moe_adapt.eval.bits.token_sizes`); with it the result also has ``bytes``,
            ``chars``, ``bits_per_byte`` and ``bits_per_char`` of the scored text.

    Returns:
        language -> :class:`LanguagePerplexity` (``to_dict()`` gives tokens, nll_sum, mean_loss, ppl,
        and bytes, chars, bits_per_byte, bits_per_char: None without ``token_sizes``).

    Raises:
        MoEAdaptError: on a bad setting, a non-1-D or out-of-vocabulary sequence, or a language
            with no token to score.
    """
    if not sequences:
        raise MoEAdaptError("evaluate_perplexity got no languages; pass {'ar': [ids, ...], ...}")
    if batch_size < 1:
        raise MoEAdaptError(f"batch_size={batch_size} must be at least 1")
    config = getattr(model, "config", None)
    if window is None:
        window = getattr(config, "max_position_embeddings", None)
        if window is None:
            raise MoEAdaptError("window is not set and the model config has no max_position_embeddings")
    stride = window if stride is None else stride
    vocab_size = getattr(config, "vocab_size", None)
    if pad_id < 0 or (vocab_size is not None and pad_id >= vocab_size):
        raise MoEAdaptError(f"pad_id={pad_id} is outside the vocabulary 0..{vocab_size}-1")

    was_training = model.training
    model.eval()
    results: dict[str, LanguagePerplexity] = {}
    try:
        with torch.no_grad():
            for lang, docs_raw in sequences.items():
                docs = [_as_ids(seq, lang, i, vocab_size) for i, seq in enumerate(docs_raw)]
                windows = [
                    w for i, d in enumerate(docs) for w in sliding_windows(d.numel(), window, stride, i)
                ]
                if not windows:
                    raise MoEAdaptError(
                        f"language {lang!r} has no token to score "
                        f"({len(docs)} documents, none with 2+ tokens)"
                    )
                windows.sort(key=lambda w: w.end - w.begin, reverse=True)  # similar lengths batch together
                nll_sum, tokens = 0.0, 0
                for start in range(0, len(windows), batch_size):
                    nll, count = _window_nll(model, docs, windows[start : start + batch_size], pad_id)
                    nll_sum += nll
                    tokens += count
                mean_loss = nll_sum / tokens
                n_bytes = n_chars = None
                if token_sizes is not None:
                    # the scored targets of every window, exactly those whose NLL was summed
                    scored_N = torch.cat([docs[w.doc][w.score_from : w.end] for w in windows])
                    n_bytes, n_chars = token_sizes.count(scored_N.numpy())
                results[lang] = LanguagePerplexity(
                    tokens=tokens,
                    nll_sum=nll_sum,
                    mean_loss=mean_loss,
                    ppl=math.exp(mean_loss),
                    bytes=n_bytes,
                    chars=n_chars,
                    bits_per_byte=bits(nll_sum, n_bytes),
                    bits_per_char=bits(nll_sum, n_chars),
                )
    finally:
        model.train(was_training)
    return results
