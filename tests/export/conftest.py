"""Fixtures of the export tests: the demo's byte-level BPE tokenizer, tiny Mixtral and Qwen3-MoE
checkpoints (what our upcycling writes: per-expert tensors, top-k renormalised) and a tiny dense
Llama saved with ``save_pretrained``, and held-out shards written by the data stage's
``write_shards``. Everything is built in the test; nothing is downloaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.eval.conftest import AR, EN


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from moe_adapt.demo.dense import build_tokenizer

    return build_tokenizer((AR + EN) * 4, vocab_size=320)


def tiny_model(kind: str, vocab: int, seed: int = 0) -> torch.nn.Module:
    """A random tiny ``mixtral``, ``qwen3_moe``, ``qwen2_moe`` (shared expert, top-k not renormalised,
    as Qwen1.5-MoE) or ``llama`` (hidden 64, 2 layers, 8 experts, top-2)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    common: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    extra: dict[str, Any] = {}
    if kind == "mixtral":
        extra = dict(intermediate_size=64, num_local_experts=8, num_experts_per_tok=2, sliding_window=None)
    elif kind == "qwen3_moe":
        extra = dict(
            intermediate_size=128,
            moe_intermediate_size=64,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            head_dim=16,
        )
    elif kind == "qwen2_moe":
        extra = dict(
            intermediate_size=128,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=64,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            use_sliding_window=False,
        )
    else:
        extra = dict(intermediate_size=128)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **common, **extra))
    with torch.no_grad():  # spread the routers so experts differ in use
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") and p.dim() == 2 and p.shape[0] == 8:
                p.normal_(0, 1.0)
    return model.eval()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> dict[str, Path]:
    """``{kind: dir}`` for mixtral, qwen3_moe, qwen2_moe and llama, each with weights and the tokenizer."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for kind in ("mixtral", "qwen3_moe", "qwen2_moe", "llama"):
        tiny_model(kind, len(tokenizer)).save_pretrained(root / kind)
        tokenizer.save_pretrained(root / kind)
        out[kind] = root / kind
    return out


@pytest.fixture(scope="session")
def heldout_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    """Held-out shards (ar, en) as the data stage writes them."""
    pytest.importorskip("megatron.core")
    from moe_adapt.data.shards import ShardConfig, write_shards

    root = tmp_path_factory.mktemp("heldout")
    tokenizer.backend_tokenizer.save(str(root / "tokenizer.json"))
    docs = [
        {"text": " ".join([s] * (1 + i % 3)), "lang": lang, "source": "hadith", "bucket": 0}
        for lang, sents in (("ar", AR), ("en", EN))
        for i, s in enumerate(sents)
    ]
    write_shards(docs, root / "tokenizer.json", root / "heldout", ShardConfig(eod_token="<|eos|>"))
    return root / "heldout"
