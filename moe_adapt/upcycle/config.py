"""Schema of the ``upcycle`` config group: how a dense checkpoint becomes an MoE checkpoint.

Every field carries a docstring: this file is the reference for ``conf/upcycle/*.yaml``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from moe_adapt.errors import MoEAdaptConfigError, config_error, invalid

_fail = invalid


LOW_PRECISION = ("bfloat16", "float16")
"""Output dtypes in which multiplying a weight by an integer other than a power of two rounds it
(fp32 rounds too, by at most half an fp32 ulp: within the logit check's fp32 noise)."""


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def down_scale_rounds(granularity: int, shared_experts: int, dtype: str) -> bool:
    """Whether the routed experts' down projections, multiplied by ``S = granularity - shared_experts``
    (the router weights each of a copy's ``S`` shards ``1/S``), round in ``dtype``: in bfloat16 and
    float16 only a power of two is an exact factor (barring overflow)."""
    return dtype in LOW_PRECISION and not is_power_of_two(granularity - shared_experts)


def down_scale_error(
    granularity: int,
    shared_experts: int,
    dtype: str,
    dtype_from: str,
    fits: Callable[[int], bool] = lambda g: True,
    shared_ok: bool = True,
) -> MoEAdaptConfigError:
    """The one-line refusal of a routed-shard count ``S`` that is not exact in ``dtype``.

    ``dtype_from`` says where the dtype comes from (``upcycle.dtype=bfloat16``, or the dense checkpoint);
    ``fits(g)`` whether granularity ``g`` divides the FFN width (to suggest only valid ones);
    ``shared_ok`` whether changing shared_experts is a fix to suggest (the target has a shared expert).
    """
    s = granularity - shared_experts
    powers = [2**i for i in range(12)]
    grans = sorted(
        (g for g in (shared_experts + p for p in powers) if fits(g)), key=lambda g: abs(g - granularity)
    )
    fixes = [" or ".join(f"upcycle.granularity={g}" for g in sorted(grans[:2]))] if grans else []
    if shared_ok and shared_experts:
        shared = sorted(
            (n for n in (granularity - p for p in powers if p <= granularity) if n >= 0),
            key=lambda n: abs(n - shared_experts),
        )
        fixes.append(" or ".join(f"upcycle.shared_experts={n}" for n in sorted(shared[:2])))
    setting = (
        f"granularity - shared_experts = {granularity} - {shared_experts}"
        if shared_experts
        else "granularity"
    )
    return config_error(
        "upcycle.granularity",
        granularity,
        f"x{s} is not exact in {dtype} ({dtype_from}): the router weights each of a copy's {s} routed shards "
        f"1/{s}, so their down projections are multiplied by {setting} = {s}, and only a power of two "
        f"multiplies {dtype} weights exactly; use {', '.join([*fixes, 'upcycle.dtype=float32'])}, "
        "or set upcycle.allow_inexact=true",
    )


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
    """How the upcycle stage compares the MoE with the dense model (``moe_adapt/upcycle/verify.py``)."""

    auto = "auto"
    layers = "layers"
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
    """Shards the dense FFN is split into; must divide the FFN width. copy requires 1. With bfloat16 or
    float16 weights, granularity - shared_experts must be a power of two for exactness (the routed down
    projections are multiplied by it; see docs/upcycle.md)."""

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
    """Weights dtype of the output: auto (the dense checkpoint's), float32, bfloat16 or float16. A dtype
    narrower than the checkpoint's rounds its weights once: the MoE then equals the dense model with its
    weights rounded to this dtype. float32 keeps any granularity exact for a bf16/fp16 checkpoint."""

    max_shard_mb: int = 2048
    """Largest output safetensors file, in MiB; larger models are written as several shards + index."""

    verify: VerifyMode = VerifyMode.auto
    """layers: stream both checkpoints layer by layer in fp32 (memory: about one layer of each plus the
    embeddings and head) and compare every layer's output and the final logits; auto: the same (it fits
    at any size); logits: load both whole models with transformers and compare logits only (needs both
    in memory); none: skip (the report then says ``"exact": null``). Runs before the output is moved
    into place."""

    verify_probes: int = 4
    """Number of random probe sequences for verification (the fixed English and Arabic sentences of
    ``verify.PROBE_TEXTS`` are added when model.dense has a tokenizer)."""

    verify_seq_len: int = 32
    """Length of each probe sequence; at most the max_position_embeddings of model.dense (checked when
    the stage starts)."""

    verify_tolerance: float = 64.0
    """Allowed error of an exact conversion, in units of fp32 rounding (eps = 2**-23 = 1.19e-7):
    each layer's output may differ by verify_tolerance * eps relative (max |moe - dense| / max |dense|,
    MoE layer on the dense layer's input), the final logits by verify_tolerance * eps * num_layers.
    Exact conversions measure <= 5 eps per layer; a finite number >= 1."""

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
        # after dtype is checked; drop_ratio > 0 is inexact anyway
        if (
            down_scale_rounds(self.granularity, self.shared_experts, self.dtype)
            and not self.allow_inexact
            and self.drop_ratio == 0
        ):
            raise down_scale_error(
                self.granularity, self.shared_experts, self.dtype, f"upcycle.dtype={self.dtype}"
            )
        if self.router_init_std <= 0:
            _fail(f"{key}.router_init_std", self.router_init_std, "must be > 0")
        if not (self.verify_tolerance >= 1 and math.isfinite(self.verify_tolerance)):
            _fail(
                f"{key}.verify_tolerance",
                self.verify_tolerance,
                "must be a finite number >= 1: it counts fp32 rounding units (default 64), not an "
                "absolute relative error",
            )
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
