"""Deduplication steps: per task :class:`ExactHashStep` and :class:`SignatureStep` (datatrove's
MinHash signatures), then once for the corpus :class:`DuplicatesStep` (exact keys merged, MinHash
pairs clustered), then per task :class:`DedupFilterStep`."""

from __future__ import annotations

import heapq
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.utils.binaryio import read_tuples_from_file

from moe_adapt.data.dtsteps.base import DocStep, rank_file, save_npy, write_stats
from moe_adapt.data.minhash import FastMinhashSignature
from moe_adapt.data.steps import StepStats
from moe_adapt.fs import atomic_write_json

_EXACT = np.dtype([("hash", "V16"), ("ordinal", "<u8"), ("idx", "<u4")])


class ExactHashStep(DocStep):
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
        save_npy(rank_file(self.root / "exact", rank, ".npy"), arr)
        self.rows = []
        return {}


_SIGNATURE_DOCS = 256
"""Documents whose signatures :class:`SignatureStep` computes and writes at once (their shingles
are held meanwhile: ~60 per document on the demo corpus, 8 bytes each)."""


class SignatureStep(FastMinhashSignature):
    """datatrove's MinHash signature step (stage 1 of 4) as a pass-through step: it also records each
    document's ordinal in ``<root>/ordinals/<rank>.npy`` (signature ``doc_idx`` -> ordinal), which
    :class:`DuplicatesStep` uses to keep the first document of each cluster. Signatures are computed
    :data:`_SIGNATURE_DOCS` documents at a time (:meth:`FastMinhashSignature.signatures`) and each
    bucket file gets datatrove's records (``hashes_per_bucket`` hashes, then the document index),
    sorted at the end of the task as datatrove's bucket step needs."""

    type = "moe_adapt"

    def __init__(self, root: str, sig_folder: str, config: Any, tokenizer: Any):
        self.name = "minhash_signature"
        super().__init__(sig_folder, config=config, language=tokenizer)
        self.root = Path(root)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        h, buckets = self.config.hashes_per_bucket, self.config.num_buckets
        fmt = f"<{self.config.hash_config.struct_format}"
        dtype = np.dtype([(f"f{i}", fmt) for i in range(h)] + [("doc", "<u4")])  # datatrove's record
        ordinals: list[int] = []
        files = [
            self.output_folder.open(f"bucket_{bi:03d}/{rank:05d}.minhash.sig", mode="wb")
            for bi in range(buckets)
        ]
        pending: list[np.ndarray] = []  # shingles of documents whose signatures are not written yet
        pending_idx: list[int] = []

        def flush() -> None:
            sigs = self.signatures(pending)  # (documents, buckets * h), bucket-major
            records = np.empty(len(pending), dtype=dtype)
            records["doc"] = pending_idx
            for bi, f in enumerate(files):
                for i in range(h):
                    records[f"f{i}"] = sigs[:, bi * h + i]
                f.write(records.tobytes())
            pending.clear()
            pending_idx.clear()

        own = 0.0
        count = 0
        for doc_idx, doc in enumerate(data or ()):
            t0 = time.perf_counter()
            ordinals.append(int(doc.metadata["ordinal"]))
            shingles = self.get_shingles(doc.text)
            if shingles.size != 0:
                pending.append(shingles)
                pending_idx.append(doc_idx)
                count += 1
                if len(pending) == _SIGNATURE_DOCS:
                    flush()
            own += time.perf_counter() - t0
            self.stat_update("total")
            yield doc
        t0 = time.perf_counter()
        if pending:
            flush()
        for f in files:
            f.close()
        for bi in range(buckets):  # sorted, as datatrove's bucket step needs
            path = f"bucket_{bi:03d}/{rank:05d}.minhash.sig"
            with self.output_folder.open(path, mode="rb") as fi:
                records = np.frombuffer(fi.read(), dtype=dtype).copy()
            if len(records) != count:
                raise ValueError(f"minhash signature file {path} holds {len(records)} records, not {count}")
            records.sort(order=dtype.names)
            with self.output_folder.open(path, mode="wb") as fo:
                fo.write(records.tobytes())
        save_npy(rank_file(self.root / "ordinals", rank, ".npy"), np.array(ordinals, dtype="<u8"))
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
                np.load(rank_file(self.root / "exact", r, ".npy"), mmap_mode="r") for r in range(self.tasks)
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
                r: np.load(rank_file(self.root / "ordinals", r, ".npy"), mmap_mode="r")
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
            save_npy(rank_file(self.root / "removals", r, ".npy"), arr)
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


class DedupFilterStep(DocStep):
    """Drop the documents :class:`DuplicatesStep` chose (reasons ``exact_duplicate``,
    ``near_duplicate``); keep the id and text start of the documents in the reported examples."""

    def __init__(self, root: str):
        super().__init__("dedup", root)
        self.remove: dict[int, int] = {}
        self.wanted: set[int] = set()
        self.snippets: dict[int, dict[str, Any]] = {}
        self.idx = 0

    def start(self, rank: int, world_size: int) -> None:
        arr = np.load(rank_file(self.root / "removals", rank, ".npy"))
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
