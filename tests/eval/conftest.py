"""Fixtures of the eval-stage tests: a tiny tokenizer, a tiny dense Llama and Qwen3-MoE saved with
``save_pretrained``, held-out shards written by the data stage's ``write_shards``, a parallel
multiple-choice benchmark (with one malformed line per language) and a contamination report.
Everything is built in the test; nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

AR = [
    "حدثنا قتيبة بن سعيد قال حدثنا الليث عن نافع عن ابن عمر",
    "قال رسول الله صلى الله عليه وسلم إنما الأعمال بالنيات",
    "عن أبي هريرة قال قال رسول الله من كان يؤمن بالله واليوم الآخر",
    "الدين النصيحة قلنا لمن قال لله ولكتابه ولرسوله",
]
EN = [
    "Qutaibah bin Said narrated to us that Al-Laith narrated from Nafi from Ibn Umar",
    "The Messenger of Allah said actions are judged by intentions",
    "Abu Hurairah said the Messenger of Allah said whoever believes in Allah and the Last Day",
    "Religion is sincerity we said to whom he said to Allah and His Book and His Messenger",
]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A whitespace + BPE tokenizer (vocab 128) trained here on the ar/en sentences; ``tokenizer.json``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=128, special_tokens=["<|pad|>", "<|endoftext|>", "<unk>"])
    tok.train_from_iterator((AR + EN) * 5, trainer)
    out = tmp_path_factory.mktemp("tok")
    tok.save(str(out / "tokenizer.json"))
    return out


def _hf_tokenizer(tokenizer_dir: Path) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_dir / "tokenizer.json"),
        pad_token="<|pad|>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
    )


def _tiny(kind: str, vocab: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    common: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    torch.manual_seed(0)
    if kind == "dense":
        return LlamaForCausalLM(LlamaConfig(intermediate_size=128, **common))
    config = Qwen3MoeConfig(
        intermediate_size=128,
        moe_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        head_dim=16,
        **common,
    )
    return Qwen3MoeForCausalLM(config)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str, Path]:
    """``{"dense": tiny Llama dir, "moe": tiny Qwen3-MoE dir}``, each with weights and tokenizer."""
    tok = _hf_tokenizer(tokenizer_dir)
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for kind in ("dense", "moe"):
        model = _tiny(kind, len(tok))
        model.save_pretrained(root / kind)
        tok.save_pretrained(root / kind)
        out[kind] = root / kind
    return out


def write_benchmark(folder: Path, malformed: bool = True) -> dict[str, Path]:
    """Parallel ar/en items (6 each, source_key-paired) + one malformed line per language."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for lang, sents in (("ar", AR), ("en", EN)):
        lines = []
        for i in range(6):
            words = sents[i % 4].split()
            choices = [" ".join(sents[(i + k) % 4].split()[-3:]) for k in range(4)]
            answer = i % 4
            choices[0], choices[answer] = choices[answer], choices[0]
            item = {
                "id": f"hadith_qa_{lang}/{i}",
                "source_key": f"k{i}",
                "question": " ".join(words[:-3]),
                "choices": choices,
                "answer": answer,
            }
            lines.append(json.dumps(item, ensure_ascii=False))
        if malformed:
            lines.insert(2, '{"id": "broken", "question": "no choices"')
        paths[lang] = folder / f"hadith_qa_{lang}.jsonl"
        paths[lang].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A run directory as the data stage leaves it: data/heldout shards, data/benchmarks, contamination."""
    pytest.importorskip("megatron.core")
    from moe_adapt.data.shards import write_shards

    root = tmp_path_factory.mktemp("run")
    docs = [
        {"text": " ".join([s] * (1 + i % 3)), "lang": lang, "source": src, "bucket": i % 2}
        for lang, sents in (("ar", AR), ("en", EN))
        for src in ("hadith", "wiki")
        for i, s in enumerate(sents)
    ]
    write_shards(docs, tokenizer_dir / "tokenizer.json", root / "data" / "heldout")
    write_benchmark(root / "data" / "benchmarks")
    contamination = {
        "corpus_docs": 100,
        "docs_removed": 3,
        "words_removed": 120,
        "config": {"n": 8},
        "benchmarks": {"hadith_qa_ar": {"items": 6, "docs_matched": 2, "docs_removed": 2, "examples": []}},
    }
    (root / "data" / "contamination.json").write_text(json.dumps(contamination), encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def make_cfg() -> Any:
    """``make_cfg(run_dir, checkpoints, **eval_overrides)`` -> the object the runner hands the stage."""
    return _make_cfg


def _make_cfg(run_dir: Path, checkpoints: dict[str, Path], **overrides: Any) -> SimpleNamespace:
    """The object the runner hands the stage: ``.eval``, ``.run_dir``, ``.seed``."""
    from moe_adapt.eval.config import BenchmarkEntry, EvalConfig, ModelEntry

    kwargs: dict[str, Any] = dict(
        models=[ModelEntry(name, str(path)) for name, path in checkpoints.items()],
        heldout=str(run_dir / "data" / "heldout"),
        window=32,
        stride=16,
        batch_size=4,
        device="cpu",
        benchmarks=[
            BenchmarkEntry(
                name="hadith_qa",
                files={
                    lang: str(run_dir / "data" / "benchmarks" / f"hadith_qa_{lang}.jsonl")
                    for lang in ("ar", "en")
                },
            )
        ],
        bootstrap_resamples=200,
        contamination=str(run_dir / "data" / "contamination.json"),
    )
    kwargs.update(overrides)
    return SimpleNamespace(eval=EvalConfig(**kwargs), run_dir=str(run_dir), seed=0)
