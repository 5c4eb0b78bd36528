"""The target's non-FFN tensors, derived from its config, are those transformers builds (issue 13, speed)."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moe_adapt.upcycle.layouts import TARGETS, dense_tensors

COMMON = dict(
    num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=96
)
CASES = [
    ("mixtral", dict(intermediate_size=32)),
    ("mixtral", dict(intermediate_size=32, head_dim=24, tie_word_embeddings=True)),
    ("qwen2_moe", dict(moe_intermediate_size=16, shared_expert_intermediate_size=0, qkv_bias=True)),
    ("qwen2_moe", dict(moe_intermediate_size=16, shared_expert_intermediate_size=32, qkv_bias=False)),
    ("qwen3_moe", dict(moe_intermediate_size=16, attention_bias=True, head_dim=8)),
    ("qwen3_moe", dict(moe_intermediate_size=16, attention_bias=False, tie_word_embeddings=True)),
]


@pytest.mark.parametrize(("model_type", "kw"), CASES)
def test_dense_tensors_match_the_model(model_type, kw):
    config = AutoConfig.for_model(model_type, **COMMON, **kw)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        model = AutoModelForCausalLM.from_config(config)
    expected = [(k, tuple(v.shape)) for k, v in model.state_dict().items() if ".mlp." not in k]
    assert list(dense_tensors(config, TARGETS[model_type]).items()) == expected
