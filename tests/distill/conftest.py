"""Tiny teacher/student checkpoints sharing a byte-level BPE with a chat template, built in the tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch


def build_lm(
    path: Path,
    family: str = "llama",
    seed: int = 0,
    vocab_texts: list[str] | None = None,
    **overrides: object,
) -> Path:
    """A tiny random causal LM of ``family`` saved with the builtin-text tokenizer (384 tokens)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from moe_adapt.demo.dense import build_tokenizer

    tok = build_tokenizer(vocab_texts)
    kwargs: dict[str, object] = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    if family == "qwen3_moe":
        kwargs.update(head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **kwargs))
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def lm_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``lm_factory(family, seed=..., **overrides)`` -> cached tiny checkpoint folder."""
    cache: dict[tuple, Path] = {}

    def make(
        family: str = "llama", seed: int = 0, vocab_texts: tuple[str, ...] | None = None, **overrides: object
    ) -> Path:
        key = (family, seed, vocab_texts, tuple(sorted(overrides.items())))
        if key not in cache:
            texts = list(vocab_texts) if vocab_texts is not None else None
            cache[key] = build_lm(tmp_path_factory.mktemp(f"lm_{family}"), family, seed, texts, **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Arithmetic training and held-out prompt sets (6 and 3 problems per language)."""
    from moe_adapt.distill.tasks import make_problems, write_problem_set

    folder = tmp_path_factory.mktemp("prompts")
    write_problem_set(folder / "train.jsonl", make_problems(6, split="train"))
    write_problem_set(folder / "test.jsonl", make_problems(3, split="test"))
    return folder / "train.jsonl", folder / "test.jsonl"
