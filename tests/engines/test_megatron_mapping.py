"""HF ⇄ megatron-core mapping: logits match HF in fp32 and the round trip is bit-exact (CPU, gloo)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.engines.conftest import FAMILIES, tiny_hf_config, tiny_hf_model

pytest.importorskip("megatron.core")

from moe_adapt.engines.megatron.mapping import hf_to_megatron, megatron_to_hf
from moe_adapt.engines.megatron.model import build_gpt_model, load_megatron_state

REL_TOL = 1e-5


def _megatron_from_hf(hf_model: Any) -> torch.nn.Module:
    model = build_gpt_model(hf_model.config)
    load_megatron_state(model, hf_to_megatron(hf_model.state_dict(), hf_model.config))
    return model.eval()


def _megatron_logits(model: torch.nn.Module, ids_BT: torch.Tensor) -> torch.Tensor:
    pos_BT = torch.arange(ids_BT.shape[1]).expand_as(ids_BT)
    return model(ids_BT, pos_BT, attention_mask=None)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_match_hf(megatron_cpu: None, name: str) -> None:
    hf_model = tiny_hf_model(name)
    mc_model = _megatron_from_hf(hf_model)
    ids_BT = torch.randint(0, hf_model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hf_BTV = hf_model(ids_BT).logits
        mc_BTV = _megatron_logits(mc_model, ids_BT)
    assert mc_BTV.shape == hf_BTV.shape
    rel = ((mc_BTV - hf_BTV).abs().max() / hf_BTV.abs().max()).item()
    print(f"{name}: max |diff| / max |hf| = {rel:.3e}")
    assert rel < REL_TOL, f"{name}: relative logit difference {rel:.3e}"


@pytest.mark.parametrize("name", list(FAMILIES))
def test_round_trip_is_bit_exact(megatron_cpu: None, name: str) -> None:
    hf_model = tiny_hf_model(name)
    mc_model = _megatron_from_hf(hf_model)
    back = megatron_to_hf(mc_model.state_dict(), hf_model.config)
    original = hf_model.state_dict()
    assert back.keys() == original.keys()
    for key, tensor in original.items():
        assert back[key].dtype == tensor.dtype, key
        assert torch.equal(back[key], tensor), key
    hf_model.load_state_dict(back, strict=True)


def test_expert_parallel_slice_renumbers_local_experts() -> None:
    config = tiny_hf_config("qwen3_moe")
    sd = tiny_hf_model("qwen3_moe").state_dict()
    rank1 = hf_to_megatron(sd, config, ep_rank=1, ep_size=2)
    local = sorted(k for k in rank1 if k.startswith("decoder.layers.0.mlp.experts."))
    assert len(local) == 8 and "local_experts.3." in local[-1]
    fc1 = rank1["decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight"]
    assert torch.equal(fc1, sd["model.layers.0.mlp.experts.gate_up_proj"][4])


def test_missing_tensor_names_the_key() -> None:
    from moe_adapt.errors import MoEAdaptError

    config = tiny_hf_config("mixtral")
    sd = dict(tiny_hf_model("mixtral").state_dict())
    del sd["model.layers.1.mlp.experts.down_proj"]
    with pytest.raises(MoEAdaptError, match=r"model\.layers\.1\.mlp\.experts\.down_proj"):
        hf_to_megatron(sd, config)
