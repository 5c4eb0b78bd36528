"""Checks of the target region's norms: ``dialect`` (no dialect marker words in text meant to be in
the target variety, Modern Standard Arabic by default) and ``regional_norms`` (no configured rule
fires: a lexicon, regular expressions or a classifier hook).
"""

from __future__ import annotations

import importlib
import logging
import numbers
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from moe_adapt.distill.format import ResponseFormat
from moe_adapt.distill.verify.base import KEY, Check, Rejection, Trace, check_fraction
from moe_adapt.distill.verify.parse import ParsedResponse, excerpt, fold_text, word_regex
from moe_adapt.errors import MoEAdaptConfigError, MoEAdaptError, invalid

log = logging.getLogger("moe_adapt.distill.verify")  # the phase's logger, whichever module warns

_RULE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


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
            invalid(f"{KEY}.dialect.max_markers", self.max_markers, "must be >= 1")
        if self.target != "msa" and self.target not in self.markers:
            invalid(f"{KEY}.dialect.target", self.target, f"use msa or one of {', '.join(self.markers)}")
        for name, words in self.markers.items():
            if not any(fold_text(w).strip() for w in words):
                invalid(f"{KEY}.dialect.markers.{name}", words, "give at least one non-blank word")


class DialectCheck(Check):
    """No dialect marker words in text meant to be in the target variety (MSA by default)."""

    name = "dialect"

    def __init__(self, cfg: DialectCheckConfig, fmt: ResponseFormat) -> None:
        super().__init__(fmt)
        self.cfg = cfg
        self._regexes: dict[str, re.Pattern[str]] = {}
        for dialect, words in cfg.markers.items():
            rx = word_regex(words)
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
            key = f"{KEY}.regional_norms.rules[{i}]"
            if not isinstance(rule.name, str) or not _RULE_NAME_RE.match(rule.name):
                invalid(f"{key}.name", rule.name, "use letters, digits, '_', '.', '-' (e.g. alcohol)")
            if rule.name in seen:
                invalid(f"{key}.name", rule.name, "rule names must be unique")
            seen.add(rule.name)
            if not (any(fold_text(w).strip() for w in rule.lexicon) or rule.regex or rule.classifier):
                invalid(key, rule.name, "give a rule a lexicon, a regex or a classifier")
            check_fraction(f"{key}.threshold", rule.threshold)
            _compile_rule_regexes(rule, key)
            if rule.classifier is not None:
                _split_hook(rule.classifier, f"{key}.classifier")


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
                return f"regex {rx.pattern!r} matched {excerpt(m.group(), 40)!r}"
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
            log.warning("%s.regional_norms has no rules: the check passes every trace", KEY)

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
    key = f"{KEY}.regional_norms.rules[{i}]"
    classifier = _load_classifier(rule.classifier, f"{key}.classifier") if rule.classifier else None
    return _CompiledRule(
        name=rule.name,
        langs=frozenset(rule.langs),
        words=word_regex(rule.lexicon),
        regexes=_compile_rule_regexes(rule, key),
        classifier=classifier,
        threshold=rule.threshold,
    )
