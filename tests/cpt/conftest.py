"""Synthetic shards for the sampler (and trainer) tests, written with megatron-core's IndexedDatasetBuilder.

Every token names where it came from: document ``d`` of shard ``k`` holds ``SHARD_BASE * (k + 1) + d``
repeated (``d < SHARD_BASE``), followed by the end-of-document id 0.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

SHARD_BASE = 1000
EOD = 0


def write_synthetic_shards(out: Path, specs: list[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    """Write one shard per spec (source, lang, bucket, role, docs, min_len, max_len) plus manifest.json."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries = []
    for k, spec in enumerate(specs):
        prefix = f"{spec['source']}__{spec['lang']}__b{spec['bucket']}"
        builder = IndexedDatasetBuilder(str(out / f"{prefix}.bin"), dtype=np.uint16)
        tokens = 0
        for d in range(spec["docs"]):
            n = int(rng.integers(spec.get("min_len", 3), spec.get("max_len", 12) + 1))
            doc = np.full(n, SHARD_BASE * (k + 1) + d, dtype=np.int64)
            doc[-1] = EOD
            builder.add_document(doc, [n])
            tokens += n
        builder.finalize(str(out / f"{prefix}.idx"))
        entries.append(
            {
                "prefix": prefix,
                "source": spec["source"],
                "lang": spec["lang"],
                "bucket": str(spec["bucket"]),
                "role": spec["role"],
                "documents": spec["docs"],
                "tokens": tokens,
            }
        )
    manifest = {"version": 1, "dtype": "uint16", "vocab_size": 65000, "eod_id": EOD, "shards": entries}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def shard_of(tokens: np.ndarray) -> np.ndarray:
    """Shard index of every non-EOD token (-1 for EOD)."""
    return np.where(tokens == EOD, -1, tokens // SHARD_BASE - 1)


@pytest.fixture
def make_shards(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_shards(specs, name="shards")`` returns the folder holding shards + manifest."""

    def make(specs: list[dict[str, Any]], name: str = "shards", seed: int = 0) -> Path:
        write_synthetic_shards(tmp_path / name, specs, seed)
        return tmp_path / name

    return make


def bilingual(docs: int = 400, buckets: int = 3) -> list[dict[str, Any]]:
    """ar (target) and en (english) sources, ``buckets`` buckets each: shard k = (lang, bucket) in order."""
    return [
        {"source": src, "lang": lang, "bucket": b, "role": role, "docs": docs}
        for src, lang, role in (("news_ar", "ar", "target"), ("wiki_en", "en", "english"))
        for b in range(buckets)
    ]


def save_tiny_qwen3_moe(path: Path, vocab_size: int, *, tie_word_embeddings: bool) -> Path:
    """A tiny Qwen3-MoE checkpoint (hidden 64, 2 layers, 8 experts, top-2), seed 0."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(cfg).save_pretrained(str(path))
    return path
