from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from moe_adapt.data.decontam import (
    BenchmarkItem,
    DecontamConfig,
    decontaminate,
    decontaminate_jsonl,
    item_text,
    load_benchmark,
    match_words,
    ngram_hashes,
)
from moe_adapt.data.jsonl import read_documents
from moe_adapt.errors import MoEAdaptConfigError, MoEAdaptError

CHAIN = "حَدَّثَنَا قُتَيْبَةُ بْنُ سَعِيدٍ قَالَ حَدَّثَنَا اللَّيْثُ عَنْ نَافِعٍ عَنِ ابْنِ عُمَرَ قَالَ قَالَ رَسُولُ اللَّهِ"
LETTERS = "ابتثجحخدذرزسشصضطظعغفقكلمنهوي"


def _body(rng: random.Random, n: int = 30) -> str:
    """``n`` random 3-6 letter Arabic words: unrelated text that shares no n-gram by chance."""
    return " ".join("".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6))) for _ in range(n))


def _corpus(seed: int = 0) -> tuple[list[dict], list[BenchmarkItem], set[str]]:
    rng = random.Random(seed)
    items = [BenchmarkItem(f"q{i}", CHAIN + " " + _body(rng)) for i in range(5)]
    docs = [
        {"id": f"chain{i}", "text": CHAIN + " " + _body(rng)} for i in range(40)
    ]  # same opening, other body
    docs += [{"id": f"plain{i}", "text": _body(rng, 60)} for i in range(40)]
    planted = set()
    for i, item in enumerate(items):  # benchmark passage embedded in a longer document
        docs.insert(
            7 * i,
            {"id": f"planted{i}", "text": _body(rng, 20) + "\u200f " + item.text + " " + _body(rng, 20)},
        )
        planted.add(f"planted{i}")
    return docs, items, planted


def test_normalisation_and_stable_hashes() -> None:
    assert match_words("إِلَى المَدِينَةِ، \u200fيا أحمد!") == ["الي", "المدينه", "يا", "احمد"]
    assert match_words("Hello, WORLD") == ["hello", "world"]
    assert ngram_hashes(["a", "b", "c"], 2) == ngram_hashes(["a", "b", "c"], 2)
    assert len(ngram_hashes(["a", "b"], 3)) == 0
    assert 0xC0FFEE not in ngram_hashes(["a", "b", "c"], 1)  # 64-bit ints, not Python's salted hash


def test_planted_removed_formulaic_openings_kept(tmp_path: Path) -> None:
    docs, items, planted = _corpus()
    cfg = DecontamConfig(n=8, min_overlap=0.5, max_doc_freq=0.05)
    result, kept = decontaminate(
        lambda: docs, {"bench": items}, cfg, report_path=tmp_path / "contamination.json"
    )
    kept_ids = {d["id"] for d in kept}
    assert result.removed_ids == planted
    assert kept_ids == {d["id"] for d in docs} - planted
    bench = result.report["benchmarks"]["bench"]
    assert bench["items_indexed"] == 5 and bench["docs_removed"] == 5 and bench["docs_matched"] == 5
    assert bench["words_removed"] == sum(len(match_words(d["text"])) for d in docs if d["id"] in planted)
    assert result.report["common_ngrams_ignored"] > 0
    on_disk = json.loads((tmp_path / "contamination.json").read_text(encoding="utf-8"))
    assert on_disk == result.report
    assert [p.name for p in tmp_path.iterdir()] == ["contamination.json"]
    # The same run with single-hit matching still spares the shared chain ...
    any_hit, _ = decontaminate(
        lambda: docs, {"bench": items}, DecontamConfig(n=8, any_hit=True, max_doc_freq=0.05)
    )
    assert any_hit.removed_ids == planted
    # ... but without the document-frequency pass the chain wipes out every document that starts with it.
    naive, _ = decontaminate(
        lambda: docs, {"bench": items}, DecontamConfig(n=8, any_hit=True, max_doc_freq=1.0)
    )
    assert len(naive.removed_ids) == 45


def test_deterministic() -> None:
    docs, items, _ = _corpus(1)
    a, _ = decontaminate(lambda: docs, {"b": items}, DecontamConfig(n=6, max_doc_freq=0.05))
    b, _ = decontaminate(lambda: docs, {"b": items}, DecontamConfig(n=6, max_doc_freq=0.05))
    assert a.report == b.report


def test_load_benchmark_formats(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    mc = tmp_path / "mc.jsonl"
    rows = [
        {"id": "m1", "question": "Who wrote it?", "choices": ["A", "B wrote"], "answer": 1},
        {"text": "a free text passage"},
    ]
    mc.write_text("\n".join(json.dumps(r) for r in rows) + "\n{bad\n", encoding="utf-8")
    with caplog.at_level("WARNING", logger="moe_adapt.data.decontam"):
        items = load_benchmark(mc)
    assert [r.getMessage() for r in caplog.records] == [f"benchmark {mc}: skipped 1 of 3 lines as unreadable"]
    assert [i.id for i in items] == ["m1", "mc/t0"]
    assert items[0].text == "Who wrote it?\nB wrote"
    assert item_text({"question": "q", "choices": ["x", "y"]}) == "q\nx\ny"
    txt = tmp_path / "free.txt"
    txt.write_text("one passage\n\ntwo passage\n", encoding="utf-8")
    assert [i.text for i in load_benchmark(txt)] == ["one passage", "two passage"]
    (tmp_path / "empty.jsonl").write_text("{}\n", encoding="utf-8")
    with pytest.raises(MoEAdaptError, match="empty.jsonl"):
        load_benchmark(tmp_path / "empty.jsonl")
    with pytest.raises(MoEAdaptConfigError, match="min_overlap"):
        DecontamConfig(min_overlap=0.0)


def test_demo_benchmark_removed_from_demo_corpus(demo_dir: Path, tmp_path: Path) -> None:
    report_path = tmp_path / "contamination.json"
    result = decontaminate_jsonl(
        demo_dir / "ar.jsonl",
        tmp_path / "ar.clean.jsonl",
        {"hadith_qa_ar": demo_dir / "benchmark" / "hadith_qa_ar.jsonl"},
        DecontamConfig(n=8),
        report_path=report_path,
    )
    sources = {
        f"hadith/{json.loads(ln)['source_key']}/ar"
        for ln in Path(demo_dir / "benchmark" / "hadith_qa_ar.jsonl").read_text(encoding="utf-8").splitlines()
    }
    assert len(sources) == 50 and sources <= result.removed_ids
    kept = list(read_documents(tmp_path / "ar.clean.jsonl"))
    assert len(kept) == 1500 - len(result.removed_ids)
    assert len(result.removed_ids) < 75  # a few true cross-collection duplicates, not the narrator chains
    assert json.loads(report_path.read_text(encoding="utf-8"))["input"]["read"]["ok"] == 1500
