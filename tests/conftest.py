"""Shared fixtures: tiny dense checkpoints of every supported family, built inside the tests."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # megatron-core jit-compiles fused kernels: slow on CPU
torch.set_num_threads(1)

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=97,
    max_position_embeddings=128,
)


def build_dense(path: Path, family: str, seed: int = 0, **overrides: object) -> Path:
    """Save a tiny dense model of ``family`` whose every weight is random (biases and norms too)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs: dict[str, object] = {**TINY, "tie_word_embeddings": False}
    if family == "qwen3":
        kwargs["head_dim"] = 16
    if family == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(overrides)
    config = AutoConfig.for_model(family, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    model.save_pretrained(path, safe_serialization=True)
    return path


def pickle_checkpoint(src: Path, dst: Path) -> Path:
    """A copy of checkpoint ``src`` whose weights are a pickle (``pytorch_model.bin``, no safetensors), as
    older checkpoints are saved (transformers 5 writes safetensors even with ``safe_serialization=False``)."""
    from safetensors.torch import load_file

    dst.mkdir(parents=True)
    for file in src.iterdir():
        if file.suffix != ".safetensors" and file.is_file():
            shutil.copy2(file, dst / file.name)
    torch.save(load_file(src / "model.safetensors"), dst / "pytorch_model.bin")
    return dst


@pytest.fixture(scope="session")
def dense_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``dense_factory(family, **config_overrides)`` -> path of a cached tiny dense checkpoint."""
    cache: dict[tuple, Path] = {}

    def make(family: str, **overrides: object) -> Path:
        key = (family, tuple(sorted(overrides.items())))
        if key not in cache:
            cache[key] = build_dense(tmp_path_factory.mktemp(f"dense_{family}"), family, **overrides)
        return cache[key]

    return make
