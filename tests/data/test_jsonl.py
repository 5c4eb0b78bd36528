from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_adapt.data.jsonl import ReadStats, read_documents, write_documents
from moe_adapt.errors import MoEAdaptError
from moe_adapt.fs import atomic_write_json


def test_bad_lines_are_counted_and_skipped(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    good = json.dumps({"id": "a", "text": "مرحبا"}, ensure_ascii=False).encode()
    with open(path, "wb") as fh:
        fh.write(good + b"\n")
        fh.write(b"\xff\xfe not utf-8\n")
        fh.write(b"{not json\n")
        fh.write(b"[1, 2]\n")
        fh.write(b'{"id": "e", "text": "   "}\n')
        fh.write(b'{"id": "f"}\n')
        fh.write(b"\n")
        fh.write(b'{"id": "big", "text": "' + b"x" * (3 * 1024 * 1024) + b'"}\n')
        fh.write(b'{"id": "z", "text": "last"}')  # no trailing newline
    stats = ReadStats()
    docs = list(read_documents(path, stats=stats, max_line_bytes=1024 * 1024))
    assert [d["id"] for d in docs] == ["a", "z"]
    assert stats.as_dict() == {
        "lines": 9,
        "ok": 2,
        "blank": 1,
        "invalid_utf8": 1,
        "invalid_json": 2,
        "empty_text": 2,
        "too_long": 1,
    }


def test_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(MoEAdaptError, match="nope.jsonl"):
        list(read_documents(tmp_path / "nope.jsonl"))


def test_atomic_writes_leave_no_temp_files(tmp_path: Path) -> None:
    n = write_documents(tmp_path / "out" / "docs.jsonl", ({"id": i, "text": str(i)} for i in range(3)))
    atomic_write_json(tmp_path / "out" / "r.json", {"ok": True})
    assert n == 3
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["docs.jsonl", "r.json"]

    def boom():
        yield {"text": "x"}
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        write_documents(tmp_path / "out" / "docs.jsonl", boom())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["docs.jsonl", "r.json"]
    assert len((tmp_path / "out" / "docs.jsonl").read_text().splitlines()) == 3  # old file intact
