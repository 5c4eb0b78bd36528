"""Checks of the response's structure: it splits (``format``), its lengths (``length``), it is not a
repeat of an earlier response (``duplicate``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from moe_adapt.distill.format import ResponseFormat
from moe_adapt.distill.verify.base import KEY, Check, Rejection, Trace, check_non_negative
from moe_adapt.distill.verify.parse import ParsedResponse
from moe_adapt.errors import invalid


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
        key = f"{KEY}.length"
        check_non_negative(f"{key}.min_reasoning_chars", self.min_reasoning_chars)
        check_non_negative(f"{key}.min_answer_chars", self.min_answer_chars)
        for part in ("reasoning", "answer"):
            lo, hi = getattr(self, f"min_{part}_chars"), getattr(self, f"max_{part}_chars")
            if hi is not None and hi < max(lo, 1):
                invalid(f"{key}.max_{part}_chars", hi, f"must be null or >= max(1, min_{part}_chars={lo})")
        if self.max_response_chars is not None and self.max_response_chars < 1:
            invalid(f"{key}.max_response_chars", self.max_response_chars, "must be null or >= 1")


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


@dataclass
class DuplicateCheckConfig:
    """``duplicate``: reject a response identical to an earlier one (the first is kept)."""

    scope: str = "prompt"
    """Where duplicates are looked for: ``prompt`` (earlier traces of the same prompt_id) or
    ``global`` (any earlier trace)."""

    def __post_init__(self) -> None:
        if self.scope not in ("prompt", "global"):
            invalid(f"{KEY}.duplicate.scope", self.scope, "use prompt or global")


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
