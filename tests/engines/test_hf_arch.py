"""Reading HF MoE configs for the megatron engine: what each family maps to, and clear refusals."""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from moe_adapt.engines.megatron.hf_arch import read_hf_arch
from moe_adapt.errors import MoEAdaptConfigError
from tests.engines.conftest import tiny_hf_config


def test_families_are_read() -> None:
    mixtral = read_hf_arch(tiny_hf_config("mixtral"))
    assert (mixtral.num_experts, mixtral.moe_ffn_size, mixtral.renormalize_topk) == (8, 96, True)
    assert mixtral.rope_theta == 1e6 and not mixtral.qkv_bias and mixtral.shared_expert_size == 0
    qwen2 = read_hf_arch(tiny_hf_config("qwen2_moe"))
    assert qwen2.qkv_bias and qwen2.shared_expert_gate and qwen2.shared_expert_size == 48
    assert not qwen2.renormalize_topk
    qwen3 = read_hf_arch(tiny_hf_config("qwen3_moe"))
    assert qwen3.qk_norm and qwen3.head_dim == 16 and qwen3.renormalize_topk
    dense = read_hf_arch(tiny_hf_config("qwen2_moe_dense_tied"))
    assert dense.moe_layers == (False, True) and dense.tie_word_embeddings


@pytest.mark.parametrize(
    ("model_type", "kwargs", "match"),
    [
        ("llama", {}, "model_type='llama'"),
        ("mixtral", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ("mixtral", {"sliding_window": 512}, "sliding_window=512"),
        ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise=0.1"),
        ("qwen3_moe", {"attention_bias": True}, "attention_bias=True"),
        (
            "qwen3_moe",
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
            "rope_type='yarn'",
        ),
    ],
)
def test_unsupported_configs_name_key_and_value(model_type: str, kwargs: dict, match: str) -> None:
    config = AutoConfig.for_model(model_type, **kwargs)
    with pytest.raises(MoEAdaptConfigError, match=match):
        read_hf_arch(config)
