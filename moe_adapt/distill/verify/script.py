"""Checks of the letters a response is written in: ``orthography`` (combining marks on letters of
their script, no presentation forms or junk characters), ``foreign_script`` (no letters of other
scripts than the target's and the allowed ones) and ``script`` (most letters in the target's script).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from moe_adapt.data.clean import ARABIC_DIACRITICS, HEBREW_MARKS
from moe_adapt.data.langid import LANGUAGE_SCRIPT, script_share
from moe_adapt.distill.format import ResponseFormat
from moe_adapt.distill.verify.base import KEY, Check, Rejection, Trace, check_fraction, check_non_negative
from moe_adapt.distill.verify.parse import ParsedResponse, has_letters, letter_script
from moe_adapt.errors import invalid


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
            invalid(f"{KEY}.orthography.max_marks_per_letter", self.max_marks_per_letter, "must be >= 1")


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
        check_non_negative(f"{KEY}.foreign_script.max_chars", self.max_chars)


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


@dataclass
class ScriptCheckConfig:
    """``script``: reasoning and answer are written in the script of the trace's language."""

    min_share: float = 0.6
    """Least share of a part's letters (digits, marks and punctuation do not count) in the target
    script: Arabic for ar, Hebrew for he, Latin for en, ..."""

    min_letters: int = 5
    """Parts with fewer letters than this are not checked (an answer ``8`` or ``B`` has none)."""

    def __post_init__(self) -> None:
        check_fraction(f"{KEY}.script.min_share", self.min_share)
        check_non_negative(f"{KEY}.script.min_letters", self.min_letters)


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
            if not has_letters(text, self.cfg.min_letters):
                continue
            share = script_share(text, trace.lang)
            if share < self.cfg.min_share:
                failed.append(
                    (part, f"{part} has {share:.0%} {script} letters < min {self.cfg.min_share:.0%}")
                )
        if not failed:
            return None
        return self.reject("; ".join(d for _, d in failed), *(p for p, _ in failed))
