"""The fast implementations of the word-level steps equal their reference definitions on random texts.

Each fast path (code-point table lookups, zip-built n-grams, sliced n-gram strings, the MinHash
signature without ``str.translate``/division/``np.split``) must give exactly what the slower
definition gives, so that the data stage's output bytes do not change.
"""

from __future__ import annotations

import random
import re
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from datatrove.pipeline.dedup.minhash import MinhashDedupSignature
from datatrove.utils.text import PUNCTUATION

from moe_adapt.data import quality
from moe_adapt.data.decontam import (
    BenchmarkItem,
    _build_index,
    match_words,
    match_words_reference,
    ngram_hashes,
    ngram_hashes_reference,
)
from moe_adapt.data.dedup import DedupConfig
from moe_adapt.data.langid import script_shares, script_shares_regex
from moe_adapt.data.minhash import (
    _MARKS_AND_TATWEEL,
    _WORD_RE,
    FastMinhashSignature,
    FastWordTokenizer,
    _strip_marks,
)

# Pieces the random texts are drawn from: words of each script (with harakat, niqqud, tatweel,
# geresh), digits with separators, datatrove's punctuation, symbols, odd whitespace, astral chars.
_PIECES = [
    "the",
    "The",
    "of",
    "Hadith",
    "narrated",
    "café",
    "naïve",
    "ÉCOLE",
    "İstanbul",
    "straße",
    "قال",
    "رَسُولُ",
    "اللَّهِ",
    "صلى",
    "الله",
    "عليه",
    "وسلم",
    "ـــالله",
    "إِنَّمَا",
    "أبو",
    "مُصْطَفَى",
    "שָׁלוֹם",
    "רמב״ם",
    "צ'יפס",
    "משנה",
    "אומר",
    "中文",
    "한국어",
    "12",
    "3.14",
    "١٢٣",
    "٤٫٥",
    "2,5",
    "x1",
    "_",
    "#",
    "$",
    "€",
    "©",
    "😀",
    "…",
    "...",
    "\U0001d400",
    "\u0301",
    "\u200f",
    "\u00a0",
    "\u2003",
    "\t",
    "\n",
    "\r\n",
    "  ",
    "'",
    '"',
    "\uff11",
    "\u0653",
    "\ufe70",
    "\ufb50",
    "\u0622",
    "\u0649",
    "\u0629",
    "\u05b0",
    "\u05f3",
    "\u200e",
    *PUNCTUATION[::7],
]


def _texts(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        k = rng.randrange(0, 80)
        # repeat runs now and then, so that duplicated n-grams and bigrams occur
        words = [rng.choice(_PIECES) for _ in range(k)]
        if words and rng.random() < 0.5:
            words = words + words[: rng.randrange(len(words) + 1)]
        out.append("".join(w + rng.choice([" ", " ", "", "\n", ", "]) for w in words))
    return out


def test_script_shares_equal_the_regex_definition() -> None:
    rng = random.Random(7)
    texts = _texts(1, 300) + [
        "".join(chr(rng.randrange(0x110000)) for _ in range(rng.randrange(60))) for _ in range(300)
    ]
    for text in texts:
        assert script_shares(text) == script_shares_regex(text), repr(text)


def test_character_classes_equal_the_regexes() -> None:
    """Letters (``[^\\W\\d_]``) and symbols (``_SYMBOL_RE``) by table lookup, over every code point."""
    everything = "".join(map(chr, range(0x110000)))
    counts = quality._class_counts(everything)
    letters = len(re.sub(r"[\W\d_]+", "", everything))
    symbols = len(everything) - len(quality._SYMBOL_RE.sub("", everything))
    assert sum(counts[1 : quality._SYMBOL]) == letters
    assert counts[quality._SYMBOL] == symbols > 1000


def test_ngram_stats_equal_the_reference() -> None:
    rng = random.Random(3)
    vocab = ["a", "bb", "ccc", "قال", "الله", "של", "x"]
    for _ in range(2000):
        words = [rng.choice(vocab[: rng.randrange(1, len(vocab) + 1)]) for _ in range(rng.randrange(30))]
        assert quality._ngram_stats(words) == quality._ngram_stats_reference(words), words


def test_quality_verdicts_unchanged_on_random_texts() -> None:
    """check_quality's stats are those of the regex definitions (script shares, letters, symbols)."""
    for text in _texts(5, 400):
        folded = quality.fold_text(text)
        tokens = quality._WORD_RE.findall(folded)
        for lang in ("ar", "he", "en"):
            stats = quality.check_quality(text, lang).stats
            n_alpha = len(quality._ALPHA_WORD_RE.findall(folded))
            n_letters = len(re.sub(r"[\W\d_]+", "", folded))
            non_space = len(text) - sum(text.count(c) for c in " \n\t\r")
            symbols = (
                len(text) - len(quality._SYMBOL_RE.sub("", text)) + text.count("\u2026") + text.count("...")
            )
            assert stats["mean_word_len"] == (n_letters / n_alpha if n_alpha else 0.0)
            assert stats["symbol_ratio"] == (symbols / non_space if non_space else 0.0)
            assert (stats["top_bigram_ratio"], stats["dup_5gram_ratio"]) == quality._ngram_stats_reference(
                tokens
            )
            shares = script_shares_regex(text)
            assert {k: stats[f"script_{k}"] for k in shares} == shares


def test_ngram_hashes_equal_the_reference() -> None:
    for text in _texts(11, 300):
        words = match_words(text)
        for n in (1, 2, 5, 8):
            assert ngram_hashes(words, n) == ngram_hashes_reference(words, n)


def test_index_hits_equal_hash_intersection() -> None:
    texts = _texts(13, 200)
    items = [BenchmarkItem(str(i), t) for i, t in enumerate(texts[:40])]
    index = _build_index({"bench": items}, 3)
    assert index.postings
    for text in texts:
        words = match_words(text)
        assert index.hits(words) == ngram_hashes_reference(words, 3) & index.postings.keys()


@pytest.mark.parametrize("strip_marks", [True, False])
def test_word_tokenizer_equals_its_regex(strip_marks: bool) -> None:
    """The table-lookup word splitter returns exactly ``_WORD_RE.findall`` of the normalised text,
    joiners (geresh, gershayim, quotes) between, beside and around words included."""
    tok = FastWordTokenizer(strip_marks=strip_marks)
    edges = [
        "a'b",
        "a''b",
        "'a'",
        "a'",
        "'",
        "''",
        "a'b'c",
        "a' 'b",
        'ab"cd"',
        "רמב״ם״",
        "׳א׳ב׳",
        "a\u05f3",
        "",
    ]
    rng = random.Random(11)
    glued = [
        "".join(rng.choice([*_PIECES[:40], "'", '"', "\u05f3", "\u05f4"]) for _ in range(30))
        for _ in range(200)
    ]
    for text in _texts(5, 300) + edges + glued:
        if strip_marks:
            norm = _MARKS_AND_TATWEEL.sub("", unicodedata.normalize("NFD", text))
        else:
            norm = text.replace("\u0640", "")
        assert tok.word_tokenize(text) == _WORD_RE.findall(norm), text


@pytest.mark.parametrize("fast_config", [True, False])
def test_fast_minhash_signature_equals_datatrove(tmp_path: Path, fast_config: bool) -> None:
    """Shingles and signatures equal datatrove's, with our tokenizer's config and datatrove's default."""
    cfg = DedupConfig()
    mh = cfg.fast_minhash_config() if fast_config else cfg.minhash_config()
    tok = FastWordTokenizer(strip_marks=fast_config)
    ours = FastMinhashSignature(str(tmp_path / "a"), config=mh, language=tok)
    theirs = MinhashDedupSignature(str(tmp_path / "b"), config=mh, language=tok)
    nonempty = 0
    for text in _texts(17, 300):
        a, b = ours.get_shingles(text), theirs.get_shingles(text)
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
        if b.size:
            nonempty += 1
            assert ours.get_signature(a) == theirs.get_signature(b)
    assert nonempty > 100


def test_mersenne_fold_equals_modulo_at_the_edges(tmp_path: Path) -> None:
    """The signature's division-free ``% (2**61 - 1)`` on extreme shingle values."""
    mh = DedupConfig().fast_minhash_config()
    ours = FastMinhashSignature(str(tmp_path / "a"), config=mh, language=FastWordTokenizer(True))
    theirs = MinhashDedupSignature(str(tmp_path / "b"), config=mh, language=FastWordTokenizer(True))
    p = (1 << 61) - 1
    edge = [0, 1, 2, p - 1, p, p + 1, 2 * p, 2**63, 2**64 - 1, 2**64 - 2, 7 * p]
    rng = np.random.default_rng(0)
    for values in [
        edge,
        *(rng.integers(0, 2**64 - 1, 50, dtype=np.uint64, endpoint=True) for _ in range(20)),
    ]:
        shingles = np.array(values, dtype=np.uint64).reshape((-1, 1))
        assert ours.get_signature(shingles) == theirs.get_signature(shingles)


def test_match_words_equal_the_reference() -> None:
    """The ASCII shortcut and the one-table folding give the words of the regex passes."""
    texts = [*_texts(19, 400), "", "ascii only, Mixed Case", "\ud800 lone surrogate \u0640\u064e"]
    for text in texts:
        assert match_words(text) == match_words_reference(text), text


def test_strip_marks_equals_the_regex() -> None:
    import unicodedata

    every = "".join(chr(c) for c in range(0x250, 0x3000)) + "\U0001d167\U000e0100\ud800"
    for text in [every, *_texts(23, 200)]:
        nfd = unicodedata.normalize("NFD", text)
        assert _strip_marks(nfd) == _MARKS_AND_TATWEEL.sub("", nfd)


def test_signatures_of_many_documents_equal_one_by_one(tmp_path: Path) -> None:
    """:meth:`FastMinhashSignature.signatures` (stacked, chunked, ``reduceat``) row by row."""
    from moe_adapt.data import minhash

    mh = DedupConfig().fast_minhash_config()
    sig = FastMinhashSignature(str(tmp_path / "a"), config=mh, language=FastWordTokenizer(True))
    shingles = [s for s in (sig.get_shingles(t) for t in _texts(29, 300)) if s.size]
    shingles.append(np.arange(3000, dtype=np.uint64).reshape((-1, 1)) * np.uint64(2**52 + 7))  # > a chunk
    expected = np.array([np.concatenate(sig.get_signature(s)) for s in shingles], dtype=np.uint64)
    assert np.array_equal(sig.signatures(shingles), expected)
    old = minhash._SIGNATURE_CHUNK
    try:
        minhash._SIGNATURE_CHUNK = 7  # every document its own chunk, and many chunks
        assert np.array_equal(sig.signatures(shingles), expected)
    finally:
        minhash._SIGNATURE_CHUNK = old


@pytest.mark.parametrize(("maqsura", "marbuta"), [(True, True), (False, False), (True, False)])
def test_fold_marks_equals_the_regex_passes(maqsura: bool, marbuta: bool) -> None:
    from moe_adapt.data.clean import fold_marks, normalize_arabic, strip_hebrew_marks

    every = "".join(chr(c) for c in range(0x250, 0x3000)) + "\U0001d167\ud800"
    for text in [every, *_texts(31, 300)]:
        expected = strip_hebrew_marks(normalize_arabic(text, alef_maqsura=maqsura, ta_marbuta=marbuta))
        assert fold_marks(text, alef_maqsura=maqsura, ta_marbuta=marbuta) == expected
    for text in _texts(37, 100):
        assert quality.fold_text(text) == quality.fold_text_reference(text)
