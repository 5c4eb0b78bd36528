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

The package has one module per family of checks, each check beside its settings dataclass:

- ``base``: :class:`Trace`, :class:`Rejection` and the :class:`Check` base class;
- ``parse``: the response split once (:func:`parse_response`) and text folded for matching;
- ``structure``: ``format``, ``length``, ``duplicate``;
- ``script``: ``orthography``, ``foreign_script``, ``script``;
- ``language``: ``language``;
- ``answer``: ``answer``;
- ``norms``: ``dialect``, ``regional_norms``;
- ``config``: :class:`VerifyConfig` and the registry of checks (:func:`build_checks`);
- ``run``: :func:`check_trace`, :func:`verify_traces`;
- ``report``: :class:`VerifyResult` and :func:`render_report_markdown`.

How to add a check: docs/distill.md ("Adding a check").
"""

from __future__ import annotations

from moe_adapt.distill.verify.answer import AnswerCheckConfig, choice_letter
from moe_adapt.distill.verify.base import Check, Rejection, Trace
from moe_adapt.distill.verify.config import CHECK_NAMES, VerifyConfig, build_checks
from moe_adapt.distill.verify.language import LanguageCheckConfig
from moe_adapt.distill.verify.norms import DialectCheckConfig, NormRule, RegionalNormsCheckConfig
from moe_adapt.distill.verify.parse import ParsedResponse, fold_text, letter_script, parse_response
from moe_adapt.distill.verify.report import VerifyResult, render_report_markdown
from moe_adapt.distill.verify.run import check_trace, verify_traces
from moe_adapt.distill.verify.script import (
    ForeignScriptCheckConfig,
    OrthographyCheckConfig,
    ScriptCheckConfig,
)
from moe_adapt.distill.verify.structure import DuplicateCheckConfig, LengthCheckConfig

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
