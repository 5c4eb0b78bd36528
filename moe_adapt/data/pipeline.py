"""The ``data`` stage's work: raw bilingual text -> decontaminated, difficulty-bucketed token shards.

Steps, in order (each a datatrove ``PipelineStep`` of :mod:`moe_adapt.data.dtsteps` run in
``data.tasks`` tasks; each counts documents and characters in/out per language, with reasons):

1. read     local JSONL / Parquet / ``save_to_disk`` folders, and the offline demo corpus
2. clean    Unicode and script normalisation (:mod:`moe_adapt.data.clean`)
3. langid   offline fastText language ID; documents contradicting their declared language are dropped
4. quality  per-language quality rules (:mod:`moe_adapt.data.quality`)
5. dedup    exact and MinHash near-duplicates (datatrove's signature and bucket steps)
6. decontam n-gram overlap with benchmark items (:mod:`moe_adapt.data.decontam`) -> contamination.json
7. split    held-out documents per (source, language) for evaluation, by a hash of the document id
8. buckets  difficulty scores and per-language quantile buckets (:mod:`moe_adapt.data.difficulty`)
9. shards   megatron-core ``.bin/.idx`` per (source, language, bucket) + manifest.json

Executor stages (``data.executor``: local, slurm or ray; each after the one before, ``depends=``):

==============  =========  ====================================================================
stage           tasks      steps
==============  =========  ====================================================================
1_filter        tasks      read, clean, langid, quality, exact hashes, MinHash signatures
2_buckets       buckets    datatrove's MinhashDedupBuckets (one task per LSH band)
3_duplicates    1          exact keys merged, MinHash clusters (first document in corpus order kept)
4_dedup         tasks      drop duplicates, decontamination document frequencies
5_common        1          common benchmark n-grams
6_score         tasks      decontamination matches, held-out candidates, raw difficulty scores
7_quantiles     1          held-out caps, z-scores, per-language quantile buckets
8_shards        tasks      one .bin/.idx per task and (source, language, bucket)
9_merge         1          shards concatenated per (source, language, bucket), manifest merged
==============  =========  ====================================================================

Outputs in the stage folder: ``shards/`` (training, with ``manifest.json``), ``heldout/`` (evaluation),
``benchmarks/`` (the benchmark files decontaminated against), ``contamination.json``,
``stats.json`` and ``stats.md``; the same bytes for any number of tasks and workers.

Resuming: everything lives under ``work`` (``<run_dir>/.work/data``), a
:class:`~moe_adapt.resume.StepCache` over the data settings, the seed and ``data.tasks`` (changed
settings empty it); every executor stage keeps datatrove's completion markers, so a re-run after a
crash (even ``kill -9``) runs only the tasks that had not finished.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from moe_adapt.data.clean import CleanConfig, clean_text
from moe_adapt.data.config import DataConfig, SourceConfig
from moe_adapt.data.steps import demo_sources, is_heldout, open_dataset  # noqa: F401 - is_heldout: kept importable here (demo/dense.py)
from moe_adapt.errors import MoEAdaptConfigError, MoEAdaptError
from moe_adapt.fs import atomic_write_json, atomic_write_text
from moe_adapt.resume import StepCache

log = logging.getLogger(__name__)


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


def _check_sources(sources: list[SourceConfig], bench_files: dict[str, Path]) -> None:
    """One line naming the first missing or unreadable input, before any task starts."""
    for i, src in enumerate(sources):
        key = f"data.sources[{i}]"
        path = Path(src.path)
        if not path.exists():
            raise MoEAdaptConfigError(f"{key}.path={src.path!r} does not exist")
        if src.format == "jsonl":
            if not path.is_file() or not os.access(path, os.R_OK):
                raise MoEAdaptError(f"{key}.path={src.path!r} is not a readable file")
            continue
        open_dataset(src, key)
    for name, path in bench_files.items():
        if not path.is_file():
            raise MoEAdaptConfigError(f"data.decontam.benchmarks: {name} path={str(path)!r} does not exist")


def _executors(
    dcfg: DataConfig,
    root: Path,
    sources: list[SourceConfig],
    bench_files: dict[str, str],
    tokenizer: str,
    eod: str | None,
) -> list[tuple[str, Any]]:
    """The executor stages, each depending on the one before: ``[(name, executor), ...]``."""
    from moe_adapt.data import dtsteps as S
    from moe_adapt.data.executors import make_executor
    from moe_adapt.data.minhash import FastWordTokenizer

    r, n = str(root), dcfg.tasks
    mh = dcfg.dedup.fast_minhash_config()
    decontam = dcfg.decontam.enabled and bool(bench_files)
    filters: list[Any] = [S.ReadSources(r, sources), S.CleanStep(r, dcfg)]
    if dcfg.langid.enabled:
        filters.append(S.LangIdStep(r, dcfg))
    if dcfg.quality.enabled:
        filters.append(S.QualityStep(r, dcfg))
    if dcfg.dedup.exact:
        filters.append(S.ExactHashStep(r))
    if dcfg.dedup.minhash:
        filters.append(S.SignatureStep(r, str(root / "sigs"), mh, FastWordTokenizer(strip_marks=True)))
    filters.append(S.DocWriter(str(root / "filtered")))
    plan: list[tuple[str, list[Any], int]] = [("1_filter", filters, n)]
    if dcfg.dedup.minhash:
        from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets

        plan.append(
            (
                "2_buckets",
                [MinhashDedupBuckets(str(root / "sigs"), str(root / "buckets"), config=mh)],
                mh.num_buckets,
            )
        )
    dd = dcfg.dedup
    plan.append(("3_duplicates", [S.DuplicatesStep(r, n, dd.exact, dd.minhash, dd.max_examples)], 1))
    dedup: list[Any] = [S.DocReader(str(root / "filtered")), S.DedupFilterStep(r)]
    if decontam:
        dedup.append(S.DecontamCountStep(r, dcfg, bench_files))
    dedup.append(S.DocWriter(str(root / "deduped")))
    plan.append(("4_dedup", dedup, n))
    score: list[Any] = [S.DocReader(str(root / "deduped"))]
    if decontam:
        plan.append(("5_common", [S.CommonNgramsStep(r, n, dcfg)], 1))
        score.append(S.DecontamMatchStep(r, dcfg, bench_files, tokenizer))
    score += [S.ScoreStep(r, dcfg), S.DocWriter(str(root / "final"))]
    plan.append(("6_score", score, n))
    plan.append(("7_quantiles", [S.QuantilesStep(r, n, dcfg)], 1))
    shards = [S.DocReader(str(root / "final")), S.ShardStep(r, tokenizer, eod, dcfg.tokenize.batch_size)]
    plan.append(("8_shards", shards, n))
    roles = {s.name: s.role for s in sources}
    plan.append(("9_merge", [S.MergeShardsStep(r, n, roles)], 1))
    out: list[tuple[str, Any]] = []
    depends = None
    for name, pipeline, tasks in plan:
        depends = make_executor(
            dcfg, name, pipeline, tasks, root / "logs" / name, depends, slurm_logs=root / "slurm_logs"
        )
        out.append((name, depends))
    return out


def _run_executors(dcfg: DataConfig, stages: list[tuple[str, Any]], root: Path) -> None:
    """Run the executor stages (the last launches the ones it depends on); name a failed task's log."""
    from moe_adapt.data.dedup import _quiet_datatrove
    from moe_adapt.data.executors import cancel_jobs, start_cluster, wait_for_slurm

    start_cluster(dcfg)
    last = stages[-1][1]
    try:
        with _quiet_datatrove():
            last.run()
    except Exception as e:  # a task failed: datatrove re-raises its exception
        if dcfg.executor == "slurm":  # no task ran here: submitting a job failed
            submitted = [str(ex.job_id) for _, ex in stages if ex.job_id not in (None, -1)]
            name = next((n for n, ex in stages if ex.job_id is None), stages[-1][0])
            cancel_jobs(submitted)
            done = f"cancelled those submitted: {','.join(submitted)}" if submitted else "none submitted"
            raise MoEAdaptError(
                f"data: submitting executor stage {name} to SLURM failed ({type(e).__name__}: {e}; sbatch "
                f"prints why above); {done}"
            ) from e
        for stage_name, ex in stages:
            logs = root / "logs" / stage_name
            incomplete = ex.get_incomplete_ranks()
            if incomplete:
                log_path = logs / "logs" / f"task_{incomplete[0]:05d}.log"
                raise MoEAdaptError(
                    f"data: task {incomplete[0]} of executor stage {stage_name} failed "
                    f"({type(e).__name__}: {e}); its log: {log_path}"
                ) from e
        raise
    if dcfg.executor == "slurm":  # the jobs were submitted: wait for the last one's tasks
        wait_for_slurm(dcfg, stages, root)


def build_corpus(dcfg: DataConfig, out: Path, work: Path, *, tokenizer: str, seed: int) -> dict[str, Any]:
    """Run the data stage's executor stages in ``work`` (the stage's scratch folder, so that a re-run
    after a crash runs only unfinished tasks) and write the outputs into ``out``; ``tokenizer`` is the
    folder whose tokenizer makes the shards. Returns the stage summary."""
    from moe_adapt.data.shards import load_tokenizer

    sources = list(dcfg.sources)
    bench_files = {b.name: Path(b.path) for b in dcfg.decontam.benchmarks}
    if dcfg.demo.enabled:
        demo, demo_bench = demo_sources(dcfg, work)
        sources += demo
        bench_files.update(demo_bench)
    if not sources:
        raise MoEAdaptConfigError("data.sources is empty: add a source, or set data.demo.enabled=true")
    _check_sources(sources, bench_files)
    load_tokenizer(tokenizer)  # a missing tokenizer is one line before any task starts
    eod = _eod_token(Path(tokenizer), dcfg.tokenize.eod_token)
    settings = {
        "data": {k: v for k, v in dcfg.as_dict().items() if k not in ("executor", "workers", "slurm", "ray")},
        "seed": seed,
        "tokenizer": str(tokenizer),
    }
    root = StepCache(work / "dt", settings, what="data").root
    stages = _executors(dcfg, root, sources, {k: str(v) for k, v in bench_files.items()}, tokenizer, eod)
    start = time.perf_counter()
    _run_executors(dcfg, stages, root)
    log.info("data: executor stages done in %.1f s", time.perf_counter() - start)
    return _finish(dcfg, root, sources, bench_files, Path(tokenizer), out)


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


def _check_contamination(dcfg: DataConfig, report: dict[str, Any]) -> None:
    remaining = float(report.get("remaining_share", 0.0))
    if remaining > dcfg.max_contamination and not dcfg.allow_contamination:
        raise MoEAdaptError(
            f"data: {remaining:.2%} of training documents still overlap a benchmark, above "
            f"data.max_contamination={dcfg.max_contamination}; set data.decontam.remove=true, raise "
            "data.max_contamination, or data.allow_contamination=true"
        )


def _step_stats(root: Path, name: str) -> tuple[Any, list[dict[str, Any]]]:
    """The counts of step ``name`` summed over its tasks (a :class:`StepStats`), and the task records."""
    from moe_adapt.data.steps import StepStats

    st = StepStats(name)
    records = [
        json.loads(p.read_text(encoding="utf-8")) for p in sorted((root / "stats" / name).glob("*.json"))
    ]
    for rec in records:
        st.seconds += rec["seconds"]
        for key in ("docs_in", "docs_out", "chars_in", "chars_out"):
            getattr(st, key).update(rec[key])
        for lang, reasons in rec["reasons"].items():
            st.reasons.setdefault(lang, Counter()).update(reasons)
    for lang, n in st.docs_in.items():  # anything not explained by a reason was dropped silently: name it
        missing = n - st.docs_out[lang] - sum(st.reasons.get(lang, Counter()).values())
        if missing > 0:
            st.drop(lang, name)
    return st, records


def _contamination(dcfg: DataConfig, root: Path, bench_files: dict[str, Path], n_docs: int) -> dict[str, Any]:
    """The contamination report (as :func:`moe_adapt.data.decontam.decontaminate` writes it, with
    tokens removed per benchmark) from the tasks' counts."""
    from moe_adapt.data.decontam import DecontamConfig as Settings
    from moe_adapt.data.dtsteps import benchmark_index

    d = dcfg.decontam
    settings = Settings(
        n=d.n,
        min_overlap=d.min_overlap,
        any_hit=d.any_hit,
        max_doc_freq=d.max_doc_freq,
        min_common_docs=d.min_common_docs,
    )
    index, items = benchmark_index(dcfg, {k: str(v) for k, v in bench_files.items()})
    common = json.loads((root / "common.json").read_text())
    common_set = set(common["common"])
    _, records = _step_stats(root, "decontam")
    per_bench: dict[str, dict[str, Any]] = {}
    for name, count in items.items():
        only_common = sum(1 for k, g in index.item_grams.items() if k[0] == name and not g - common_set)
        entry: dict[str, Any] = {
            "items": count,
            "items_indexed": index.indexed[name],
            "items_skipped_short": index.skipped_short[name],
            "items_only_common_ngrams": only_common,
            "docs_matched": 0,
            "docs_removed": 0,
            "words_removed": 0,
            "examples": [],
            "tokens_removed": 0,
        }
        examples = []
        for rec in records:
            b = rec["benchmarks"][name]
            for k in ("docs_matched", "docs_removed", "words_removed", "tokens_removed"):
                entry[k] += b[k]
            examples += b["examples"]
        entry["examples"] = [
            {k: e[k] for k in ("doc_id", "item_id", "overlap")}
            for e in sorted(examples, key=lambda e: e["ordinal"])[: settings.max_examples]
        ]
        per_bench[name] = entry
    removed = sum(b["docs_removed"] for b in per_bench.values())
    report = {
        "config": {k: getattr(settings, k) for k in settings.__dataclass_fields__},
        "corpus_docs": common["docs"],
        "corpus_words": sum(rec["corpus_words"] for rec in records),
        "indexed_ngrams": len(index.postings),
        "common_ngrams_ignored": len(common_set),
        "common_threshold_docs": common["threshold"],
        "docs_removed": removed,
        "words_removed": sum(b["words_removed"] for b in per_bench.values()),
        "benchmarks": per_bench,
        "tokens_removed": sum(b["tokens_removed"] for b in per_bench.values()),
        "removed": d.remove,
        "remaining_share": 0.0 if d.remove else removed / max(n_docs, 1),
    }
    log.info(
        "data: decontam removed %d docs overlapping %d benchmark(s)",
        removed if d.remove else 0,
        len(bench_files),
    )
    return report


def _dedup_examples(root: Path, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    snippets: dict[str, dict[str, Any]] = {}
    for rec in records:
        snippets.update(rec.get("snippets", {}))
    out = []
    for pair in json.loads((root / "dedup_examples.json").read_text())["pairs"]:
        removed, kept = snippets.get(str(pair["removed"])), snippets.get(str(pair["kept"]))
        if removed is None:
            continue
        out.append(
            {
                "kind": pair["kind"],
                "lang": removed["lang"],
                "removed_id": removed["id"],
                "kept_id": kept["id"] if kept else None,
                "removed_text": removed["text"],
                "kept_text": kept["text"] if kept else None,
            }
        )
    return out


def _finish(
    dcfg: DataConfig,
    root: Path,
    sources: list[SourceConfig],
    bench_files: dict[str, Path],
    tokenizer: Path,
    out: Path,
) -> dict[str, Any]:
    merged = root / "merged"
    if not (merged / "shards" / "manifest.json").is_file():
        raise MoEAdaptError("data: no documents survived the filters; see the step counts above")
    steps: dict[str, dict[str, Any]] = {}
    read, records = _step_stats(root, "read")
    bad: dict[str, dict[str, int]] = {s.name: {} for s in sources}
    for rec in records:
        for src, counts in rec["bad_lines"].items():
            for k, v in counts.items():
                bad[src][k] = bad[src].get(k, 0) + v
    steps["read"] = {**read.as_dict(), "bad_lines": bad}
    for name, on in (("clean", True), ("langid", dcfg.langid.enabled), ("quality", dcfg.quality.enabled)):
        if on:
            steps[name] = _step_stats(root, name)[0].as_dict()
    dedup, records = _step_stats(root, "dedup")
    for lang in dedup.docs_in:
        for kind, on in (("exact_duplicate", dcfg.dedup.exact), ("near_duplicate", dcfg.dedup.minhash)):
            if on:
                dedup.reasons.setdefault(lang, Counter())[kind] += 0
    for extra in ("exact_hash", "minhash_signature"):
        dedup.seconds += _step_stats(root, extra)[0].seconds
    dup_stats = root / "stats" / "duplicates.json"
    dedup.seconds += json.loads(dup_stats.read_text())["seconds"] if dup_stats.is_file() else 0.0
    steps["dedup"] = {**dedup.as_dict(), "examples": _dedup_examples(root, records)[:5]}
    if dcfg.decontam.enabled and bench_files:
        decontam, _ = _step_stats(root, "decontam")
        decontam.seconds += _step_stats(root, "decontam_count")[0].seconds  # pass 1
        steps["decontam"] = decontam.as_dict()
        contamination = _contamination(dcfg, root, bench_files, sum(decontam.docs_in.values()))
        atomic_write_json(out / "contamination.json", contamination)
        _check_contamination(dcfg, contamination)
    if bench_files:
        (out / "benchmarks").mkdir()
        for name, path in bench_files.items():
            write_clean_benchmark(path, out / "benchmarks" / f"{name}.jsonl", dcfg.clean)
    buckets = json.loads((root / "stats" / "buckets.json").read_text())
    steps["buckets"] = {k: buckets[k] for k in ("seconds", "buckets", "per_language")}
    for folder in ("shards", "heldout"):
        if (merged / folder / "manifest.json").is_file():
            shutil.copytree(merged / folder, out / folder)
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    heldout_path = out / "heldout" / "manifest.json"
    heldout = json.loads(heldout_path.read_text()) if heldout_path.is_file() else None
    shard_seconds = (
        _step_stats(root, "shards")[0].seconds
        + json.loads((root / "stats" / "merge.json").read_text())["seconds"]
    )
    steps["shards"] = {
        "seconds": round(shard_seconds, 3),
        "train_tokens": manifest["totals"]["tokens"],
        "heldout_tokens": heldout["totals"]["tokens"] if heldout else 0,
    }
    train_table = _shard_table(manifest)
    heldout_table = _shard_table(heldout) if heldout else {}
    stats: dict[str, Any] = {
        "steps": steps,
        "train": train_table,
        "heldout": heldout_table,
        "executor": {"kind": dcfg.executor, "tasks": dcfg.tasks, "workers": dcfg.workers},
        "fertility": fertility(train_table, heldout_table),
    }
    atomic_write_json(out / "stats.json", stats)
    (out / "stats.md").write_text(render_stats(stats), encoding="utf-8")
    for line in render_stats(stats).splitlines():
        log.info("data: %s", line)
    return {
        "shards": "shards",
        "heldout": "heldout" if heldout else None,
        "train_tokens": manifest["totals"]["tokens"],
        "train_documents": manifest["totals"]["documents"],
        "heldout_documents": buckets["heldout_documents"],
    }


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
