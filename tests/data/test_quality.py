from __future__ import annotations

from pathlib import Path

import pytest

from moe_adapt.data.clean import clean_text
from moe_adapt.data.jsonl import read_documents
from moe_adapt.data.quality import (
    DEFAULT_THRESHOLDS,
    FilterReport,
    QualityThresholds,
    check_quality,
    filter_documents,
    thresholds_for,
)
from moe_adapt.errors import MoEAdaptConfigError

AR = (
    "حدثنا قتيبة بن سعيد قال حدثنا الليث عن نافع عن ابن عمر أن رسول الله صلى الله عليه وسلم قال "
    "إذا دعي أحدكم إلى الوليمة فليأتها وكان ابن عمر يأتي الدعوة في العرس وغير العرس وهو صائم"
)
HE = "מאימתי קורין את שמע בערבית משעה שהכהנים נכנסים לאכול בתרומתן עד סוף האשמורה הראשונה דברי רבי אליעזר"
EN = (
    "The Messenger of Allah said: when one of you is invited to a wedding feast, let him attend it, "
    "and Ibn Umar used to attend invitations whether for a wedding or otherwise, even when he was fasting."
)


@pytest.mark.parametrize(("text", "lang"), [(AR, "ar"), (HE, "he"), (EN, "en")])
def test_good_text_kept(text: str, lang: str) -> None:
    result = check_quality(text, lang)
    assert result.keep, (result.reason, result.stats)


def test_reasons() -> None:
    assert check_quality("قال رسول الله", "ar").reason == "too_few_words"
    assert check_quality(EN, "ar").reason == "wrong_script"
    assert check_quality("buy now $$$ ### " * 10 + EN, "en").reason == "symbol_ratio"
    spam = "\n".join(["click here to win a prize today and the best"] * 6)
    assert check_quality(spam, "en").reason == "dup_lines"
    no_stop = " ".join(
        ["lorem ipsum dolor sit amet consectetur adipiscing elit"] * 1 + ["sed do eiusmod tempor"] * 1
    )
    assert check_quality(no_stop, "en", QualityThresholds(min_words=5)).reason == "stop_words"


def test_thresholds_validate_and_lookup() -> None:
    with pytest.raises(MoEAdaptConfigError, match="max_symbol_ratio=1.5"):
        QualityThresholds(max_symbol_ratio=1.5)
    assert thresholds_for("fr").min_stop_words == 0
    with pytest.raises(MoEAdaptConfigError, match="quality.thresholds.xx"):
        thresholds_for("xx")


def test_keep_rates_on_demo_corpus(demo_dir: Path) -> None:
    """Ours keep most of the real demo text per language; English-tuned thresholds keep ~no Arabic."""
    docs = [
        {**d, "text": clean_text(d["text"])}
        for lang in ("ar", "en", "he")
        for d in read_documents(demo_dir / f"{lang}.jsonl")
    ]
    report = FilterReport()
    kept = list(filter_documents(docs, report=report))
    rates = {lang: report.keep_rate(lang) for lang in ("ar", "en", "he")}
    print("keep rates:", report.as_dict())
    assert rates["ar"] > 0.9 and rates["en"] > 0.8 and rates["he"] > 0.75
    assert len(kept) == sum(report.kept.values())
    english_tuned = {
        "ar": QualityThresholds(**{**DEFAULT_THRESHOLDS["en"].__dict__, "min_script_share": 0.0})
    }
    ar_docs = [d for d in docs if d["lang"] == "ar"]
    en_report = FilterReport()
    assert len(list(filter_documents(ar_docs, thresholds=english_tuned, report=en_report))) == 0
    assert en_report.reasons["ar"]["stop_words"] > 0.9 * len(ar_docs)
