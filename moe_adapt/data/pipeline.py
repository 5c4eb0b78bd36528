"""The ``data`` stage's work: raw bilingual text -> decontaminated, difficulty-bucketed token shards.

Steps, in order (each counts documents and characters in/out per language, with reasons):

1. read     local JSONL / Parquet / ``save_to_disk`` folders, and the offline demo corpus
2. clean    Unicode and script normalisation (:mod:`moe_adapt.data.clean`)
3. langid   offline fastText language ID; documents contradicting their declared language are dropped
4. quality  per-language quality rules (:mod:`moe_adapt.data.quality`)
5. dedup    exact and MinHash near-duplicates (:mod:`moe_adapt.data.dedup`, datatrove)
6. decontam n-gram overlap with benchmark items (:mod:`moe_adapt.data.decontam`) -> contamination.json
7. split    held-out documents per (source, language) for evaluation, by a hash of the document id
8. buckets  difficulty scores and per-language quantile buckets (:mod:`moe_adapt.data.difficulty`)
9. shards   megatron-core ``.bin/.idx`` per (source, language, bucket) + manifest.json

Outputs in the stage folder: ``shards/`` (training, with ``manifest.json``), ``heldout/`` (evaluation),
``benchmarks/`` (the benchmark files decontaminated against), ``contamination.json``,
``stats.json`` and ``stats.md``.

Resuming: steps 1-6 keep their results in ``work`` (``<run_dir>/.work/data``), a
:class:`~moe_adapt.resume.StepCache` over the data settings and seed (the one resume mechanism: a step
is done when its folder holds ``_COMPLETE.json``; changed settings empty the folder); a re-run after a
crash continues from the last finished step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from moe_adapt.data.clean import CleanConfig, clean_text
from moe_adapt.data.config import DataConfig
from moe_adapt.data.jsonl import ReadStats, read_documents, write_documents
from moe_adapt.data.steps import (
    Doc,
    StepStats,
    clean_step,
    counted,
    demo_sources,
    langid_step,
    quality_step,
    read_source,
    run_step,
)
from moe_adapt.errors import MoEAdaptConfigError, MoEAdaptError
from moe_adapt.fs import atomic_write_json, atomic_write_text
from moe_adapt.resume import StepCache

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ stage
class _Checkpoints:
    """Finished steps' documents under ``<run_dir>/.work/data``, valid while the settings are unchanged:
    a :class:`~moe_adapt.resume.StepCache` whose units are ``<step>/docs.jsonl``, the step's stats as
    the marker's summary."""

    def __init__(self, root: Path, settings: dict[str, Any]):
        self.cache = StepCache(root, settings, what="data")

    def load(self, name: str) -> tuple[list[Doc], dict[str, Any]] | None:
        stats = self.cache.done(name)
        if stats is None:
            return None
        log.info("data: %s already done in an earlier attempt, reusing it", name)
        return list(read_documents(self.cache.folder(name) / "docs.jsonl")), stats

    def save(self, name: str, docs: list[Doc], stats: dict[str, Any]) -> None:
        write_documents(self.cache.folder(name) / "docs.jsonl", docs)
        self.cache.mark(name, stats)


def is_heldout(doc: Doc, fraction: float) -> bool:
    """Whether ``doc`` goes to the held-out split: a stable hash of its id below ``fraction`` (the
    same document is held out in every run, whatever the other documents)."""
    h = int.from_bytes(hashlib.blake2b(str(doc["id"]).encode(), digest_size=8).digest(), "little")
    return h / 2**64 < fraction


def _eod_token(tokenizer_dir: Path, setting: str | None) -> str | None:
    """``data.tokenize.eod_token``; ``auto`` reads the eos_token of the tokenizer_config.json in the
    tokenizer's folder, or beside its tokenizer.json when the setting names the file."""
    if setting != "auto":
        return setting
    config = (tokenizer_dir if tokenizer_dir.is_dir() else tokenizer_dir.parent) / "tokenizer_config.json"
    if config.is_file():
        eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str):
            return eos
    raise MoEAdaptConfigError(
        f"data.tokenize.eod_token=auto found no eos_token in {config} (for {tokenizer_dir}); "
        "set data.tokenize.eod_token to a token of the vocabulary, or null"
    )


def build_corpus(dcfg: DataConfig, out: Path, work: Path, *, tokenizer: str, seed: int) -> dict[str, Any]:
    """Run the data stage's steps into ``out``, keeping finished steps in ``work`` (the stage's scratch
    folder) so that a re-run after a crash reuses them; ``tokenizer`` is the folder whose tokenizer
    makes the shards. Returns the stage summary."""
    ckpt = _Checkpoints(work, {"data": asdict(dcfg), "seed": seed})
    sources = list(dcfg.sources)
    bench_files = {b.name: Path(b.path) for b in dcfg.decontam.benchmarks}
    if dcfg.demo.enabled:
        demo, demo_bench = demo_sources(dcfg, work)
        sources += demo
        bench_files.update(demo_bench)
    if not sources:
        raise MoEAdaptConfigError("data.sources is empty: add a source, or set data.demo.enabled=true")
    for name, path in bench_files.items():
        if not path.is_file():
            raise MoEAdaptConfigError(f"data.decontam.benchmarks: {name} path={str(path)!r} does not exist")
    steps: dict[str, dict[str, Any]] = {}

    loaded = ckpt.load("filtered")
    if loaded is None:
        read = StepStats("read")
        bad_lines: dict[str, dict[str, int]] = {}
        docs: list[Doc] = []
        start = time.perf_counter()
        for i, src in enumerate(sources):
            rs = ReadStats()
            docs += counted(
                read,
                tqdm(
                    read_source(src, f"data.sources[{i}]", rs),
                    desc=f"read {src.name}",
                    unit="doc",
                    disable=None,
                ),
                out=True,
            )
            bad_lines[src.name] = rs.as_dict()
        read.seconds = time.perf_counter() - start
        read.docs_in, read.chars_in = Counter(read.docs_out), Counter(read.chars_out)
        steps["read"] = {**read.as_dict(), "bad_lines": bad_lines}
        enabled = {"clean": True, "langid": dcfg.langid.enabled, "quality": dcfg.quality.enabled}
        for name, make in (("clean", clean_step), ("langid", langid_step), ("quality", quality_step)):
            if not enabled[name]:
                continue
            step = StepStats(name)
            docs = run_step(step, docs, make(dcfg, step))
            steps[name] = step.as_dict()
        ckpt.save("filtered", docs, steps)
    else:
        docs, steps = loaded

    loaded = ckpt.load("dedup")
    if loaded is None:
        from moe_adapt.data.dedup import deduplicate

        step = StepStats("dedup")
        start = time.perf_counter()
        list(counted(step, docs, out=False))
        docs, dedup_stats = deduplicate(docs, dcfg.dedup, work / "dedup_tmp")
        list(counted(step, docs, out=True))
        step.seconds = time.perf_counter() - start
        for kind in ("exact_removed", "near_removed"):
            for lang, n in dedup_stats.get(kind, {}).items():
                step.reasons.setdefault(lang, Counter())[kind.replace("_removed", "_duplicate")] += n
        steps["dedup"] = {**step.as_dict(), "examples": dedup_stats.get("examples", [])[:5]}
        ckpt.save("dedup", docs, steps)
    else:
        docs, steps = loaded

    contamination: dict[str, Any] | None = None
    loaded = ckpt.load("decontam")
    if dcfg.decontam.enabled and bench_files and loaded is None:
        docs, contamination, steps["decontam"] = _decontaminate(dcfg, docs, bench_files, Path(tokenizer))
        atomic_write_json(work / "contamination.json", contamination)
        ckpt.save("decontam", docs, steps)
    elif loaded is not None:
        docs, steps = loaded
        contamination = json.loads((work / "contamination.json").read_text())
    if contamination is not None:
        atomic_write_json(out / "contamination.json", contamination)
        _check_contamination(dcfg, contamination)
    if bench_files:
        (out / "benchmarks").mkdir()
        for name, path in bench_files.items():
            write_clean_benchmark(path, out / "benchmarks" / f"{name}.jsonl", dcfg.clean)

    return _finish(dcfg, docs, steps, Path(tokenizer), out)


_BENCHMARK_TEXT_KEYS = ("question", "text", "context", "passage")


def write_clean_benchmark(src: Path, dest: Path, clean: CleanConfig) -> None:
    """Copy the benchmark ``src`` to ``dest`` with its text (question, text, context, passage and every
    choice of a JSONL item) cleaned like the training text, so that the eval stage and lm-eval score
    the text the model was trained on (the demo's Arabic hadiths carry U+200F marks that cleaning
    strips). Other fields are kept; a file that is not JSONL (``.txt``) is cleaned line by line."""
    text = src.read_text(encoding="utf-8", errors="replace")
    lines = []
    for line in text.splitlines():
        if src.suffix == ".txt":
            lines.append(clean_text(line, clean))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            lines.append(line)  # kept as it was: load_benchmark skips it with a warning
            continue
        if isinstance(obj, dict):
            for key in _BENCHMARK_TEXT_KEYS:
                if isinstance(obj.get(key), str):
                    obj[key] = clean_text(obj[key], clean)
            if isinstance(obj.get("choices"), list):
                obj["choices"] = [clean_text(c, clean) if isinstance(c, str) else c for c in obj["choices"]]
            if isinstance(obj.get("answer"), str):
                obj["answer"] = clean_text(obj["answer"], clean)
        lines.append(json.dumps(obj, ensure_ascii=False))
    atomic_write_text(dest, "".join(f"{line}\n" for line in lines))


def _decontaminate(
    dcfg: DataConfig, docs: list[Doc], bench_files: dict[str, Path], tokenizer: Path
) -> tuple[list[Doc], dict[str, Any], dict[str, Any]]:
    from moe_adapt.data.decontam import DecontamConfig as Settings
    from moe_adapt.data.decontam import decontaminate, load_benchmark

    d = dcfg.decontam
    settings = Settings(
        n=d.n,
        min_overlap=d.min_overlap,
        any_hit=d.any_hit,
        max_doc_freq=d.max_doc_freq,
        min_common_docs=d.min_common_docs,
    )
    step = StepStats("decontam")
    start = time.perf_counter()
    benchmarks = {  # compared as the training text is: cleaned the same way
        n: [replace(item, text=clean_text(item.text, dcfg.clean)) for item in load_benchmark(p)]
        for n, p in bench_files.items()
    }
    result, kept = decontaminate(lambda: docs, benchmarks, settings)
    list(counted(step, docs, out=False))
    out_docs = list(counted(step, kept, out=True)) if d.remove else list(counted(step, docs, out=True))
    step.seconds = time.perf_counter() - start
    if d.remove:
        for doc in docs:
            if str(doc["id"]) in result.removed_ids:
                step.drop(doc["lang"], "benchmark_overlap")
    # Tokens removed, per benchmark, with the tokenizer the shards use.
    from moe_adapt.data.shards import load_tokenizer

    removed_docs = [doc for doc in docs if str(doc["id"]) in result.removed_by]
    encodings = (
        load_tokenizer(tokenizer).encode_batch([doc["text"] for doc in removed_docs]) if removed_docs else []
    )
    for entry in result.report["benchmarks"].values():
        entry["tokens_removed"] = 0
    for doc, enc in zip(removed_docs, encodings, strict=True):
        result.report["benchmarks"][result.removed_by[str(doc["id"])]]["tokens_removed"] += len(enc.ids)
    result.report["tokens_removed"] = sum(len(enc.ids) for enc in encodings)
    report = {
        **result.report,
        "removed": d.remove,
        "remaining_share": 0.0 if d.remove else len(result.removed_ids) / max(len(docs), 1),
    }
    log.info(
        "data: decontam removed %d docs overlapping %d benchmark(s)",
        report["docs_removed"] if d.remove else 0,
        len(bench_files),
    )
    return out_docs, report, step.as_dict()


def _check_contamination(dcfg: DataConfig, report: dict[str, Any]) -> None:
    remaining = float(report.get("remaining_share", 0.0))
    if remaining > dcfg.max_contamination and not dcfg.allow_contamination:
        raise MoEAdaptError(
            f"data: {remaining:.2%} of training documents still overlap a benchmark, above "
            f"data.max_contamination={dcfg.max_contamination}; set data.decontam.remove=true, raise "
            "data.max_contamination, or data.allow_contamination=true"
        )


def _finish(
    dcfg: DataConfig, docs: list[Doc], steps: dict[str, Any], tokenizer: Path, out: Path
) -> dict[str, Any]:
    from moe_adapt.data.difficulty import assign_buckets, perplexity_scorer, score_documents
    from moe_adapt.data.shards import ShardConfig, write_shards

    if not docs:
        raise MoEAdaptError("data: no documents survived the filters; see the step counts above")
    # Held-out split, capped per (source, language).
    held: list[Doc] = []
    train: list[Doc] = []
    per_group: Counter[tuple[str, str]] = Counter()
    for d in docs:
        group = (d["source"], d["lang"])
        if per_group[group] < dcfg.heldout_max_docs and is_heldout(d, dcfg.heldout_fraction):
            per_group[group] += 1
            held.append(d)
        else:
            train.append(d)
    start = time.perf_counter()
    weights = dict(dcfg.difficulty.weights)
    extra = {}
    if dcfg.difficulty.reference_model:
        extra["perplexity"] = perplexity_scorer(dcfg.difficulty.reference_model)
        weights.setdefault("perplexity", 1.0)
    scores = score_documents(train, weights, extra_scorers=extra)
    buckets = assign_buckets(train, scores, dcfg.difficulty.buckets)
    train = [
        {**d, "difficulty": round(float(s), 4), "bucket": b}
        for d, s, b in zip(train, scores, buckets, strict=True)
    ]
    steps["buckets"] = {
        "seconds": round(time.perf_counter() - start, 3),
        "buckets": dcfg.difficulty.buckets,
        "per_language": _bucket_table(train),
    }
    eod = _eod_token(tokenizer, dcfg.tokenize.eod_token)
    shard_cfg = ShardConfig(eod_token=eod, batch_size=dcfg.tokenize.batch_size)
    start = time.perf_counter()
    manifest = write_shards(
        tqdm(train, desc="tokenize", unit="doc", disable=None), tokenizer, out / "shards", shard_cfg
    )
    heldout = write_shards(held, tokenizer, out / "heldout", shard_cfg) if held else None
    roles = {d["source"]: d.get("role", "other") for d in docs}
    for folder, m in (("shards", manifest), ("heldout", heldout)):
        if m is not None:  # the manifest also names each shard's role (target, english, ...)
            for shard in m["shards"]:
                shard["role"] = roles.get(shard["source"], "other")
            atomic_write_json(out / folder / "manifest.json", m)
    steps["shards"] = {
        "seconds": round(time.perf_counter() - start, 3),
        "train_tokens": manifest["totals"]["tokens"],
        "heldout_tokens": heldout["totals"]["tokens"] if heldout else 0,
    }
    stats = {
        "steps": steps,
        "train": _shard_table(manifest),
        "heldout": _shard_table(heldout) if heldout else {},
    }
    stats["fertility"] = fertility(stats["train"], stats["heldout"])
    atomic_write_json(out / "stats.json", stats)
    (out / "stats.md").write_text(render_stats(stats), encoding="utf-8")
    for line in render_stats(stats).splitlines():
        log.info("data: %s", line)
    return {
        "shards": "shards",
        "heldout": "heldout" if heldout else None,
        "train_tokens": manifest["totals"]["tokens"],
        "train_documents": manifest["totals"]["documents"],
        "heldout_documents": len(held),
    }


def _bucket_table(docs: list[Doc]) -> dict[str, list[int]]:
    table: dict[str, Counter[int]] = {}
    for d in docs:
        table.setdefault(d["lang"], Counter())[d["bucket"]] += 1
    return {lang: [c[b] for b in sorted(c)] for lang, c in sorted(table.items())}


_TEXT_SIZES = ("text_tokens", "words", "chars", "bytes")


def _shard_table(manifest: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Per language: documents, tokens (EOD included) and the size of the text tokenized."""
    table: dict[str, dict[str, int]] = {}
    for s in manifest["shards"]:
        row = table.setdefault(s["lang"], {"documents": 0, "tokens": 0, **dict.fromkeys(_TEXT_SIZES, 0)})
        row["documents"] += s["documents"]
        row["tokens"] += s["tokens"]
        for k in _TEXT_SIZES:
            row[k] += int(s.get(k, 0))
    return table


def fertility(*tables: dict[str, dict[str, int]]) -> dict[str, dict[str, float]]:
    """The tokenizer's fertility per language over the text of ``tables`` (:func:`_shard_table`s):
    ``tokens_per_word`` (whitespace-separated words), ``tokens_per_char``, ``tokens_per_byte`` (UTF-8)
    and ``bytes_per_char``, counting the text's own tokens (EOD left out). A language whose text has no
    word is left out.
    """
    totals: dict[str, dict[str, int]] = {}
    for table in tables:
        for lang, row in table.items():
            total = totals.setdefault(lang, dict.fromkeys(_TEXT_SIZES, 0))
            for k in _TEXT_SIZES:
                total[k] += int(row.get(k, 0))
    return {
        lang: {
            "tokens_per_word": round(t["text_tokens"] / t["words"], 4),
            "tokens_per_char": round(t["text_tokens"] / t["chars"], 4),
            "tokens_per_byte": round(t["text_tokens"] / t["bytes"], 4),
            "bytes_per_char": round(t["bytes"] / t["chars"], 4),
        }
        for lang, t in sorted(totals.items())
        if t["words"] > 0
    }


def render_stats(stats: dict[str, Any]) -> str:
    """A Markdown table of documents per step and language, then tokens per language and the
    tokenizer's fertility per language."""
    steps = stats["steps"]
    langs = sorted({lang for s in steps.values() for lang in s.get("languages", {})})
    names = [n for n in steps if "languages" in steps[n]]
    lines = [
        "| step | " + " | ".join(langs) + " | MB/s | top drop reasons |",
        "|---|" + "---|" * len(langs) + "---|---|",
    ]
    for n in names:
        s = steps[n]
        cells = [f"{s['languages'].get(lang, {}).get('docs_out', 0):,}" for lang in langs]
        reasons = Counter()  # type: Counter[str]
        for lang_stats in s["languages"].values():
            reasons.update(lang_stats.get("dropped", {}))
        top = ", ".join(f"{r} {c}" for r, c in reasons.most_common(3))
        mbps = s.get("mb_per_s")
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {mbps if mbps is not None else '-'} | {top} |")
    lines += ["", "| split | " + " | ".join(langs) + " |", "|---|" + "---|" * len(langs)]
    for split in ("train", "heldout"):
        cells = [f"{stats[split].get(lang, {}).get('tokens', 0):,} tok" for lang in langs]
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    fert = stats.get("fertility", {})
    if fert:
        lines += [
            "",
            "Tokenizer fertility (train + held-out text, EOD left out): tokens per whitespace-separated "
            "word, per character and per UTF-8 byte.",
            "",
            "| language | tokens/word | tokens/char | tokens/byte | bytes/char |",
            "|---|---|---|---|---|",
        ]
        for lang, f in fert.items():
            lines.append(
                f"| {lang} | {f['tokens_per_word']:.3f} | {f['tokens_per_char']:.3f} | "
                f"{f['tokens_per_byte']:.3f} | {f['bytes_per_char']:.3f} |"
            )
    return "\n".join(lines) + "\n"
