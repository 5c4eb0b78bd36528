"""The headline: copy and fine-grained upcycling reproduce the dense model's logits (fp32, 1e-5)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moe_adapt.upcycle.config import UpcycleConfig
from moe_adapt.upcycle.convert import Upcycler
from moe_adapt.upcycle.verify import verify_checkpoints

EXPRESSIBLE = [
    ("llama", "mixtral"),
    ("llama", "qwen2_moe"),
    ("mistral", "mixtral"),
    ("mistral", "qwen2_moe"),
    ("qwen2", "qwen2_moe"),
    ("qwen3", "qwen3_moe"),
]
# (method, granularity, shared shards, copies, copies active per token)
METHODS = [
    ("copy", 1, 0, 4, 2),
    ("fine_grained", 1, 0, 3, 1),
    ("fine_grained", 2, 0, 3, 1),
    ("fine_grained", 4, 0, 3, 2),
    ("drop", 2, 0, 2, 1),  # drop_ratio=0 is the base method
]
SHARED = [("fine_grained", 2, 1, 3, 1), ("fine_grained", 4, 1, 2, 1), ("fine_grained", 4, 2, 3, 2)]

CASES = [(f, t, *m) for f, t in EXPRESSIBLE for m in METHODS]
CASES += [(f, t, *m) for f, t in EXPRESSIBLE if t == "qwen2_moe" for m in SHARED]


def upcycle(dense: Path, out: Path, **kw: object) -> dict:
    up = Upcycler(str(dense), UpcycleConfig(**kw), seed=0)
    try:
        out.mkdir(parents=True)
        return up.write(out, progress=False)
    finally:
        up.close()


@pytest.mark.parametrize(
    ("family", "target", "method", "g", "shared", "copies", "active"), CASES, ids=lambda v: str(v)
)
def test_upcycled_logits_equal_dense(
    dense_factory, tmp_path, family, target, method, g, shared, copies, active
):
    dense = dense_factory(family)
    routed = g - shared
    report = upcycle(
        dense,
        tmp_path / "moe",
        method=method,
        target=target,
        granularity=g,
        shared_experts=shared,
        num_experts=copies * routed,
        top_k=active * routed,
        router_init="random" if method == "copy" else "virtual_group",
    )
    assert report["exact"] and report["target"] == target
    result = verify_checkpoints(dense, tmp_path / "moe", probes=3, seq_len=24, seed=1)
    assert result["max_rel_diff"] < 1e-5, result
    assert result["top1_agreement"] == 1.0


def test_auto_target_is_the_family_sibling(dense_factory, tmp_path):
    for family, expected in [
        ("llama", "mixtral"),
        ("mistral", "mixtral"),
        ("qwen2", "qwen2_moe"),
        ("qwen3", "qwen3_moe"),
    ]:
        up = Upcycler(str(dense_factory(family)), UpcycleConfig(num_experts=4, granularity=2), seed=0)
        assert up.layout.model_type == expected
        up.close()


def test_megatron_style_scaling_is_not_exact_but_ours_is(dense_factory):
    """The reason for our construction: scaling gate and down by s**(1/3) breaks SwiGLU at G=4."""
    from moe_adapt.upcycle.experts import FFN

    torch.manual_seed(0)
    ffn = FFN(torch.randn(128, 64) * 0.3, torch.randn(128, 64) * 0.3, torch.randn(64, 128) * 0.3)
    x = torch.randn(16, 64)

    def swiglu(f: FFN, x: torch.Tensor) -> torch.Tensor:
        return (torch.nn.functional.silu(x @ f.gate_IH.T) * (x @ f.up_IH.T)) @ f.down_HI.T

    dense = swiglu(ffn, x)
    g = 4
    shards = [slice(i * 32, (i + 1) * 32) for i in range(g)]
    # one copy selected, each shard weighted 1/G after renormalisation
    ours = sum(swiglu(ffn.rows(s, down_scale=g), x) / g for s in shards)
    c = g ** (1 / 3)
    theirs = sum(swiglu(FFN(ffn.gate_IH[s] * c, ffn.up_IH[s], ffn.down_HI[:, s] * c), x) / g for s in shards)
    rel = lambda y: ((y - dense).abs().max() / dense.abs().max()).item()  # noqa: E731
    assert rel(ours) < 1e-6
    assert rel(theirs) > 1e-3


def test_tied_embeddings_stay_tied(dense_factory, tmp_path):
    dense = dense_factory("qwen2", tie_word_embeddings=True)
    upcycle(dense, tmp_path / "moe", num_experts=8, granularity=4)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "moe" / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()  # noqa: SIM118
    result = verify_checkpoints(dense, tmp_path / "moe", probes=2, seq_len=16, seed=0)
    assert result["max_rel_diff"] < 1e-5


def test_bf16_checkpoint_stays_bf16_and_exact_with_power_of_two_shards(dense_factory, tmp_path):
    """bf16 weights scaled by S=2 are exact in bf16, so the bf16 MoE equals the bf16 dense model."""
    from transformers import AutoModelForCausalLM

    src = dense_factory("llama")
    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(bf16)
    report = upcycle(bf16, tmp_path / "moe", num_experts=4, granularity=2)
    assert report["dtype"] == "bfloat16"
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    assert moe.dtype == torch.bfloat16
    result = verify_checkpoints(bf16, tmp_path / "moe", probes=2, seq_len=16, seed=0)
    assert result["max_rel_diff"] < 1e-5


def test_sharded_output_loads(dense_factory, tmp_path):
    dense = dense_factory("llama", hidden_size=128, intermediate_size=512)
    report = upcycle(dense, tmp_path / "moe", num_experts=16, granularity=4, max_shard_mb=1)
    assert len(report["files"]) > 2
    assert (tmp_path / "moe" / "model.safetensors.index.json").is_file()
    result = verify_checkpoints(dense, tmp_path / "moe", probes=2, seq_len=16, seed=0)
    assert result["max_rel_diff"] < 1e-5
