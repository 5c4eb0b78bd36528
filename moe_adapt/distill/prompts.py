"""Prompt sets: JSONL files of ``{id, lang, prompt, answer?, answer_type?, reference_response?}``."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from moe_adapt.data.jsonl import ReadStats, read_documents
from moe_adapt.errors import MoEAdaptConfigError

log = logging.getLogger(__name__)

ANSWER_TYPES = ("numeric", "exact", "mc")


@dataclass(frozen=True)
class PromptRecord:
    """One prompt of a prompt set."""

    id: str
    lang: str
    prompt: str
    answer: str | None = None
    answer_type: str = "numeric"
    reference_response: str | None = None


def load_prompts(
    path: str | Path | None, langs: Sequence[str], *, key: str, limit: int | None = None
) -> list[PromptRecord]:
    """The prompts of ``path`` in ``langs`` (at most ``limit`` per language, in file order).

    Raises a config error naming ``key`` when the file is missing, has no usable prompt, repeats an
    id, or names an unknown answer type.
    """
    if not path or not Path(path).is_file():
        raise MoEAdaptConfigError(f"{key}={str(path) if path else None!r} is not a JSONL prompt file")
    stats = ReadStats()
    records: list[PromptRecord] = []
    seen: set[str] = set()
    per_lang: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    for i, obj in enumerate(read_documents(path, text_key="prompt", stats=stats)):
        lang = str(obj.get("lang", ""))
        if lang not in langs:
            skipped[lang or "<none>"] += 1
            continue
        if limit is not None and per_lang[lang] >= limit:
            continue
        rid = str(obj.get("id", f"line{i}"))
        if rid in seen:
            raise MoEAdaptConfigError(f"{key}={str(path)!r}: prompt id {rid!r} appears twice")
        answer_type = str(obj.get("answer_type", "numeric"))
        if answer_type not in ANSWER_TYPES:
            raise MoEAdaptConfigError(
                f"{key}={str(path)!r}: prompt {rid!r} has answer_type={answer_type!r}; "
                f"allowed: {', '.join(ANSWER_TYPES)}"
            )
        seen.add(rid)
        per_lang[lang] += 1
        answer = obj.get("answer")
        records.append(
            PromptRecord(
                id=rid,
                lang=lang,
                prompt=obj["prompt"],
                answer=None if answer is None else str(answer),
                answer_type=answer_type,
                reference_response=obj.get("reference_response"),
            )
        )
    if skipped:
        log.info("%s: skipped prompts in other languages: %s", key, dict(skipped))
    bad = stats.lines - stats.ok - stats.blank
    if bad:
        log.warning("%s: %d unreadable lines skipped (%s)", key, bad, stats.as_dict())
    if not records:
        raise MoEAdaptConfigError(
            f"{key}={str(path)!r} holds no prompt in languages {list(langs)} "
            f"({stats.ok} readable lines, languages seen: {dict(skipped) or 'none'})"
        )
    return records
