"""JSONL documents in and out: bad input is counted and skipped, outputs are written atomically.

A document is a JSON object with a non-empty string ``text``. :func:`read_documents` never
raises on a bad line: invalid UTF-8, invalid JSON, a non-object, a missing/empty ``text`` and
lines longer than ``max_line_bytes`` are skipped and counted in a :class:`ReadStats`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from moe_adapt.errors import MoEAdaptError
from moe_adapt.fs import atomic_open

DEFAULT_MAX_LINE_BYTES = 8 * 1024 * 1024
"""Lines longer than this (8 MiB) are skipped rather than parsed."""

_CHUNK = 1024 * 1024


@dataclass
class ReadStats:
    """Counts of what :func:`read_documents` kept and skipped."""

    lines: int = 0
    """Lines seen (including skipped ones)."""
    ok: int = 0
    """Documents yielded."""
    blank: int = 0
    """Empty or whitespace-only lines."""
    invalid_utf8: int = 0
    """Lines that are not valid UTF-8."""
    invalid_json: int = 0
    """Lines that are not a JSON object."""
    empty_text: int = 0
    """Objects whose ``text`` is missing, not a string, or whitespace only."""
    too_long: int = 0
    """Lines longer than ``max_line_bytes``."""

    def as_dict(self) -> dict[str, int]:
        """Return the counts as a plain dict (for reports)."""
        return asdict(self)


def read_documents(
    path: str | Path,
    *,
    text_key: str = "text",
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    stats: ReadStats | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield the JSON objects of a JSONL file that carry a non-empty string ``text_key``.

    Bad lines are skipped and counted in ``stats`` (pass your own :class:`ReadStats` to see them).
    Raises :class:`MoEAdaptError` only when the file itself cannot be opened.
    """
    for _, obj in read_range(
        path, 0, sys.maxsize, text_key=text_key, max_line_bytes=max_line_bytes, stats=stats
    ):
        yield obj


def parse_line(raw: bytes, text_key: str, stats: ReadStats) -> dict[str, Any] | None:
    """The JSON object of one raw line when it carries a non-empty string ``text_key``, else None
    with the reason counted in ``stats`` (blank, invalid UTF-8, invalid JSON, empty text)."""
    if not raw.strip():
        stats.blank += 1
        return None
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.invalid_utf8 += 1
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        stats.invalid_json += 1
        return None
    if not isinstance(obj, dict):
        stats.invalid_json += 1
        return None
    text = obj.get(text_key)
    if not isinstance(text, str) or not text.strip():
        stats.empty_text += 1
        return None
    stats.ok += 1
    return obj


def read_range(
    path: str | Path,
    start: int,
    end: int,
    *,
    text_key: str = "text",
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    stats: ReadStats | None = None,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """:func:`read_documents` over the lines of ``path`` whose first byte lies in ``[start, end)``,
    yielding ``(byte offset of the line, object)``: ``n`` tasks splitting a file at any byte offsets
    read every line exactly once between them, in file order."""
    stats = stats if stats is not None else ReadStats()
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed in finally; generator
    except OSError as err:
        raise MoEAdaptError(f"cannot read documents from {path}: {err.strerror}") from err
    try:
        pos = start
        if start > 0:  # skip the line that starts before ``start`` (its owner reads it)
            fh.seek(start - 1)
            pos = start - 1
            while True:
                part = fh.readline(_CHUNK)
                pos += len(part)
                if not part or part.endswith(b"\n"):
                    break
        while pos < end:
            line = fh.readline(max_line_bytes + 1)
            if not line:
                return
            offset, pos = pos, pos + len(line)
            stats.lines += 1
            if len(line) > max_line_bytes and not line.endswith(b"\n"):
                stats.too_long += 1
                while True:
                    rest = fh.readline(_CHUNK)
                    pos += len(rest)
                    if not rest or rest.endswith(b"\n"):
                        break
                continue
            obj = parse_line(line, text_key, stats)
            if obj is not None:
                yield offset, obj
    finally:
        fh.close()


def write_documents(path: str | Path, docs: Iterable[dict[str, Any]]) -> int:
    """Write ``docs`` as JSONL to ``path`` atomically; return the number of lines written."""
    n = 0
    with atomic_open(path) as fh:
        for doc in docs:
            fh.write(json.dumps(doc, ensure_ascii=False) + "\n")
            n += 1
    return n
