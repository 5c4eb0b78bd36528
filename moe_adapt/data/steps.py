"""What the data stage's steps share: :class:`StepStats` (documents and characters in/out per
language, drop reasons), the held-out rule :func:`is_heldout`, the demo corpus as sources
(:func:`demo_sources`), :func:`open_dataset` (a Parquet or saved-dataset source, one line when it
cannot be read) and :func:`read_source`, a whole source as document dicts (the demo's pretraining
corpus reads it). The steps themselves are datatrove ``PipelineStep``s in the package
:mod:`moe_adapt.data.dtsteps`.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


# ------------------------------------------------------------------------------------------- read
def open_dataset(src: SourceConfig, key: str) -> Any:
    """The ``datasets.Dataset`` of a Parquet source (a file or a folder of ``*.parquet``) or a
    ``save_to_disk`` folder; one line naming ``key`` when it cannot be read or lacks ``text_key``."""
    import datasets

    path = Path(src.path)
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
    return ds


def read_source(src: SourceConfig, key: str, read_stats: ReadStats) -> Iterator[Doc]:
    path = Path(src.path)
    if not path.exists():
        raise MoEAdaptConfigError(f"{key}.path={src.path!r} does not exist")
    if src.format == "jsonl":
        rows: Iterable[dict[str, Any]] = read_documents(path, text_key=src.text_key, stats=read_stats)
    else:
        ds = open_dataset(src, key)
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
