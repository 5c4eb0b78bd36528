"""Per-language heuristic quality filters (Gopher-style rules with language-aware thresholds).

The stock Gopher rules (and datatrove's implementation of them) are tuned on English: they require
English stop words and English word lengths, so they drop essentially all Arabic. Here each rule
reads its threshold from a :class:`QualityThresholds` chosen by the document's declared language,
with defaults for ``ar``, ``he`` and ``en`` (:data:`DEFAULT_THRESHOLDS`). Word lengths count
letters only (Arabic harakat and Hebrew niqqud are combining marks and do not count), stop words are
matched after Arabic/Hebrew orthographic folding, and a script-share rule checks that the text is
written in the script of its declared language.

:func:`check_quality` returns a :class:`QualityResult` with ``keep`` and the first failing rule as
``reason``; :func:`filter_documents` applies it to a stream and counts keep/drop reasons per language.
"""

from __future__ import annotations

import functools
import itertools
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from moe_adapt.data.clean import fold_marks, normalize_arabic, strip_hebrew_marks
from moe_adapt.data.langid import (
    LANGUAGE_SCRIPT,
    SCRIPTS,
    all_code_points,
    code_points,
    letter_table,
    shares_from_counts,
)
from moe_adapt.errors import MoEAdaptConfigError


@dataclass(frozen=True)
class QualityThresholds:
    """Thresholds of the quality rules for one language. A document failing any rule is dropped."""

    min_words: int = 20
    """Fewest whitespace-separated words."""
    max_words: int = 100_000
    """Most whitespace-separated words."""
    min_mean_word_len: float = 3.0
    """Smallest mean word length, in letters (marks and punctuation do not count)."""
    max_mean_word_len: float = 10.0
    """Largest mean word length, in letters."""
    max_symbol_ratio: float = 0.1
    """Largest share of non-space characters that are symbols (Unicode S*, '#') or ellipses."""
    min_alpha_word_ratio: float = 0.8
    """Smallest share of words that contain at least one letter."""
    max_dup_line_ratio: float = 0.3
    """Largest share of non-empty lines that repeat an earlier line."""
    max_top_bigram_ratio: float = 0.2
    """Largest share of word characters covered by the single most frequent word bigram."""
    max_dup_5gram_ratio: float = 0.15
    """Largest share of word characters inside word 5-grams that occur more than once."""
    min_script_share: float = 0.7
    """Smallest share of letters written in the script of the declared language."""
    min_stop_words: int = 2
    """Fewest occurrences of the language's stop words (0 disables the rule)."""
    stop_words: frozenset[str] = field(default_factory=frozenset)
    """Stop words of the language, folded as :func:`fold_text` does."""

    def __post_init__(self) -> None:
        checks = {
            "min_words": self.min_words >= 0,
            "max_words": self.max_words >= self.min_words,
            "max_mean_word_len": self.max_mean_word_len >= self.min_mean_word_len >= 0,
            "max_symbol_ratio": 0.0 <= self.max_symbol_ratio <= 1.0,
            "min_alpha_word_ratio": 0.0 <= self.min_alpha_word_ratio <= 1.0,
            "max_dup_line_ratio": 0.0 <= self.max_dup_line_ratio <= 1.0,
            "max_top_bigram_ratio": 0.0 <= self.max_top_bigram_ratio <= 1.0,
            "max_dup_5gram_ratio": 0.0 <= self.max_dup_5gram_ratio <= 1.0,
            "min_script_share": 0.0 <= self.min_script_share <= 1.0,
            "min_stop_words": self.min_stop_words >= 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise MoEAdaptConfigError(
                f"quality thresholds invalid: {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)} "
                "(ratios must lie in [0, 1], counts >= 0, max >= min)"
            )


_AR_STOP = "في من على الى عن ان ما لا هذا ذلك التي الذي قال كان ثم او اذا هو هي قد كل لم بن مع و"
_HE_STOP = "של את על לא הוא היא כי אם גם זה זו או אין אבל כל מה עד אומר אלא בין הם לו"
_EN_STOP = "the be to of and that have with is was a in it for not he his said"

DEFAULT_THRESHOLDS: dict[str, QualityThresholds] = {
    # Arabic words are short once harakat are ignored (clitics attach: و، ب، ال), and religious and
    # classical text repeats formulae ("صلى الله عليه وسلم"), so the repetition limits are looser.
    "ar": QualityThresholds(
        min_words=10,
        min_mean_word_len=2.5,
        max_mean_word_len=9.0,
        max_top_bigram_ratio=0.25,
        max_dup_5gram_ratio=0.3,
        stop_words=frozenset(_AR_STOP.split()),
    ),
    # Unpointed Hebrew: prefixes (ו, ב, ה, ל, מ, ש) attach to words; Mishnah passages are short.
    "he": QualityThresholds(
        min_words=8,
        min_mean_word_len=2.5,
        max_mean_word_len=8.0,
        max_dup_5gram_ratio=0.3,
        min_stop_words=1,
        stop_words=frozenset(_HE_STOP.split()),
    ),
    "en": QualityThresholds(min_words=15, max_dup_5gram_ratio=0.25, stop_words=frozenset(_EN_STOP.split())),
}
"""Default thresholds for Arabic, Hebrew and English (tuned on the demo corpus, see the tests)."""


@dataclass
class QualityResult:
    """The verdict of :func:`check_quality`: ``keep``, the first failing rule and the measured stats."""

    keep: bool
    reason: str | None
    stats: dict[str, float]


def _ngram_stats(words: list[str]) -> tuple[float, float]:
    """Return (top bigram char share, duplicated 5-gram char share) of a word list.

    The 5-grams are counted as tuples built by ``zip`` (no per-gram slicing); the character
    coverage of repeated 5-grams is only walked when some 5-gram repeats.
    """
    total = sum(map(len, words)) or 1
    top_bigram = 0.0
    if len(words) >= 2:
        bigrams = Counter(itertools.pairwise(words))
        (gram, count) = bigrams.most_common(1)[0]
        if count > 1:
            top_bigram = count * (len(gram[0]) + len(gram[1])) / total
    dup5 = 0.0
    if len(words) >= 5:
        grams = list(zip(words, words[1:], words[2:], words[3:], words[4:], strict=False))
        counts = Counter(grams)
        if len(counts) < len(grams):
            covered = bytearray(len(words))
            for i, g in enumerate(grams):
                if counts[g] > 1:
                    covered[i : i + 5] = b"\x01\x01\x01\x01\x01"
            dup5 = sum(len(w) for w, c in zip(words, covered, strict=True) if c) / total
    return top_bigram, dup5


def _ngram_stats_reference(words: list[str]) -> tuple[float, float]:
    """:func:`_ngram_stats` as first written (slices, a full coverage walk): the tests' reference."""
    total = sum(len(w) for w in words) or 1
    top_bigram = 0.0
    if len(words) >= 2:
        bigrams = Counter(itertools.pairwise(words))
        (gram, count) = bigrams.most_common(1)[0]
        if count > 1:
            top_bigram = count * (len(gram[0]) + len(gram[1])) / total
    dup5 = 0.0
    if len(words) >= 5:
        grams = [tuple(words[i : i + 5]) for i in range(len(words) - 4)]
        counts = Counter(grams)
        covered = [False] * len(words)
        for i, g in enumerate(grams):
            if counts[g] > 1:
                for j in range(i, i + 5):
                    covered[j] = True
        dup5 = sum(len(w) for w, c in zip(words, covered, strict=True) if c) / total
    return top_bigram, dup5


def _symbol_class() -> str:
    """A regex class of all symbol characters (Unicode S*) of the BMP and emoji planes, plus '#'."""
    cps = [c for c in [*range(0x10000), *range(0x1F000, 0x1FB00)] if unicodedata.category(chr(c))[0] == "S"]
    parts, start, prev = ["#"], cps[0], cps[0]
    for c in [*cps[1:], -1]:
        if c != prev + 1:
            parts.append(f"\\U{start:08x}-\\U{prev:08x}" if prev > start else f"\\U{start:08x}")
            start = c
        prev = c
    return "[" + "".join(parts) + "]+"


_SYMBOL_RE = re.compile(_symbol_class())
_LETTERS_RE = re.compile(r"[\W\d_]+")
_ALPHA_WORD_RE = re.compile(r"(?:^|\s)\S*?[^\W\d_]")
_WORD_RE = re.compile(r"\w+")


def fold_text(text: str) -> str:
    """Lowercase ``text`` and fold Arabic diacritics/tatweel/alef variants and Hebrew marks (for matching)."""
    return fold_marks(text.lower(), ta_marbuta=False, alef_maqsura=False)


def fold_text_reference(text: str) -> str:
    """:func:`fold_text` by the regex passes of ``normalize_arabic`` and ``strip_hebrew_marks``."""
    return strip_hebrew_marks(normalize_arabic(text.lower(), ta_marbuta=False, alef_maqsura=False))


@functools.cache
def _char_table() -> np.ndarray:
    """:func:`~moe_adapt.data.langid.letter_table` with symbols (what ``_SYMBOL_RE`` matches) as
    class ``_SYMBOL``: one lookup per character gives letters per script and symbols."""
    table = letter_table().copy()
    symbols = np.zeros(0x110000, dtype=bool)
    for m in _SYMBOL_RE.finditer(all_code_points()):
        symbols[m.start() : m.end()] = True
    if table[symbols].any():
        raise AssertionError("a symbol character is also a letter")  # cannot happen: S* vs \\w
    table[symbols] = _SYMBOL
    table.setflags(write=False)
    return table


_SYMBOL = 1 + len(SCRIPTS)
"""Class of symbol characters in :func:`_char_table` (after non-letter 0 and the letter classes)."""


def _class_counts(text: str) -> list[int]:
    """Characters of ``text`` per :func:`_char_table` class (non-letter, letters per script, symbols)."""
    return np.bincount(_char_table()[code_points(text)], minlength=_SYMBOL + 1).tolist()


def quality_stats(text: str, stop_words: frozenset[str] = frozenset()) -> dict[str, float]:
    """Measure what the quality rules look at (word count, lengths, ratios, script shares)."""
    n_words = len(text.split())
    folded = fold_text(text)
    n_letters = sum(_class_counts(folded)[1:_SYMBOL])
    n_alpha_words = len(_ALPHA_WORD_RE.findall(folded))
    non_space = len(text) - sum(text.count(c) for c in " \n\t\r")
    counts = _class_counts(text)
    symbols = counts[_SYMBOL] + text.count("\u2026") + text.count("...")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    dup_lines = len(lines) - len(set(lines))
    tokens = _WORD_RE.findall(folded)
    top_bigram, dup5 = _ngram_stats(tokens)
    stats: dict[str, float] = {
        "words": float(n_words),
        "mean_word_len": n_letters / n_alpha_words if n_alpha_words else 0.0,
        "symbol_ratio": symbols / non_space if non_space else 0.0,
        "alpha_word_ratio": n_alpha_words / n_words if n_words else 0.0,
        "dup_line_ratio": dup_lines / len(lines) if lines else 0.0,
        "top_bigram_ratio": top_bigram,
        "dup_5gram_ratio": dup5,
        "stop_words": float(sum(1 for w in tokens if w in stop_words)) if stop_words else 0.0,
    }
    stats.update({f"script_{k}": v for k, v in shares_from_counts(counts[:_SYMBOL]).items()})
    return stats


def thresholds_for(lang: str, overrides: Mapping[str, QualityThresholds] | None = None) -> QualityThresholds:
    """Return the thresholds for ``lang`` from ``overrides`` or :data:`DEFAULT_THRESHOLDS`.

    Raises :class:`MoEAdaptConfigError` for a language with no thresholds and no known script.
    """
    table = {**DEFAULT_THRESHOLDS, **(overrides or {})}
    if lang in table:
        return table[lang]
    if lang in LANGUAGE_SCRIPT:  # a known script: generic thresholds, no stop-word rule
        return replace(QualityThresholds(), min_stop_words=0)
    raise MoEAdaptConfigError(
        f"no quality thresholds for language {lang!r}; defined: {', '.join(sorted(table))} "
        f"(add quality.thresholds.{lang}, or use a language with a known script: "
        f"{', '.join(sorted(LANGUAGE_SCRIPT))})"
    )


def check_quality(text: str, lang: str, thresholds: QualityThresholds | None = None) -> QualityResult:
    """Apply the quality rules for language ``lang`` to ``text``; return keep/reason/stats."""
    th = thresholds or thresholds_for(lang)
    s = quality_stats(text, th.stop_words)
    script = LANGUAGE_SCRIPT.get(lang)
    rules: list[tuple[str, bool]] = [
        ("too_few_words", s["words"] < th.min_words),
        ("too_many_words", s["words"] > th.max_words),
        ("mean_word_len_low", s["mean_word_len"] < th.min_mean_word_len),
        ("mean_word_len_high", s["mean_word_len"] > th.max_mean_word_len),
        ("symbol_ratio", s["symbol_ratio"] > th.max_symbol_ratio),
        ("alpha_word_ratio", s["alpha_word_ratio"] < th.min_alpha_word_ratio),
        ("wrong_script", script is not None and s[f"script_{script}"] < th.min_script_share),
        ("dup_lines", s["dup_line_ratio"] > th.max_dup_line_ratio),
        ("top_bigram", s["top_bigram_ratio"] > th.max_top_bigram_ratio),
        ("dup_5grams", s["dup_5gram_ratio"] > th.max_dup_5gram_ratio),
        ("stop_words", th.min_stop_words > 0 and s["stop_words"] < th.min_stop_words),
    ]
    for reason, failed in rules:
        if failed:
            return QualityResult(False, reason, s)
    return QualityResult(True, None, s)


@dataclass
class FilterReport:
    """Keep/drop counts of :func:`filter_documents`, per language and per drop reason."""

    seen: Counter[str] = field(default_factory=Counter)
    kept: Counter[str] = field(default_factory=Counter)
    reasons: dict[str, Counter[str]] = field(default_factory=dict)

    def keep_rate(self, lang: str) -> float:
        """Share of ``lang`` documents kept (0.0 when none were seen)."""
        return self.kept[lang] / self.seen[lang] if self.seen[lang] else 0.0

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready summary per language."""
        return {
            lang: {
                "seen": self.seen[lang],
                "kept": self.kept[lang],
                "keep_rate": round(self.keep_rate(lang), 4),
                "dropped": dict(self.reasons.get(lang, Counter()).most_common()),
            }
            for lang in sorted(self.seen)
        }


def filter_documents(
    docs: Iterable[dict[str, Any]],
    *,
    thresholds: Mapping[str, QualityThresholds] | None = None,
    report: FilterReport | None = None,
    default_lang: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield the documents of ``docs`` that pass :func:`check_quality` for their ``lang``.

    A document without ``lang`` uses ``default_lang``; with neither it is dropped as ``no_lang``.
    Counts go to ``report`` (pass a :class:`FilterReport` to read them).
    """
    report = report if report is not None else FilterReport()
    cache: dict[str, QualityThresholds] = {}
    for doc in docs:
        lang = doc.get("lang") or default_lang or ""
        report.seen[lang] += 1
        if not lang:
            report.reasons.setdefault(lang, Counter())["no_lang"] += 1
            continue
        if lang not in cache:
            cache[lang] = thresholds_for(lang, thresholds)
        result = check_quality(str(doc.get("text", "")), lang, cache[lang])
        if result.keep:
            report.kept[lang] += 1
            yield doc
        else:
            report.reasons.setdefault(lang, Counter())[result.reason or "unknown"] += 1
