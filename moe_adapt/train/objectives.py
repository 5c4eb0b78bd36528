"""Training loss terms as pure functions of tensors (engine-agnostic).

Every function takes tensors and returns a 0-dim float32 tensor that autograd can differentiate;
none of them reads a model, a config or global state, so each one is checked against a hand
computation in ``tests/train/test_objectives.py``.

Shape legend: ``B`` sequences, ``T`` positions (tokens per sequence, or tokens in a flat batch),
``N`` = B·T flattened tokens, ``V`` vocabulary, ``E`` routed experts, ``K`` experts chosen per token
(top-k), ``L`` MoE layers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from moe_adapt.errors import MoEAdaptError

__all__ = [
    "kl_anchor_loss",
    "l2_anchor_loss",
    "lm_cross_entropy",
    "load_balancing_loss",
    "router_z_loss",
]


def lm_cross_entropy(
    logits_BTV: torch.Tensor, labels_BT: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose label is not ``ignore_index``.

    ``logits_BTV[b, t]`` predicts ``labels_BT[b, t]`` (the caller shifts: for a packed sequence
    ``tokens_BT1`` the inputs are ``tokens[:, :-1]`` and the labels ``tokens[:, 1:]``). Computed in
    float32 whatever the logits' dtype.
    """
    if logits_BTV.shape[:-1] != labels_BT.shape:
        raise MoEAdaptError(
            f"lm_cross_entropy: logits {tuple(logits_BTV.shape)} do not match labels {tuple(labels_BT.shape)}"
        )
    return F.cross_entropy(
        logits_BTV.float().reshape(-1, logits_BTV.shape[-1]), labels_BT.reshape(-1), ignore_index=ignore_index
    )


def _check_layers(router_logits_LTE: Sequence[torch.Tensor], name: str) -> None:
    if len(router_logits_LTE) == 0:
        raise MoEAdaptError(f"{name}: no router logits given (is the model a Mixture-of-Experts?)")
    for logits_TE in router_logits_LTE:
        if logits_TE.dim() != 2:
            raise MoEAdaptError(
                f"{name}: router logits must be [tokens, experts], got {tuple(logits_TE.shape)}"
            )


def load_balancing_loss(router_logits_LTE: Sequence[torch.Tensor], top_k: int) -> torch.Tensor:
    """Switch-Transformer load-balancing loss ``E · Σ_e f_e · P_e``, averaged over layers.

    Per layer, from the router logits ``logits_TE`` of the ``T`` tokens it routed: ``P_e`` is the mean
    softmax probability of expert ``e`` and ``f_e`` the fraction of the ``T · K`` top-k assignments that
    went to ``e``. Both sum to 1 over experts, so perfectly balanced routing gives exactly 1.0 (the
    Megatron-core normalisation; transformers' ``load_balancing_loss_func`` is ``K`` times larger and
    pools layers before the product). Gradients flow through ``P`` only.
    """
    _check_layers(router_logits_LTE, "load_balancing_loss")
    losses_L = []
    for logits_TE in router_logits_LTE:
        num_tokens, num_experts = logits_TE.shape
        if not 1 <= top_k <= num_experts:
            raise MoEAdaptError(f"load_balancing_loss: top_k={top_k} must be in [1, {num_experts}]")
        probs_TE = torch.softmax(logits_TE.float(), dim=-1)
        topk_idx_TK = torch.topk(probs_TE, top_k, dim=-1).indices
        # one-hot sum rather than bincount: deterministic and differentiability-neutral
        counts_E = F.one_hot(topk_idx_TK.reshape(-1), num_experts).sum(dim=0).float()
        frac_E = counts_E / (num_tokens * top_k)
        prob_E = probs_TE.mean(dim=0)
        losses_L.append(num_experts * torch.sum(frac_E * prob_E))
    return torch.stack(losses_L).mean()


def router_z_loss(router_logits_LTE: Sequence[torch.Tensor]) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of ``logsumexp(logits)²``, averaged over layers."""
    _check_layers(router_logits_LTE, "router_z_loss")
    per_layer_L = [torch.logsumexp(x_TE.float(), dim=-1).pow(2).mean() for x_TE in router_logits_LTE]
    return torch.stack(per_layer_L).mean()


def l2_anchor_loss(params: Iterable[torch.Tensor], anchors: Iterable[torch.Tensor]) -> torch.Tensor:
    """``Σ_i ||θ_i − θ0_i||²`` over matching parameter and anchor tensors (anchors carry no gradient)."""
    total = torch.zeros((), dtype=torch.float32)
    count = 0
    for theta, theta0 in zip(params, anchors, strict=True):
        count += 1
        if theta.shape != theta0.shape:
            raise MoEAdaptError(
                f"l2_anchor_loss: parameter {tuple(theta.shape)} does not match anchor {tuple(theta0.shape)}"
            )
        total = total.to(theta.device) + (theta.float() - theta0.detach().float()).pow(2).sum()
    if count == 0:
        raise MoEAdaptError("l2_anchor_loss: no parameters given")
    return total


def kl_anchor_loss(
    logits_BTV: torch.Tensor, ref_logits_BTV: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``KL(p_ref ‖ p)`` per token, averaged over tokens: keeps the model's next-token distribution near a
    frozen reference model's. Both distributions are softened by ``temperature`` (the result is not
    rescaled by ``temperature²``). The reference logits carry no gradient.
    """
    if logits_BTV.shape != ref_logits_BTV.shape:
        raise MoEAdaptError(
            f"kl_anchor_loss: logits {tuple(logits_BTV.shape)} do not match reference "
            f"{tuple(ref_logits_BTV.shape)} (same tokenizer and vocabulary needed)"
        )
    if temperature <= 0:
        raise MoEAdaptError(f"kl_anchor_loss: temperature={temperature} must be > 0")
    logp_NV = torch.log_softmax(logits_BTV.float().reshape(-1, logits_BTV.shape[-1]) / temperature, dim=-1)
    ref_logp_NV = torch.log_softmax(
        ref_logits_BTV.detach().float().reshape(-1, ref_logits_BTV.shape[-1]) / temperature, dim=-1
    )
    kl_N = (ref_logp_NV.exp() * (ref_logp_NV - logp_NV)).sum(dim=-1)
    return kl_N.mean()
