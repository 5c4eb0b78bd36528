"""Fixtures for the engine tests: tiny HF MoE models and megatron-core on CPU (gloo, world size 1)."""

from __future__ import annotations

import os

# torch._dynamo reads this when first imported; megatron's jit_fuser would otherwise compile on CPU.
os.environ["TORCHDYNAMO_DISABLE"] = "1"

from collections.abc import Iterator
from typing import Any

import pytest
import torch

TINY_MOE: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=101,
    max_position_embeddings=128,
    num_experts_per_tok=2,
    tie_word_embeddings=False,
)

FAMILIES: dict[str, dict[str, Any]] = {
    "mixtral": dict(model_type="mixtral", num_local_experts=8, rope_theta=1e6),
    "qwen2_moe": dict(
        model_type="qwen2_moe",
        num_experts=8,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        norm_topk_prob=False,
    ),
    "qwen3_moe": dict(
        model_type="qwen3_moe", num_experts=8, moe_intermediate_size=32, head_dim=16, norm_topk_prob=True
    ),
    # A Qwen2-MoE with a dense first layer, tied embeddings and renormalised top-k.
    "qwen2_moe_dense_tied": dict(
        model_type="qwen2_moe",
        num_experts=8,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        norm_topk_prob=True,
        mlp_only_layers=[0],
        tie_word_embeddings=True,
    ),
}
"""Tiny test configurations by name: the three families, plus one exercising the rarer options."""


def tiny_hf_config(name: str, **overrides: Any) -> Any:
    """The transformers config of the tiny model ``name`` (a key of :data:`FAMILIES`), with ``overrides``."""
    from transformers import AutoConfig

    kwargs = {**TINY_MOE, **FAMILIES[name], **overrides}
    model_type = kwargs.pop("model_type")
    theta = kwargs.pop("rope_theta", 10000.0)
    kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_hf_model(name: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A tiny fp32 HF MoE model with every weight random (std 0.1; norms 1 ± 0.1), in eval mode.

    ``overrides`` change config keys (e.g. ``vocab_size=128`` for tensor parallel).
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(name, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if pname.endswith("norm.weight"):
                param.copy_(1 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def megatron_cpu() -> Iterator[None]:
    """megatron-core patched for CPU with gloo and model parallel state (world size 1); undone after."""
    pytest.importorskip("megatron.core")
    from tests.engines.megatron_cpu import megatron_on_cpu

    with megatron_on_cpu():
        yield
