"""What every check shares: the trace it reads, the rejection it returns, the :class:`Check` base.

A check is a subclass of :class:`Check` with a ``name`` (its key in ``distill.verify.checks``) and a
``check(trace, parsed)`` method that returns None (pass) or a :class:`Rejection`. Its settings are a
dataclass beside it, validated when the config is composed with :func:`check_fraction` and
:func:`check_non_negative`, whose errors name the key under :data:`KEY`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

from moe_adapt.distill.format import ResponseFormat
from moe_adapt.distill.verify.parse import ParsedResponse, parse_response
from moe_adapt.errors import MoEAdaptError, invalid

ANSWER_TYPES = ("numeric", "exact", "mc")
"""How a trace's answer is compared with its reference (:attr:`Trace.answer_type`)."""

KEY = "distill.verify"
"""Where the verify settings sit in the config; config errors name keys under it."""


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


def check_fraction(key: str, value: float) -> None:
    """Fail naming ``key`` unless ``value`` lies in [0, 1]."""
    if not 0.0 <= value <= 1.0:
        invalid(key, value, "must be a fraction in [0, 1]")


def check_non_negative(key: str, value: int | float) -> None:
    """Fail naming ``key`` when ``value`` is negative."""
    if value < 0:
        invalid(key, value, "must be >= 0")


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
