"""MinHash signatures for the data stage, as datatrove computes them but faster.

:class:`FastWordTokenizer` is a regex word tokenizer handed to datatrove instead of a language code
(datatrove's default runs spaCy, sentence splitter included, on every document: 75-90% of the
MinHash time, for words only). :class:`FastMinhashSignature` is datatrove's
``MinhashDedupSignature`` with the same shingles and signatures, computed faster; the data stage's
``SignatureStep`` (:mod:`moe_adapt.data.dtsteps.dedup`) and :func:`moe_adapt.data.dedup.minhash_duplicates`
use both. ``tests/data/test_fast_paths.py`` checks them against datatrove on random texts.
"""

from __future__ import annotations

import functools
import itertools
import unicodedata
from typing import Any

import numpy as np
import regex
from datatrove.pipeline.dedup.minhash import MinhashDedupSignature
from datatrove.pipeline.dedup.minhash import _mersenne_prime as _MERSENNE_PRIME
from datatrove.utils.text import (
    MONTHS_PATTERN,
    NUMBERS_PATTERN,
    PUNCTUATION,
    WEEKDAYS_PATTERN,
    simplify_text,
)
from datatrove.utils.word_tokenizers import WordTokenizer

# ---------------------------------------------------------------------------------------------
# Word tokenizer handed to datatrove
# ---------------------------------------------------------------------------------------------

# A word: letters, combining marks and digits of any script; Hebrew geresh/gershayim (and ASCII
# quotes, as Hebrew text often uses them instead) may join two runs, as in רמב״ם or צ'יפס.
_WORD_RE = regex.compile(r"[\p{L}\p{M}\p{N}]+(?:[\u05f3\u05f4'\"][\p{L}\p{M}\p{N}]+)*")
_SENT_RE = regex.compile(r"[^.!?؟۔\n]+[.!?؟۔]*")
_TATWEEL = "\u0640"
_MARKS_AND_TATWEEL = regex.compile(r"[\p{Mn}\u0640]")
"""What ``strip_marks`` deletes after NFD: non-spacing marks, and the tatweel."""


@functools.cache
def _marks_table() -> np.ndarray:
    """Code point -> whether :data:`_MARKS_AND_TATWEEL` matches it (1.1 MB, built once per process
    from the regex itself, so both agree on every code point)."""
    every = "".join(map(chr, itertools.chain(range(0xD800), range(0xE000, 0x110000))))
    table = np.zeros(0x110000, dtype=bool)
    table[[ord(c) for c in _MARKS_AND_TATWEEL.findall(every)]] = True
    return table


def _strip_marks(text: str) -> str:
    """``_MARKS_AND_TATWEEL.sub("", text)`` as one table lookup over the code points (4x faster on
    vocalised Arabic, where two characters in five are marks)."""
    cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    marks = _marks_table()[cps]
    if not marks.any():
        return text
    return cps[~marks].tobytes().decode("utf-32-le", "surrogatepass")


_WORD_CHAR = regex.compile(r"[\p{L}\p{M}\p{N}]")
_JOINERS = "\u05f3\u05f4'\""
_SPACE = np.uint32(ord(" "))


@functools.cache
def _word_table() -> np.ndarray:
    """Code point -> 1 for a word character of :data:`_WORD_RE` (letter, mark, digit), 2 for a
    joiner (geresh, gershayim and the ASCII quotes), 0 otherwise; built once per process from the
    regexes themselves (1.1 MB)."""
    every = "".join(map(chr, itertools.chain(range(0xD800), range(0xE000, 0x110000))))
    table = np.zeros(0x110000, dtype=np.uint8)
    table[[ord(c) for c in _WORD_CHAR.findall(every)]] = 1
    table[[ord(c) for c in _JOINERS]] = 2
    return table


@functools.cache
def _word_map() -> np.ndarray:
    """Code point -> itself for a word character, a space for anything else (4.4 MB)."""
    return np.where(_word_table() == 1, np.arange(0x110000, dtype=np.uint32), _SPACE)


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def _split_words(cps: np.ndarray, joiners: bool) -> list[str]:
    """``_WORD_RE.findall`` of the text whose code points are ``cps``, by table lookups: every
    character that is neither a word character nor a joiner with word characters on both sides
    becomes a space, and ``str.split`` cuts there (a run of word characters joined by single
    joiners is exactly what the regex matches). ``joiners``: whether the text holds any of
    :data:`_JOINERS`; without, one lookup does it (2x faster than the regex on 1 kB of Arabic)."""
    if not joiners:
        return _word_map()[cps].tobytes().decode("utf-32-le", "surrogatepass").split()
    cls = _word_table()[cps]
    keep = cls == 1
    if len(cps) > 2:
        keep[1:-1] |= (cls[1:-1] == 2) & keep[:-2] & keep[2:]
    return np.where(keep, cps, _SPACE).tobytes().decode("utf-32-le", "surrogatepass").split()


class FastWordTokenizer(WordTokenizer):
    """A regex word tokenizer for datatrove steps: no spaCy, no sentence splitting, any script.

    ``word_tokenize`` drops the Arabic tatweel and returns runs of letters/marks/digits (see
    ``_WORD_RE``); with ``strip_marks`` it first decomposes the text (NFD) and drops non-spacing
    marks (Arabic harakat, Hebrew niqqud, Latin accents), exactly as datatrove's
    ``TextNormConfig.norm_unicode_diacritics`` does but by one table lookup over the code points
    (:func:`_strip_marks`). ASCII text skips both passes (nothing in it would change). Sentences
    (only needed by datatrove steps other than MinHash) end at ``. ! ? ؟ ۔`` or a newline.
    """

    def __init__(self, strip_marks: bool = False) -> None:
        super().__init__(language=None)
        self.strip_marks = strip_marks

    def word_tokenize(self, text: str) -> list[str]:
        """Return the words of ``text`` in order."""
        joiners = any(j in text for j in _JOINERS)
        if text.isascii():  # no marks, no tatweel, NFD changes nothing: skip both passes
            return _split_words(_code_points(text), joiners)
        if self.strip_marks:
            cps = _code_points(unicodedata.normalize("NFD", text))
            return _split_words(cps[~_marks_table()[cps]], joiners)
        cps = _code_points(text)
        return _split_words(cps[cps != ord(_TATWEEL)], joiners)

    def sent_tokenize(self, text: str) -> list[str]:
        """Return the non-empty sentences of ``text`` (stripped)."""
        return [s.strip() for s in _SENT_RE.findall(text) if s.strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        """Return ``(start, end)`` character spans of the sentences of ``text``."""
        return [m.span() for m in _SENT_RE.finditer(text) if m.group().strip()]

    def __repr__(self) -> str:
        return f"FastWordTokenizer(strip_marks={self.strip_marks})"


_SHIFT_61 = np.uint64(61)
_PLUS_1, _MINUS_1 = (1).__add__, (-1).__add__
_PUNCTUATION_IN_WORDS = tuple(
    c
    for c in PUNCTUATION
    if c in "'\"\u05f3\u05f4" or _WORD_RE.search(c) or _WORD_RE.search(unicodedata.normalize("NFD", c))
)
"""The punctuation characters (datatrove's, which ``simplify_text`` turns into spaces) that
:class:`FastWordTokenizer` would not already treat as word separators: the quotes its words may
contain, and those that are (or decompose into) word characters: today ``'``, ``"`` and the
fullwidth digit one."""
_SIGNATURE_CHUNK = 1024
"""Shingles permuted at once by :meth:`FastMinhashSignature.signatures` (``1024 x permutations``
uint64: 0.9 MiB at the default 112 permutations; larger chunks run slower, out of cache)."""


class FastMinhashSignature(MinhashDedupSignature):
    """datatrove's ``MinhashDedupSignature`` with the same shingles and signatures, computed faster.

    ``get_shingles``: datatrove joins each n-gram tuple (``" ".join``) and calls its hash through a
    wrapper; here the words are joined once and each n-gram is a slice of that string (the slice
    from word i's start to word i+n-1's end *is* ``" ".join(words[i:i+n])``), hashed by the bare
    xxhash function (slices and calls iterated by ``map``, no Python frame per n-gram).
    ``get_signature``: the modulo by the Mersenne prime 2**61-1 as shifts, masks and one
    ``np.minimum`` (no 64-bit division, no boolean indexing), and one reshape instead of ``np.split``
    into per-bucket arrays; :meth:`signatures` does many documents per numpy call. All return
    exactly what datatrove's do (``tests/data/test_fast_paths.py`` compares them).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        hc = self.config.hash_config
        if hc.hash_fc == "xxhash":
            import xxhash

            self._raw_hash = xxhash.xxh32_intdigest if hc.precision == 32 else xxhash.xxh64_intdigest
        else:
            self._raw_hash = self._hash_func

    def simplify(self, text: str) -> str:
        """datatrove's ``simplify_text`` as far as the words of :class:`FastWordTokenizer` can tell.

        Whitespace runs are not collapsed and the ends not stripped, since that tokenizer's words
        never contain or touch whitespace. Of the punctuation, which datatrove turns into spaces,
        only the characters the tokenizer could take into a word are replaced (``'``, ``"`` and
        the fullwidth digit one, by ``str.replace``); every other one already separates words, as a
        space would (checked when the module loads, and against ``simplify_text`` by the tests).
        Any other tokenizer, or diacritic removal switched on, gets datatrove's ``simplify_text``.
        """
        cfg = self.config.norm_config
        if not isinstance(self.word_tokenizer, FastWordTokenizer) or cfg.norm_unicode_diacritics:
            return simplify_text(text, cfg)
        if cfg.lowercase:
            text = text.lower()
        if cfg.norm_numbers:
            text = NUMBERS_PATTERN.sub("0", text)
        if cfg.norm_weekdays:
            text = WEEKDAYS_PATTERN.sub("WEEKDAY", text)
        if cfg.norm_monthnames:
            text = MONTHS_PATTERN.sub("MONTH", text)
        if cfg.remove_punctuation:
            for c in _PUNCTUATION_IN_WORDS:
                text = text.replace(c, " ")
        return text

    def get_shingles(self, text: str) -> np.ndarray:
        """Hashes of the word n-grams of ``text``'s simplified words, shape ``(n_grams, 1)``, uint64."""
        words = self.word_tokenizer.word_tokenize(self.simplify(text))
        n, count = self.config.n_grams, len(words) - self.config.n_grams + 1
        if count <= 0:
            return np.empty((0, 1), dtype=np.uint64)
        joined = " ".join(words)
        # just past each word's following space; n-gram i is joined[start of word i : end of word i+n-1]
        ends = list(itertools.accumulate(map(_PLUS_1, map(len, words))))
        starts, stops = [0, *ends[: count - 1]], map(_MINUS_1, ends[n - 1 :])
        # slice -> substring -> hash, all iterated in C (no Python frame per n-gram)
        grams = map(joined.__getitem__, map(slice, starts, stops))
        return np.fromiter(map(self._raw_hash, grams), dtype=np.uint64, count=count).reshape((-1, 1))

    def _permuted(self, shingles: np.ndarray) -> np.ndarray:
        """``(a * shingle + b) % (2**61 - 1)`` for every shingle (rows) and permutation (columns),
        masked to 32 bits at that precision: datatrove's permuted hashes, without a division."""
        a, b = self.parameters
        phv = shingles * a  # wraps mod 2**64, as in datatrove
        phv += b
        # fold the top 3 bits (2**61 = 1 mod p), then subtract p where the sum reached it: in
        # uint64, phv - p wraps to a huge value exactly where phv < p, so the minimum picks.
        high = phv >> _SHIFT_61
        phv &= _MERSENNE_PRIME
        phv += high
        np.minimum(phv, phv - _MERSENNE_PRIME, out=phv)
        if self.config.hash_config.precision == 32:
            phv &= np.uint64(self.config.hash_config.max)
        return phv

    def get_signature(self, shingles: np.ndarray) -> list[list[int]]:
        """Per bucket, the minimum of each permuted hash over the shingles (as datatrove's)."""
        mins = np.min(self._permuted(shingles), axis=0).astype(self.config.hash_config.np_dtype)
        return mins.reshape(self.config.num_buckets, -1).tolist()

    def signatures(self, shingles: list[np.ndarray]) -> np.ndarray:
        """:meth:`get_signature` of many documents at once: row ``i`` holds document ``i``'s
        minimum of each permuted hash (``num_buckets * hashes_per_bucket`` columns, bucket-major).

        The documents' shingles are stacked and permuted in chunks of about
        :data:`_SIGNATURE_CHUNK` rows, and each document's rows reduced by ``np.minimum.reduceat``:
        a few numpy calls per chunk rather than per document. Every array must be non-empty.
        """
        k = self.config.num_buckets * self.config.hashes_per_bucket
        out = np.empty((len(shingles), k), dtype=self.config.hash_config.np_dtype)
        i = 0
        while i < len(shingles):
            j, rows = i, 0
            while j < len(shingles) and (j == i or rows + len(shingles[j]) <= _SIGNATURE_CHUNK):
                rows += len(shingles[j])
                j += 1
            sizes = np.fromiter(map(len, shingles[i:j]), dtype=np.int64, count=j - i)
            offsets = np.concatenate(([0], np.cumsum(sizes[:-1])))
            phv = self._permuted(np.concatenate(shingles[i:j]))
            out[i:j] = np.minimum.reduceat(phv, offsets, axis=0)
            i = j
        return out
