"""Drop-Upcycling re-initialises exactly the expected units; the sizing solver and parameter report."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from moe_adapt.errors import MoEAdaptConfigError
from moe_adapt.upcycle.config import UpcycleConfig
from moe_adapt.upcycle.convert import Upcycler


def write(dense, out, **kw):
    up = Upcycler(str(dense), UpcycleConfig(**kw), seed=7)
    out.mkdir()
    report = up.write(out, progress=False)
    up.close()
    return report


def tensors(path):
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


@pytest.mark.parametrize("granularity", [1, 2])
def test_drop_reinitialises_the_same_units_in_gate_up_down(dense_factory, tmp_path, granularity):
    dense = dense_factory("llama")
    ratio, experts = 0.25, 4 * granularity
    write(
        dense,
        tmp_path / "drop",
        method="drop",
        drop_ratio=ratio,
        num_experts=experts,
        top_k=granularity,
        granularity=granularity,
        router_init="virtual_group",
    )
    write(
        dense,
        tmp_path / "base",
        method="fine_grained",
        num_experts=experts,
        top_k=granularity,
        granularity=granularity,
    )
    d, b = tensors(tmp_path / "drop"), tensors(tmp_path / "base")
    width = 128 // granularity
    expected = round(ratio * width)
    seen = set()
    for layer in range(2):
        for e in range(experts):
            p = f"model.layers.{layer}.block_sparse_moe.experts.{e}."
            gate_rows = (d[p + "w1.weight"] != b[p + "w1.weight"]).any(dim=1).nonzero().flatten().tolist()
            up_rows = (d[p + "w3.weight"] != b[p + "w3.weight"]).any(dim=1).nonzero().flatten().tolist()
            down_cols = (d[p + "w2.weight"] != b[p + "w2.weight"]).any(dim=0).nonzero().flatten().tolist()
            assert len(gate_rows) == expected
            assert gate_rows == up_rows == down_cols
            seen.add(tuple(gate_rows))
            # the redrawn values follow the replaced matrix's statistics
            fresh = d[p + "w1.weight"][gate_rows]
            assert abs(fresh.std().item() - b[p + "w1.weight"].std().item()) < 0.05
    assert len(seen) > 1  # each expert draws its own units
    # the router and the attention are untouched by dropping
    for name in b:
        if ".experts." not in name:
            assert torch.equal(d[name], b[name]), name


def test_drop_ratio_zero_equals_base_method(dense_factory, tmp_path):
    dense = dense_factory("qwen3")
    kw = dict(num_experts=6, top_k=2, granularity=2)
    write(dense, tmp_path / "drop", method="drop", drop_ratio=0.0, router_init="virtual_group", **kw)
    write(dense, tmp_path / "base", method="fine_grained", **kw)
    d, b = tensors(tmp_path / "drop"), tensors(tmp_path / "base")
    assert d.keys() == b.keys() and all(torch.equal(d[k], b[k]) for k in d)


def test_parameter_report_matches_the_loaded_model(dense_factory, tmp_path):
    dense = dense_factory("qwen2")
    report = write(dense, tmp_path / "moe", num_experts=9, top_k=3, granularity=4, shared_experts=1)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    assert report["params"]["total"] == sum(p.numel() for p in model.parameters())
    h, width = 64, 32
    assert report["params"]["total"] - report["params"]["active"] == 2 * (9 - 3) * 3 * h * width
    assert report["layer_shapes"]["expert_gate_up"] == [width, h]
    assert report["layer_shapes"]["shared_down"] == [h, width]


@pytest.mark.parametrize("fraction", [0.2, 0.4])
def test_active_fraction_solves_num_experts(dense_factory, fraction):
    up = Upcycler(str(dense_factory("llama")), UpcycleConfig(active_fraction=fraction, granularity=4), seed=0)
    sz = up.sizing
    assert sz.top_k == 4 and sz.num_experts % 4 == 0
    got = up.param_report()["params"]["active_fraction"]
    # the closest achievable: one more or one fewer copy would be further away
    for other in (sz.num_experts - 4, sz.num_experts + 4):
        if other >= sz.top_k:
            up.sizing = type(sz)(sz.ffn_width, sz.granularity, sz.shared, other, sz.top_k)
            assert abs(up.param_report()["params"]["active_fraction"] - fraction) >= abs(got - fraction)
    up.close()


def test_granularity_must_divide_the_ffn(dense_factory):
    with pytest.raises(
        MoEAdaptConfigError, match=r"upcycle.granularity=3 must divide .*intermediate_size=128"
    ):
        Upcycler(str(dense_factory("llama")), UpcycleConfig(num_experts=6, granularity=3), seed=0)


def test_top_k_larger_than_experts(dense_factory):
    with pytest.raises(MoEAdaptConfigError, match="top_k"):
        UpcycleConfig(num_experts=4, top_k=8, granularity=1, router_init="random")
