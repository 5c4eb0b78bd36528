"""Fine-grained upcycling with virtual groups (He et al., 2024), exact by construction.

The dense FFN is a sum over its intermediate units, so splitting them into ``G`` shards gives
``FFN(x) = sum_g shard_g(x)``. The last ``N`` shards form the shared expert; the other
``S = G - N`` are replicated into ``E / S`` copies, expert ``e`` being shard ``e mod S`` of copy
``e // S``. A virtual-group router (:mod:`moe_adapt.upcycle.router`) gives all shards of a copy
the same logit, so a top-k of ``m * S`` selects ``m`` whole copies, each shard with weight
``q_copy / S`` after renormalisation (the ``q`` sum to one). Scaling each routed shard's down
projection by ``S`` therefore returns ``sum_copies q_copy * sum_s shard_s(x)`` = the routed part
of the dense FFN, exactly. In bfloat16/float16 weights the factor ``S`` is exact only when it is
a power of two; the Upcycler refuses other ``S`` there (docs/upcycle.md, "Exactness in bfloat16 and float16").

megatron-core instead scales gate and down by ``s**(1/3)``, which is exact only for homogeneous
activations; SwiGLU is not, hence its 7.3e-3 relative error at G=4 (shared/facts.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_adapt.upcycle.config import UpcycleConfig
from moe_adapt.upcycle.experts import FFN, write_dtype
from moe_adapt.upcycle.sizing import Sizing


@dataclass
class FineGrainedExperts:
    dense: FFN
    sizing: Sizing
    dtype: torch.dtype | None = None
    """The dtype the experts are written in (scaled shards are rounded to it once); None: fp32."""

    def routed(self, expert: int) -> FFN:
        s = self.sizing.routed_per_copy
        return self.dense.rows(self.sizing.shard_slice(expert % s), down_scale=float(s), dtype=self.dtype)

    def shared(self) -> FFN | None:
        rows = self.source_rows(None)
        return None if rows is None else self.dense.rows(rows)

    def source_rows(self, expert: int | None) -> slice | None:
        """The dense rows that are routed expert ``expert``'s (None: the shared expert's) gate and up,
        unchanged; None when there is no shared expert."""
        w, s, g = self.sizing.expert_width, self.sizing.routed_per_copy, self.sizing.granularity
        if expert is not None:
            return self.sizing.shard_slice(expert % s)
        return slice(s * w, g * w) if self.sizing.shared else None


def upcycle(dense: FFN, sizing: Sizing, cfg: UpcycleConfig, seed: int) -> FineGrainedExperts:
    """Shards of the dense FFN, replicated; routed shards' down projections scaled by ``S``."""
    return FineGrainedExperts(dense, sizing, write_dtype(cfg, dense))
