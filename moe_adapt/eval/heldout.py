"""Read the data stage's held-out shards (``manifest.json`` + megatron-core ``.bin``/``.idx``) per language.

The manifest lists one shard per (source, language, difficulty bucket); every shard of a language
is pooled. With ``max_docs`` a seeded sample of the language's documents is kept (the same
documents for every model, so losses are comparable), in shard order.

The shards keep token ids, not text. The size of the text the ids spell (for bits per byte, see
:mod:`moe_adapt.eval.bits`) is read off the tokenizer that wrote them, named in the manifest
(``tokenizer``), or the ``tokenizer`` given when that one is gone.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moe_adapt.errors import MoEAdaptError
from moe_adapt.eval.bits import TokenSizes, token_sizes

log = logging.getLogger(__name__)

__all__ = ["HeldOut", "load_heldout"]


@dataclass
class HeldOut:
    """Held-out documents per language."""

    docs: dict[str, list[np.ndarray]]
    """Language -> documents, each a 1-D int64 array of token ids (EOD included when written)."""
    available: dict[str, int]
    """Language -> documents in the shards before sampling."""
    manifest: dict[str, Any] = field(default_factory=dict)
    """The manifest as read."""
    token_sizes: TokenSizes | None = None
    """Bytes and characters per token id of the shards' tokenizer (None when it could not be loaded:
    then no bits per byte are reported)."""

    @property
    def tokens(self) -> dict[str, int]:
        """Language -> tokens in the sampled documents."""
        return {lang: int(sum(d.size for d in docs)) for lang, docs in self.docs.items()}


def load_heldout(
    heldout_dir: str | Path,
    *,
    languages: list[str] | None = None,
    max_docs: int | None = None,
    seed: int = 0,
    key: str = "eval.heldout",
    tokenizer: str | Path | None = None,
) -> HeldOut:
    """Read held-out documents per language from ``heldout_dir``.

    The text sizes (:attr:`HeldOut.token_sizes`) come from the manifest's tokenizer, else from
    ``tokenizer`` (same vocabulary); with neither a warning says bits per byte are not reported.

    Raises:
        MoEAdaptError: naming ``key`` when the folder or its manifest is missing or unreadable, a
            requested language has no shard, or a shard cannot be opened.
    """
    from moe_adapt.data.shards import open_shard

    root = Path(heldout_dir)
    manifest_file = root / "manifest.json"
    if not root.is_dir():
        raise MoEAdaptError(
            f"{key}={str(root)!r} does not exist: run the data stage first, or point {key} at a folder "
            "of held-out shards (or set it to null to skip held-out loss)"
        )
    if not manifest_file.is_file():
        raise MoEAdaptError(f"{key}={str(root)!r} has no manifest.json; is it a data-stage shard folder?")
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        shards = manifest["shards"]
        if not isinstance(shards, list):
            raise TypeError("'shards' is not a list")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise MoEAdaptError(f"{key}: cannot read {manifest_file}: {err}") from err
    by_lang: dict[str, list[dict[str, Any]]] = {}
    for entry in shards:
        by_lang.setdefault(str(entry["lang"]), []).append(entry)
    wanted = list(languages) if languages else sorted(by_lang)
    missing = [lang for lang in wanted if lang not in by_lang]
    if missing:
        raise MoEAdaptError(
            f"eval.languages={wanted!r} is invalid: {key} has no shard for {missing}; "
            f"it has {sorted(by_lang)}"
        )
    docs: dict[str, list[np.ndarray]] = {}
    available: dict[str, int] = {}
    for lang in wanted:
        datasets = [(e["prefix"], open_shard(root, e["prefix"])) for e in by_lang[lang]]
        refs = [(s, i) for s, (_, ds) in enumerate(datasets) for i in range(len(ds))]
        available[lang] = len(refs)
        if max_docs is not None and len(refs) > max_docs:
            rng = np.random.default_rng([seed, sum(lang.encode())])
            keep = np.sort(rng.choice(len(refs), size=max_docs, replace=False))
            refs = [refs[int(k)] for k in keep]
        docs[lang] = [np.asarray(datasets[s][1][i], dtype=np.int64) for s, i in refs]
        if not any(d.size >= 2 for d in docs[lang]):
            raise MoEAdaptError(f"{key}: language {lang!r} has no held-out document of 2+ tokens")
    return HeldOut(
        docs=docs, available=available, manifest=manifest, token_sizes=_sizes(manifest, tokenizer, key)
    )


def _sizes(manifest: dict[str, Any], fallback: str | Path | None, key: str) -> TokenSizes | None:
    """The token sizes of the manifest's tokenizer (else ``fallback``), checked against its vocabulary."""
    from moe_adapt.data.shards import load_tokenizer

    tried = []
    for source in (manifest.get("tokenizer"), fallback):
        if not source or not Path(source).exists():
            tried += [str(source)] if source else []
            continue
        try:
            tok = load_tokenizer(source)
        except MoEAdaptError as err:
            tried.append(f"{source} ({err})")
            continue
        eod = manifest.get("eod_id")
        sizes = token_sizes(tok, zero_ids=[eod] if isinstance(eod, int) else [])
        vocab = manifest.get("vocab_size")
        if isinstance(vocab, int) and sizes.bytes_V.size < vocab:
            tried.append(f"{source} (vocabulary {sizes.bytes_V.size} < the shards' {vocab})")
            continue
        return sizes
    log.warning(
        "%s: no tokenizer to size the held-out text (tried %s); bits per byte are not reported",
        key,
        ", ".join(tried) or "none: the manifest names no tokenizer",
    )
    return None
