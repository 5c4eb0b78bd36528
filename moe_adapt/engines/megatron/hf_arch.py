"""Read an HF MoE config (Mixtral, Qwen2-MoE, Qwen3-MoE) into one family-independent description.

The three families spell the same things differently (``num_local_experts`` vs ``num_experts``,
``intermediate_size`` vs ``moe_intermediate_size``, always-on vs optional top-k renormalisation).
:func:`read_hf_arch` reads them once, refuses what the Megatron model cannot reproduce exactly
(naming the config key and value), and hands :mod:`.model` and :mod:`.mapping` one dataclass.
This module needs only the config object, never megatron-core.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moe_adapt.errors import MoEAdaptConfigError

SUPPORTED_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
"""HF ``model_type`` values the Megatron engine can build and map."""


@dataclass(frozen=True)
class HFMoEArch:
    """What the Megatron model and the weight mapping need to know about an HF MoE model."""

    model_type: str
    """HF ``model_type``: one of :data:`SUPPORTED_MODEL_TYPES`."""
    num_layers: int
    """``num_hidden_layers``."""
    hidden_size: int
    """``hidden_size`` (H)."""
    num_heads: int
    """``num_attention_heads`` (Q heads)."""
    num_kv_heads: int
    """``num_key_value_heads`` (query groups, G)."""
    head_dim: int
    """``head_dim``, or ``hidden_size // num_attention_heads`` when unset (D)."""
    vocab_size: int
    """``vocab_size`` (V)."""
    num_experts: int
    """Routed experts per MoE layer (E)."""
    top_k: int
    """``num_experts_per_tok``."""
    moe_ffn_size: int
    """Intermediate size of one routed expert (I)."""
    dense_ffn_size: int
    """Intermediate size of a dense FFN layer (only used by Qwen layers listed as dense)."""
    renormalize_topk: bool
    """True when the top-k probabilities are renormalised to sum to 1 (Mixtral; Qwen ``norm_topk_prob``)."""
    shared_expert_size: int
    """Intermediate size of the shared expert; 0 when there is none."""
    shared_expert_gate: bool
    """True for Qwen2-MoE's sigmoid-gated shared expert."""
    qkv_bias: bool
    """q/k/v projections carry biases (Qwen2-MoE ``qkv_bias``, Qwen3-MoE ``attention_bias``)."""
    qk_norm: bool
    """Per-head RMSNorm on queries and keys (Qwen3-MoE)."""
    rope_theta: float
    """RoPE base frequency."""
    rms_norm_eps: float
    """``rms_norm_eps``."""
    tie_word_embeddings: bool
    """``tie_word_embeddings``: the LM head reuses the input embedding."""
    max_position_embeddings: int
    """``max_position_embeddings``."""
    moe_layers: tuple[bool, ...]
    """Per layer: True when the layer is a MoE layer, False for a dense FFN."""

    @property
    def heads_per_group(self) -> int:
        """Query heads that share one key/value head."""
        return self.num_heads // self.num_kv_heads


def _refuse(key: str, value: Any, allowed: str) -> MoEAdaptConfigError:
    return MoEAdaptConfigError(
        f"HF config {key}={value!r} is not supported by the megatron engine; {allowed}"
    )


def _rope_theta(cfg: Any) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise _refuse("rope_parameters.rope_type", rope_type, "only 'default' RoPE is mapped")
    factor = params.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", None))
    if factor not in (None, 1.0):
        raise _refuse("partial_rotary_factor", factor, "only full rotary (1.0) is mapped")
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    if theta is None:
        raise _refuse("rope_parameters.rope_theta", None, "a RoPE base frequency is required")
    return float(theta)


def _moe_layers(cfg: Any, num_layers: int) -> tuple[bool, ...]:
    if cfg.model_type == "mixtral":
        return (True,) * num_layers
    step = int(getattr(cfg, "decoder_sparse_step", 1) or 1)
    dense = set(getattr(cfg, "mlp_only_layers", None) or [])
    return tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers))


def read_hf_arch(cfg: Any) -> HFMoEArch:
    """Describe an HF MoE ``PretrainedConfig``; raise :class:`MoEAdaptConfigError` on what we cannot map."""
    model_type = getattr(cfg, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise _refuse("model_type", model_type, f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if cfg.hidden_act != "silu":
        raise _refuse("hidden_act", cfg.hidden_act, "only 'silu' (SwiGLU experts) is mapped")
    if getattr(cfg, "use_sliding_window", False) or (
        model_type == "mixtral" and getattr(cfg, "sliding_window", None) is not None
    ):
        raise _refuse(
            "sliding_window", cfg.sliding_window, "sliding-window attention is not mapped; set it off"
        )
    if float(getattr(cfg, "attention_dropout", 0.0) or 0.0) != 0.0:
        raise _refuse("attention_dropout", cfg.attention_dropout, "only 0.0 is mapped")
    if model_type == "mixtral":
        num_experts, moe_ffn = cfg.num_local_experts, cfg.intermediate_size
        renormalize, shared, gate, qkv_bias, qk_norm = True, 0, False, False, False
        if float(getattr(cfg, "router_jitter_noise", 0.0) or 0.0) != 0.0:
            raise _refuse("router_jitter_noise", cfg.router_jitter_noise, "only 0.0 is mapped")
    else:
        num_experts, moe_ffn = cfg.num_experts, cfg.moe_intermediate_size
        renormalize = bool(cfg.norm_topk_prob)
        qk_norm = model_type == "qwen3_moe"
        if model_type == "qwen2_moe":
            shared, gate, qkv_bias = int(cfg.shared_expert_intermediate_size or 0), True, bool(cfg.qkv_bias)
        else:
            shared, gate, qkv_bias = 0, False, bool(cfg.attention_bias)
    if model_type == "qwen3_moe" and getattr(cfg, "attention_bias", False):
        raise _refuse("attention_bias", True, "Qwen3-MoE's o_proj bias is not mapped; use False")
    num_layers = int(cfg.num_hidden_layers)
    num_kv_heads = int(cfg.num_key_value_heads or cfg.num_attention_heads)
    if cfg.num_attention_heads % num_kv_heads:
        raise _refuse("num_key_value_heads", num_kv_heads, "must divide num_attention_heads")
    return HFMoEArch(
        model_type=model_type,
        num_layers=num_layers,
        hidden_size=int(cfg.hidden_size),
        num_heads=int(cfg.num_attention_heads),
        num_kv_heads=num_kv_heads,
        head_dim=int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads),
        vocab_size=int(cfg.vocab_size),
        num_experts=int(num_experts),
        top_k=int(cfg.num_experts_per_tok),
        moe_ffn_size=int(moe_ffn),
        dense_ffn_size=int(cfg.intermediate_size),
        renormalize_topk=renormalize,
        shared_expert_size=shared,
        shared_expert_gate=gate and shared > 0,
        qkv_bias=qkv_bias,
        qk_norm=qk_norm,
        rope_theta=_rope_theta(cfg),
        rms_norm_eps=float(cfg.rms_norm_eps),
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        max_position_embeddings=int(cfg.max_position_embeddings),
        moe_layers=_moe_layers(cfg, num_layers),
    )
