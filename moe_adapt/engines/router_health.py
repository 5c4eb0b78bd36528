"""Router health: expert-load metrics, the same keys for both engines.

Load metrics
    :func:`expert_load` counts the top-k assignments each expert received in each MoE layer,
    :func:`dropped_tokens` how many of them a capacity-limited router (Megatron's
    ``moe_expert_capacity_factor``) would drop, and :func:`load_metrics` turns both into a bounded set
    of float metrics, so the dropless ``hf`` engine and the ``megatron`` engine log the same keys.

The per-expert selection biases of aux-loss-free balancing
(:class:`~moe_adapt.checkpoint.router_bias.RouterBias`) are updated from :func:`expert_load` after
every step.

Shape legend: ``L`` MoE layers, ``T`` tokens routed in one call (batch × sequence flattened), ``E`` routed
experts, ``K`` experts chosen per token (top-k).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from moe_adapt.errors import MoEAdaptError

__all__ = ["dropped_tokens", "expert_load", "load_metrics"]


# -- load metrics -------------------------------------------------------------------------------
def expert_load(
    router_logits_LTE: Sequence[torch.Tensor], top_k: int, expert_bias_LE: torch.Tensor | None = None
) -> torch.Tensor:
    """Top-k assignments per expert and layer, ``[L, E]`` int64 (no gradient).

    Selection is ``topk(softmax(logits) + bias)`` per token, i.e. what the model routed: pass
    :meth:`RouterBias.bias_LE` when the routers are biased (the ``router_logits`` the model returns are the
    unbiased ones), None otherwise. Each row sums to ``T · K``. All layers must route the same tokens.
    """
    if len(router_logits_LTE) == 0:
        raise MoEAdaptError("expert_load: no router logits given (is the model a Mixture-of-Experts?)")
    shapes = {tuple(x.shape) for x in router_logits_LTE}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise MoEAdaptError(f"expert_load: router logits must all be [tokens, experts], got {sorted(shapes)}")
    num_layers = len(router_logits_LTE)
    num_experts = router_logits_LTE[0].shape[1]
    if not 1 <= top_k <= num_experts:
        raise MoEAdaptError(f"expert_load: top_k={top_k} must be in [1, {num_experts}]")
    if expert_bias_LE is not None and tuple(expert_bias_LE.shape) != (num_layers, num_experts):
        raise MoEAdaptError(
            f"expert_load: expert bias {tuple(expert_bias_LE.shape)} does not match the router logits "
            f"({num_layers} layers, {num_experts} experts)"
        )
    with torch.no_grad():
        scores_LTE = torch.softmax(torch.stack([x.detach().float() for x in router_logits_LTE]), dim=-1)
        if expert_bias_LE is not None:
            scores_LTE = scores_LTE + expert_bias_LE.to(scores_LTE)[:, None, :]
        idx_LTK = torch.topk(scores_LTE, top_k, dim=-1).indices
        # one bincount over (layer, expert) pairs: exact integer counts, deterministic without weights
        offset_L11 = torch.arange(num_layers, device=idx_LTK.device)[:, None, None] * num_experts
        flat = (idx_LTK + offset_L11).reshape(-1)
        return torch.bincount(flat, minlength=num_layers * num_experts).view(num_layers, num_experts)


def dropped_tokens(
    load_LE: torch.Tensor, capacity_factor: float | None, tokens: int, top_k: int
) -> torch.Tensor:
    """Assignments per layer that a capacity-limited router would drop, ``[L]`` int64.

    Megatron's semantics: each expert takes at most ``capacity = ceil(tokens · top_k / E · capacity_factor)``
    assignments of one routing call, the rest are dropped, so layer ``l`` drops
    ``Σ_e max(0, load_le − capacity)``. ``tokens`` is the number of tokens of that one call (per
    micro-batch, per rank); sum the results over calls. ``capacity_factor=None`` is a dropless router:
    zeros.
    """
    if load_LE.dim() != 2:
        raise MoEAdaptError(f"dropped_tokens: load must be [layers, experts], got {tuple(load_LE.shape)}")
    if capacity_factor is None:
        return torch.zeros(load_LE.shape[0], dtype=torch.int64, device=load_LE.device)
    if not (capacity_factor > 0 and math.isfinite(capacity_factor)):
        raise MoEAdaptError(f"dropped_tokens: capacity_factor={capacity_factor} must be a finite number > 0")
    num_experts = load_LE.shape[1]
    capacity = math.ceil(tokens * top_k / num_experts * capacity_factor)
    return (load_LE.to(torch.int64) - capacity).clamp(min=0).sum(dim=-1)


def load_metrics(
    load_LE: torch.Tensor, dropped_L: torch.Tensor | None = None, *, detail_layers: int = 8
) -> dict[str, float]:
    """Float metrics of an ``[L, E]`` load (from :func:`expert_load`), bounded in number for deep models.

    Loads are taken relative to the layer's mean load ``T · K / E`` (1.0 is perfect balance):

    * ``moe/layer{l}/max_load``: max load / mean load (the imbalance ratio), every layer;
    * ``moe/layer{l}/min_load`` and ``moe/layer{l}/load_cv`` (std / mean, the coefficient of variation),
      only when ``L <= detail_layers``;
    * summaries: ``moe/max_load`` (worst layer), ``moe/mean_max_load``, ``moe/min_load`` (worst layer),
      ``moe/load_cv`` (mean over layers), ``moe/idle_experts`` (layer-expert pairs with no token);
    * with ``dropped_L`` (:func:`dropped_tokens`): ``moe/dropped_tokens`` (assignments dropped, all layers)
      and ``moe/dropped_frac`` (their fraction of all assignments).
    """
    if load_LE.dim() != 2 or load_LE.numel() == 0:
        raise MoEAdaptError(
            f"load_metrics: load must be a non-empty [layers, experts], got {tuple(load_LE.shape)}"
        )
    load_LE = load_LE.detach().double()
    mean_L1 = load_LE.mean(dim=-1, keepdim=True)
    if bool((mean_L1 <= 0).any()):
        raise MoEAdaptError("load_metrics: a layer routed no tokens")
    rel_LE = load_LE / mean_L1
    max_L = rel_LE.max(dim=-1).values
    min_L = rel_LE.min(dim=-1).values
    cv_L = rel_LE.std(dim=-1, correction=0)
    # one transfer to the host for everything
    max_list, min_list, cv_list = torch.stack([max_L, min_L, cv_L]).cpu().tolist()
    num_layers = len(max_list)
    out: dict[str, float] = {}
    for layer, value in enumerate(max_list):
        out[f"moe/layer{layer}/max_load"] = value
    if num_layers <= detail_layers:
        for layer in range(num_layers):
            out[f"moe/layer{layer}/min_load"] = min_list[layer]
            out[f"moe/layer{layer}/load_cv"] = cv_list[layer]
    out["moe/max_load"] = max(max_list)
    out["moe/mean_max_load"] = sum(max_list) / num_layers
    out["moe/min_load"] = min(min_list)
    out["moe/load_cv"] = sum(cv_list) / num_layers
    out["moe/idle_experts"] = float((load_LE == 0).sum())
    if dropped_L is not None:
        dropped = float(dropped_L.sum())
        out["moe/dropped_tokens"] = dropped
        out["moe/dropped_frac"] = dropped / float(load_LE.sum())
    return out
