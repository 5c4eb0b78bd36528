from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from moe_adapt.data.langid import script_share
from moe_adapt.distill.format import ResponseFormat, last_number
from moe_adapt.distill.tasks import (
    NAMES,
    OPS,
    SPLIT_PERCENT,
    TASKS,
    Problem,
    make_problems,
    max_problems,
    write_problem_set,
)
from moe_adapt.errors import MoEAdaptConfigError

EQUATION = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)\.")
SMALL = 4  # max_operand small enough to render every instance of every split


def _everything(split: str, max_operand: int = SMALL, ops: tuple[str, ...] = OPS) -> list[Problem]:
    return make_problems(
        max_problems(split, max_operand=max_operand, ops=ops), split=split, ops=ops, max_operand=max_operand
    )


def _all_splits() -> list[Problem]:
    # One op at a time, so that balancing never leaves instances out.
    return [p for split in SPLIT_PERCENT for op in OPS for p in _everything(split, ops=(op,))]


def _by_id(problems: list[Problem]) -> dict[str, Problem]:
    return {p.id: p for p in problems}


def test_registry_names_the_arith_task() -> None:
    assert TASKS["arith"] is make_problems


def test_deterministic_in_seed_and_split() -> None:
    first = make_problems(30, split="train", seed=3, ops=OPS)
    assert first == make_problems(30, split="train", seed=3, ops=OPS)
    assert first != make_problems(30, split="train", seed=4, ops=OPS)
    assert [p.prompt for p in first] != [p.prompt for p in make_problems(30, split="val", seed=3, ops=OPS)]


def test_ids_are_unique_and_share_the_instance_index() -> None:
    problems = make_problems(25, split="test", seed=1)
    ids = [p.id for p in problems]
    assert len(set(ids)) == len(ids) == 50
    assert ids[0] == "arith-test-00000-ar" and ids[25] == "arith-test-00000-en"
    assert all(re.fullmatch(r"arith-test-\d{5}-(ar|en)", i) for i in ids)
    assert [p.lang for p in problems] == ["ar"] * 25 + ["en"] * 25


def test_splits_are_disjoint_and_cover_every_instance() -> None:
    by_split = {
        split: {(p.lang, p.prompt) for op in OPS for p in _everything(split, ops=(op,))}
        for split in SPLIT_PERCENT
    }
    assert not by_split["train"] & by_split["val"]
    assert not by_split["train"] & by_split["test"]
    assert not by_split["val"] & by_split["test"]
    # Every (op, operands, template, name) lands in exactly one split: 5 templates x 8 names per equation.
    per_equation = 5 * len(NAMES)
    n_add, n_sub, n_mul = SMALL * SMALL, SMALL * (SMALL + 1) // 2, (SMALL - 1) ** 2
    n_two_step = sum(min(a + b, SMALL) for a in range(1, SMALL + 1) for b in range(1, SMALL + 1))
    total = sum(len(s) for s in by_split.values())
    assert total == 2 * per_equation * (n_add + n_sub + n_mul + n_two_step)
    # Roughly the documented shares.
    assert 0.7 < len(by_split["train"]) / total < 0.9


def test_held_out_does_not_depend_on_seed_or_max_operand() -> None:
    train = {
        p.prompt for p in make_problems(max_problems("train", max_operand=6), split="train", max_operand=6)
    }
    for seed in range(3):
        test = make_problems(max_problems("test", max_operand=5), split="test", seed=seed, max_operand=5)
        assert not train & {p.prompt for p in test}


def test_languages_are_parallel() -> None:
    problems = _by_id(make_problems(60, split="val", seed=2, ops=OPS))
    for k in range(60):
        ar, en = problems[f"arith-val-{k:05d}-ar"], problems[f"arith-val-{k:05d}-en"]
        assert ar.answer == en.answer
        assert re.findall(r"\d+", ar.prompt) == re.findall(r"\d+", en.prompt)
        assert re.findall(r"\d+", ar.reasoning) == re.findall(r"\d+", en.reasoning)
        assert EQUATION.findall(ar.reasoning) == EQUATION.findall(en.reasoning)


def test_drawn_instances_do_not_depend_on_langs() -> None:
    both = make_problems(20, ("ar", "en"), split="test", seed=5)
    assert make_problems(20, ("en",), split="test", seed=5) == both[20:]
    assert make_problems(20, ("en", "ar"), split="test", seed=5) == both[20:] + both[:20]


@pytest.mark.parametrize("max_operand", [SMALL, 20])
def test_answers_follow_from_the_equations(max_operand: int) -> None:
    problems = (
        _all_splits() if max_operand == SMALL else make_problems(200, split="train", ops=OPS, max_operand=20)
    )
    for p in problems:
        equations = EQUATION.findall(p.reasoning)
        assert equations and p.reasoning.endswith(f"= {p.answer}."), p
        for a, op, b, result in equations:
            value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
            assert value == int(result) >= 0, p
        if len(equations) == 2:  # two_step: the second equation starts from the first result
            assert equations[1][0] == equations[0][3] and equations[1][1] == "-"
        assert equations[-1][3] == p.answer and p.answer.isascii() and p.answer.isdigit()
        # The operands of the first equation are the first numbers of the prompt.
        assert re.findall(r"\d+", p.prompt)[:2] == [equations[0][0], equations[0][2]]
        assert max(int(n) for n in re.findall(r"\d+", p.prompt)) <= max_operand


def test_texts_are_in_the_right_script_and_fully_rendered() -> None:
    plural_after_one = re.compile(
        r"\b1 (apples|books|pens|birds|dates|coins|boxes|bags|shelves|rows|roses|plates|people)"
    )
    for p in _all_splits():
        for text in (p.prompt, p.reasoning, p.final):
            assert not re.search(r"[\[\]{}|]", text), text
            assert script_share(text, p.lang) >= 0.8, text
            assert not re.search(r"[٠-٩۰-۹]", text), "digits must be ASCII"
        if p.lang == "en":
            assert not plural_after_one.search(p.prompt), p.prompt
            assert p.final == f"The answer is {p.answer}."
        else:
            assert p.final == f"الجواب هو {p.answer}."


def test_pronouns_follow_the_name() -> None:
    genders = {en: gender for _, en, gender in NAMES}
    for p in make_problems(200, ("en",), split="train", ops=OPS):
        name = p.prompt.split()[0].removesuffix("'s")
        if name not in genders:  # templates that open with something else
            continue
        words = set(re.findall(r"[A-Za-z]+", p.prompt + " " + p.reasoning))
        wrong = {"He", "he", "him", "his", "His"} if genders[name] == "f" else {"She", "she", "her", "Her"}
        assert not words & wrong, p.prompt


def test_operations_are_balanced() -> None:
    problems = make_problems(40, ("en",), split="train", ops=OPS)
    kinds = []
    for p in problems:
        equations = EQUATION.findall(p.reasoning)
        kinds.append(
            "two_step" if len(equations) == 2 else {"+": "add", "-": "sub", "*": "mul"}[equations[0][1]]
        )
    assert {op: kinds.count(op) for op in OPS} == dict.fromkeys(OPS, 10)


def test_texts_are_short() -> None:
    for p in make_problems(100, split="train", ops=OPS):
        assert len(p.prompt.split()) + len(p.reasoning.split()) + len(p.final.split()) <= 60, p


def test_response_round_trips_through_the_format() -> None:
    custom = ResponseFormat(think_open="<reason>", think_close="</reason>")
    for p in make_problems(20, split="test", ops=OPS):
        assert ResponseFormat().split(p.response()) == (p.reasoning, p.final)
        assert custom.split(p.response(custom)) == (p.reasoning, p.final)
        assert last_number(p.final) == float(p.answer)
        assert last_number(p.reasoning) == float(p.answer)


def test_records_are_written_atomically_and_read_back(tmp_path: Path) -> None:
    problems = make_problems(10, split="val", ops=("add", "mul"))
    path = tmp_path / "sets" / "arith_val.jsonl"
    write_problem_set(path, problems)
    lines = path.read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert records == [p.to_record() for p in problems]
    assert set(records[0]) == {"id", "lang", "prompt", "answer", "answer_type", "reference_response"}
    assert records[0]["answer_type"] == "numeric"
    assert "\\u06" not in path.read_text(encoding="utf-8")  # Arabic is written as UTF-8, not escaped

    class Broken(Problem):
        def to_record(self) -> dict[str, str]:
            raise RuntimeError("disk full")

    bad = Broken(**{**problems[0].__dict__})
    with pytest.raises(RuntimeError, match="disk full"):
        write_problem_set(path, [*problems[:3], bad])
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == records
    assert sorted(f.name for f in path.parent.iterdir()) == ["arith_val.jsonl"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"split": "dev"},
            r"distill\.task\.split='dev' is invalid: must be one of \['train', 'val', 'test'\]",
        ),
        ({"langs": ("ar", "fr")}, r"distill\.task\.langs=.*unknown \['fr'\]"),
        ({"langs": "ar"}, r"distill\.task\.langs='ar' is invalid: must be a non-empty list"),
        ({"langs": ()}, r"distill\.task\.langs=\(\) is invalid"),
        ({"langs": ("en", "en")}, r"distill\.task\.langs=.*must not repeat"),
        ({"ops": ("add", "div")}, r"distill\.task\.ops=.*unknown \['div'\]"),
        ({"ops": 3}, r"distill\.task\.ops=3 is invalid: must be a non-empty list"),
        ({"max_operand": 1}, r"distill\.task\.max_operand=1 is invalid: must be an integer from 2 to 20"),
        ({"max_operand": 21}, r"distill\.task\.max_operand=21"),
        ({"max_operand": True}, r"distill\.task\.max_operand=True"),
        ({"seed": "0"}, r"distill\.task\.seed='0'"),
        ({"n_per_lang": 0}, r"distill\.task\.n_per_lang=0 is invalid: must be a positive integer"),
    ],
)
def test_bad_arguments_name_the_setting(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"n_per_lang": 5, **kwargs}
    with pytest.raises(MoEAdaptConfigError, match=match):
        make_problems(**args)  # type: ignore[arg-type]


def test_too_many_problems_gives_the_maximum() -> None:
    most = max_problems("test", max_operand=5, ops=("add", "mul"))
    assert len(make_problems(most, ("en",), split="test", max_operand=5, ops=("add", "mul"))) == most
    with pytest.raises(
        MoEAdaptConfigError, match=rf"n_per_lang={most + 1} .*at most {most} problems per language"
    ):
        make_problems(most + 1, split="test", max_operand=5, ops=("add", "mul"))
