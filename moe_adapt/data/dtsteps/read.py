"""The first step of the data stage: :class:`ReadSources`, each task's share of every source."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datatrove.data import Document, DocumentsPipeline

from moe_adapt.data.config import SourceConfig
from moe_adapt.data.dtsteps.base import SOURCE_SHIFT, DocStep, write_stats
from moe_adapt.data.jsonl import ReadStats, read_range
from moe_adapt.data.steps import StepStats, open_dataset


def source_ranges(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """The part ``[start, end)`` of ``size`` items (bytes or rows) task ``rank`` of ``world_size`` reads."""
    return size * rank // world_size, size * (rank + 1) // world_size


class ReadSources(DocStep):
    """Read this task's share of every source in order: a byte range of each JSONL file (a line
    belongs to the task its first byte falls in), a contiguous row range of each Parquet file or
    saved dataset. A source with ``max_docs`` is read by task 0 alone (its first documents).
    Bad lines are counted per source (``bad_lines``) and skipped."""

    def __init__(self, root: str, sources: list[SourceConfig]):
        super().__init__("read", root)
        self.sources = sources

    def _rows(self, si: int, src: SourceConfig, rank: int, world: int, rs: ReadStats) -> Iterator[Any]:
        path = Path(src.path)
        if src.max_docs is not None:
            if rank != 0:
                return
            world, rank = 1, 0
        if src.format == "jsonl":
            start, end = source_ranges(path.stat().st_size, rank, world)
            yield from read_range(path, start, end, text_key=src.text_key, stats=rs)
            return
        ds = open_dataset(src, f"data.sources[{si}]")
        start, end = source_ranges(len(ds), rank, world)
        for i, row in zip(range(start, end), ds.select(range(start, end)), strict=True):
            text = row.get(src.text_key)
            if isinstance(text, str) and text.strip():
                yield i, row

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        st = StepStats("read")
        bad: dict[str, dict[str, int]] = {}
        own = 0.0  # time spent reading, not in the steps downstream
        for si, src in enumerate(self.sources):
            rs = ReadStats()
            rows = self._rows(si, src, rank, world_size, rs)
            n = 0
            while True:
                t0 = time.perf_counter()
                item = next(rows, None)
                own += time.perf_counter() - t0
                if item is None:
                    break
                offset, row = item
                if src.max_docs is not None and n >= src.max_docs:
                    break
                text = row[src.text_key]
                lang = src.lang if src.lang != "auto" else row.get("lang", "auto")
                rid = row.get("id", f"@{offset}")
                doc = Document(
                    text=text,
                    id=f"{src.name}/{rid}",
                    metadata={
                        "ordinal": si << SOURCE_SHIFT | offset,
                        "lang": lang,
                        "source": src.name,
                        "role": src.role,
                    },
                )
                st.docs_out[str(lang)] += 1
                st.chars_out[str(lang)] += len(text)
                self.stat_update("forwarded")
                n += 1
                yield doc
            bad[src.name] = rs.as_dict()
        st.seconds = own
        st.docs_in, st.chars_in = Counter(st.docs_out), Counter(st.chars_out)
        write_stats(self.root, "read", rank, st, {"bad_lines": bad})
