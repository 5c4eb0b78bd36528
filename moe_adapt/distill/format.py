"""The response format every distillation phase agrees on: reasoning between delimiters, then the answer.

A response reads ``<think>\\n{reasoning}\\n</think>\\n{answer}``. The teacher is prompted (and, in the
tiny recipe, trained) to write it; verification checks it; answer checks read the part after the
closing delimiter. The delimiters are configurable for teachers with other conventions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from moe_adapt.errors import invalid

_ARABIC_INDIC = str.maketrans("٠١٢٣٤٥٦٧٨٩۰۱۲۳۴۵۶۷۸۹", "01234567890123456789")
# thousands grouped with "," or "٬" (1,250), then an optional decimal part with "." or "٫"
_NUMBER = re.compile(r"[-−]?(?:\d{1,3}(?:[,٬]\d{3})+|\d+)(?:[.٫]\d+)?")


@dataclass
class ResponseFormat:
    """How a response separates its reasoning from its final answer."""

    think_open: str = "<think>"
    """Text that opens the reasoning."""

    think_close: str = "</think>"
    """Text that closes the reasoning; the final answer follows it."""

    def __post_init__(self) -> None:
        if not self.think_open.strip():
            invalid("distill.format.think_open", self.think_open, "must be non-blank text")
        if not self.think_close.strip() or self.think_close == self.think_open:
            invalid(
                "distill.format.think_close", self.think_close, "must be non-blank and differ from think_open"
            )

    def render(self, reasoning: str, answer: str) -> str:
        """The response text for a reasoning and an answer."""
        return f"{self.think_open}\n{reasoning.strip()}\n{self.think_close}\n{answer.strip()}"

    def split(self, response: str) -> tuple[str, str] | None:
        """``(reasoning, answer)`` of a well-formed response, None when the delimiters are missing,
        repeated or out of order, or either part is empty."""
        text = response.strip()
        if not text.startswith(self.think_open):
            return None
        if text.count(self.think_open) != 1 or text.count(self.think_close) != 1:
            return None
        reasoning, _, answer = text[len(self.think_open) :].partition(self.think_close)
        reasoning, answer = reasoning.strip(), answer.strip()
        if not reasoning or not answer:
            return None
        return reasoning, answer


def normalize_digits(text: str) -> str:
    """Arabic-Indic and Eastern Arabic-Indic digits replaced by ASCII digits."""
    return text.translate(_ARABIC_INDIC)


def last_number(text: str) -> float | None:
    """The last number written in ``text``, None when there is none.

    ASCII or Arabic-Indic digits; a leading minus sign; ``,`` / ``٬`` group thousands (``1,250``) and
    ``.`` / ``٫`` start the decimals (so a decimal comma, ``1,5``, reads as two numbers).
    """
    matches = _NUMBER.findall(normalize_digits(text))
    if not matches:
        return None
    token = matches[-1].replace("−", "-").replace("٫", ".").replace(",", "").replace("٬", "")
    return float(token)
