"""The one resume mechanism: a stable fingerprint, markers written last, a cache that starts over."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moe_adapt import fs, resume
from moe_adapt.resume import MARKER, StepCache, changed, fingerprint, read_marker, write_marker

SETTINGS = {"upcycle": {"num_experts": 16, "top_k": 2, "router": None}, "seed": 0, "model": "ü/path"}


def test_fingerprint_is_fixed_across_processes_and_versions() -> None:
    # hard-coded: run directories made by earlier versions must keep their fingerprints
    assert fingerprint(SETTINGS) == "0794bb4a217c3942"
    assert fingerprint({"b": 1, "a": 2}) == fingerprint({"a": 2, "b": 1})
    code = f"from moe_adapt.resume import fingerprint; print(fingerprint({SETTINGS!r}))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == fingerprint(SETTINGS)


def test_changed_names_every_dotted_setting_that_differs() -> None:
    new = {**SETTINGS, "upcycle": {**SETTINGS["upcycle"], "num_experts": 8}, "extra": 1}
    assert changed(SETTINGS, new) == ["extra: None -> 1", "upcycle.num_experts: 16 -> 8"]
    assert changed(SETTINGS, SETTINGS) == []


def test_marker_is_written_atomically_through_fs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert read_marker(tmp_path) is None
    calls: list[Path] = []
    real = fs.atomic_write_json

    def spy(path: Path, obj: object) -> Path:
        calls.append(Path(path))
        return real(path, obj)

    monkeypatch.setattr(resume, "atomic_write_json", spy)
    write_marker(tmp_path, {"fingerprint": "abc", "summary": {"n": 1}})
    assert calls == [tmp_path / MARKER]
    assert read_marker(tmp_path) == {"fingerprint": "abc", "summary": {"n": 1}}
    assert sorted(p.name for p in tmp_path.iterdir()) == [MARKER]  # no temporary file left


def test_step_cache_keeps_finished_units_and_starts_over_on_changed_settings(tmp_path: Path) -> None:
    root = tmp_path / "work"
    cache = StepCache(root, {"a": 1}, what="test")
    assert cache.done("one") is None
    (cache.folder("one") / "docs.jsonl").write_text("x\n")
    cache.mark("one", {"docs": 1})
    (cache.folder("two") / "partial").write_text("half")  # unfinished: no marker
    assert cache.done("two") is None and (root / "two" / "partial").is_file()

    again = StepCache(root, {"a": 1}, what="test")
    assert again.done("one") == {"docs": 1}
    assert json.loads((root / "one" / MARKER).read_text())["fingerprint"] == fingerprint({"a": 1})

    changed_ = StepCache(root, {"a": 2}, what="test")
    assert changed_.done("one") is None
    assert sorted(p.name for p in root.iterdir()) == [resume.STAMP]


def test_units_with_their_own_fingerprint_are_redone_when_it_changes(tmp_path: Path) -> None:
    cache = StepCache(tmp_path, None, what="test")
    assert not list(tmp_path.iterdir())  # nothing stamped
    cache.mark("phase", {"loss": 1.0}, "fp1")
    assert cache.done("phase", "fp1") == {"loss": 1.0}
    assert cache.done("phase", "fp2") is None
    assert not (tmp_path / "phase").exists()  # finished with other settings: removed


def test_stamp_name_and_extra_fields(tmp_path: Path) -> None:
    StepCache(tmp_path, ["s"], what="test", stamp="manifest.json", extra={"shards": 3})
    assert json.loads((tmp_path / "manifest.json").read_text()) == {
        "fingerprint": fingerprint(["s"]),
        "shards": 3,
    }


def test_resume_is_on_the_ground_floor() -> None:
    """It imports only the standard library, :mod:`moe_adapt.fs` and :mod:`moe_adapt.errors`, so every
    layer can use it."""
    import ast

    tree = ast.parse(Path(resume.__file__).read_text(encoding="utf-8"))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    ours = {m for m in imported if m.split(".")[0] == "moe_adapt"}
    assert ours <= {"moe_adapt.fs", "moe_adapt.errors"}
    assert all(m.split(".")[0] in sys.stdlib_module_names or m in ours or m == "__future__" for m in imported)


def test_a_damaged_marker_is_named_and_its_unit_is_done_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The marker is written last and atomically: one cut short was not written by us, so its folder
    counts as unfinished (issue 12)."""
    cache = StepCache(tmp_path / "work", {"a": 1}, what="test")
    cache.mark("one", {"docs": 1})
    marker = tmp_path / "work" / "one" / MARKER
    marker.write_text(marker.read_text()[:15])
    caplog.set_level("WARNING")
    assert read_marker(marker.parent) is None
    assert f"{marker} is damaged" in caplog.text
    assert cache.done("one") is None
    (marker.parent / MARKER).write_text("[1, 2]")  # valid JSON, not a record
    assert read_marker(marker.parent) is None

    stamp = tmp_path / "work" / resume.STAMP
    stamp.write_text('{"finger')
    StepCache(tmp_path / "work", {"a": 1}, what="test")  # a damaged stamp: settings unknown, start over
    assert f"{stamp} is damaged" in caplog.text
    assert not (tmp_path / "work" / "one").exists()
