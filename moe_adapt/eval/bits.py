"""Bits per byte and bits per character: losses that compare across languages and tokenizers.

A loss in nats per *token* depends on how many tokens the tokenizer spends on the text: SmolLM2's
tokenizer spends about 0.98 tokens per Arabic character and 0.29 per English one, so a model that
knows no Arabic can still show a lower Arabic loss per token. Dividing the same summed negative
log-likelihood by the size of the text instead gives a unit that does not depend on the tokenizer::

    bits_per_byte = nll_sum / ln(2) / utf8_bytes      bits_per_char = nll_sum / ln(2) / chars

where ``nll_sum`` is summed over the scored tokens and ``utf8_bytes``/``chars`` are the size of
exactly the text those tokens spell. The held-out shards keep only token ids, so the text's size is
read off the tokenizer: :func:`token_sizes` gives every vocabulary entry its UTF-8 byte count and
its character count (the UTF-8 lead bytes among those bytes, i.e. a character counts for the token
that holds its first byte), and the size of a scored span is the sum over its tokens. Special tokens
(EOD, BOS, padding) spell no text and count 0.

How exact that is depends on the tokenizer's decoder (``TokenSizes.method``):

* ``byte_level`` (GPT-2 style byte-level BPE: SmolLM2, Llama 3, Qwen, the demo's tokenizer): every
  token is a fixed byte string and decoding concatenates them, so the sum is exactly the number of
  UTF-8 bytes of the decoded scored text, also when a token holds part of a multi-byte character.
* ``metaspace`` (SentencePiece style): ``▁`` counts as a space and ``<0xNN>`` byte-fallback tokens
  as one byte; the space a decoder strips at the very start of a text is still counted (one byte).
* ``decode`` (any other decoder): each token decoded on its own; a tokenizer that throws away
  whitespace when it pre-tokenizes cannot give the spaces back, so bytes are undercounted.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from moe_adapt.errors import MoEAdaptError

__all__ = ["TokenSizes", "bits", "token_sizes"]

LN2 = math.log(2.0)
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@dataclass(frozen=True)
class TokenSizes:
    """Size of the text each token id spells. Legend: ``V`` vocabulary."""

    bytes_V: np.ndarray
    """UTF-8 bytes per token id (int64; 0 for special tokens)."""
    chars_V: np.ndarray
    """Characters per token id: UTF-8 lead bytes among its bytes (int64; 0 for special tokens)."""
    method: str
    """How the sizes were read off the tokenizer: ``byte_level``, ``metaspace`` or ``decode``."""

    def count(self, ids: Any) -> tuple[int, int]:
        """``(utf8_bytes, chars)`` of the text the token ``ids`` spell."""
        ids_N = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids_N.size == 0:
            return 0, 0
        if int(ids_N.min()) < 0 or int(ids_N.max()) >= self.bytes_V.size:
            raise MoEAdaptError(
                f"token ids span [{int(ids_N.min())}, {int(ids_N.max())}] but the tokenizer that sizes "
                f"the text has {self.bytes_V.size} entries; the held-out shards and the tokenizer differ"
            )
        return int(self.bytes_V[ids_N].sum()), int(self.chars_V[ids_N].sum())


def bits(nll_nats: float, units: int | None) -> float | None:
    """``nll_nats / ln 2 / units`` (bits per byte or per character); None when ``units`` is 0 or None."""
    return nll_nats / LN2 / units if units else None


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's ``bytes_to_unicode``: each byte-level alphabet character -> its byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _decoder_types(decoder: Any) -> set[str]:
    if not isinstance(decoder, dict):
        return set()
    types = {str(decoder.get("type"))}
    for sub in decoder.get("decoders", []) or []:
        types |= _decoder_types(sub)
    return types


def _lead_bytes(data: bytes) -> int:
    return sum(1 for b in data if b & 0xC0 != 0x80)


def token_sizes(tokenizer: Any, *, zero_ids: Iterable[int] = ()) -> TokenSizes:
    """Bytes and characters per token id of a ``tokenizers.Tokenizer`` (see the module docstring).

    Special added tokens and ``zero_ids`` (e.g. the shards' EOD id) count 0.
    """
    spec = json.loads(tokenizer.to_str())
    types = _decoder_types(spec.get("decoder"))
    if "ByteLevel" in types:
        method = "byte_level"
    elif types & {"Metaspace", "ByteFallback"} or "Replace" in types:
        method = "metaspace"
    else:
        method = "decode"
    added = tokenizer.get_added_tokens_decoder()
    size = int(tokenizer.get_vocab_size(with_added_tokens=True))
    size = max([size, *(i + 1 for i in added)])
    vocab: dict[str, int] = tokenizer.get_vocab(with_added_tokens=True)
    bytes_V = np.zeros(size, dtype=np.int64)
    chars_V = np.zeros(size, dtype=np.int64)
    byte_of = _byte_decoder()
    for token, i in vocab.items():
        if i in added:
            data = b"" if added[i].special else added[i].content.encode("utf-8")
        elif method == "byte_level":
            data = b"".join(bytes([byte_of[c]]) if c in byte_of else c.encode("utf-8") for c in token)
        elif method == "metaspace":
            m = _BYTE_TOKEN.match(token)
            data = bytes([int(m.group(1), 16)]) if m else token.replace("▁", " ").encode("utf-8")
        else:
            data = tokenizer.decode([i], skip_special_tokens=False).encode("utf-8")
        bytes_V[i] = len(data)
        # a lone continuation byte (part of a character begun in an earlier token) is no new character
        chars_V[i] = _lead_bytes(data)
    for i in zero_ids:
        if 0 <= i < size:
            bytes_V[i] = chars_V[i] = 0
    return TokenSizes(bytes_V=bytes_V, chars_V=chars_V, method=method)
