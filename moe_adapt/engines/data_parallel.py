"""The data-parallel arithmetic of a training step: each rank's rows of the global batch, its share
of the global token-mean loss, metrics averaged over ranks, and the load-balancing loss of the global
batch. Both engines use it so that a step on W ranks equals a step on one.

Shape legend: ``L`` MoE layers, ``T`` tokens routed by one rank, ``E`` experts, ``K`` top-k.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields, is_dataclass, replace
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from moe_adapt.distributed import DistContext, all_reduce_sum, current
from moe_adapt.errors import MoEAdaptError

T = TypeVar("T")


def weighted_mean(
    values: Mapping[str, float],
    weights: Mapping[str, float],
    keys: Sequence[str],
    ctx: DistContext | None = None,
    *,
    extra: torch.Tensor | None = None,
) -> tuple[dict[str, float], torch.Tensor | None]:
    """``Σ_r w_r·v_r / Σ_r w_r`` for every key, over ranks, in one all-reduce.

    Every rank passes the same ``keys`` (sorted the same way); a key missing from ``values`` or with
    weight 0 on a rank adds nothing there (a NaN with weight 0 does not poison the mean). A key whose
    total weight is 0 is left out of the result. ``extra`` (any tensor) is summed over ranks in the same
    all-reduce and returned beside the means. With one process the values are returned as they are.
    """
    ctx = ctx or current()
    if not ctx.is_distributed:
        return {k: float(values[k]) for k in keys if k in values and weights.get(k, 0.0) > 0}, extra
    n = len(keys)
    flat = torch.zeros(2 * n + (extra.numel() if extra is not None else 0), dtype=torch.float64)
    for i, key in enumerate(keys):
        w = float(weights.get(key, 0.0)) if key in values else 0.0
        if w > 0:
            flat[i], flat[n + i] = float(values[key]) * w, w
    if extra is not None:
        flat[2 * n :] = extra.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    flat = flat.to(ctx.device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=ctx.group)
    flat = flat.cpu()
    out = {key: float(flat[i] / flat[n + i]) for i, key in enumerate(keys) if float(flat[n + i]) > 0}
    total = None if extra is None else flat[2 * n :].reshape(extra.shape).to(extra.dtype)
    return out, total


# -- the global batch -----------------------------------------------------------------------------
def rows_of(batch: T, ctx: DistContext | None = None) -> T:
    """This rank's rows of a global batch: the ``rank``-th of ``world_size`` contiguous equal slices.

    ``batch`` is an array/tensor ``[B, ...]`` or an object (dataclass or plain) whose array and tensor
    attributes with ``B`` rows are sliced; everything else (language names, source names) is kept.
    Every rank draws the same global batch, so which sequences are trained on does not depend on the
    number of processes. With one process the batch is returned as it is.

    Raises:
        MoEAdaptError: ``B`` is not a multiple of ``world_size``.
    """
    ctx = ctx or current()
    if not ctx.is_distributed:
        return batch
    tokens: Any = getattr(batch, "tokens", batch)
    rows = int(tokens.shape[0])
    if rows % ctx.world_size:
        raise MoEAdaptError(
            f"a global batch of {rows} sequences does not split evenly over {ctx.world_size} processes: "
            f"make the batch size a multiple of {ctx.world_size}"
        )
    per = rows // ctx.world_size
    lo, hi = ctx.rank * per, (ctx.rank + 1) * per

    def cut(x: Any) -> Any:
        if isinstance(x, np.ndarray | torch.Tensor) and x.ndim >= 1 and x.shape[0] == rows:
            return x[lo:hi]
        return x

    if isinstance(batch, np.ndarray | torch.Tensor):
        return cut(batch)  # type: ignore[no-any-return]
    if is_dataclass(batch) and not isinstance(batch, type):
        changed = {f.name: cut(getattr(batch, f.name)) for f in fields(batch) if f.init}
        return replace(batch, **changed)  # type: ignore[type-var]
    import copy

    out = copy.copy(batch)
    for name, value in vars(batch).items():
        setattr(out, name, cut(value))
    return out


def share_of_global(
    main: torch.Tensor, anchor: torch.Tensor, counted: float, total: float, ctx: DistContext | None = None
) -> torch.Tensor:
    """This rank's share of the global batch's token-mean loss ``main``, scaled so that the mean over
    ranks (what DDP, FSDP and megatron's DDP average) is the global mean: ``main · n_r · W / N`` for
    ``n_r = counted`` positions here and ``N = total`` in the global batch (ranks' counts differ with
    loss masks). Where nothing counts here it is ``anchor.sum() · 0``: every parameter stays in the
    graph and nothing is added."""
    ctx = ctx or current()
    if total == 0:  # nothing counts anywhere: as with one process (an LM loss of NaN is skipped)
        return main
    if counted == 0:
        return anchor.sum() * 0.0
    return main * (counted * ctx.world_size / total)


def metric_weights(
    terms: Mapping[str, torch.Tensor], counted: float, lang_counted: Mapping[str, float]
) -> dict[str, float]:
    """The weights of :func:`weighted_mean` for an engine's loss terms: the token-mean terms (LM and
    KD) by the positions that counted on this rank, ``kd_selected/<lang>`` by that language's
    positions, every other term 1 (the same token count on every rank)."""
    weights = dict.fromkeys(terms, 1.0)
    for key in ("lm_loss", "kd_loss", "kd_ce", "kd_kl", "kd_selected"):
        if key in terms:
            weights[key] = counted
    weights.update({f"kd_selected/{lang}": n for lang, n in lang_counted.items()})
    return weights


def global_load_balancing_loss(
    router_logits_LTE: Sequence[torch.Tensor], top_k: int, ctx: DistContext | None = None
) -> torch.Tensor:
    """This rank's share of the Switch load-balancing loss of the *global* batch, averaged over layers.

    :func:`moe_adapt.engines.objectives.load_balancing_loss` computes ``E · Σ_e f_e · P_e`` per layer
    from one batch's tokens; ``f`` (the share of top-k assignments) is not linear in the tokens, so the
    mean of the ranks' losses is not the loss of the global batch. Here ``f`` is counted over the
    global batch (one all-reduce of ``[L, E]`` counts, no gradient), and ``P`` (mean router
    probability, through which the gradient flows) over this rank's tokens. Every rank routes the same
    number of tokens, so the mean of the ranks' values is the global batch's loss and the mean of their
    gradients (what DDP and FSDP compute) its gradient: a step on W ranks equals a step on one.
    """
    ctx = ctx or current()
    probs_LTE, counts_LE = [], []
    for logits_TE in router_logits_LTE:
        num_experts = logits_TE.shape[-1]
        if not 1 <= top_k <= num_experts:
            raise MoEAdaptError(f"load_balancing_loss: top_k={top_k} must be in [1, {num_experts}]")
        probs_TE = torch.softmax(logits_TE.float(), dim=-1)
        topk_idx_TK = torch.topk(probs_TE, top_k, dim=-1).indices
        counts_LE.append(F.one_hot(topk_idx_TK.reshape(-1), num_experts).sum(dim=0).float().detach())
        probs_LTE.append(probs_TE)
    counts = all_reduce_sum(torch.stack(counts_LE), ctx)
    tokens = router_logits_LTE[0].shape[0] * ctx.world_size
    frac_LE = counts / (tokens * top_k)
    losses_L = [
        probs_TE.shape[-1] * torch.sum(frac_LE[i] * probs_TE.mean(dim=0))
        for i, probs_TE in enumerate(probs_LTE)
    ]
    return torch.stack(losses_L).mean()
