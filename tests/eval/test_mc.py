"""Multiple-choice items: malformed lines counted and skipped; batched scoring equals one at a time."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from moe_adapt.errors import MoEAdaptError
from moe_adapt.eval.mc import MCItem, load_mc_items, score_items


def test_malformed_lines_are_counted(tmp_path: Path) -> None:
    good = {"id": "a", "source_key": "k", "question": "q?", "choices": ["x", "y"], "answer": 1}
    lines = [
        json.dumps(good),
        "not json",
        json.dumps([1, 2]),
        json.dumps({**good, "id": "b", "choices": ["only one"]}),
        json.dumps({**good, "id": "c", "answer": 2}),
        json.dumps({**good, "id": "d", "answer": True}),
        json.dumps({**good, "id": "e", "question": " "}),
        json.dumps(good),  # duplicate id
        "",
        json.dumps({k: v for k, v in good.items() if k != "source_key"} | {"id": "f"}),
    ]
    path = tmp_path / "b.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    mc = load_mc_items(path, max_malformed_share=1.0)  # 7 of 9 bad: refused by default (see below)
    assert [i.id for i in mc.items] == ["a", "f"] and mc.items[1].pair_key is None
    assert mc.malformed == 7 and len(mc.examples) == 5
    assert mc.examples[0].startswith("line 2: invalid JSON")
    with pytest.raises(
        MoEAdaptError, match=r"eval\.benchmarks\[0\]\.files\.ar='.*nope.jsonl' does not exist"
    ):
        load_mc_items(tmp_path / "nope.jsonl", key="eval.benchmarks[0].files.ar")


def test_batched_scores_match_single(checkpoints: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    from moe_adapt.checkpoint.hf import load_causal_lm

    model = load_causal_lm(checkpoints["dense"])
    tok = AutoTokenizer.from_pretrained(checkpoints["dense"], local_files_only=True)

    def encode(text: str, special: bool) -> list[int]:
        return list(tok(text, add_special_tokens=special)["input_ids"])

    items = [
        MCItem("1", "The Messenger of Allah said", ("actions are judged", "by intentions", "Book"), 0, None),
        MCItem("2", "قال رسول الله", ("إنما الأعمال بالنيات", "الدين"), 1, None),
    ]
    batched = score_items(model, encode, items, batch_size=5)
    single = score_items(model, encode, items, batch_size=1)
    for a, b in zip(batched, single, strict=True):
        assert all(math.isclose(x, y, abs_tol=1e-4) for x, y in zip(a.loglik, b.loglik, strict=True))
    # The first choice's score by hand: log p of its tokens after the question.
    ctx, cont = encode(items[0].question, True), encode(" " + items[0].choices[0], False)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    want = sum(float(logp[len(ctx) - 1 + t, cont[t]]) for t in range(len(cont)))
    assert math.isclose(batched[0].loglik[0], want, abs_tol=1e-4)
    assert batched[0].pick == max(range(3), key=lambda c: batched[0].loglik[c])


def test_bad_lines_are_warned_about_and_a_mostly_bad_file_is_refused(tmp_path: Path, caplog) -> None:
    good = {"source_key": "k", "question": "q?", "choices": ["x", "y"], "answer": 1}
    path = tmp_path / "b.jsonl"
    path.write_text("\n".join([json.dumps({**good, "id": str(i)}) for i in range(3)] + ["{oops"]), "utf-8")
    with caplog.at_level("WARNING", logger="moe_adapt.eval"):
        assert load_mc_items(path, key="eval.benchmarks[0].files.ar").malformed == 1
    assert [r.getMessage() for r in caplog.records] == [
        f"eval.benchmarks[0].files.ar={str(path)!r}: skipped 1 of 4 lines as malformed "
        "(first: line 4: invalid JSON (Expecting property name enclosed in double quotes))"
    ]
    path.write_text("\n".join([json.dumps({**good, "id": "a"}), "x", "y"]), "utf-8")
    with pytest.raises(
        MoEAdaptError, match=r"^f='.*b.jsonl': 2 of 3 lines are malformed, more than 50% \(first: line 2"
    ):
        load_mc_items(path, key="f")
    path.write_text("x\n\n[1]\n", "utf-8")
    with pytest.raises(
        MoEAdaptError, match=r"holds no multiple-choice item: all 2 lines are malformed \(first: line 1"
    ):
        load_mc_items(path, key="f")
