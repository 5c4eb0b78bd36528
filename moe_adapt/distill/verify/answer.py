"""The ``answer`` check: the final answer agrees with the trace's reference, compared as a number,
as normalised text (``exact``) or as a multiple-choice letter (Latin, Arabic or Hebrew).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from moe_adapt.distill.format import ResponseFormat, last_number
from moe_adapt.distill.verify.base import KEY, Check, Rejection, Trace, check_non_negative
from moe_adapt.distill.verify.parse import ParsedResponse, excerpt, normalize_exact
from moe_adapt.errors import invalid


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
        check_non_negative(f"{KEY}.answer.rel_tol", self.rel_tol)
        check_non_negative(f"{KEY}.answer.abs_tol", self.abs_tol)
        if self.exact_match not in ("equal", "contains"):
            invalid(f"{KEY}.answer.exact_match", self.exact_match, "use equal or contains")


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
        want, got = normalize_exact(reference), normalize_exact(answer)
        if not want:
            return self.reject(f"reference {reference!r} is empty after normalisation", "bad_reference")
        ok = got == want if self.cfg.exact_match == "equal" else f" {want} " in f" {got} "
        if ok:
            return None
        relation = "is not" if self.cfg.exact_match == "equal" else "does not contain"
        return self.reject(f"answer {excerpt(got, 60)!r} {relation} {want!r}", "wrong_exact")

    def _choice(self, answer: str, reference: str) -> Rejection | None:
        want = _MC_LETTERS.get(normalize_exact(reference).upper())
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
