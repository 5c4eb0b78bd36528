"""The one resume mechanism: a fingerprint of the settings and a marker written last.

Everything that resumes after a crash works the same way. A unit of work (a stage, a data step, a
distill phase) is a folder; it is finished when the folder holds the marker :data:`MARKER`
(``_COMPLETE.json``), written atomically (:mod:`moe_adapt.fs`) after everything else, holding the
:func:`fingerprint` of the settings it was made with and its summary. A folder without the marker is
unfinished, and the next attempt resumes or redoes it.

Two policies use it:

- **Refuse** (the runner, for stage folders in the run directory, which are results): a finished
  stage with the same fingerprint is skipped; one with another fingerprint is an error naming the
  settings that changed (:func:`changed`), never silently replaced.
- **Wipe and restart** (:class:`StepCache`, for scratch under ``<run_dir>/.work``: data steps,
  distill phases and their accuracy checks, generate shards): a cache remembers the fingerprint of
  its settings in a stamp file; when they changed, it empties itself. A unit whose marker has another
  fingerprint is removed and done again.

A fingerprint is the first 16 hex digits of the SHA-256 of the object's sorted-key JSON, so it is the
same in every process and on every machine, and a run directory made by an earlier version (same
settings, same function) is still recognised.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from moe_adapt.fs import atomic_write_json

log = logging.getLogger(__name__)

MARKER = "_COMPLETE.json"
"""The file that says a unit of work is finished; written last, atomically."""

STAMP = "_SETTINGS.json"
"""The file in which a :class:`StepCache` keeps the fingerprint of its settings (by default)."""


def fingerprint(obj: Any) -> str:
    """16 hex digits that change when ``obj`` (anything JSON can hold; other values by ``str``) does."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker record of ``folder``, or None when the folder is not finished.

    A marker that cannot be read as a JSON object (truncated or overwritten: the marker is written last
    and atomically, so a damaged one was not written by us) is not trusted: it is logged as a warning
    naming the file and the folder counts as not finished, so its work is done again.
    """
    path = folder / MARKER
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # ValueError: bad JSON or bad UTF-8
        log.warning("%s is damaged (%s): treating %s as not finished", path, err, folder)
        return None
    if not isinstance(record, dict):
        log.warning("%s is damaged (not a JSON object): treating %s as not finished", path, folder)
        return None
    return record


def write_marker(folder: Path, record: dict[str, Any]) -> Path:
    """Mark ``folder`` finished with ``record`` (which holds at least ``fingerprint`` and ``summary``);
    call it after everything else in the folder is written."""
    return atomic_write_json(folder / MARKER, record)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


def changed(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``"a.b: OLD -> NEW"`` for every (dotted) setting that differs between ``old`` and ``new``, sorted."""
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


class StepCache:
    """Finished units of work under ``root``, each a folder ``root/<name>`` with its :data:`MARKER`.

    ``settings`` are what every unit depends on: their fingerprint is kept in ``root/<stamp>``, and
    when it differs from the last attempt's, ``root`` is emptied (``what`` names the cache in the log).
    With ``settings=None`` nothing is stamped and every unit carries its own fingerprint (passed to
    :meth:`done` and :meth:`mark`). ``extra`` is written into the stamp beside the fingerprint.
    """

    def __init__(
        self,
        root: Path,
        settings: Any,
        *,
        what: str,
        stamp: str = STAMP,
        extra: dict[str, Any] | None = None,
    ):
        self.root = root
        self.what = what
        self.fingerprint = None if settings is None else fingerprint(settings)
        if self.fingerprint is not None:
            path = root / stamp
            if path.is_file():
                try:
                    old = json.loads(path.read_text(encoding="utf-8")).get("fingerprint")
                except (OSError, ValueError, AttributeError) as err:  # damaged: settings unknown
                    log.warning("%s: %s is damaged (%s)", what, path, err)
                    old = None
                if old != self.fingerprint:
                    log.warning("%s: settings changed since %s was started; starting over", what, root)
                    shutil.rmtree(root)
            root.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, {"fingerprint": self.fingerprint, **(extra or {})})
        else:
            root.mkdir(parents=True, exist_ok=True)

    def folder(self, name: str) -> Path:
        """The unit's folder, created if needed."""
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def done(self, name: str, fingerprint: str | None = None) -> dict[str, Any] | None:
        """The summary of unit ``name`` if it finished with this fingerprint (the cache's by default);
        None if it did not finish. A unit finished with another fingerprint is removed first."""
        expected = fingerprint or self.fingerprint
        record = read_marker(self.root / name)
        if record is None:
            return None
        if record.get("fingerprint") != expected:
            shutil.rmtree(self.root / name)
            return None
        summary: dict[str, Any] = record.get("summary", {})
        return summary

    def mark(self, name: str, summary: dict[str, Any], fingerprint: str | None = None) -> None:
        """Record unit ``name`` as finished with ``summary``; call it once its folder is complete."""
        write_marker(
            self.folder(name),
            {"unit": name, "fingerprint": fingerprint or self.fingerprint, "summary": summary},
        )
