"""Drop-Upcycling (Nakamura et al., ICLR 2025): diversify copied experts by partial re-initialisation.

Starting from copy (``granularity=1``) or fine-grained experts, each routed expert re-draws a
random ``drop_ratio`` share of its intermediate units: the same unit indices in gate (rows), up
(rows) and down (columns), each matrix from a normal with the mean and standard deviation of that
expert's own matrix. Each expert draws its own indices from a seed derived from (layer seed,
expert), so the result does not depend on the order experts are written in. The shared expert is
kept intact. With ``drop_ratio=0`` this is the base method, exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_adapt.upcycle import fine_grained
from moe_adapt.upcycle.config import UpcycleConfig
from moe_adapt.upcycle.experts import FFN, LayerExperts, generator
from moe_adapt.upcycle.sizing import Sizing


def dropped_units(width: int, ratio: float, gen: torch.Generator) -> torch.Tensor:
    """Indices of the ``round(ratio * width)`` units to re-initialise, sorted."""
    n = round(ratio * width)
    return torch.randperm(width, generator=gen)[:n].sort().values


def _redraw(weight: torch.Tensor, index: torch.Tensor, dim: int, gen: torch.Generator) -> torch.Tensor:
    weight = weight.float()
    out = weight.clone()
    mean, std = weight.mean().item(), weight.std().item()
    shape = list(weight.shape)
    shape[dim] = len(index)
    fresh = torch.empty(shape).normal_(mean, std, generator=gen)
    out.index_copy_(dim, index, fresh)
    return out


@dataclass
class DropExperts:
    base: LayerExperts
    ratio: float
    seed: int

    def routed(self, expert: int) -> FFN:
        ffn = self.base.routed(expert)
        gen = generator(self.seed, expert)
        idx = dropped_units(ffn.gate_IH.shape[0], self.ratio, gen)
        if not len(idx):
            return ffn
        return FFN(
            gate_IH=_redraw(ffn.gate_IH, idx, 0, gen),
            up_IH=_redraw(ffn.up_IH, idx, 0, gen),
            down_HI=_redraw(ffn.down_HI, idx, 1, gen),
        )

    def shared(self) -> FFN | None:
        return self.base.shared()


def upcycle(dense: FFN, sizing: Sizing, cfg: UpcycleConfig, seed: int) -> DropExperts:
    """Fine-grained (or, at granularity 1, copied) experts with ``cfg.drop_ratio`` of units redrawn."""
    # fp32 shards (no dtype): the redrawn units' mean and std are those of the unrounded scaled weights
    return DropExperts(fine_grained.FineGrainedExperts(dense, sizing), cfg.drop_ratio, seed)
