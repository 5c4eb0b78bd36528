"""Decontamination steps: per task :class:`DecontamCountStep` (document frequencies of the
benchmark n-grams), once for the corpus :class:`CommonNgramsStep`, then per task
:class:`DecontamMatchStep` (matches removed, the contamination report's counts)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from moe_adapt.data.clean import clean_text
from moe_adapt.data.config import DataConfig
from moe_adapt.data.dtsteps.base import DocStep, rank_file
from moe_adapt.data.steps import StepStats
from moe_adapt.fs import atomic_write_json


def benchmark_index(cfg: DataConfig, bench_files: dict[str, str]) -> tuple[Any, dict[str, int]]:
    """The n-gram index of the benchmarks (cleaned like the training text) and their item counts."""
    from moe_adapt.data.decontam import _build_index, load_benchmark

    benchmarks = {
        n: [replace(item, text=clean_text(item.text, cfg.clean)) for item in load_benchmark(p)]
        for n, p in bench_files.items()
    }
    return _build_index(benchmarks, cfg.decontam.n), {n: len(items) for n, items in benchmarks.items()}


MATCHED = "decontam_matched"
"""Metadata key :class:`DecontamCountStep` leaves on each document for :class:`DecontamMatchStep`:
``[words, *indexed n-gram hashes found]``, so that pass 2 does not normalise the text again."""


class DecontamCountStep(DocStep):
    """Pass 1 of decontamination, per task: in how many documents each benchmark n-gram occurs;
    written to ``<root>/df/<rank>.json``. Each document keeps its word count and the indexed
    n-grams it holds in ``metadata[MATCHED]`` for pass 2."""

    def __init__(self, root: str, cfg: DataConfig, bench_files: dict[str, str]):
        super().__init__("decontam_count", root)
        self.cfg, self.bench_files = cfg, bench_files
        self.df: Counter[int] = Counter()
        self.n_docs = 0
        self.index: Any = None

    def start(self, rank: int, world_size: int) -> None:
        self.index, _ = benchmark_index(self.cfg, self.bench_files)
        self.df, self.n_docs = Counter(), 0

    def process(self, doc: Document, st: StepStats) -> Document | None:
        from moe_adapt.data.decontam import match_words

        self.n_docs += 1
        words = match_words(doc.text)
        hits = self.index.hits(words)
        self.df.update(hits)
        doc.metadata[MATCHED] = [len(words), *hits]  # in the set's order, as pass 2 iterated it
        return doc

    def finish(self, rank: int, st: StepStats) -> dict[str, Any]:
        atomic_write_json(
            rank_file(self.root / "df", rank, ".json"),
            {"docs": self.n_docs, "df": sorted(self.df.items())},
        )
        self.index = None  # not kept on the step: datatrove writes the steps of a pipeline to JSON
        return {}


class CommonNgramsStep(PipelineStep):
    """Whole corpus: the benchmark n-grams too common to count (in more than ``max_doc_freq`` of the
    documents and at least ``min_common_docs``), from the tasks' document frequencies."""

    type = "moe_adapt"
    name = "common n-grams"

    def __init__(self, root: str, tasks: int, cfg: DataConfig):
        super().__init__()
        self.root, self.tasks, self.cfg = Path(root), tasks, cfg

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        df: Counter[int] = Counter()
        n_docs = 0
        for r in range(self.tasks):
            rec = json.loads(rank_file(self.root / "df", r, ".json").read_text())
            n_docs += rec["docs"]
            df.update(dict((int(g), int(c)) for g, c in rec["df"]))
        d = self.cfg.decontam
        threshold = max(d.max_doc_freq * n_docs, d.min_common_docs - 1)
        common = sorted(g for g, c in df.items() if c > threshold)
        atomic_write_json(
            self.root / "common.json", {"docs": n_docs, "threshold": threshold, "common": common}
        )
        return
        yield


_MAX_EXAMPLES = 5
"""Example matches kept per benchmark in the contamination report (as :mod:`moe_adapt.data.decontam`)."""


class DecontamMatchStep(DocStep):
    """Pass 2 of decontamination: a document matching a benchmark item (share of the item's
    non-common n-grams >= ``min_overlap``, or any with ``any_hit``) is removed (``remove: true``) as
    ``benchmark_overlap``; per benchmark the task counts matches, words and tokens removed and keeps
    its first examples (``<root>/stats/decontam/<rank>.json``)."""

    def __init__(self, root: str, cfg: DataConfig, bench_files: dict[str, str], tokenizer: str):
        super().__init__("decontam", root)
        self.cfg, self.bench_files, self.tokenizer = cfg, bench_files, tokenizer
        self.index: Any = None
        self.effective: dict[Any, set[int]] = {}
        self.common: set[int] = set()
        self.per: dict[str, dict[str, Any]] = {}
        self.words_total = 0
        self.tok: Any = None

    def start(self, rank: int, world_size: int) -> None:
        from moe_adapt.data.shards import load_tokenizer

        self.index, _ = benchmark_index(self.cfg, self.bench_files)
        self.common = set(json.loads((self.root / "common.json").read_text())["common"])
        self.effective = {k: g - self.common for k, g in self.index.item_grams.items()}
        self.per = {
            n: {"docs_matched": 0, "docs_removed": 0, "words_removed": 0, "tokens_removed": 0, "examples": []}
            for n in self.bench_files
        }
        self.words_total = 0
        self.tok = load_tokenizer(self.tokenizer)

    def process(self, doc: Document, st: StepStats) -> Document | None:
        from moe_adapt.data.decontam import match_words

        d = self.cfg.decontam
        found = doc.metadata.pop(MATCHED, None)  # pass 1's words and n-grams, not kept downstream
        if found is None:  # the step used without DecontamCountStep before it
            words = match_words(doc.text)
            found = [len(words), *self.index.hits(words)]
        n_words = int(found[0])
        self.words_total += n_words
        hits: Counter[tuple[str, int]] = Counter()
        for g in found[1:]:
            if g not in self.common:
                hits.update(self.index.postings[g])
        matched: dict[str, tuple[str, float]] = {}
        for key, count in hits.items():
            share = count / len(self.effective[key])
            if d.any_hit or share >= d.min_overlap:
                best = matched.get(key[0])
                if best is None or share > best[1]:
                    matched[key[0]] = (self.index.item_ids[key], share)
        if not matched:
            return doc
        ordinal = int(doc.metadata["ordinal"])
        for j, (name, (item_id, share)) in enumerate(sorted(matched.items())):
            entry = self.per[name]
            entry["docs_matched"] += 1
            if j == 0:  # removed once, credited to its first benchmark by name
                entry["docs_removed"] += 1
                entry["words_removed"] += n_words
                entry["tokens_removed"] += len(self.tok.encode(doc.text).ids)
            if len(entry["examples"]) < _MAX_EXAMPLES:
                entry["examples"].append(
                    {"ordinal": ordinal, "doc_id": doc.id, "item_id": item_id, "overlap": round(share, 4)}
                )
        if not d.remove:
            return doc
        st.drop(str(doc.metadata["lang"]), "benchmark_overlap")
        self.stat_update("benchmark_overlap")
        return None

    def finish(self, rank: int, st: StepStats) -> dict[str, Any]:
        self.index, self.effective, self.common, self.tok = None, {}, set(), None
        return {"benchmarks": self.per, "corpus_words": self.words_total}
