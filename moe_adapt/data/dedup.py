"""Exact and near-duplicate removal for the data stage, built on datatrove's MinHash pipeline.

Two passes, both optional:

1. **Exact.** Each text is normalised (lowercased, whitespace runs collapsed to one space, ends
   stripped) and hashed with 16-byte BLAKE2b (stable across processes and runs). The first document
   with a given hash is kept; later ones are removed.
2. **Near (MinHash-LSH).** datatrove's own four steps run under ``work_dir`` with a
   :class:`~datatrove.executor.LocalPipelineExecutor`: ``MinhashDedupSignature`` (signatures of
   word n-gram shingles) -> ``MinhashDedupBuckets`` (documents sharing all hashes of a bucket are
   duplicate pairs) -> ``MinhashDedupCluster`` (union-find over the pairs) -> ``MinhashDedupFilter``
   (drops all but one document per cluster). Input shards are written as JSONL and read back with
   datatrove's ``JsonlReader``; the filter writes only ``{id, cluster}`` records with its
   ``JsonlWriter``. With the default settings (5-grams, 14 buckets x 8 hashes) a pair is caught
   with probability 0.5 at Jaccard similarity ~0.72 and >0.92 at 0.8.

Word tokenization: datatrove's default word tokenizer for a language runs spaCy, including its
sentence splitter, on every document; that is 75-90% of the MinHash time and buys nothing here
(only words are needed). :class:`~moe_adapt.data.minhash.FastWordTokenizer` is a regex tokenizer
that keeps Arabic and Hebrew words whole (letters, combining marks and digits; tatweel dropped;
Hebrew geresh/gershayim inside a word kept) and is passed to datatrove instead of a language code.

Side effects are confined to ``work_dir``: each call works in a fresh ``minhash-*`` sub-folder
(logs, signatures, buckets, clusters), deleted on success and kept on failure for inspection.
datatrove's console logging is lowered to warnings and its progress bars are hidden for the
duration of the call. Nothing is downloaded.

``workers > 1`` runs datatrove's tasks in a pool of ``fork``-ed processes, which, unlike
``spawn``/``forkserver``, do not re-import the caller's entry script; where ``fork`` is not
available (Windows) ``workers > 1`` is refused with a :class:`MoEAdaptConfigError`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import multiprocess
from datatrove.data import Document
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
)
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.text import (
    TextNormConfig,
)
from datatrove.utils.word_tokenizers import WordTokenizer
from loguru import logger

from moe_adapt.data.jsonl import write_documents
from moe_adapt.data.minhash import FastMinhashSignature, FastWordTokenizer
from moe_adapt.errors import MoEAdaptConfigError, MoEAdaptError

_KEY = "data.dedup"


@dataclass
class DedupConfig:
    """Settings of :func:`deduplicate` (Hydra group ``data.dedup``)."""

    exact: bool = True
    """Remove exact duplicates after normalisation (lowercase, whitespace collapsed); keeps the first."""
    minhash: bool = True
    """Remove near duplicates with datatrove's MinHash-LSH pipeline; keeps one document per cluster."""
    n_grams: int = 5
    """Word n-gram (shingle) length of the MinHash signature (datatrove ``MinhashConfig.n_grams``)."""
    num_buckets: int = 14
    """LSH bands: a pair is a candidate when one bucket matches in full (``MinhashConfig.num_buckets``)."""
    hashes_per_bucket: int = 8
    """Hashes per LSH band; more makes a bucket stricter (``MinhashConfig.hashes_per_bucket``)."""
    seed: int = 1
    """Seed of the MinHash permutations (``MinhashConfig.seed``); fixed so that runs are reproducible."""
    workers: int = 1
    """Processes for datatrove's tasks (signatures, buckets); > 1 needs the ``fork`` start method."""
    max_examples: int = 5
    """Removed/kept document pairs reported in ``stats["examples"]`` (per kind: exact and near)."""

    def __post_init__(self) -> None:
        for name in ("exact", "minhash"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise MoEAdaptConfigError(f"{_KEY}.{name}={value!r} is not allowed: must be true or false")
        minimum = {
            "n_grams": 1,
            "num_buckets": 1,
            "hashes_per_bucket": 1,
            "seed": 0,
            "workers": 1,
            "max_examples": 0,
        }
        for name, low in minimum.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise MoEAdaptConfigError(
                    f"{_KEY}.{name}={value!r} is not allowed: must be an integer >= {low}"
                )
        if self.seed >= 2**32:
            raise MoEAdaptConfigError(f"{_KEY}.seed={self.seed} is not allowed: must be < 2**32")
        if self.workers > 1 and "fork" not in multiprocess.get_all_start_methods():
            raise MoEAdaptConfigError(
                f"{_KEY}.workers={self.workers} is not allowed on this platform: parallel MinHash needs the "
                f"'fork' start method; set {_KEY}.workers=1"
            )

    def minhash_config(self) -> MinhashConfig:
        """Return the equivalent datatrove :class:`MinhashConfig` (64-bit xxhash, default text norm)."""
        return MinhashConfig(
            n_grams=self.n_grams,
            num_buckets=self.num_buckets,
            hashes_per_bucket=self.hashes_per_bucket,
            seed=self.seed,
        )

    def fast_minhash_config(self) -> MinhashConfig:
        """:meth:`minhash_config` for :class:`FastWordTokenizer` (``strip_marks=True``).

        datatrove's diacritic removal is a per-character Python loop (about a tenth of the MinHash
        time); the tokenizer does the same (NFD, then drop non-spacing marks) with one regex, so it
        is switched off in the text normalisation. The shingles are identical.
        """
        mh = self.minhash_config()
        mh.norm_config = TextNormConfig(norm_unicode_diacritics=False)
        return mh


# ---------------------------------------------------------------------------------------------
# Exact duplicates
# ---------------------------------------------------------------------------------------------


def normalize_for_exact(text: str) -> str:
    """Lowercase ``text`` and collapse whitespace runs to one space (ends stripped)."""
    return " ".join(text.lower().split())


def exact_key(text: str) -> bytes:
    """Return the stable 16-byte BLAKE2b digest of :func:`normalize_for_exact` of ``text``."""
    return hashlib.blake2b(normalize_for_exact(text).encode("utf-8"), digest_size=16).digest()


# ---------------------------------------------------------------------------------------------
# datatrove plumbing
# ---------------------------------------------------------------------------------------------

_LOG_FORMAT = "{time:HH:mm:ss} | {level: <8} | datatrove | {message}"


def _quiet_add_task_logger(logging_dir: Any, rank: int, local_rank: int = 0, node_rank: int = -1) -> Any:
    """Replacement for datatrove's ``add_task_logger``: console at WARNING, full log under ``logging_dir``."""
    logger.remove()
    logfile = logging_dir.open(f"logs/task_{rank:05d}.log", "w")
    logger.add(sys.stderr, level="WARNING", format=_LOG_FORMAT)
    logger.add(logfile, level="DEBUG", format=_LOG_FORMAT)
    return logfile


def _quiet_close_task_logger(logfile: Any) -> None:
    """Replacement for datatrove's ``close_task_logger`` that keeps the console at WARNING."""
    logger.complete()
    logger.remove()
    logger.add(sys.stderr, level="WARNING", format=_LOG_FORMAT)
    logfile.close()


_quiet_depth = 0
"""Nesting depth of :func:`_quiet_datatrove` in this process (forked workers inherit it)."""


@contextlib.contextmanager
def _quiet_datatrove() -> Iterator[None]:
    """Lower datatrove's console logging to warnings and hide its progress bars, then restore them.

    datatrove installs its loguru sinks itself (INFO to stderr for every task), so the two
    functions that do it are swapped for the duration; the MinHash module's ``tqdm`` is replaced by
    a disabled one. Re-entrant: only the outermost use patches and restores. Applied in the
    parent and (through :class:`_QuietExecutor`) in worker processes.
    """
    global _quiet_depth
    if _quiet_depth > 0:
        _quiet_depth += 1
        try:
            yield
        finally:
            _quiet_depth -= 1
        return

    import datatrove.executor.base as executor_base
    import datatrove.pipeline.dedup.minhash as minhash_module
    from datatrove.utils.logging import setup_default_logger
    from tqdm import tqdm

    saved = (executor_base.add_task_logger, executor_base.close_task_logger, minhash_module.tqdm)
    executor_base.add_task_logger = _quiet_add_task_logger
    executor_base.close_task_logger = _quiet_close_task_logger
    minhash_module.tqdm = functools.partial(tqdm, disable=True)
    logger.remove()
    logger.add(sys.stderr, level="WARNING", format=_LOG_FORMAT)
    _quiet_depth = 1
    try:
        yield
    finally:
        _quiet_depth = 0
        executor_base.add_task_logger, executor_base.close_task_logger, minhash_module.tqdm = saved
        setup_default_logger()  # datatrove's own import-time state


class _QuietExecutor(LocalPipelineExecutor):
    """A :class:`LocalPipelineExecutor` whose tasks log quietly, also inside worker processes."""

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1) -> Any:
        with _quiet_datatrove():
            return super()._run_for_rank(rank, local_rank, node_rank)


def _id_cluster_adapter(_writer: Any, document: Document) -> dict[str, Any]:
    """JsonlWriter adapter: write only the document id and its MinHash cluster (-1: no cluster)."""
    return {"id": document.id, "cluster": document.metadata.get("minhash_cluster_id", -1)}


def _read_jsonl_folder(folder: Path) -> list[dict[str, Any]]:
    """Read every ``*.jsonl`` file under ``folder`` (datatrove writer output) into a list."""
    rows: list[dict[str, Any]] = []
    for path in sorted(folder.glob("*.jsonl")):
        with open(path, encoding="utf-8") as fh:
            rows.extend(json.loads(line) for line in fh if line.strip())
    return rows


def _executor(pipeline: list[Any], tasks: int, workers: int, logs: Path) -> _QuietExecutor:
    return _QuietExecutor(
        pipeline,
        tasks=tasks,
        workers=min(workers, tasks),
        logging_dir=str(logs),
        skip_completed=False,
        start_method="fork",
    )


def minhash_duplicates(
    texts: list[str],
    cfg: DedupConfig,
    run_dir: Path,
    *,
    word_tokenizer: WordTokenizer | str | None = None,
) -> dict[int, int]:
    """Run datatrove's four MinHash steps on ``texts`` in ``run_dir``; return ``{removed: kept}`` positions.

    ``removed`` is the position of a dropped text and ``kept`` that of the text kept from its cluster.
    ``word_tokenizer`` defaults to :class:`FastWordTokenizer`; a language code (``"en"``) selects
    datatrove's own (spaCy) tokenizer, for comparison.
    """
    if not texts:
        return {}
    if word_tokenizer is None:
        tokenizer: WordTokenizer | str = FastWordTokenizer(strip_marks=True)
        mh = cfg.fast_minhash_config()
    else:
        tokenizer, mh = word_tokenizer, cfg.minhash_config()
    shards = max(1, min(cfg.workers, len(texts)))
    inp, sigs, buckets, clusters = (run_dir / d for d in ("input", "signatures", "buckets", "clusters"))
    removed_dir, kept_dir, logs = run_dir / "removed", run_dir / "kept", run_dir / "logs"
    per_shard = -(-len(texts) // shards)
    for s in range(shards):
        lo = s * per_shard
        write_documents(
            inp / f"{s:05d}.jsonl",
            ({"id": str(i), "text": texts[i]} for i in range(lo, min(lo + per_shard, len(texts)))),
        )

    def reader() -> JsonlReader:
        return JsonlReader(str(inp), compression=None, add_file_path=False, glob_pattern="*.jsonl")

    def id_writer(folder: Path) -> JsonlWriter:
        return JsonlWriter(str(folder), compression=None, adapter=_id_cluster_adapter)

    stages = [
        _executor(
            [reader(), FastMinhashSignature(str(sigs), config=mh, language=tokenizer)],
            shards,
            cfg.workers,
            logs / "1_signatures",
        ),
        _executor(
            [MinhashDedupBuckets(str(sigs), str(buckets), config=mh)],
            mh.num_buckets,
            cfg.workers,
            logs / "2_buckets",
        ),
        _executor(
            [MinhashDedupCluster(str(buckets), str(clusters), config=mh, save_cluster_id=True)],
            1,
            1,
            logs / "3_clusters",
        ),
        _executor(
            [
                reader(),
                MinhashDedupFilter(
                    str(clusters), exclusion_writer=id_writer(removed_dir), load_cluster_ids=True
                ),
                id_writer(kept_dir),
            ],
            shards,
            cfg.workers,
            logs / "4_filter",
        ),
    ]
    with _quiet_datatrove():
        for stage in stages[:3]:
            stage.run()
        # Without duplicates in a shard the cluster step writes no files for it, and the filter then
        # warns (no .remove) or fails (no .clusters): give every shard its (empty) files.
        clusters.mkdir(parents=True, exist_ok=True)
        for s in range(shards):
            for suffix in ("remove", "clusters"):
                (clusters / f"{s:06d}.{suffix}").touch(exist_ok=True)
        stages[3].run()
    kept_by_cluster = {r["cluster"]: int(r["id"]) for r in _read_jsonl_folder(kept_dir) if r["cluster"] != -1}
    return {int(r["id"]): kept_by_cluster.get(r["cluster"], -1) for r in _read_jsonl_folder(removed_dir)}


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


def _example(kind: str, removed: dict[str, Any], kept: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "kind": kind,
        "lang": removed.get("lang", "und"),
        "removed_id": removed.get("id"),
        "kept_id": kept.get("id") if kept is not None else None,
        "removed_text": removed["text"][:160],
        "kept_text": kept["text"][:160] if kept is not None else None,
    }


def deduplicate(
    docs: list[dict[str, Any]], cfg: DedupConfig, work_dir: Path
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Remove exact and near duplicates from ``docs``; return ``(kept_docs, stats)``.

    Kept documents are the input dicts themselves, in input order, all fields untouched; of each
    group of duplicates the first (exact) or datatrove's cluster representative (near) is kept.
    ``stats`` has ``exact_removed`` and ``near_removed`` (``{lang: count}``, every input language
    listed), ``docs_in``, ``docs_out`` and ``examples`` (removed/kept pairs with text snippets).
    MinHash files go to a fresh sub-folder of ``work_dir``, deleted on success.

    Raises :class:`MoEAdaptError` when a document has no string ``text``.
    """
    for i, doc in enumerate(docs):
        if not isinstance(doc.get("text"), str):
            raise MoEAdaptError(
                f"document {i} (id={doc.get('id')!r}) has no string 'text'; cannot deduplicate"
            )
    langs = {str(doc.get("lang", "und")): 0 for doc in docs}
    exact_removed: Counter[str] = Counter(langs)
    near_removed: Counter[str] = Counter(langs)
    examples: list[dict[str, Any]] = []

    survivors = list(range(len(docs)))
    if cfg.exact:
        first: dict[bytes, int] = {}
        survivors = []
        for i, doc in enumerate(docs):
            j = first.setdefault(exact_key(doc["text"]), i)
            if j == i:
                survivors.append(i)
                continue
            exact_removed[str(doc.get("lang", "und"))] += 1
            if sum(e["kind"] == "exact" for e in examples) < cfg.max_examples:
                examples.append(_example("exact", doc, docs[j]))

    near: dict[int, int] = {}
    if cfg.minhash and survivors:
        work_dir = Path(work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        run_dir = Path(tempfile.mkdtemp(prefix="minhash-", dir=work_dir))
        local = minhash_duplicates([docs[i]["text"] for i in survivors], cfg, run_dir)
        shutil.rmtree(run_dir, ignore_errors=True)
        near = {survivors[r]: (survivors[k] if k >= 0 else -1) for r, k in local.items()}
        for r in sorted(near):
            near_removed[str(docs[r].get("lang", "und"))] += 1
            if sum(e["kind"] == "near" for e in examples) < cfg.max_examples:
                examples.append(_example("near", docs[r], docs[near[r]] if near[r] >= 0 else None))

    kept = [docs[i] for i in survivors if i not in near]
    stats: dict[str, Any] = {
        "docs_in": len(docs),
        "docs_out": len(kept),
        "exact_removed": dict(exact_removed),
        "near_removed": dict(near_removed),
        "examples": examples,
    }
    return kept, stats
