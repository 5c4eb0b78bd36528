"""Router initialisation.

Legend: ``E`` routed experts, ``H`` hidden size, ``S`` routed shards per copy.

- ``virtual_group`` (He et al., 2024): draw one row per copy of the FFN and repeat it for the
  ``S`` shards of that copy, so a top-k of whole multiples of ``S`` picks whole copies and the
  upcycled MoE equals the dense model at any granularity.
- ``random`` (sparse upcycling; Drop-Upcycling): an independent row per expert. Exact only when
  each copy is a single expert (``S = 1``).
"""

from __future__ import annotations

import torch

from moe_adapt.upcycle.config import RouterInit
from moe_adapt.upcycle.sizing import Sizing


def init_router(
    sizing: Sizing, hidden: int, scheme: RouterInit, std: float, gen: torch.Generator
) -> torch.Tensor:
    """Router weight ``[E, H]`` (``nn.Linear`` layout: one row of logits weights per expert)."""
    e, s = sizing.num_experts, sizing.routed_per_copy
    if scheme == RouterInit.virtual_group:
        copies = -(-e // s)
        rows_CH = torch.empty(copies, hidden).normal_(0.0, std, generator=gen)
        return rows_CH.repeat_interleave(s, dim=0)[:e].contiguous()
    return torch.empty(e, hidden).normal_(0.0, std, generator=gen)
