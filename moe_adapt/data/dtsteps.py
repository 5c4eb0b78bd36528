"""The data stage's steps as datatrove ``PipelineStep``s: generators over ``Document``s, one task's
share of the corpus at a time, so memory is bounded by the task and not by the corpus.

Per-document steps (run in ``data.tasks`` tasks): :class:`ReadSources` (each task reads a byte range
of every JSONL source, or a contiguous row range of a Parquet / saved dataset), :class:`CleanStep`,
:class:`LangIdStep`, :class:`QualityStep`, :class:`ExactHashStep`, :class:`SignatureStep` (datatrove's
MinHash signatures with our word tokenizer), :class:`DedupFilterStep`, :class:`DecontamCountStep`,
:class:`DecontamMatchStep`, :class:`ScoreStep`, :class:`PlanStep` (held-out split and bucket) and
:class:`ShardStep` (one ``.bin/.idx`` per task and (source, language, bucket)). :class:`DocWriter` and
:class:`DocReader` keep a task's documents between executor stages.

Whole-corpus steps (one task each; :mod:`moe_adapt.data.pipeline` chains them with ``depends=``):
:class:`DuplicatesStep` (exact-duplicate hashes merged across tasks, MinHash pairs clustered),
:class:`CommonNgramsStep` (the decontamination's document frequencies), :class:`QuantilesStep`
(held-out caps, z-scores and per-language quantiles over the whole corpus) and :class:`MergeShardsStep`
(the tasks' shards concatenated into one shard per (source, language, bucket), manifest merged).

Every document carries ``metadata["ordinal"]``: its source's position in ``data.sources`` times 2**48
plus its byte offset (JSONL) or row (Parquet) in the source, so the corpus order is the order of the
ordinals whatever the number of tasks. Every choice that depends on order (which duplicate is kept,
which documents are held out under the cap, ties between difficulty scores) follows it, so the output
is the same bytes for any number of tasks and workers.

Each step writes its counts (documents and characters in/out per language, drop reasons, its own
seconds) to ``<root>/stats/<step>/<rank>.json`` at the end of its task; datatrove's own stats
(``total``, ``forwarded``, ``dropped``, reasons) go to the executor's logging folder.
"""

from __future__ import annotations

import heapq
import io
import json
import os
import struct
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.utils.binaryio import read_tuples_from_file

from moe_adapt.data.clean import clean_text
from moe_adapt.data.config import DataConfig, SourceConfig
from moe_adapt.data.dedup import FastMinhashSignature
from moe_adapt.data.jsonl import ReadStats, read_range
from moe_adapt.data.steps import StepStats, is_heldout
from moe_adapt.errors import MoEAdaptConfigError
from moe_adapt.fs import atomic_open, atomic_write_json

SOURCE_SHIFT = 48
"""An ordinal is ``source index << SOURCE_SHIFT | offset``: sources up to 256 TiB each."""


def _rank_file(folder: Path, rank: int, suffix: str) -> Path:
    return folder / f"{rank:05d}{suffix}"


def _atomic_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _save_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    _atomic_bytes(path, buf.getvalue())


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    _atomic_bytes(path, buf.getvalue())


class _Step(PipelineStep):
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
    record = {
        "seconds": st.seconds,
        "docs_in": dict(st.docs_in),
        "docs_out": dict(st.docs_out),
        "chars_in": dict(st.chars_in),
        "chars_out": dict(st.chars_out),
        "reasons": {k: dict(v) for k, v in st.reasons.items()},
        **extra,
    }
    atomic_write_json(_rank_file(root / "stats" / name, rank, ".json"), record)


# ------------------------------------------------------------------------------------------- read
def source_ranges(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """The part ``[start, end)`` of ``size`` items (bytes or rows) task ``rank`` of ``world_size`` reads."""
    return size * rank // world_size, size * (rank + 1) // world_size


class ReadSources(_Step):
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
        import datasets

        if src.format == "parquet":
            files = sorted(str(p) for p in path.glob("*.parquet")) if path.is_dir() else [str(path)]
            ds = datasets.load_dataset("parquet", data_files=files, split="train")
        else:
            ds = datasets.load_from_disk(str(path))
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


# ------------------------------------------------------------------------------------ filter steps
class CleanStep(_Step):
    """Unicode and script normalisation (:func:`moe_adapt.data.clean.clean_text`)."""

    def __init__(self, root: str, cfg: DataConfig):
        super().__init__("clean", root)
        self.cfg = cfg.clean

    def process(self, doc: Document, st: StepStats) -> Document | None:
        text = clean_text(doc.text, self.cfg)
        if not text:
            st.drop(str(doc.metadata["lang"]), "empty_after_cleaning")
            self.stat_update("empty_after_cleaning")
            return None
        doc.text = text
        return doc


class LangIdStep(_Step):
    """Offline fastText language ID: ``lang: auto`` documents get the detected language; a declared
    language contradicted with confidence >= ``data.langid.min_score`` drops the document."""

    def __init__(self, root: str, cfg: DataConfig):
        super().__init__("langid", root)
        self.min_score = cfg.langid.min_score
        self.model: Any = None

    def start(self, rank: int, world_size: int) -> None:
        from moe_adapt.data.langid import LanguageIdentifier

        self.model = LanguageIdentifier()

    def process(self, doc: Document, st: StepStats) -> Document | None:
        lang, score = self.model.predict_one(doc.text)
        declared = doc.metadata["lang"]
        if declared == "auto":
            if lang == "und":
                st.drop("und", "language_undetermined")
                return None
            doc.metadata["lang"] = lang
        elif lang != declared and score >= self.min_score:
            st.drop(str(declared), f"detected_{lang}")
            self.stat_update(f"detected_{lang}")
            return None
        doc.metadata["lang_score"] = round(score, 4)
        return doc


class QualityStep(_Step):
    """Per-language quality rules (:mod:`moe_adapt.data.quality`, overridden by
    ``data.quality.thresholds``)."""

    def __init__(self, root: str, cfg: DataConfig):
        super().__init__("quality", root)
        self.overrides: dict[str, dict[str, Any]] = {k: dict(v) for k, v in cfg.quality.thresholds.items()}
        self.table: dict[str, Any] = {}

    def _thresholds(self, lang: str) -> Any:
        from moe_adapt.data.quality import thresholds_for

        if lang not in self.table:
            try:
                base = thresholds_for(lang)
            except MoEAdaptConfigError:
                base = None
            self.table[lang] = replace(base, **self.overrides.get(lang, {})) if base is not None else None
        return self.table[lang]

    def process(self, doc: Document, st: StepStats) -> Document | None:
        from moe_adapt.data.quality import check_quality

        lang = str(doc.metadata["lang"])
        t = self._thresholds(lang)
        if t is None:
            st.drop(lang, "no_thresholds_for_language")
            return None
        result = check_quality(doc.text, lang, t)
        if result.keep:
            return doc
        st.drop(lang, result.reason or "quality")
        self.stat_update(result.reason or "quality")
        return None


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
        with atomic_open(_rank_file(self.folder, rank, ".jsonl")) as fh:
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
        with open(_rank_file(self.folder, rank, ".jsonl"), encoding="utf-8") as fh:
            for line in fh:
                rec = json.loads(line)
                self.stat_update("read")
                yield Document(text=rec["text"], id=rec["id"], metadata=rec["metadata"])


# ------------------------------------------------------------------------------------------ dedup
_EXACT = np.dtype([("hash", "V16"), ("ordinal", "<u8"), ("idx", "<u4")])


class ExactHashStep(_Step):
    """Record each document's exact-duplicate key (:func:`moe_adapt.data.dedup.exact_key`) with its
    ordinal and its position in the task; written sorted to ``<root>/exact/<rank>.npy``."""

    def __init__(self, root: str):
        super().__init__("exact_hash", root)
        self.rows: list[tuple[bytes, int, int]] = []

    def start(self, rank: int, world_size: int) -> None:
        self.rows = []

    def process(self, doc: Document, st: StepStats) -> Document | None:
        from moe_adapt.data.dedup import exact_key

        self.rows.append((exact_key(doc.text), int(doc.metadata["ordinal"]), len(self.rows)))
        return doc

    def finish(self, rank: int, st: StepStats) -> dict[str, Any]:
        arr = np.array(self.rows, dtype=_EXACT)
        arr.sort(order=["hash", "ordinal"])
        _save_npy(_rank_file(self.root / "exact", rank, ".npy"), arr)
        self.rows = []
        return {}


class SignatureStep(FastMinhashSignature):
    """datatrove's MinHash signature step (stage 1 of 4) as a pass-through step: it also records each
    document's ordinal in ``<root>/ordinals/<rank>.npy`` (signature ``doc_idx`` -> ordinal), which
    :class:`DuplicatesStep` uses to keep the first document of each cluster."""

    type = "moe_adapt"

    def __init__(self, root: str, sig_folder: str, config: Any, tokenizer: Any):
        self.name = "minhash_signature"
        super().__init__(sig_folder, config=config, language=tokenizer)
        self.root = Path(root)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        fmt = f"<{self.config.hashes_per_bucket}{self.config.hash_config.struct_format}I"
        ordinals: list[int] = []
        files = [
            self.output_folder.open(f"bucket_{bi:03d}/{rank:05d}.minhash.sig", mode="wb")
            for bi in range(self.config.num_buckets)
        ]
        own = 0.0
        count = 0
        for doc_idx, doc in enumerate(data or ()):
            t0 = time.perf_counter()
            ordinals.append(int(doc.metadata["ordinal"]))
            shingles = self.get_shingles(doc.text)
            if shingles.size != 0:
                for f, bucket_sig in zip(files, self.get_signature(shingles), strict=True):
                    f.write(struct.pack(fmt, *bucket_sig, doc_idx))
                count += 1
            own += time.perf_counter() - t0
            self.stat_update("total")
            yield doc
        for f in files:
            f.close()
        t0 = time.perf_counter()
        dtype = np.dtype(
            [
                (f"f{i}", f"<{self.config.hash_config.struct_format}")
                for i in range(self.config.hashes_per_bucket)
            ]
            + [("doc", "<u4")]
        )
        for bi in range(self.config.num_buckets):  # sorted, as datatrove's bucket step needs
            path = f"bucket_{bi:03d}/{rank:05d}.minhash.sig"
            with self.output_folder.open(path, mode="rb") as fi:
                records = np.frombuffer(fi.read(), dtype=dtype).copy()
            if len(records) != count:
                raise ValueError(f"minhash signature file {path} holds {len(records)} records, not {count}")
            records.sort(order=dtype.names)
            with self.output_folder.open(path, mode="wb") as fo:
                fo.write(records.tobytes())
        _save_npy(_rank_file(self.root / "ordinals", rank, ".npy"), np.array(ordinals, dtype="<u8"))
        st = StepStats(self.name)
        st.seconds = own + time.perf_counter() - t0
        write_stats(self.root, self.name, rank, st, {})


_REMOVAL = np.dtype([("idx", "<u4"), ("kind", "u1")])
EXACT, NEAR = 1, 2


class DuplicatesStep(PipelineStep):
    """Whole-corpus duplicate decisions (one task): exact keys merged across tasks (the first
    document of each key in corpus order is kept), MinHash pairs (datatrove's bucket step output)
    clustered with union-find, the cluster's first document in corpus order kept (datatrove's own
    cluster step keeps its union-by-size root, which depends on how the corpus was split into tasks).
    Writes ``<root>/removals/<rank>.npy`` (positions in the task's filtered documents and why) and
    ``<root>/dedup_examples.json`` (ordinals of the first removed/kept pairs of each kind)."""

    type = "moe_adapt"
    name = "duplicates"

    def __init__(self, root: str, tasks: int, exact: bool, minhash: bool, max_examples: int):
        super().__init__()
        self.root = Path(root)
        self.tasks, self.exact, self.minhash, self.max_examples = tasks, exact, minhash, max_examples

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        t0 = time.perf_counter()
        removed: dict[tuple[int, int], int] = {}  # (rank, idx) -> kind
        examples: dict[int, list[tuple[int, int]]] = {EXACT: [], NEAR: []}  # heaps of (-removed, kept)

        def example(kind: int, removed_ord: int, kept_ord: int) -> None:
            h = examples[kind]
            if self.max_examples == 0:
                return
            if len(h) < self.max_examples:
                heapq.heappush(h, (-removed_ord, kept_ord))
            elif -h[0][0] > removed_ord:
                heapq.heapreplace(h, (-removed_ord, kept_ord))

        if self.exact:
            arrays = [  # mapped, not read: the merge holds one row per task
                np.load(_rank_file(self.root / "exact", r, ".npy"), mmap_mode="r") for r in range(self.tasks)
            ]

            def rows(r: int) -> Iterator[tuple[bytes, int, int, int]]:
                for row in arrays[r]:
                    yield bytes(row["hash"]), int(row["ordinal"]), r, int(row["idx"])

            last: bytes | None = None
            kept_ord = -1
            for h, ordinal, r, idx in heapq.merge(*(rows(r) for r in range(self.tasks))):
                if h == last:
                    removed[(r, idx)] = EXACT
                    example(EXACT, ordinal, kept_ord)
                else:
                    last, kept_ord = h, ordinal
            del arrays
        if self.minhash:
            parent: dict[tuple[int, int], tuple[int, int]] = {}

            def find(x: tuple[int, int]) -> tuple[int, int]:
                root = x
                while parent.get(root, root) != root:
                    root = parent[root]
                while x != root:
                    parent[x], x = root, parent[x]
                return root

            for dups in sorted((self.root / "buckets").glob("*.dups")):
                with open(dups, "rb") as fh:
                    for f1, d1, f2, d2 in read_tuples_from_file(fh, "4I", lines_to_buffer=1000):
                        a, b = find((f1, d1)), find((f2, d2))
                        parent.setdefault(a, a)
                        parent.setdefault(b, b)
                        if a != b:
                            parent[max(a, b)] = min(a, b)
            ords = {
                r: np.load(_rank_file(self.root / "ordinals", r, ".npy"), mmap_mode="r")
                for r in range(self.tasks)
            }
            clusters: dict[tuple[int, int], list[tuple[int, tuple[int, int]]]] = {}
            for node in parent:
                clusters.setdefault(find(node), []).append((int(ords[node[0]][node[1]]), node))
            for members in clusters.values():
                members.sort()
                first = members[0][0]
                for ordinal, node in members[1:]:
                    if node not in removed:
                        removed[node] = NEAR
                        example(NEAR, ordinal, first)
        per_rank: dict[int, list[tuple[int, int]]] = {r: [] for r in range(self.tasks)}
        for (r, idx), kind in removed.items():
            per_rank[r].append((idx, kind))
        for r, items in per_rank.items():
            arr = np.array(sorted(items), dtype=_REMOVAL)
            _save_npy(_rank_file(self.root / "removals", r, ".npy"), arr)
        pairs = [
            {"kind": "exact" if kind == EXACT else "near", "removed": -neg, "kept": kept}
            for kind in (EXACT, NEAR)
            for neg, kept in sorted(examples[kind], reverse=True)
        ]
        atomic_write_json(self.root / "dedup_examples.json", {"pairs": pairs})
        self.stat_update("removed", value=len(removed))
        atomic_write_json(self.root / "stats" / "duplicates.json", {"seconds": time.perf_counter() - t0})
        return
        yield


class DedupFilterStep(_Step):
    """Drop the documents :class:`DuplicatesStep` chose (reasons ``exact_duplicate``,
    ``near_duplicate``); keep the id and text start of the documents in the reported examples."""

    def __init__(self, root: str):
        super().__init__("dedup", root)
        self.remove: dict[int, int] = {}
        self.wanted: set[int] = set()
        self.snippets: dict[int, dict[str, Any]] = {}
        self.idx = 0

    def start(self, rank: int, world_size: int) -> None:
        arr = np.load(_rank_file(self.root / "removals", rank, ".npy"))
        self.remove = {int(i): int(k) for i, k in zip(arr["idx"], arr["kind"], strict=True)}
        pairs = json.loads((self.root / "dedup_examples.json").read_text())["pairs"]
        self.wanted = {p["removed"] for p in pairs} | {p["kept"] for p in pairs}
        self.snippets = {}
        self.idx = 0

    def process(self, doc: Document, st: StepStats) -> Document | None:
        idx, self.idx = self.idx, self.idx + 1
        ordinal = int(doc.metadata["ordinal"])
        if ordinal in self.wanted:
            self.snippets[ordinal] = {"id": doc.id, "lang": doc.metadata["lang"], "text": doc.text[:160]}
        kind = self.remove.get(idx)
        if kind is None:
            return doc
        reason = "exact_duplicate" if kind == EXACT else "near_duplicate"
        st.drop(str(doc.metadata["lang"]), reason)
        self.stat_update(reason)
        return None

    def finish(self, rank: int, st: StepStats) -> dict[str, Any]:
        return {"snippets": {str(k): v for k, v in self.snippets.items()}}


# --------------------------------------------------------------------------------------- decontam
def benchmark_index(cfg: DataConfig, bench_files: dict[str, str]) -> tuple[Any, dict[str, int]]:
    """The n-gram index of the benchmarks (cleaned like the training text) and their item counts."""
    from moe_adapt.data.decontam import _build_index, load_benchmark

    benchmarks = {
        n: [replace(item, text=clean_text(item.text, cfg.clean)) for item in load_benchmark(p)]
        for n, p in bench_files.items()
    }
    return _build_index(benchmarks, cfg.decontam.n), {n: len(items) for n, items in benchmarks.items()}


class DecontamCountStep(_Step):
    """Pass 1 of decontamination, per task: in how many documents each benchmark n-gram occurs;
    written to ``<root>/df/<rank>.json``."""

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
        self.df.update(self.index.hits(match_words(doc.text)))
        return doc

    def finish(self, rank: int, st: StepStats) -> dict[str, Any]:
        atomic_write_json(
            _rank_file(self.root / "df", rank, ".json"),
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
            rec = json.loads(_rank_file(self.root / "df", r, ".json").read_text())
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


class DecontamMatchStep(_Step):
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
        words = match_words(doc.text)
        self.words_total += len(words)
        hits: Counter[tuple[str, int]] = Counter()
        for g in self.index.hits(words):
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
                entry["words_removed"] += len(words)
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


# ------------------------------------------------------------------------- split, scores, buckets
class ScoreStep(_Step):
    """Record, per document in task order, what the whole-corpus :class:`QuantilesStep` needs: the
    ordinal, the (source, language) group, whether its id puts it in the held-out candidates, and
    the raw value of each weighted difficulty scorer (``<root>/scores/<rank>.npz``)."""

    def __init__(self, root: str, cfg: DataConfig):
        super().__init__("score", root)
        self.fraction = cfg.heldout_fraction
        self.weights = dict(cfg.difficulty.weights)
        self.reference_model = cfg.difficulty.reference_model
        if self.reference_model:
            self.weights.setdefault("perplexity", 1.0)
        self.rows: dict[str, list[Any]] = {}
        self.scorers: dict[str, Any] = {}

    def start(self, rank: int, world_size: int) -> None:
        from moe_adapt.data.difficulty import SCORERS, perplexity_scorer

        self.scorers = dict(SCORERS)
        if self.reference_model:
            self.scorers["perplexity"] = perplexity_scorer(self.reference_model)
        unknown = sorted(set(self.weights) - set(self.scorers))
        if unknown:
            raise MoEAdaptConfigError(
                f"difficulty.weights has unknown scorer(s) {', '.join(unknown)}; "
                f"available: {', '.join(sorted(self.scorers))}"
            )
        self.rows = {k: [] for k in ("ordinal", "source", "lang", "candidate", *self.weights)}

    def process(self, doc: Document, st: StepStats) -> Document | None:
        self.rows["ordinal"].append(int(doc.metadata["ordinal"]))
        self.rows["source"].append(str(doc.metadata["source"]))
        self.rows["lang"].append(str(doc.metadata["lang"]))
        self.rows["candidate"].append(is_heldout({"id": doc.id}, self.fraction))
        for name, weight in self.weights.items():
            self.rows[name].append(self.scorers[name](doc.text) if weight != 0 else 0.0)
        return doc

    def finish(self, rank: int, st: StepStats) -> dict[str, Any]:
        arrays = {
            "ordinal": np.array(self.rows["ordinal"], dtype="<u8"),
            "source": np.array(self.rows["source"], dtype=str),
            "lang": np.array(self.rows["lang"], dtype=str),
            "candidate": np.array(self.rows["candidate"], dtype=bool),
            **{f"score_{n}": np.array(self.rows[n], dtype=np.float64) for n in self.weights},
        }
        _save_npz(_rank_file(self.root / "scores", rank, ".npz"), **arrays)
        self.rows = {}
        return {}


class QuantilesStep(PipelineStep):
    """Whole corpus, in corpus order: the held-out documents (candidates up to
    ``heldout_max_docs`` per (source, language)), the z-scores of each scorer over the training
    documents, their weighted sum and the per-language quantile buckets (ties by corpus order).
    Writes ``<root>/plan/<rank>.npz`` (held, difficulty, bucket per document of each task) and
    ``<root>/stats/buckets.json``. Holds 8 bytes per scorer and ~30 per document of the corpus."""

    type = "moe_adapt"
    name = "quantiles"

    def __init__(self, root: str, tasks: int, cfg: DataConfig):
        super().__init__()
        self.root, self.tasks, self.cfg = Path(root), tasks, cfg

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        t0 = time.perf_counter()
        parts = [dict(np.load(_rank_file(self.root / "scores", r, ".npz"))) for r in range(self.tasks)]
        sizes = [len(p["ordinal"]) for p in parts]
        cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        order = np.argsort(cat["ordinal"], kind="stable")  # corpus order
        n = len(order)
        held = np.zeros(n, dtype=bool)  # in corpus order
        cap = self.cfg.heldout_max_docs
        counts: Counter[tuple[str, str]] = Counter()
        src, lang, cand = cat["source"][order], cat["lang"][order], cat["candidate"][order]
        for i in np.flatnonzero(cand):
            group = (str(src[i]), str(lang[i]))
            if counts[group] < cap:
                counts[group] += 1
                held[i] = True
        train = np.flatnonzero(~held)
        total = np.zeros(len(train))
        weights = dict(self.cfg.difficulty.weights)
        if self.cfg.difficulty.reference_model:
            weights.setdefault("perplexity", 1.0)
        for name, weight in weights.items():
            if weight == 0:
                continue
            values = cat[f"score_{name}"][order][train]
            std = values.std()
            z = (values - values.mean()) / std if std > 0 else np.zeros_like(values)
            total += weight * z
        k = self.cfg.difficulty.buckets
        buckets = np.zeros(len(train), dtype=np.int64)
        train_lang = lang[train]
        table: dict[str, list[int]] = {}
        for lg in sorted(set(train_lang.tolist())):
            idx = np.flatnonzero(train_lang == lg)
            ranked = idx[np.lexsort((idx, total[idx]))]
            m = len(ranked)
            buckets[ranked] = np.minimum(np.arange(m) * k // m, k - 1)
            present = Counter(buckets[idx].tolist())
            table[lg] = [present[b] for b in sorted(present)]
        difficulty = np.zeros(n)
        bucket = np.zeros(n, dtype=np.int64)
        difficulty[train] = total
        bucket[train] = buckets
        # back to each task's order
        inverse = np.empty(n, dtype=np.int64)
        inverse[order] = np.arange(n)
        start = 0
        for r, size in enumerate(sizes):
            pos = inverse[start : start + size]
            start += size
            plan = {"held": held[pos], "difficulty": difficulty[pos], "bucket": bucket[pos]}
            _save_npz(_rank_file(self.root / "plan", r, ".npz"), **plan)
        atomic_write_json(
            self.root / "stats" / "buckets.json",
            {
                "seconds": round(time.perf_counter() - t0, 3),
                "buckets": k,
                "per_language": table,
                "heldout_documents": int(held.sum()),
            },
        )
        return
        yield


class ShardStep(_Step):
    """Tokenize the task's documents into ``<root>/shards/<rank>/{train,heldout}``: one ``.bin/.idx``
    per (source, language, bucket), held-out documents in bucket 0, as :class:`QuantilesStep` planned."""

    def __init__(self, root: str, tokenizer: str, eod_token: str | None, batch_size: int):
        super().__init__("shards", root)
        self.tokenizer, self.eod_token, self.batch_size = tokenizer, eod_token, batch_size
        self.sinks: dict[str, Any] = {}
        self.plan: dict[str, np.ndarray] = {}
        self.idx = 0

    def start(self, rank: int, world_size: int) -> None:
        from moe_adapt.data.shards import ShardConfig, ShardSink

        cfg = ShardConfig(eod_token=self.eod_token, batch_size=self.batch_size)
        folder = self.root / "shards" / f"{rank:05d}"
        self.sinks = {s: ShardSink(self.tokenizer, folder / s, cfg) for s in ("train", "heldout")}
        self.plan = dict(np.load(_rank_file(self.root / "plan", rank, ".npz")))
        self.idx = 0

    def process(self, doc: Document, st: StepStats) -> Document | None:
        i, self.idx = self.idx, self.idx + 1
        rec = {"text": doc.text, "source": doc.metadata["source"], "lang": doc.metadata["lang"]}
        if self.plan["held"][i]:
            self.sinks["heldout"].add(rec)
        else:
            self.sinks["train"].add({**rec, "bucket": int(self.plan["bucket"][i])})
        return doc

    def finish(self, rank: int, st: StepStats) -> dict[str, Any]:
        for sink in self.sinks.values():
            sink.close()
        self.sinks = {}
        return {}


class MergeShardsStep(PipelineStep):
    """Whole corpus: the tasks' shards concatenated, in task order (corpus order), into
    ``<root>/merged/{shards,heldout}`` with one manifest each naming every shard's role."""

    type = "moe_adapt"
    name = "merge shards"

    def __init__(self, root: str, tasks: int, roles: dict[str, str]):
        super().__init__()
        self.root, self.tasks, self.roles = Path(root), tasks, roles

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from moe_adapt.data.shards import merge_shards

        t0 = time.perf_counter()
        merged = self.root / "merged"
        summary: dict[str, Any] = {}
        for split, folder in (("train", "shards"), ("heldout", "heldout")):
            parts = [self.root / "shards" / f"{r:05d}" / split for r in range(self.tasks)]
            manifest = merge_shards(parts, merged / folder)
            if manifest is not None:
                for shard in manifest.get("shards", []):
                    shard["role"] = self.roles.get(shard["source"], "other")
                atomic_write_json(merged / folder / "manifest.json", manifest)
            summary[split] = manifest
        atomic_write_json(self.root / "stats" / "merge.json", {"seconds": time.perf_counter() - t0})
        return
        yield
