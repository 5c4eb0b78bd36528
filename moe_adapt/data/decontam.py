"""N-gram decontamination of a training corpus against benchmark items.

Two passes over the corpus:

1. **Document frequency.** Every word n-gram of every benchmark item is hashed into an index. The
   corpus is read once to count in how many documents each indexed n-gram occurs. N-grams found in
   more than ``max_doc_freq`` of the documents (and at least ``min_common_docs`` documents) are
   *common*: formulaic openings such as hadith chains of narrators ("حدثنا فلان عن فلان قال ...")
   or licence boilerplate. They are ignored, so they cannot make unrelated documents look
   contaminated.
2. **Matching.** A document is contaminated by an item when the share of the item's non-common
   n-grams that occur in the document is at least ``min_overlap`` (or, with ``any_hit=True``, when
   at least one non-common n-gram occurs). Contaminated documents are removed.

Text is normalised before n-grams are taken (:func:`match_words`): NFKC, bidi controls removed,
lowercase, punctuation dropped, Arabic diacritics/tatweel removed and alef/alef maqsura/ta marbuta
folded, Hebrew niqqud removed. N-grams are hashed with 8-byte BLAKE2b (stable across processes,
unlike Python's salted ``hash``), so results are deterministic.

Limitation: a benchmark passage copied into more than ``max_doc_freq`` of the corpus is itself
"common" and no longer matched; run exact/near deduplication before decontamination.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moe_adapt.data.clean import (
    fold_marks,
    normalize_arabic,
    strip_bidi_controls,
    strip_hebrew_marks,
)
from moe_adapt.data.jsonl import ReadStats, read_documents, write_documents
from moe_adapt.errors import MoEAdaptConfigError, MoEAdaptError
from moe_adapt.fs import atomic_write_json

log = logging.getLogger(__name__)

_WORD_RE = re.compile(r"[^\W_]+")


@dataclass(frozen=True)
class DecontamConfig:
    """Settings of :func:`decontaminate`."""

    n: int = 8
    """Word n-gram length."""
    min_overlap: float = 0.5
    """Share of an item's (non-common) n-grams that must occur in a document to call it contaminated."""
    any_hit: bool = False
    """Call a document contaminated on a single shared non-common n-gram (ignores ``min_overlap``)."""
    max_doc_freq: float = 0.001
    """N-grams found in more than this share of corpus documents are common and ignored."""
    min_common_docs: int = 5
    """An n-gram must also occur in at least this many documents to be common (protects small corpora)."""
    max_examples: int = 5
    """Example matches kept per benchmark in the report."""

    def __post_init__(self) -> None:
        if self.n < 1:
            raise MoEAdaptConfigError(f"decontam.n={self.n} must be >= 1")
        if not 0.0 < self.min_overlap <= 1.0:
            raise MoEAdaptConfigError(f"decontam.min_overlap={self.min_overlap} must lie in (0, 1]")
        if not 0.0 < self.max_doc_freq <= 1.0:
            raise MoEAdaptConfigError(f"decontam.max_doc_freq={self.max_doc_freq} must lie in (0, 1]")
        if self.min_common_docs < 1 or self.max_examples < 0:
            raise MoEAdaptConfigError(
                f"decontam.min_common_docs={self.min_common_docs} must be >= 1 and "
                f"decontam.max_examples={self.max_examples} >= 0"
            )


def match_words(text: str) -> list[str]:
    """Normalise ``text`` for matching and split it into words (see the module docstring).

    Equal to :func:`match_words_reference`: ASCII text skips the passes that cannot change it
    (bidi controls, NFKC, the Arabic and Hebrew foldings), and the foldings are one table lookup.
    """
    if text.isascii():
        return _WORD_RE.findall(text.lower())
    text = unicodedata.normalize("NFKC", strip_bidi_controls(text)).lower()
    return _WORD_RE.findall(fold_marks(text))


def match_words_reference(text: str) -> list[str]:
    """:func:`match_words` as first written (one regex pass per folding): the tests' reference."""
    text = unicodedata.normalize("NFKC", strip_bidi_controls(text)).lower()
    text = strip_hebrew_marks(normalize_arabic(text))
    return _WORD_RE.findall(text)


def ngram_texts(words: list[str], n: int) -> list[str]:
    """Return the word ``n``-grams of ``words`` as strings (``" ".join(gram)``), in order.

    The words are joined once and each n-gram is a slice of that string (from its first word's
    start to its last word's end), not a join of its own.
    """
    count = len(words) - n + 1
    if count <= 0:
        return []
    joined = " ".join(words)
    ends = list(itertools.accumulate([len(w) + 1 for w in words]))  # just past each word's space
    return [joined[a : b - 1] for a, b in zip([0, *ends[: count - 1]], ends[n - 1 :], strict=True)]


def _hash(gram: str) -> int:
    return int.from_bytes(hashlib.blake2b(gram.encode("utf-8"), digest_size=8).digest(), "little")


def ngram_hashes(words: list[str], n: int) -> set[int]:
    """Return the stable 64-bit hashes of the word ``n``-grams of ``words`` (empty if fewer than n words).

    Each hash is the little-endian 8-byte BLAKE2b of ``" ".join(gram).encode()``; equal to
    :func:`ngram_hashes_reference`.
    """
    return {_hash(g) for g in ngram_texts(words, n)}


def ngram_hashes_reference(words: list[str], n: int) -> set[int]:
    """:func:`ngram_hashes` one n-gram at a time (join, encode, hash): the tests' reference."""
    out: set[int] = set()
    for i in range(len(words) - n + 1):
        digest = hashlib.blake2b(" ".join(words[i : i + n]).encode("utf-8"), digest_size=8).digest()
        out.add(int.from_bytes(digest, "little"))
    return out


@dataclass
class BenchmarkItem:
    """One benchmark item: an id and the text to protect (question, choices and answer joined)."""

    id: str
    text: str


def item_text(obj: dict[str, Any]) -> str:
    """Return the text of a benchmark record that must not leak into training.

    That is the question (or ``text``/``context``/``passage``) plus the correct answer: ``choices[answer]``
    when ``answer`` is an index, ``answer`` itself when it is a string. Distractor choices are left
    out (they are often text from elsewhere, and would dilute the overlap share); when the answer is
    unknown all choices are included.
    """
    parts = [obj[k] for k in ("context", "passage", "question", "text") if isinstance(obj.get(k), str)]
    choices = obj.get("choices")
    answer = obj.get("answer")
    if isinstance(choices, list) and isinstance(answer, int) and 0 <= answer < len(choices):
        parts.append(str(choices[answer]))
    elif isinstance(answer, str):
        parts.append(answer)
    elif isinstance(choices, list):
        parts.extend(str(c) for c in choices)
    return "\n".join(parts)


def load_benchmark(path: str | Path) -> list[BenchmarkItem]:
    """Read benchmark items: JSONL ({question, choices, answer} or {text}) or .txt (one item per line).

    Unreadable lines (not UTF-8, not a JSON object, too long) are skipped and counted in a warning
    naming the file; a file with no usable item raises :class:`MoEAdaptError`.
    """
    path = Path(path)
    items: list[BenchmarkItem] = []
    if path.suffix == ".txt":
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError as err:
            raise MoEAdaptError(f"cannot read benchmark {path}: {err.strerror}") from err
        items = [BenchmarkItem(f"{path.stem}/{i}", ln) for i, ln in enumerate(lines) if ln.strip()]
    else:
        stats = ReadStats()
        for i, obj in enumerate(read_documents(path, text_key="question", stats=stats)):
            items.append(BenchmarkItem(str(obj.get("id", f"{path.stem}/{i}")), item_text(obj)))
        if stats.empty_text:  # free-text records: {"text": ...}
            for i, obj in enumerate(read_documents(path, text_key="text")):
                if "question" not in obj:
                    items.append(BenchmarkItem(str(obj.get("id", f"{path.stem}/t{i}")), item_text(obj)))
        unreadable = stats.invalid_utf8 + stats.invalid_json + stats.too_long
        if unreadable:
            log.warning("benchmark %s: skipped %d of %d lines as unreadable", path, unreadable, stats.lines)
    if not items:
        raise MoEAdaptError(
            f"benchmark {path} has no usable items (expected JSONL with 'question' or 'text', or a .txt file)"
        )
    return items


@dataclass
class _Index:
    """N-gram hash -> ids of the items (per benchmark) that contain it."""

    n: int
    postings: dict[int, list[tuple[str, int]]] = field(default_factory=dict)
    item_grams: dict[tuple[str, int], set[int]] = field(default_factory=dict)
    item_ids: dict[tuple[str, int], str] = field(default_factory=dict)
    skipped_short: Counter[str] = field(default_factory=Counter)
    indexed: Counter[str] = field(default_factory=Counter)
    gram_hash: dict[str, int] = field(default_factory=dict)
    """Each indexed n-gram's text -> its hash (``postings`` keys)."""
    vocab: set[str] = field(default_factory=set)
    """The words of the indexed n-grams: an n-gram with any other word cannot be in the index."""

    def hits(self, words: list[str]) -> set[int]:
        """The hashes of ``words``' n-grams that are in the index: ``ngram_hashes(words, n) & postings``.

        The n-gram texts are looked up in :attr:`gram_hash` (Python's string hash), so BLAKE2b is
        never computed for a corpus n-gram: nearly all of them are not in the index. (The one
        difference from hashing every n-gram: a corpus n-gram whose 64-bit hash merely collides
        with an indexed one no longer counts.)
        The only n-grams looked up are those whose ``n`` words are all in :attr:`vocab` (one set
        lookup per word and a sliding count finds them); the others cannot be in the index.
        """
        table, n = self.gram_hash, self.n
        count = len(words) - n + 1
        if count <= 0:
            return set()
        known = np.fromiter(map(self.vocab.__contains__, words), dtype=bool, count=len(words))
        run = np.cumsum(known, dtype=np.int64)
        run[n:] -= run[:-n].copy()  # known words in the n ending at each position
        starts = np.flatnonzero(run[n - 1 :] == n)
        if 2 * len(starts) > count:  # mostly known: slicing one joined string is cheaper
            return {table[g] for g in ngram_texts(words, n) if g in table}
        grams = (" ".join(words[i : i + n]) for i in starts.tolist())
        return {table[g] for g in grams if g in table}


def _build_index(benchmarks: dict[str, list[BenchmarkItem]], n: int) -> _Index:
    index = _Index(n)
    for name, items in benchmarks.items():
        for k, item in enumerate(items):
            texts = ngram_texts(match_words(item.text), n)
            hashes = [_hash(t) for t in texts]
            index.gram_hash.update(zip(texts, hashes, strict=True))
            index.vocab.update(w for t in texts for w in t.split(" "))
            grams = set(hashes)
            if not grams:
                index.skipped_short[name] += 1
                continue
            index.indexed[name] += 1
            key = (name, k)
            index.item_grams[key] = grams
            index.item_ids[key] = item.id
            for g in grams:
                index.postings.setdefault(g, []).append(key)
    return index


DocSource = Callable[[], Iterable[dict[str, Any]]]
"""A callable returning a fresh iterable of documents; decontamination reads the corpus twice."""


@dataclass
class DecontamResult:
    """What :func:`decontaminate` found: the report (as written to ``contamination.json``) and removed ids.

    Removal is by position in the corpus, so duplicate or missing ids are harmless; ``removed_ids``
    lists the ids (or positions, for documents without ``id``) for reporting.
    """

    report: dict[str, Any]
    removed_ids: set[str]
    removed_by: dict[str, str] = field(default_factory=dict)
    """Each removed document's id -> the benchmark it is credited to (the first by name)."""


def _doc_id(doc: dict[str, Any], i: int) -> str:
    return str(doc.get("id", i))


def decontaminate(
    docs: DocSource,
    benchmarks: dict[str, list[BenchmarkItem]],
    config: DecontamConfig | None = None,
    *,
    report_path: str | Path | None = None,
) -> tuple[DecontamResult, Iterator[dict[str, Any]]]:
    """Find contaminated documents and return ``(result, kept_docs)``.

    ``docs()`` is called twice for the two counting/matching passes; ``kept_docs`` is a third,
    lazy pass yielding the documents not removed. The report has one entry per benchmark (items
    indexed/skipped, common n-grams ignored, docs matched, docs removed, words removed, example
    matches) and totals; it is written atomically to ``report_path`` when given.
    """
    cfg = config or DecontamConfig()
    if not benchmarks:
        raise MoEAdaptConfigError("decontamination needs at least one benchmark (got none)")
    index = _build_index(benchmarks, cfg.n)
    # Pass 1: document frequency of indexed n-grams.
    df: Counter[int] = Counter()
    n_docs = 0
    for doc in docs():
        n_docs += 1
        df.update(index.hits(match_words(str(doc.get("text", "")))))
    threshold = max(cfg.max_doc_freq * n_docs, cfg.min_common_docs - 1)
    common = {g for g, c in df.items() if c > threshold}
    effective = {key: grams - common for key, grams in index.item_grams.items()}
    # Pass 2: match.
    per_bench: dict[str, dict[str, Any]] = {
        name: {
            "items": len(items),
            "items_indexed": index.indexed[name],
            "items_skipped_short": index.skipped_short[name],
            "items_only_common_ngrams": sum(1 for k, g in effective.items() if k[0] == name and not g),
            "docs_matched": 0,
            "docs_removed": 0,
            "words_removed": 0,
            "examples": [],
        }
        for name, items in benchmarks.items()
    }
    removed: set[str] = set()
    removed_by: dict[str, str] = {}
    removed_pos: set[int] = set()
    words_total = 0
    for i, doc in enumerate(docs()):
        words = match_words(str(doc.get("text", "")))
        words_total += len(words)
        hits: Counter[tuple[str, int]] = Counter()
        for g in index.hits(words):
            if g not in common:
                hits.update(index.postings[g])
        matched_bench: dict[str, tuple[str, float]] = {}
        for key, count in hits.items():
            share = count / len(effective[key])
            if cfg.any_hit or share >= cfg.min_overlap:
                best = matched_bench.get(key[0])
                if best is None or share > best[1]:
                    matched_bench[key[0]] = (index.item_ids[key], share)
        if not matched_bench:
            continue
        doc_id = _doc_id(doc, i)
        removed.add(doc_id)
        removed_pos.add(i)
        for j, (name, (item_id, share)) in enumerate(sorted(matched_bench.items())):
            entry = per_bench[name]
            entry["docs_matched"] += 1
            if j == 0:  # a document is removed once, credited to its first benchmark by name
                removed_by[doc_id] = name
                entry["docs_removed"] += 1
                entry["words_removed"] += len(words)
            if len(entry["examples"]) < cfg.max_examples:
                entry["examples"].append({"doc_id": doc_id, "item_id": item_id, "overlap": round(share, 4)})
    report = {
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "corpus_docs": n_docs,
        "corpus_words": words_total,
        "indexed_ngrams": len(index.postings),
        "common_ngrams_ignored": len(common),
        "common_threshold_docs": threshold,
        "docs_removed": len(removed),
        "words_removed": sum(b["words_removed"] for b in per_bench.values()),
        "benchmarks": per_bench,
    }
    if report_path is not None:
        atomic_write_json(report_path, report)

    def kept() -> Iterator[dict[str, Any]]:
        for i, doc in enumerate(docs()):
            if i not in removed_pos:
                yield doc

    return DecontamResult(report, removed, removed_by), kept()


def decontaminate_jsonl(
    in_path: str | Path,
    out_path: str | Path,
    benchmark_paths: dict[str, str | Path],
    config: DecontamConfig | None = None,
    *,
    report_path: str | Path | None = None,
) -> DecontamResult:
    """Decontaminate the JSONL corpus ``in_path`` into ``out_path`` against benchmark files by name.

    The report (see :func:`decontaminate`) also records the reader's bad-line counts.
    """
    benchmarks = {name: load_benchmark(p) for name, p in benchmark_paths.items()}
    passes: list[ReadStats] = []

    def docs() -> Iterable[dict[str, Any]]:
        passes.append(ReadStats())
        return read_documents(in_path, stats=passes[-1])

    result, kept = decontaminate(docs, benchmarks, config)
    write_documents(out_path, kept)
    result.report["input"] = {"path": str(in_path), "read": passes[-1].as_dict()}
    if report_path is not None:
        atomic_write_json(report_path, result.report)
    return result


def report_json(result: DecontamResult) -> str:
    """Return the report as pretty JSON (for logs)."""
    return json.dumps(result.report, ensure_ascii=False, indent=2)
