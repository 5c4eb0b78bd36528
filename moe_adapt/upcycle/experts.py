"""What an upcycling method produces for one layer: routed experts made on demand, and a shared one.

Legend: ``I`` dense FFN width, ``Ie`` expert width, ``H`` hidden size. Weights follow
``nn.Linear`` (``[out, in]``): gate/up are ``[I, H]``, down is ``[H, I]``. Weights stay in the
checkpoint's dtype while they are only sliced; any arithmetic (scaling, redrawing) happens in fp32
and is rounded once, when the writer casts to the output dtype.

Experts are produced one at a time (:meth:`LayerExperts.routed`) so that a layer with hundreds of
experts never sits in memory at once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from moe_adapt.checkpoint.hf import DTYPES
from moe_adapt.upcycle.config import UpcycleConfig
from moe_adapt.upcycle.sizing import Sizing


@dataclass
class FFN:
    """A SwiGLU FFN: ``down_HI @ (act(gate_IH @ x) * (up_IH @ x))``."""

    gate_IH: torch.Tensor
    up_IH: torch.Tensor
    down_HI: torch.Tensor

    def rows(self, sl: slice, down_scale: float = 1.0, dtype: torch.dtype | None = None) -> FFN:
        """The FFN restricted to intermediate units ``sl``, its output scaled by ``down_scale``.

        The scaled down projection is fp32, or ``dtype`` when that is the dtype it will be written in
        and the checkpoint's own: torch multiplies bfloat16/float16 in fp32 and rounds once, so the
        bits are those of the fp32 product cast to ``dtype``, at a sixth of the cost (one pass).
        """
        down = self.down_HI[:, sl]
        if down_scale == 1.0:
            return FFN(self.gate_IH[sl], self.up_IH[sl], down)
        scaled = down * down_scale if dtype == down.dtype else down.float() * down_scale
        return FFN(self.gate_IH[sl], self.up_IH[sl], scaled)


class LayerExperts(Protocol):
    """One layer's experts."""

    def routed(self, expert: int) -> FFN:
        """Routed expert ``expert`` (0..E-1)."""
        ...

    def shared(self) -> FFN | None:
        """The always-on shared expert (all shared shards together), or None."""
        ...


def write_dtype(cfg: UpcycleConfig, dense: FFN) -> torch.dtype | None:
    """The dtype the experts are written in when ``upcycle.dtype`` names one of the float dtypes, else
    (``auto``) the dense FFN's own; None for any other name."""
    return dense.down_HI.dtype if cfg.dtype == "auto" else DTYPES.get(cfg.dtype)


Method = Callable[[FFN, Sizing, UpcycleConfig, int], LayerExperts]
"""``upcycle(dense_ffn, sizing, cfg, layer_seed) -> LayerExperts``: the signature of every method.
``layer_seed`` is derived from the run seed and the layer index."""


def derive_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (e.g. run seed, layer, expert), independent of call order."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))
