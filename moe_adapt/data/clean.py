"""Text normalisation for Arabic, Hebrew and Latin-script documents.

Every step is a separate flag of :class:`CleanConfig`; :func:`clean_text` applies them in a fixed
order: Unicode normalisation, invisible characters (bidi controls, zero-width, C0/C1 controls),
Arabic options, Hebrew options, whitespace. The defaults are the lossless-in-meaning ones (NFKC,
strip bidi/zero-width/controls, tatweel); orthographic folding (diacritics, alef, alef maqsura,
ta marbuta, niqqud) is opt-in because it changes what a model learns to write.

Character classes (code points):

- bidi controls: U+200E LRM, U+200F RLM, U+061C ALM, U+202A-U+202E embeddings/overrides,
  U+2066-U+2069 isolates (99.6% of the demo Arabic hadiths contain U+200F);
- zero-width: U+200B ZWSP, U+2060 word joiner, U+FEFF BOM (ZWJ/ZWNJ are kept: they shape Persian/Urdu);
- Arabic tatweel U+0640; Arabic diacritics: U+0610-U+061A, U+064B-U+065F (harakat, shadda, sukun, ...),
  U+0670 (superscript alef), U+06D6-U+06DC, U+06DF-U+06E4, U+06E7-U+06E8, U+06EA-U+06ED (Quranic marks);
- alef variants: U+0622 آ, U+0623 أ, U+0625 إ, U+0671 ٱ -> U+0627 ا; alef maqsura U+0649 ى -> U+064A ي;
  ta marbuta U+0629 ة -> U+0647 ه;
- Hebrew niqqud and cantillation: the combining marks in U+0591-U+05C7 (letters U+05D0-U+05EA and
  punctuation such as maqaf U+05BE and sof pasuq U+05C3 are kept).
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

import numpy as np

from moe_adapt.errors import MoEAdaptConfigError

UNICODE_FORMS = ("NFC", "NFKC", "NFD", "NFKD", "none")

BIDI_CONTROLS = "\u200e\u200f\u061c\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
ZERO_WIDTH = "\u200b\u2060\ufeff"
TATWEEL = "\u0640"
ARABIC_DIACRITICS = (
    "".join(chr(c) for c in range(0x0610, 0x061B))
    + "".join(chr(c) for c in range(0x064B, 0x0660))
    + "\u0670"
    + "".join(chr(c) for c in range(0x06D6, 0x06DD))
    + "".join(chr(c) for c in range(0x06DF, 0x06E5))
    + "\u06e7\u06e8"
    + "".join(chr(c) for c in range(0x06EA, 0x06EE))
)
HEBREW_MARKS = "".join(chr(c) for c in range(0x0591, 0x05C8) if unicodedata.category(chr(c)) == "Mn")


def _char_class(chars: str) -> re.Pattern[str]:
    """A regex matching any one of ``chars`` (regex substitution is far faster than str.translate)."""
    return re.compile("[" + re.escape(chars) + "]+")


_BIDI_RE = _char_class(BIDI_CONTROLS)
_ZW_RE = _char_class(ZERO_WIDTH)
_TATWEEL_RE = _char_class(TATWEEL)
_AR_DIACRITICS_RE = _char_class(ARABIC_DIACRITICS)
_HE_MARKS_RE = _char_class(HEBREW_MARKS)
_ALEF_RE = re.compile("[\u0622\u0623\u0625\u0671]")
# C0 and C1 controls except tab and newline; \r is folded into \n first.
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_MANY_NL = re.compile(r"\n{3,}")


@dataclass
class CleanConfig:
    """Which normalisations :func:`clean_text` applies."""

    unicode_form: str = "NFKC"
    """Unicode normalisation form: one of NFC, NFKC, NFD, NFKD or ``none``. NFKC also folds Arabic
    presentation forms (U+FB50-U+FEFF) into base letters."""
    strip_bidi: bool = True
    """Remove bidi control characters (LRM, RLM, ALM, embeddings, overrides, isolates)."""
    strip_zero_width: bool = True
    """Remove ZWSP, word joiner and BOM (ZWJ/ZWNJ are kept)."""
    strip_controls: bool = True
    """Remove C0/C1 control characters other than tab and newline; fold CRLF/CR into LF."""
    normalize_whitespace: bool = True
    """Collapse runs of spaces/tabs, trim lines, keep at most one blank line, strip the ends."""
    remove_tatweel: bool = True
    """Remove the Arabic tatweel (kashida, U+0640), a purely typographic stretcher."""
    remove_arabic_diacritics: bool = False
    """Remove Arabic harakat, shadda, sukun, tanwin, superscript alef and Quranic marks."""
    normalize_alef: bool = False
    """Fold alef variants آ أ إ ٱ into bare alef ا."""
    normalize_alef_maqsura: bool = False
    """Fold alef maqsura ى into ya ي."""
    normalize_ta_marbuta: bool = False
    """Fold ta marbuta ة into ha ه."""
    remove_hebrew_marks: bool = False
    """Remove Hebrew niqqud (vowel points, dagesh, shin/sin dots) and cantillation marks."""

    def __post_init__(self) -> None:
        if self.unicode_form not in UNICODE_FORMS:
            raise MoEAdaptConfigError(
                f"clean.unicode_form={self.unicode_form!r} is not supported; "
                f"allowed: {', '.join(UNICODE_FORMS)}"
            )


def strip_bidi_controls(text: str) -> str:
    """Remove bidi control characters (U+200E/F, U+061C, U+202A-E, U+2066-9) from ``text``."""
    return _BIDI_RE.sub("", text)


def normalize_arabic(
    text: str,
    *,
    tatweel: bool = True,
    diacritics: bool = True,
    alef: bool = True,
    alef_maqsura: bool = True,
    ta_marbuta: bool = True,
) -> str:
    """Apply the selected Arabic orthographic foldings to ``text`` (all on by default).

    Used as-is for matching (decontamination); :func:`clean_text` calls it with the flags of its
    :class:`CleanConfig`.
    """
    if tatweel:
        text = _TATWEEL_RE.sub("", text)
    if diacritics:
        text = _AR_DIACRITICS_RE.sub("", text)
    if alef:
        text = _ALEF_RE.sub("\u0627", text)
    if alef_maqsura:
        text = text.replace("\u0649", "\u064a")
    if ta_marbuta:
        text = text.replace("\u0629", "\u0647")
    return text


def strip_hebrew_marks(text: str) -> str:
    """Remove Hebrew niqqud and cantillation (combining marks in U+0591-U+05C7), keeping letters."""
    return _HE_MARKS_RE.sub("", text)


_DELETE = 0xFFFFFFFF
"""In :func:`_fold_table`: the code point is removed."""


@functools.cache
def _fold_table(alef_maqsura: bool, ta_marbuta: bool) -> np.ndarray:
    """Code point -> code point (or :data:`_DELETE`) of :func:`fold_marks` (4.4 MB, once per
    process and setting)."""
    table = np.arange(0x110000, dtype=np.uint32)
    for c in TATWEEL + ARABIC_DIACRITICS + HEBREW_MARKS:
        table[ord(c)] = _DELETE
    for c in "\u0622\u0623\u0625\u0671":  # alef variants, as _ALEF_RE
        table[ord(c)] = 0x0627
    if alef_maqsura:
        table[0x0649] = 0x064A
    if ta_marbuta:
        table[0x0629] = 0x0647
    table.setflags(write=False)
    return table


def fold_marks(text: str, *, alef_maqsura: bool = True, ta_marbuta: bool = True) -> str:
    """``strip_hebrew_marks(normalize_arabic(text, alef_maqsura=..., ta_marbuta=...))`` (tatweel,
    diacritics and alef folding on) as one table lookup over the code points: both remove or replace
    characters one by one, so a table does all their passes at once (4x faster on vocalised text)."""
    if text.isascii():
        return text
    cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    out = _fold_table(alef_maqsura, ta_marbuta)[cps]
    if np.array_equal(out, cps):
        return text
    return out[out != _DELETE].tobytes().decode("utf-32-le", "surrogatepass")


def normalize_whitespace(text: str) -> str:
    """Collapse horizontal whitespace to one space, trim lines, allow one blank line, strip the ends."""
    text = "\n".join(" ".join(line.split()) for line in text.split("\n"))
    if "\n\n\n" in text:
        text = _MANY_NL.sub("\n\n", text)
    return text.strip()


def clean_text(text: str, config: CleanConfig | None = None) -> str:
    """Return ``text`` normalised according to ``config`` (defaults: :class:`CleanConfig`)."""
    cfg = config or CleanConfig()
    form: Any = cfg.unicode_form
    if form != "none" and not unicodedata.is_normalized(form, text):
        text = unicodedata.normalize(form, text)
    if cfg.strip_bidi:
        text = _BIDI_RE.sub("", text)
    if cfg.strip_zero_width:
        text = _ZW_RE.sub("", text)
    if cfg.strip_controls:
        text = _CONTROLS.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = normalize_arabic(
        text,
        tatweel=cfg.remove_tatweel,
        diacritics=cfg.remove_arabic_diacritics,
        alef=cfg.normalize_alef,
        alef_maqsura=cfg.normalize_alef_maqsura,
        ta_marbuta=cfg.normalize_ta_marbuta,
    )
    if cfg.remove_hebrew_marks:
        text = _HE_MARKS_RE.sub("", text)
    if cfg.normalize_whitespace:
        text = normalize_whitespace(text)
    return text
