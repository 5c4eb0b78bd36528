"""Source families and target MoE layouts: names of tensors, configs, and what each can express.

A dense source (Llama, Mistral, Qwen2, Qwen3, or any checkpoint with the same tensor names) keeps
its embeddings, attention and norms unchanged; only each layer's FFN becomes a router plus experts.
The target layout must therefore reproduce the source's attention exactly. Each family goes by
default to its MoE sibling (Llama/Mistral -> Mixtral, Qwen2 -> Qwen2-MoE, Qwen3 -> Qwen3-MoE);
:func:`check_expressible` refuses a target that cannot express the source (say Qwen3's q/k norms
in Mixtral) unless the user allows an inexact result.

Experts are written in the per-expert layout that ``save_pretrained`` writes and every loader
reads (``...experts.{e}.gate_proj.weight``); transformers 5 fuses them into 3-D tensors on load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from moe_adapt.checkpoint.hf import warn_remote_code
from moe_adapt.errors import CheckpointError, MoEAdaptConfigError
from moe_adapt.upcycle.sizing import Sizing

SOURCE_TARGETS = {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}
"""Supported dense families and the MoE layout each goes to by default."""

DENSE_FFN = {
    "gate": "model.layers.{layer}.mlp.gate_proj.weight",
    "up": "model.layers.{layer}.mlp.up_proj.weight",
    "down": "model.layers.{layer}.mlp.down_proj.weight",
}
"""The dense FFN's tensor names (shared by all supported families)."""

# Attention features a source may have, found from its tensors.
QKV_BIAS, O_BIAS, QK_NORM, MLP_BIAS = (
    "q/k/v projection biases",
    "output projection bias",
    "q/k norms",
    "FFN biases",
)


@dataclass(frozen=True)
class TargetLayout:
    """How one MoE family names its tensors and what its attention can express."""

    model_type: str
    architecture: str
    router: str
    expert: dict[str, str]
    shared: dict[str, str] | None = None
    shared_gate: str | None = None
    optional: frozenset[str] = frozenset()  # features the target can switch on to match the source
    required: frozenset[str] = frozenset()  # features the target always has

    @property
    def has_shared_expert(self) -> bool:
        return self.shared is not None


_LAYER = "model.layers.{layer}"
TARGETS: dict[str, TargetLayout] = {
    "mixtral": TargetLayout(
        model_type="mixtral",
        architecture="MixtralForCausalLM",
        router=f"{_LAYER}.block_sparse_moe.gate.weight",
        expert={
            p: f"{_LAYER}.block_sparse_moe.experts.{{expert}}.{w}.weight"
            for p, w in (("gate", "w1"), ("up", "w3"), ("down", "w2"))
        },
    ),
    "qwen2_moe": TargetLayout(
        model_type="qwen2_moe",
        architecture="Qwen2MoeForCausalLM",
        router=f"{_LAYER}.mlp.gate.weight",
        expert={p: f"{_LAYER}.mlp.experts.{{expert}}.{p}_proj.weight" for p in ("gate", "up", "down")},
        shared={p: f"{_LAYER}.mlp.shared_expert.{p}_proj.weight" for p in ("gate", "up", "down")},
        shared_gate=f"{_LAYER}.mlp.shared_expert_gate.weight",
        optional=frozenset({QKV_BIAS}),
    ),
    "qwen3_moe": TargetLayout(
        model_type="qwen3_moe",
        architecture="Qwen3MoeForCausalLM",
        router=f"{_LAYER}.mlp.gate.weight",
        expert={p: f"{_LAYER}.mlp.experts.{{expert}}.{p}_proj.weight" for p in ("gate", "up", "down")},
        optional=frozenset({QKV_BIAS, O_BIAS}),
        required=frozenset({QK_NORM}),
    ),
}


def load_source_config(path: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """Read a dense checkpoint's config with transformers (normalised rope, head_dim, layer types);
    ``trust_remote_code`` runs the checkpoint's own configuration code (with a warning)."""
    if trust_remote_code:
        warn_remote_code(path)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError) as e:
        raise CheckpointError(f"model.dense={path}: transformers cannot read its config.json ({e})") from None


def source_features(has_tensor: Any) -> set[str]:
    """Attention/FFN features of a dense checkpoint, from which tensors layer 0 has."""
    found = set()
    probes = {
        QKV_BIAS: "model.layers.0.self_attn.q_proj.bias",
        O_BIAS: "model.layers.0.self_attn.o_proj.bias",
        QK_NORM: "model.layers.0.self_attn.q_norm.weight",
        MLP_BIAS: "model.layers.0.mlp.gate_proj.bias",
    }
    for feature, name in probes.items():
        if has_tensor(name):
            found.add(feature)
    return found


def resolve_target(model_type: str, target: str, explicit_ok: bool = True) -> TargetLayout:
    """The target layout for ``upcycle.target`` (``auto`` = the source family's MoE sibling)."""
    if target == "auto":
        if model_type not in SOURCE_TARGETS:
            raise MoEAdaptConfigError(
                f"model.dense has model_type={model_type!r}, which moe_adapt does not know: "
                "supported families "
                f"are {', '.join(SOURCE_TARGETS)}; for a checkpoint with the same tensor names, set "
                "upcycle.target=mixtral|qwen2_moe|qwen3_moe"
            )
        target = SOURCE_TARGETS[model_type]
    return TARGETS[target]


def layer_windows(config: PretrainedConfig) -> list[int | None]:
    """Each layer's sliding attention window (None = full attention), as the modelling code sees it."""
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None) or None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return [window if t == "sliding_attention" else None for t in layer_types]
    return [window] * n


def inexact_reasons(features: set[str], layout: TargetLayout, sizing: Sizing) -> list[str]:
    """Why ``layout`` cannot reproduce a dense model with ``features`` (empty list: it can)."""
    reasons = []
    for feature in sorted(features - layout.optional - layout.required):
        reasons.append(f"the source has {feature}, which {layout.model_type} cannot hold")
    for feature in sorted(layout.required - features):
        reasons.append(f"{layout.model_type} always applies {feature}, which the source does not have")
    if sizing.shared and not layout.has_shared_expert:
        reasons.append(f"{layout.model_type} has no shared expert (upcycle.shared_experts={sizing.shared})")
    return reasons


def build_target_config(
    source: PretrainedConfig, features: set[str], layout: TargetLayout, sizing: Sizing, dtype: str
) -> PretrainedConfig:
    """The target model's config: the source's attention and vocabulary, plus the MoE sizes."""
    common: dict[str, Any] = {
        key: getattr(source, key)
        for key in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "hidden_act",
            "max_position_embeddings",
            "initializer_range",
            "rms_norm_eps",
            "tie_word_embeddings",
            "rope_parameters",
            "attention_dropout",
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
        )
        if hasattr(source, key)
    }
    common["head_dim"] = getattr(source, "head_dim", None) or source.hidden_size // source.num_attention_heads
    common["architectures"] = [layout.architecture]
    common["dtype"] = dtype
    windows = layer_windows(source)
    window = next((w for w in windows if w), None)
    extra: dict[str, Any]
    if layout.model_type == "mixtral":
        extra = dict(
            num_local_experts=sizing.num_experts,
            num_experts_per_tok=sizing.top_k,
            intermediate_size=sizing.expert_width,
            sliding_window=window,
        )
    else:
        extra = dict(
            num_experts=sizing.num_experts,
            num_experts_per_tok=sizing.top_k,
            moe_intermediate_size=sizing.expert_width,
            intermediate_size=sizing.ffn_width,
            norm_topk_prob=True,  # renormalised top-k: what makes the upcycled MoE exact
            decoder_sparse_step=1,
            mlp_only_layers=[],
            use_sliding_window=window is not None,
            sliding_window=window,
        )
        if layout.model_type == "qwen2_moe":
            extra.update(
                shared_expert_intermediate_size=sizing.shared_width,
                qkv_bias=QKV_BIAS in features,
                layer_types=["sliding_attention" if w else "full_attention" for w in windows],
            )
        else:
            extra.update(attention_bias=QKV_BIAS in features or O_BIAS in features)
    return AutoConfig.for_model(layout.model_type, **common, **extra)


def dense_tensors(config: PretrainedConfig, layout: TargetLayout) -> dict[str, tuple[int, ...]]:
    """Every tensor of the target model outside its FFNs (``.mlp.``), with its shape, in the order of
    the model's ``state_dict`` (``lm_head.weight`` included, tied or not).

    Derived from the config instead of instantiating the model (on the meta device that cost ~1.8 s
    of the upcycle's set-up, mostly importing the modelling code); ``tests/upcycle/test_layouts.py``
    checks it against the models transformers builds.
    """
    h, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    if layout.model_type == "qwen2_moe":
        qkv_bias, o_bias = bool(config.qkv_bias), False
    elif layout.model_type == "qwen3_moe":
        qkv_bias = o_bias = bool(config.attention_bias)
    else:
        qkv_bias = o_bias = False
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h)}
    for layer in range(config.num_hidden_layers):
        a = f"model.layers.{layer}.self_attn."
        for proj, width in (("q", heads * head_dim), ("k", kv * head_dim), ("v", kv * head_dim)):
            out[f"{a}{proj}_proj.weight"] = (width, h)
            if qkv_bias:
                out[f"{a}{proj}_proj.bias"] = (width,)
        out[f"{a}o_proj.weight"] = (h, heads * head_dim)
        if o_bias:
            out[f"{a}o_proj.bias"] = (h,)
        if QK_NORM in layout.required:
            out[f"{a}q_norm.weight"] = (head_dim,)
            out[f"{a}k_norm.weight"] = (head_dim,)
        out[f"model.layers.{layer}.input_layernorm.weight"] = (h,)
        out[f"model.layers.{layer}.post_attention_layernorm.weight"] = (h,)
    out["model.norm.weight"] = (h,)
    out["lm_head.weight"] = (config.vocab_size, h)
    return out


def attention_mismatch(source: PretrainedConfig, target: PretrainedConfig) -> list[str]:
    """Differences between the two configs that change the attention (windows)."""
    if layer_windows(source) != layer_windows(target):
        return [
            f"per-layer attention windows {layer_windows(source)} cannot be expressed by "
            f"{target.model_type} (would be {layer_windows(target)})"
        ]
    return []
