"""What the data stage's datatrove steps share: :class:`DocStep` (a per-document step that counts
documents and characters in and out per language, drop reasons and its own time into
``<root>/stats/<name>/<rank>.json``), the per-task file names and atomic writes, and
:class:`DocWriter` / :class:`DocReader`, which keep a task's documents between executor stages."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from moe_adapt.data.steps import StepStats
from moe_adapt.fs import atomic_open, atomic_write_json

SOURCE_SHIFT = 48
"""An ordinal is ``source index << SOURCE_SHIFT | offset``: sources up to 256 TiB each."""


def rank_file(folder: Path, rank: int, suffix: str) -> Path:
    """Task ``rank``'s file in ``folder``: ``<folder>/<rank:05d><suffix>``."""
    return folder / f"{rank:05d}{suffix}"


def _atomic_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_npy(path: Path, array: np.ndarray) -> None:
    """Write ``array`` as ``.npy`` (no pickles), atomically."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    _atomic_bytes(path, buf.getvalue())


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Write ``arrays`` as one ``.npz``, atomically."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    _atomic_bytes(path, buf.getvalue())


class DocStep(PipelineStep):
    """A per-document step: counts documents and characters in and out per language, drop reasons
    and its own time (not its inputs'), and writes them to ``<root>/stats/<name>/<rank>.json``."""

    type = "moe_adapt"

    def __init__(self, name: str, root: str):
        self.name = name
        super().__init__()
        self.root = Path(root)

    def start(self, rank: int, world_size: int) -> None:
        """Called once at the start of a task."""

    def process(self, doc: Document, st: StepStats) -> Document | None:
        """The step's work on one document: the document to pass on, or None to drop it (after
        ``st.drop(lang, reason)``)."""
        return doc

    def finish(self, rank: int, st: StepStats) -> dict[str, Any]:
        """Called once at the end of a task; returns extra fields for the stats file."""
        return {}

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        st = StepStats(self.name)
        self.start(rank, world_size)
        own = 0.0
        for doc in data or ():
            lang = str(doc.metadata["lang"])
            st.docs_in[lang] += 1
            st.chars_in[lang] += len(doc.text)
            self.stat_update("total")
            t0 = time.perf_counter()
            out = self.process(doc, st)
            own += time.perf_counter() - t0
            if out is None:
                self.stat_update("dropped")
                continue
            lang = str(out.metadata["lang"])
            st.docs_out[lang] += 1
            st.chars_out[lang] += len(out.text)
            self.stat_update("forwarded")
            yield out
        t0 = time.perf_counter()
        extra = self.finish(rank, st)
        st.seconds = own + time.perf_counter() - t0
        write_stats(self.root, self.name, rank, st, extra)


def write_stats(root: Path, name: str, rank: int, st: StepStats, extra: dict[str, Any]) -> None:
    """Write a step's counts for task ``rank`` (and ``extra``) to ``<root>/stats/<name>/<rank>.json``."""
    record = {
        "seconds": st.seconds,
        "docs_in": dict(st.docs_in),
        "docs_out": dict(st.docs_out),
        "chars_in": dict(st.chars_in),
        "chars_out": dict(st.chars_out),
        "reasons": {k: dict(v) for k, v in st.reasons.items()},
        **extra,
    }
    atomic_write_json(rank_file(root / "stats" / name, rank, ".json"), record)


# ------------------------------------------------------------------------------ documents on disk
class DocWriter(PipelineStep):
    """Write the task's documents to ``<folder>/<rank>.jsonl`` (``{text, id, metadata}`` a line),
    renamed into place when the task's input is exhausted. The last step of an executor stage."""

    type = "moe_adapt"
    name = "write documents"

    def __init__(self, folder: str):
        super().__init__()
        self.folder = Path(folder)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        with atomic_open(rank_file(self.folder, rank, ".jsonl")) as fh:
            for doc in data or ():
                fh.write(
                    json.dumps({"text": doc.text, "id": doc.id, "metadata": doc.metadata}, ensure_ascii=False)
                )
                fh.write("\n")
                self.stat_update("written")
        return
        yield


class DocReader(PipelineStep):
    """Read back the documents :class:`DocWriter` wrote for this task, in order."""

    type = "moe_adapt"
    name = "read documents"

    def __init__(self, folder: str):
        super().__init__()
        self.folder = Path(folder)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        with open(rank_file(self.folder, rank, ".jsonl"), encoding="utf-8") as fh:
            for line in fh:
                rec = json.loads(line)
                self.stat_update("read")
                yield Document(text=rec["text"], id=rec["id"], metadata=rec["metadata"])
