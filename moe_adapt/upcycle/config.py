"""Schema of the ``upcycle`` config group: how a dense checkpoint becomes an MoE checkpoint.

Every field carries a docstring: this file is the reference for ``conf/upcycle/*.yaml``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from moe_adapt.errors import config_error, invalid

_fail = invalid


class UpcycleMethod(str, Enum):
    """How dense FFN weights become experts; each is a module under ``moe_adapt/upcycle/``."""

    copy = "copy"
    fine_grained = "fine_grained"
    drop = "drop"


class RouterInit(str, Enum):
    """How router weights start."""

    virtual_group = "virtual_group"
    random = "random"


class VerifyMode(str, Enum):
    """Whether the upcycle stage compares the MoE's logits with the dense model's."""

    auto = "auto"
    logits = "logits"
    none = "none"


@dataclass
class UpcycleConfig:
    """The ``upcycle`` stage: dense checkpoint -> Hugging Face MoE checkpoint."""

    method: UpcycleMethod = UpcycleMethod.fine_grained
    """copy (E identical experts), fine_grained (FFN split into granularity shards, replicated)
    or drop (fine_grained/copy, then re-initialise drop_ratio of each expert's units)."""

    num_experts: int | None = None
    """Routed experts per MoE layer. Give it with top_k, or give active_fraction instead."""

    top_k: int | None = None
    """Routed experts each token uses. Exactness needs a multiple of the routed shards per copy
    (granularity - shared_experts). Default: one full copy (granularity - shared_experts)."""

    granularity: int = 1
    """Shards the dense FFN is split into; must divide the FFN width. copy requires 1."""

    shared_experts: int = 0
    """Shards (of granularity) that become an always-on shared expert (Qwen2-MoE layout only)."""

    active_fraction: float | None = None
    """Target share of parameters active per token (embeddings included), e.g. 0.05. When set,
    the stage solves num_experts for it; num_experts must then be left unset."""

    drop_ratio: float = 0.0
    """Drop-Upcycling: share of each routed expert's intermediate units re-initialised (method=drop)."""

    target: str = "auto"
    """MoE layout to write: auto (the source family's sibling), mixtral, qwen2_moe or qwen3_moe."""

    allow_inexact: bool = False
    """Allow a target or setting that cannot reproduce the dense model's function exactly."""

    router_init: RouterInit = RouterInit.virtual_group
    """virtual_group: one random row per copy, repeated over its shards (exact at any granularity);
    random: an independent row per expert (sparse upcycling; exact only with one routed shard per copy)."""

    router_init_std: float = 0.02
    """Standard deviation of the normal router initialisation."""

    dtype: str = "auto"
    """Weights dtype of the output: auto (the dense checkpoint's), float32, bfloat16 or float16."""

    max_shard_mb: int = 2048
    """Largest output safetensors file, in MiB; larger models are written as several shards + index."""

    verify: VerifyMode = VerifyMode.auto
    """logits: load both models in fp32 and compare logits on probe sequences before the output is
    moved into place; auto: do so when both fit in half the available memory; none: skip."""

    verify_probes: int = 4
    """Number of random probe sequences for verification."""

    verify_seq_len: int = 32
    """Length of each probe sequence; at most the max_position_embeddings of model.dense (checked when
    the stage starts)."""

    verify_tolerance: float = 1e-5
    """Largest allowed relative logit difference (max |moe - dense| / max |dense|) for exact methods;
    a finite number >= 0."""

    def __post_init__(self) -> None:
        key = "upcycle"
        for name, enum in (("method", UpcycleMethod), ("router_init", RouterInit), ("verify", VerifyMode)):
            value = getattr(self, name)
            try:
                setattr(self, name, enum(value))  # accept plain strings from Python callers
            except ValueError:
                _fail(f"{key}.{name}", value, f"choose one of {', '.join(m.value for m in enum)}")
        if self.granularity < 1:
            _fail(f"{key}.granularity", self.granularity, "must be >= 1")
        if self.method == UpcycleMethod.copy and self.granularity != 1:
            _fail(
                f"{key}.granularity",
                self.granularity,
                "upcycle=copy makes whole-FFN experts (granularity=1); use upcycle=fine_grained to split",
            )
        if not 0 <= self.shared_experts < self.granularity:
            _fail(
                f"{key}.shared_experts",
                self.shared_experts,
                f"must be in [0, granularity={self.granularity}): shared experts are shards of the FFN, "
                "and at least one shard must stay routed",
            )
        routed = self.granularity - self.shared_experts
        if self.num_experts is not None and self.active_fraction is not None:
            _fail(
                f"{key}.num_experts",
                self.num_experts,
                "give num_experts or active_fraction, not both: active_fraction solves num_experts "
                "(the upcycle= options set num_experts, so add upcycle.num_experts=null)",
            )
        if self.active_fraction is not None and not 0 < self.active_fraction < 1:
            _fail(f"{key}.active_fraction", self.active_fraction, "must be in (0, 1)")
        if self.num_experts is not None and self.num_experts < 1:
            _fail(f"{key}.num_experts", self.num_experts, "must be >= 1")
        if self.top_k is not None and self.top_k < 1:
            _fail(f"{key}.top_k", self.top_k, "must be >= 1")
        if not self.allow_inexact:
            self._check_exact(key, routed)
        if self.num_experts is not None and self.top_k is not None and self.top_k > self.num_experts:
            _fail(f"{key}.top_k", self.top_k, f"must be <= num_experts={self.num_experts}")
        if self.method == UpcycleMethod.drop:
            if not 0 <= self.drop_ratio <= 1:
                _fail(f"{key}.drop_ratio", self.drop_ratio, "must be in [0, 1]")
        elif self.drop_ratio != 0:
            _fail(
                f"{key}.drop_ratio",
                self.drop_ratio,
                "only upcycle=drop re-initialises units; set upcycle=drop",
            )
        targets = ("auto", "mixtral", "qwen2_moe", "qwen3_moe")
        if self.target not in targets:
            _fail(f"{key}.target", self.target, f"choose one of {', '.join(targets)}")
        dtypes = ("auto", "float32", "bfloat16", "float16")
        if self.dtype not in dtypes:
            _fail(f"{key}.dtype", self.dtype, f"choose one of {', '.join(dtypes)}")
        if self.router_init_std <= 0:
            _fail(f"{key}.router_init_std", self.router_init_std, "must be > 0")
        if not (self.verify_tolerance >= 0 and math.isfinite(self.verify_tolerance)):
            _fail(f"{key}.verify_tolerance", self.verify_tolerance, "must be a finite number >= 0")
        if self.max_shard_mb < 1:
            _fail(f"{key}.max_shard_mb", self.max_shard_mb, "must be >= 1")
        if self.verify_probes < 1 or self.verify_seq_len < 1:
            _fail(
                f"{key}.verify_probes",
                (self.verify_probes, self.verify_seq_len),
                "probes and length must be >= 1",
            )

    def _check_exact(self, key: str, routed: int) -> None:
        """Refuse the settings that would make the MoE differ from the dense model, all of them in one
        error: ``upcycle=drop upcycle.granularity=4`` conflicts with both the group's top_k and its
        router_init, and the user should learn both (and the overrides that fix them) at once."""
        inexact = "upcycle.allow_inexact=true"
        problems: list[tuple[str, object, str, str, str]] = []  # key, value, reason, alternative, fix
        if self.top_k is not None and self.top_k % routed:
            problems.append(
                (
                    f"{key}.top_k",
                    self.top_k,
                    f"must be a multiple of the routed shards per copy, "
                    f"granularity - shared_experts = {routed} (got remainder {self.top_k % routed})",
                    f"; or set {inexact}",
                    f"{key}.top_k={routed * max(1, round(self.top_k / routed))}",
                )
            )
        if self.num_experts is not None and self.num_experts % routed:
            problems.append(
                (
                    f"{key}.num_experts",
                    self.num_experts,
                    f"must be a multiple of granularity - shared_experts = {routed} so experts form whole "
                    f"copies of the FFN (got remainder {self.num_experts % routed})",
                    f"; or set {inexact}",
                    f"{key}.num_experts={routed * max(1, round(self.num_experts / routed))}",
                )
            )
        if self.router_init == RouterInit.random and routed > 1:
            problems.append(
                (
                    f"{key}.router_init",
                    self.router_init.value,
                    f"random rows cannot keep the {routed} shards of a copy together; use virtual_group",
                    f" or set {inexact}",
                    f"{key}.router_init=virtual_group",
                )
            )
        if len(problems) == 1:
            k, v, reason, alternative, _ = problems[0]
            _fail(k, v, reason + alternative)
        if problems:
            others = "; ".join(f"{k}={v!r} ({reason})" for k, v, reason, _, _ in problems[1:])
            fixes = " ".join(fix for *_, fix in problems)
            k, v, reason, _, _ = problems[0]
            allowed = f"{reason}; also invalid: {others}. Set together: {fixes} (or {inexact})"
            raise config_error(k, v, allowed)
