"""Each loss term against a hand computation on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from moe_adapt.engines.objectives import (
    kl_anchor_loss,
    l2_anchor_loss,
    lm_cross_entropy,
    load_balancing_loss,
    router_z_loss,
)
from moe_adapt.errors import MoEAdaptError

LN2, LN3 = math.log(2.0), math.log(3.0)


def test_lm_cross_entropy() -> None:
    # position 0: uniform over 4 -> ln 4; position 1: p(label=1) = 3/4 -> -ln(3/4); position 2 ignored
    logits_BTV = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, LN3, -1e9, -1e9], [5.0, 0.0, 0.0, 0.0]]])
    labels_BT = torch.tensor([[2, 1, -100]])
    expected = (math.log(4.0) - math.log(0.75)) / 2
    assert lm_cross_entropy(logits_BTV, labels_BT).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(MoEAdaptError, match="do not match labels"):
        lm_cross_entropy(logits_BTV, labels_BT[:, :2])


def test_load_balancing_loss() -> None:
    # layer 1: both tokens p = [3/4, 1/4], top-1 expert 0 -> f = [1, 0], P = [3/4, 1/4] -> 2 * 3/4 = 1.5
    # layer 2: p = [1/4, 3/4] and [3/4, 1/4] -> f = [1/2, 1/2], P = [1/2, 1/2] -> 2 * 1/2 = 1.0
    layer1_TE = torch.tensor([[LN3, 0.0], [LN3, 0.0]], requires_grad=True)
    layer2_TE = torch.tensor([[0.0, LN3], [LN3, 0.0]])
    loss = load_balancing_loss([layer1_TE, layer2_TE], top_k=1)
    assert loss.item() == pytest.approx((1.5 + 1.0) / 2, rel=1e-6)
    loss.backward()
    assert layer1_TE.grad is not None and layer1_TE.grad.abs().sum() > 0  # through P
    # top-2 of 2 experts: every expert gets half the assignments whatever the logits -> E * Σ ½ P = 1
    assert load_balancing_loss([layer1_TE.detach()], top_k=2).item() == pytest.approx(1.0)
    # balanced routing is exactly 1
    assert load_balancing_loss([torch.zeros(8, 4)], top_k=1).item() == pytest.approx(1.0)
    with pytest.raises(MoEAdaptError, match="top_k=3"):
        load_balancing_loss([layer2_TE], top_k=3)
    with pytest.raises(MoEAdaptError, match="no router logits"):
        load_balancing_loss([], top_k=1)


def test_router_z_loss() -> None:
    # logsumexp([0, 0]) = ln 2, logsumexp([ln 3, 0]) = ln 4 -> mean(ln²2, 4 ln²2) = 2.5 ln²2
    layer1_TE = torch.tensor([[0.0, 0.0], [LN3, 0.0]])
    # second layer: logsumexp([ln 2, ln 2]) = ln 4 for both tokens -> 4 ln²2
    layer2_TE = torch.tensor([[LN2, LN2], [LN2, LN2]])
    assert router_z_loss([layer1_TE]).item() == pytest.approx(2.5 * LN2**2, rel=1e-6)
    assert router_z_loss([layer1_TE, layer2_TE]).item() == pytest.approx((2.5 + 4.0) / 2 * LN2**2, rel=1e-6)
    with pytest.raises(MoEAdaptError, match=r"\[tokens, experts\]"):
        router_z_loss([torch.zeros(2, 3, 4)])


def test_l2_anchor_loss() -> None:
    a = torch.tensor([1.0, 2.0], requires_grad=True)
    b = torch.tensor([[3.0]], requires_grad=True)
    loss = l2_anchor_loss([a, b], [torch.zeros(2), torch.ones(1, 1)])
    assert loss.item() == pytest.approx(1.0 + 4.0 + 4.0)
    loss.backward()
    assert a.grad is not None and torch.equal(a.grad, torch.tensor([2.0, 4.0]))  # 2 (θ − θ0)
    with pytest.raises(MoEAdaptError, match="does not match anchor"):
        l2_anchor_loss([a], [torch.zeros(3)])
    with pytest.raises(ValueError):
        l2_anchor_loss([a, b], [torch.zeros(2)])  # zip(strict=True)
    with pytest.raises(MoEAdaptError, match="no parameters"):
        l2_anchor_loss([], [])


def test_kl_anchor_loss() -> None:
    # token 1: p_ref = [1/2, 1/2], p = [1/4, 3/4] -> ½ ln 2 + ½ ln(2/3); token 2: identical -> 0
    logits_BTV = torch.tensor([[[0.0, LN3], [1.0, 2.0]]])
    ref_BTV = torch.tensor([[[5.0, 5.0], [1.0, 2.0]]])
    expected = (0.5 * LN2 + 0.5 * math.log(2.0 / 3.0)) / 2
    assert kl_anchor_loss(logits_BTV, ref_BTV).item() == pytest.approx(expected, rel=1e-6)
    # temperature 2 on doubled logits is temperature 1 on the originals
    assert kl_anchor_loss(2 * logits_BTV, 2 * ref_BTV, temperature=2.0).item() == pytest.approx(
        expected, rel=1e-6
    )
    with pytest.raises(MoEAdaptError, match="same tokenizer"):
        kl_anchor_loss(logits_BTV, ref_BTV[:, :1])
    with pytest.raises(MoEAdaptError, match="temperature"):
        kl_anchor_loss(logits_BTV, ref_BTV, temperature=0.0)
