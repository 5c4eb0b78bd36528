"""The data stage's per-document steps: reading sources, cleaning, language ID and quality rules.

Each filter step is a generator over documents (``{"id", "text", "lang", "source", "role"}``) that
records why it drops a document in a :class:`StepStats`; :func:`run_step` counts documents and
characters in and out per language and times the step. :mod:`moe_adapt.data.pipeline` chains them.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_adapt.data.clean import clean_text
from moe_adapt.data.config import DataConfig, SourceConfig
from moe_adapt.data.jsonl import ReadStats, read_documents
from moe_adapt.errors import MoEAdaptConfigError, MoEAdaptError

log = logging.getLogger(__name__)

Doc = dict[str, Any]


def is_heldout(doc: Doc, fraction: float) -> bool:
    """Whether ``doc`` goes to the held-out split: a stable hash of its id below ``fraction`` (the
    same document is held out in every run, whatever the other documents)."""
    h = int.from_bytes(hashlib.blake2b(str(doc["id"]).encode(), digest_size=8).digest(), "little")
    return h / 2**64 < fraction


@dataclass
class StepStats:
    """Documents and characters in and out of one step, per language, with drop reasons."""

    name: str
    docs_in: Counter[str] = field(default_factory=Counter)
    docs_out: Counter[str] = field(default_factory=Counter)
    chars_in: Counter[str] = field(default_factory=Counter)
    chars_out: Counter[str] = field(default_factory=Counter)
    reasons: dict[str, Counter[str]] = field(default_factory=dict)
    seconds: float = 0.0

    def drop(self, lang: str, reason: str) -> None:
        self.reasons.setdefault(lang, Counter())[reason] += 1

    def as_dict(self) -> dict[str, Any]:
        langs = sorted(set(self.docs_in) | set(self.docs_out))
        mb = sum(self.chars_in.values()) / 1e6
        return {
            "seconds": round(self.seconds, 3),
            "mb_per_s": round(mb / self.seconds, 3) if self.seconds > 0 else None,
            "languages": {
                lang: {
                    "docs_in": self.docs_in[lang],
                    "docs_out": self.docs_out[lang],
                    "chars_in": self.chars_in[lang],
                    "chars_out": self.chars_out[lang],
                    "dropped": dict(self.reasons.get(lang, Counter()).most_common()),
                }
                for lang in langs
            },
        }


def counted(step: StepStats, docs: Iterable[Doc], out: bool) -> Iterator[Doc]:
    docs_c, chars_c = (step.docs_out, step.chars_out) if out else (step.docs_in, step.chars_in)
    for d in docs:
        lang = str(d.get("lang", "und"))
        docs_c[lang] += 1
        chars_c[lang] += len(d["text"])
        yield d


def run_step(step: StepStats, docs: list[Doc], fn: Callable[[Iterable[Doc]], Iterable[Doc]]) -> list[Doc]:
    start = time.perf_counter()
    result = list(counted(step, fn(counted(step, docs, out=False)), out=True))
    step.seconds = time.perf_counter() - start
    for lang, n in step.docs_in.items():  # anything not explained by a reason was dropped silently: name it
        missing = n - step.docs_out[lang] - sum(step.reasons.get(lang, Counter()).values())
        if missing > 0:
            step.drop(lang, step.name)
    log.info(
        "data: %-8s %7d -> %7d docs (%.1f s)",
        step.name,
        sum(step.docs_in.values()),
        sum(step.docs_out.values()),
        step.seconds,
    )
    return result


# ------------------------------------------------------------------------------------------- read
def read_source(src: SourceConfig, key: str, read_stats: ReadStats) -> Iterator[Doc]:
    path = Path(src.path)
    if not path.exists():
        raise MoEAdaptConfigError(f"{key}.path={src.path!r} does not exist")
    if src.format == "jsonl":
        rows: Iterable[dict[str, Any]] = read_documents(path, text_key=src.text_key, stats=read_stats)
    else:
        import datasets

        try:
            if src.format == "parquet":
                files = sorted(str(p) for p in path.glob("*.parquet")) if path.is_dir() else [str(path)]
                ds = datasets.load_dataset("parquet", data_files=files, split="train")
            else:
                ds = datasets.load_from_disk(str(path))
        except Exception as e:  # datasets raises many types for unreadable input
            raise MoEAdaptError(f"{key}.path={src.path!r} cannot be read as {src.format}: {e}") from None
        if src.text_key not in ds.column_names:
            raise MoEAdaptConfigError(
                f"{key}.text_key={src.text_key!r} is not a column of {src.path} "
                f"(columns: {', '.join(ds.column_names)})"
            )
        rows = (r for r in ds if isinstance(r.get(src.text_key), str) and r[src.text_key].strip())
    for i, row in enumerate(rows):
        if src.max_docs is not None and i >= src.max_docs:
            return
        text = row[src.text_key]
        yield {
            "id": f"{src.name}/{row.get('id', i)}",
            "text": text,
            "lang": src.lang if src.lang != "auto" else row.get("lang", "auto"),
            "source": src.name,
            "role": src.role,
        }


def demo_sources(cfg: DataConfig, work: Path) -> tuple[list[SourceConfig], dict[str, Path]]:
    from moe_adapt.data.demo_corpus import build_demo_corpus

    demo_dir = work / "demo"
    if not (demo_dir / "summary.json").is_file():
        try:
            build_demo_corpus(
                demo_dir,
                max_docs=cfg.demo.max_docs,
                include_hebrew="he" in cfg.demo.languages,
                n_benchmark=cfg.demo.benchmark_items,
                plant_benchmark=cfg.demo.plant_benchmark,
                seed=cfg.demo.seed,
            )
        except ModuleNotFoundError as e:
            raise MoEAdaptError(
                f"data.demo.enabled=true needs the demo corpora: pip install 'moe-adapt[demo]' "
                f"({e.name} is missing)"
            ) from None
    names = {"ar": ("hadith_ar", "target"), "en": ("hadith_en", "english"), "he": ("mishnah_he", "target")}
    sources = [
        SourceConfig(
            name=names[lang][0], path=str(demo_dir / f"{lang}.jsonl"), lang=lang, role=names[lang][1]
        )
        for lang in cfg.demo.languages
    ]
    benchmarks = {p.stem: p for p in sorted((demo_dir / "benchmark").glob("*.jsonl"))}
    return sources, benchmarks


# ----------------------------------------------------------------------------------- filter steps
def clean_step(cfg: DataConfig, step: StepStats) -> Callable[[Iterable[Doc]], Iterator[Doc]]:
    def run(docs: Iterable[Doc]) -> Iterator[Doc]:
        for d in docs:
            text = clean_text(d["text"], cfg.clean)
            if not text:
                step.drop(str(d["lang"]), "empty_after_cleaning")
                continue
            yield {**d, "text": text}

    return run


def langid_step(cfg: DataConfig, step: StepStats) -> Callable[[Iterable[Doc]], Iterator[Doc]]:
    from moe_adapt.data.langid import LanguageIdentifier

    model = LanguageIdentifier()

    def run(docs: Iterable[Doc]) -> Iterator[Doc]:
        for d in docs:
            lang, score = model.predict_one(d["text"])
            declared = d["lang"]
            if declared == "auto":
                if lang == "und":
                    step.drop("und", "language_undetermined")
                    continue
                yield {**d, "lang": lang, "lang_score": round(score, 4)}
            elif lang != declared and score >= cfg.langid.min_score:
                step.drop(str(declared), f"detected_{lang}")
            else:
                yield {**d, "lang_score": round(score, 4)}

    return run


def quality_step(cfg: DataConfig, step: StepStats) -> Callable[[Iterable[Doc]], Iterator[Doc]]:
    from dataclasses import replace

    from moe_adapt.data.quality import check_quality, thresholds_for

    table: dict[str, Any] = {}

    def thresholds(lang: str) -> Any:
        if lang not in table:
            try:
                base = thresholds_for(lang)
            except MoEAdaptConfigError:
                base = None
            overrides: dict[str, Any] = dict(cfg.quality.thresholds.get(lang, {}))
            table[lang] = replace(base, **overrides) if base is not None else None
        return table[lang]

    def run(docs: Iterable[Doc]) -> Iterator[Doc]:
        for d in docs:
            t = thresholds(d["lang"])
            if t is None:
                step.drop(d["lang"], "no_thresholds_for_language")
                continue
            result = check_quality(d["text"], d["lang"], t)
            if result.keep:
                yield d
            else:
                step.drop(d["lang"], result.reason or "quality")

    return run
