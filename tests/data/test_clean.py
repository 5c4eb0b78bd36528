from __future__ import annotations

import pytest

from moe_adapt.data.clean import (
    CleanConfig,
    clean_text,
    normalize_arabic,
    strip_bidi_controls,
    strip_hebrew_marks,
)
from moe_adapt.errors import MoEAdaptConfigError

HADITH = 'قَالَ رَسُولُ اللَّهِ ـ صلى الله عليه وسلم ـ \u200f"\u200f إِنَّمَا الأَعْمَالُ بِالنِّيَّاتِ \u200f"\u200f'


def test_default_strips_bidi_tatweel_and_whitespace_keeps_harakat() -> None:
    out = clean_text(HADITH)
    assert "\u200f" not in out and "\u0640" not in out
    assert "  " not in out
    assert "\u064e" in out  # fatha kept by default
    assert out.startswith("قَالَ رَسُولُ")


def test_each_arabic_flag_is_separate() -> None:
    assert (
        normalize_arabic(
            "أحمد إلى آدم ٱلله", tatweel=False, diacritics=False, alef_maqsura=False, ta_marbuta=False
        )
        == "احمد الى ادم الله"
    )
    assert normalize_arabic("مستشفى", alef=False, ta_marbuta=False) == "مستشفي"
    assert normalize_arabic("مدرسة", alef=False, alef_maqsura=False) == "مدرسه"
    assert (
        normalize_arabic("بِسْمِ اللَّهِ الرَّحْمَٰنِ", alef=False, alef_maqsura=False, ta_marbuta=False)
        == "بسم الله الرحمن"
    )
    assert normalize_arabic("كـــتاب", diacritics=False, alef=False) == "كتاب"


def test_full_arabic_folding_via_config() -> None:
    cfg = CleanConfig(
        remove_arabic_diacritics=True,
        normalize_alef=True,
        normalize_alef_maqsura=True,
        normalize_ta_marbuta=True,
    )
    assert clean_text("إِلَى الْمَدِينَةِ \u200fـ أَحْمَد", cfg) == "الي المدينه احمد"


def test_nfkc_folds_presentation_forms() -> None:
    assert clean_text("\ufefb") == "\u0644\u0627"  # lam-alef ligature -> lam + alef
    assert clean_text("\ufefb", CleanConfig(unicode_form="none")) == "\ufefb"


def test_hebrew_niqqud_and_cantillation_removed_letters_and_maqaf_kept() -> None:
    assert strip_hebrew_marks("בְּרֵאשִׁ֖ית בָּרָ֣א אֱלֹהִ֑ים") == "בראשית ברא אלהים"
    assert strip_hebrew_marks("כׇּל־הָעָם") == "כל־העם"
    assert clean_text("שָׁלוֹם", CleanConfig(remove_hebrew_marks=True)) == "שלום"
    assert clean_text("שָׁלוֹם") == "שָׁלוֹם"


def test_bidi_and_controls() -> None:
    assert strip_bidi_controls("\u202bשלום\u202c \u2067abc\u2069\u200e") == "שלום abc"
    assert clean_text("a\x00b\r\nc\ufeff\u200bd") == "ab\ncd"
    assert clean_text("a\u200cb") == "a\u200cb"  # ZWNJ is kept


def test_bad_unicode_form_names_allowed_values() -> None:
    with pytest.raises(MoEAdaptConfigError, match="NFKC"):
        CleanConfig(unicode_form="nfkc")
