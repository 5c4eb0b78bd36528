"""Expert sizing: granularity, copies, top-k, and the parameter counts that follow.

Legend: ``I`` dense FFN width, ``G`` granularity (shards per FFN), ``N`` shared shards,
``S = G - N`` routed shards per copy, ``E`` routed experts, ``K`` experts per token,
``H`` hidden size, ``L`` layers. A routed expert is one shard of width ``I / G``.

Parameter counts include embeddings, as Mixtral and DeepSeek report theirs; *active* parameters are
everything a token touches: all non-expert weights, every router, the shared expert, and ``K``
routed experts per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_adapt.errors import MoEAdaptConfigError
from moe_adapt.upcycle.config import UpcycleConfig


@dataclass(frozen=True)
class Sizing:
    """The solved MoE shape of every layer."""

    ffn_width: int  # I
    granularity: int  # G
    shared: int  # N
    num_experts: int  # E
    top_k: int  # K

    @property
    def routed_per_copy(self) -> int:  # S
        return self.granularity - self.shared

    @property
    def expert_width(self) -> int:
        return self.ffn_width // self.granularity

    @property
    def shared_width(self) -> int:
        return self.shared * self.expert_width

    def shard_slice(self, shard: int) -> slice:
        """Rows of the dense FFN that shard ``shard`` (0..G-1) takes; shared shards come last."""
        w = self.expert_width
        return slice(shard * w, (shard + 1) * w)


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of the upcycled model."""

    total: int
    active: int
    embedding: int  # input embeddings + untied output head

    @property
    def active_fraction(self) -> float:
        return self.active / self.total


def count_params(sizing: Sizing, base: int, embedding: int, hidden: int, layers: int) -> ParamCounts:
    """Counts for ``sizing`` given ``base`` = every dense parameter outside the FFNs."""
    expert = 3 * hidden * sizing.expert_width
    shared = 3 * hidden * sizing.shared_width + (hidden if sizing.shared else 0)
    router = sizing.num_experts * hidden
    per_layer_total = router + shared + sizing.num_experts * expert
    per_layer_active = router + shared + sizing.top_k * expert
    return ParamCounts(
        total=base + layers * per_layer_total, active=base + layers * per_layer_active, embedding=embedding
    )


def solve(
    cfg: UpcycleConfig,
    ffn_width: int,
    base: int,
    embedding: int,
    hidden: int,
    layers: int,
    source: str = "model.dense",
) -> Sizing:
    """Complete (num_experts, top_k) from the config and the dense model's shapes.

    With ``active_fraction`` set, picks the number of routed experts (a multiple of ``S``, at
    least ``top_k``) whose active share is closest to it.
    """
    g, n = cfg.granularity, cfg.shared_experts
    if ffn_width % g:
        divisors = [d for d in range(1, min(ffn_width, 64) + 1) if ffn_width % d == 0]
        raise MoEAdaptConfigError(
            f"upcycle.granularity={g} must divide the FFN width intermediate_size={ffn_width} of {source} "
            f"(divisors up to 64: {', '.join(map(str, divisors))})"
        )
    s = g - n
    top_k = cfg.top_k if cfg.top_k is not None else s
    if cfg.num_experts is not None:
        return Sizing(ffn_width, g, n, cfg.num_experts, top_k)
    if cfg.active_fraction is None:
        raise MoEAdaptConfigError("upcycle.num_experts is required: set it, or set upcycle.active_fraction")
    step = s if not cfg.allow_inexact else 1
    first = max(top_k, step) + (-max(top_k, step)) % step
    best: tuple[float, Sizing] | None = None
    for e in range(first, first + step * 100_000, step):
        candidate = Sizing(ffn_width, g, n, e, top_k)
        frac = count_params(candidate, base, embedding, hidden, layers).active_fraction
        err = abs(frac - cfg.active_fraction)
        if best is None or err < best[0]:
            best = (err, candidate)
        if frac < cfg.active_fraction:  # the share only falls from here on
            break
    assert best is not None
    return best[1]
