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
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moe_adapt.errors import MoEAdaptError

__all__ = [
    "KDSettings",
    "TeacherTopK",
    "kl_anchor_loss",
    "l2_anchor_loss",
    "lm_cross_entropy",
    "load_balancing_loss",
    "router_z_loss",
    "token_kd_loss",
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


@dataclass(frozen=True)
class KDSettings:
    """How token-level distillation weighs its terms (see :func:`token_kd_loss`)."""

    alpha: float = 0.5
    """Weight of the cross-entropy on the reference tokens; 1 − alpha weighs T²·KL."""

    temperature: float = 2.0
    """Softening temperature T of both distributions."""

    direction: str = "forward"
    """forward: KL(teacher ‖ student); reverse: KL(student ‖ teacher)."""

    theta: float | None = None
    """SelecTKD: count the KL only where the teacher's max softmax(z/T) exceeds theta; None: all."""


@dataclass(frozen=True)
class TeacherTopK:
    """A teacher's next-token distribution kept as its ``K`` most likely tokens per position.

    ``logp_NK`` are the teacher's log-probabilities at temperature 1 (log-softmax over the whole
    vocabulary) of the token ids ``ids_NK``. Written by the generate phase, so token-level KD can run
    without the teacher in memory.
    """

    ids_NK: torch.Tensor
    logp_NK: torch.Tensor


def token_kd_loss(
    logits_NV: torch.Tensor,
    labels_N: torch.Tensor,
    mask_N: torch.Tensor,
    teacher: torch.Tensor | TeacherTopK,
    *,
    alpha: float = 0.5,
    temperature: float = 2.0,
    direction: str = "forward",
    theta: float | None = None,
) -> dict[str, torch.Tensor]:
    """Token-level distillation ``α·CE + (1−α)·T²·KL`` over the positions where ``mask_N`` is true.

    ``teacher`` is either the teacher's logits ``[N, V]`` (online) or its :class:`TeacherTopK`. Both
    distributions are softened by ``T``. ``direction="forward"`` is ``KL(q_T ‖ p_T)`` (teacher ``q``,
    student ``p``), ``"reverse"`` is ``KL(p_T ‖ q_T)``. With top-k teachers the sums run over the ``K``
    stored ids: ``q`` is renormalised over them (exact on that support); forward KL uses the student's
    full-vocabulary log-probabilities (so it is still ≥ 0 and pushes mass onto the teacher's support),
    reverse KL renormalises the student over the support too. With ``K = V`` both equal the online
    values.

    ``theta`` (SelecTKD) keeps the KL term only where the teacher's confidence ``max softmax(z/T)``
    exceeds it (with top-k teachers, computed over the stored support: an upper bound of the full
    value). The KL is summed over the kept positions and divided by *all* masked positions, so a
    position that is not selected adds nothing, and ``theta=0`` is plain token KD. Returns ``loss``,
    ``ce``, ``kl`` and ``selected_N`` (bool, false outside ``mask_N``).
    """
    if direction not in ("forward", "reverse"):
        raise MoEAdaptError(f"token_kd_loss: direction={direction!r} must be 'forward' or 'reverse'")
    if not 0.0 <= alpha <= 1.0:
        raise MoEAdaptError(f"token_kd_loss: alpha={alpha} must be in [0, 1]")
    if temperature <= 0:
        raise MoEAdaptError(f"token_kd_loss: temperature={temperature} must be > 0")
    num, vocab = logits_NV.shape
    if labels_N.shape != (num,) or mask_N.shape != (num,):
        raise MoEAdaptError(
            f"token_kd_loss: logits {tuple(logits_NV.shape)}, labels {tuple(labels_N.shape)} and "
            f"mask {tuple(mask_N.shape)} disagree on the number of positions"
        )
    mask_N = mask_N.bool()
    count = mask_N.sum().clamp(min=1).float()
    logits_NV = logits_NV.float()
    ce_N = F.cross_entropy(logits_NV, labels_N.clamp(min=0), reduction="none")
    ce = (ce_N * mask_N).sum() / count

    logp_NV = torch.log_softmax(logits_NV / temperature, dim=-1)
    if isinstance(teacher, TeacherTopK):
        ids_NK = teacher.ids_NK.long()
        if ids_NK.shape[0] != num or teacher.logp_NK.shape != ids_NK.shape:
            raise MoEAdaptError(
                f"token_kd_loss: teacher top-k ids {tuple(ids_NK.shape)} / log-probs "
                f"{tuple(teacher.logp_NK.shape)} do not match {num} positions"
            )
        if int(ids_NK.max()) >= vocab or int(ids_NK.min()) < 0:
            raise MoEAdaptError(
                f"token_kd_loss: teacher top-k ids reach {int(ids_NK.max())} but the student's vocabulary "
                f"has {vocab} entries (same tokenizer needed)"
            )
        q_logp_NK = torch.log_softmax(teacher.logp_NK.float() / temperature, dim=-1)
        p_logp_NK = logp_NV.gather(1, ids_NK)
        if direction == "forward":
            kl_N = (q_logp_NK.exp() * (q_logp_NK - p_logp_NK)).sum(dim=-1)
        else:
            p_support_NK = torch.log_softmax(p_logp_NK, dim=-1)
            kl_N = (p_support_NK.exp() * (p_support_NK - q_logp_NK)).sum(dim=-1)
        confidence_N = q_logp_NK.max(dim=-1).values.exp()
    else:
        if teacher.shape != logits_NV.shape:
            raise MoEAdaptError(
                f"token_kd_loss: teacher logits {tuple(teacher.shape)} do not match the student's "
                f"{tuple(logits_NV.shape)} (same tokenizer and vocabulary needed)"
            )
        q_logp_NV = torch.log_softmax(teacher.detach().float() / temperature, dim=-1)
        if direction == "forward":
            kl_N = (q_logp_NV.exp() * (q_logp_NV - logp_NV)).sum(dim=-1)
        else:
            kl_N = (logp_NV.exp() * (logp_NV - q_logp_NV)).sum(dim=-1)
        confidence_N = q_logp_NV.max(dim=-1).values.exp()
    selected_N = mask_N if theta is None else mask_N & (confidence_N.detach() > theta)
    kl = (kl_N * selected_N).sum() / count
    loss = alpha * ce + (1.0 - alpha) * temperature**2 * kl
    return {"loss": loss, "ce": ce, "kl": kl, "selected_N": selected_N}
