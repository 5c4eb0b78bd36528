"""Text parsing shared by the checks: a response split once, and text folded for matching.

:func:`parse_response` splits a response into reasoning and answer (a :class:`ParsedResponse`);
:func:`fold_text` and :func:`word_regex` let checks match words whatever their diacritics, digits or
case; :func:`letter_script` names the script of a letter for the script checks.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache, cached_property

from moe_adapt.data.clean import normalize_arabic, strip_hebrew_marks
from moe_adapt.distill.format import ResponseFormat, normalize_digits


@dataclass(frozen=True)
class ParsedResponse:
    """A response split once for all checks."""

    reasoning: str | None
    """The reasoning, None when the response does not split."""

    answer: str | None
    """The final answer, None when the response does not split."""

    body: str
    """Reasoning and answer (or the whole response without its delimiters): what text checks read."""

    @cached_property
    def folded(self) -> str:
        """``body`` folded for word matching (see :func:`fold_text`), computed once."""
        return fold_text(self.body)

    def segments(self) -> list[tuple[str, str]]:
        """``(part name, text)`` pairs: reasoning and answer, or the whole response when it does not split."""
        if self.reasoning is None or self.answer is None:
            return [("response", self.body)]
        return [("reasoning", self.reasoning), ("answer", self.answer)]


def parse_response(response: str, fmt: ResponseFormat) -> ParsedResponse:
    """Split ``response`` with ``fmt``; when it does not split, ``body`` is it without delimiters."""
    parts = fmt.split(response)
    if parts is None:
        body = response.replace(fmt.think_open, " ").replace(fmt.think_close, " ").strip()
        return ParsedResponse(None, None, body)
    reasoning, answer = parts
    return ParsedResponse(reasoning, answer, f"{reasoning}\n\n{answer}")


def fold_text(text: str) -> str:
    """Text folded for matching: NFKC, Arabic normalisation, no niqqud, Western digits, case-folded."""
    text = unicodedata.normalize("NFKC", text)
    text = strip_hebrew_marks(normalize_arabic(text))
    return normalize_digits(text).casefold()


def normalize_exact(text: str) -> str:
    """Folded text with punctuation and symbols replaced by spaces and whitespace collapsed."""
    chars = (" " if unicodedata.category(ch)[0] in "PS" else ch for ch in fold_text(text))
    return " ".join("".join(chars).split())


def word_regex(phrases: Iterable[str]) -> re.Pattern[str] | None:
    """A regex matching any of ``phrases`` (folded) as whole words in folded text; None for no phrases."""
    folded = {" ".join(fold_text(p).split()) for p in phrases}
    alternatives = [
        r"\s+".join(map(re.escape, p.split())) for p in sorted(folded, key=len, reverse=True) if p
    ]
    if not alternatives:
        return None
    return re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)")


_SCRIPT_WORDS = {
    "ARABIC": "arabic",
    "HEBREW": "hebrew",
    "LATIN": "latin",
    "MODIFIER": "latin",
    "SUPERSCRIPT": "latin",
    "SUBSCRIPT": "latin",
    "GREEK": "greek",
    "COPTIC": "greek",
    "CYRILLIC": "cyrillic",
    "CJK": "cjk",
    "HIRAGANA": "cjk",
    "KATAKANA": "cjk",
    "KATAKANA-HIRAGANA": "cjk",
    "HANGUL": "cjk",
    "BOPOMOFO": "cjk",
    "IDEOGRAPHIC": "cjk",
    "FULLWIDTH": "cjk",
    "HALFWIDTH": "cjk",
    "MATHEMATICAL": "math",
}


@cache
def letter_script(ch: str) -> str | None:
    """The script of a letter, None for a non-letter; the names are those of
    :attr:`~moe_adapt.distill.verify.script.ForeignScriptCheckConfig.allowed`."""
    if not ch.isalpha():
        return None
    cp = ord(ch)
    if cp < 0x250:
        return "greek" if ch == "µ" else "latin"
    if 0x2100 <= cp <= 0x214F or 0x1D400 <= cp <= 0x1D7FF:
        return "math"
    word = unicodedata.name(ch, "UNKNOWN").split(" ", 1)[0]
    return _SCRIPT_WORDS.get(word, word.lower())


_LETTER_RUN = re.compile(r"[^\W\d_]+")  # letters, as script_shares counts them (no marks, digits, _)


def has_letters(text: str, n: int) -> bool:
    """Whether ``text`` holds at least ``n`` letters (stops counting once it has)."""
    if n <= 0:
        return True
    count = 0
    for m in _LETTER_RUN.finditer(text):
        count += m.end() - m.start()
        if count >= n:
            return True
    return False


def excerpt(text: str, limit: int = 200) -> str:
    """The first ``limit`` characters of ``text`` with its whitespace collapsed (for details and reports)."""
    return " ".join(text.split())[:limit]
