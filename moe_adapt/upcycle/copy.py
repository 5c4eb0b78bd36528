"""Sparse upcycling (Komatsuzaki et al., 2023): every routed expert is the whole dense FFN.

With renormalised top-k weights (they sum to one) a mixture of identical experts is the dense FFN,
so the MoE starts exactly where the dense model was, for any router and any top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_adapt.upcycle.config import UpcycleConfig
from moe_adapt.upcycle.experts import FFN
from moe_adapt.upcycle.sizing import Sizing


@dataclass
class CopyExperts:
    dense: FFN

    def routed(self, expert: int) -> FFN:
        return self.dense

    def shared(self) -> FFN | None:
        return None

    def source_rows(self, expert: int | None) -> slice | None:
        """Every expert's gate and up are the dense ones, unchanged."""
        return slice(None) if expert is not None else None


def upcycle(dense: FFN, sizing: Sizing, cfg: UpcycleConfig, seed: int) -> CopyExperts:
    """E identical experts (``sizing.granularity`` is 1 for this method)."""
    assert sizing.granularity == 1 and sizing.shared == 0, "copy makes whole-FFN experts"
    return CopyExperts(dense)
