"""HF ⇄ megatron-core weight mapping for Mixtral, Qwen2-MoE and Qwen3-MoE.

The HF side is the *in-memory* state dict of a transformers 5 model (``model.state_dict()``), in
which each MoE layer's experts are two fused 3-D tensors. (On disk, ``save_pretrained`` writes the
per-expert layout ``experts.{e}.gate_proj.weight``; transformers fuses it on load.) The megatron
side is the state dict of the ``GPTModel`` from :mod:`.model` (local spec, ``SequentialMLP``).

Shape legend (suffixes on tensor names):
    V vocab, H hidden, Q query heads, G key/value heads (= megatron query groups),
    R = Q // G query heads per group, D head dim, E experts, I expert FFN size,
    S shared-expert FFN size, F dense FFN size, C = (R + 2) * D rows per group in linear_qkv.

Per layer ``L`` (HF prefix ``model.layers.L.``, megatron prefix ``decoder.layers.L.``):

======================================  ===========================================================
HF (in memory)                          megatron-core (local spec, SequentialMLP)
======================================  ===========================================================
input_layernorm.weight [H]              input_layernorm.weight [H]
self_attn.{q,k,v}_proj.weight           self_attention.linear_qkv.weight [G*C, H]: per group g the
  q [Q*D, H], k/v [G*D, H]                R query heads of g, then g's key head, then g's value head
self_attn.{q,k,v}_proj.bias (Qwen2)     self_attention.linear_qkv.bias [G*C], same interleaving
self_attn.{q,k}_norm.weight [D] (Qwen3) self_attention.{q,k}_layernorm.weight [D]
self_attn.o_proj.weight [H, Q*D]        self_attention.linear_proj.weight [H, Q*D]
post_attention_layernorm.weight [H]     pre_mlp_layernorm.weight [H]
mlp.gate.weight [E, H]                  mlp.router.weight [E, H]
mlp.experts.gate_up_proj [E, 2I, H]     mlp.experts.local_experts.e.linear_fc1.weight [2I, H]
  (rows: gate then up)                    (rows: gate then up — megatron's GLU splits the same way)
mlp.experts.down_proj [E, H, I]         mlp.experts.local_experts.e.linear_fc2.weight [H, I]
mlp.shared_expert.{gate,up}_proj [S,H]  mlp.shared_experts.linear_fc1.weight [2S, H] (gate; up)
mlp.shared_expert.down_proj [H, S]      mlp.shared_experts.linear_fc2.weight [H, S]
mlp.shared_expert_gate.weight [1, H]    mlp.shared_experts.gate_weight [1, H]
mlp.{gate,up}_proj [F, H] (dense layer) mlp.linear_fc1.weight [2F, H] (gate; up)
mlp.down_proj [H, F] (dense layer)      mlp.linear_fc2.weight [H, F]
======================================  ===========================================================

Plus ``model.embed_tokens.weight`` ⇄ ``embedding.word_embeddings.weight`` [V, H],
``model.norm.weight`` ⇄ ``decoder.final_layernorm.weight`` [H] and ``lm_head.weight`` ⇄
``output_layer.weight`` [V, H] (absent on the megatron side when embeddings are tied).

With expert parallel, a rank holds experts ``ep_rank * E/ep_size ...`` renumbered from 0;
:func:`hf_to_megatron` can emit just that rank's slice. Tensor parallel is not sliced here.
Output tensors may share storage with the input; megatron ``_extra_state`` entries are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from moe_adapt.engines.megatron.hf_arch import HFMoEArch, read_hf_arch
from moe_adapt.errors import MoEAdaptError

StateDict = dict[str, torch.Tensor]

_HF_LAYER = "model.layers.{}."
_MC_LAYER = "decoder.layers.{}."


def _take(sd: Mapping[str, Any], key: str) -> torch.Tensor:
    try:
        value = sd[key]
    except KeyError:
        raise MoEAdaptError(
            f"state dict has no tensor {key!r}; is it from the model this config describes?"
        ) from None
    if not torch.is_tensor(value):
        raise MoEAdaptError(f"state dict entry {key!r} is {type(value).__name__}, not a tensor")
    return value


def _check_shape(key: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(tensor.shape) != shape:
        raise MoEAdaptError(f"{key} has shape {tuple(tensor.shape)}, expected {shape} from the HF config")
    return tensor


def _expert_range(arch: HFMoEArch, ep_rank: int, ep_size: int) -> range:
    if ep_size < 1 or arch.num_experts % ep_size or not 0 <= ep_rank < ep_size:
        raise MoEAdaptError(
            f"expert parallel ep_size={ep_size}, ep_rank={ep_rank} does not split {arch.num_experts} experts"
        )
    per_rank = arch.num_experts // ep_size
    return range(ep_rank * per_rank, (ep_rank + 1) * per_rank)


def interleave_qkv(
    q_QDx: torch.Tensor, k_GDx: torch.Tensor, v_GDx: torch.Tensor, arch: HFMoEArch
) -> torch.Tensor:
    """Fuse HF q/k/v weights ([Q*D, H], [G*D, H]) or biases ([Q*D], [G*D]) into megatron's linear_qkv."""
    g, r, d = arch.num_kv_heads, arch.heads_per_group, arch.head_dim
    tail = q_QDx.shape[1:]
    q_GRDx = q_QDx.reshape(g, r * d, *tail)
    k_G1Dx = k_GDx.reshape(g, d, *tail)
    v_G1Dx = v_GDx.reshape(g, d, *tail)
    return torch.cat([q_GRDx, k_G1Dx, v_G1Dx], dim=1).reshape(g * (r + 2) * d, *tail)


def split_qkv(qkv_GCx: torch.Tensor, arch: HFMoEArch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`interleave_qkv`: megatron linear_qkv [G*C, ...] -> HF (q, k, v)."""
    g, r, d = arch.num_kv_heads, arch.heads_per_group, arch.head_dim
    tail = qkv_GCx.shape[1:]
    q_GRDx, k_GDx, v_GDx = qkv_GCx.reshape(g, (r + 2) * d, *tail).split([r * d, d, d], dim=1)
    return q_GRDx.reshape(g * r * d, *tail), k_GDx.reshape(g * d, *tail), v_GDx.reshape(g * d, *tail)


def _attention_pairs(arch: HFMoEArch) -> list[tuple[str, str]]:
    """(HF suffix, megatron suffix) of the one-to-one attention and norm tensors of a layer."""
    pairs = [
        ("input_layernorm.weight", "input_layernorm.weight"),
        ("self_attn.o_proj.weight", "self_attention.linear_proj.weight"),
        ("post_attention_layernorm.weight", "pre_mlp_layernorm.weight"),
    ]
    if arch.qk_norm:
        pairs += [
            ("self_attn.q_norm.weight", "self_attention.q_layernorm.weight"),
            ("self_attn.k_norm.weight", "self_attention.k_layernorm.weight"),
        ]
    return pairs


def hf_to_megatron(
    hf_state_dict: Mapping[str, torch.Tensor], hf_config: Any, *, ep_rank: int = 0, ep_size: int = 1
) -> StateDict:
    """Map an HF MoE model's in-memory state dict to the megatron ``GPTModel`` state dict.

    Args:
        hf_state_dict: ``model.state_dict()`` of a transformers Mixtral/Qwen2-MoE/Qwen3-MoE model.
        hf_config: that model's ``PretrainedConfig``.
        ep_rank: this rank's index in the expert-parallel group.
        ep_size: expert-parallel size; only experts of ``ep_rank`` are emitted, numbered from 0.

    Raises:
        MoEAdaptError: a tensor is missing or has the wrong shape; the config is unsupported.
    """
    arch = read_hf_arch(hf_config)
    experts = _expert_range(arch, ep_rank, ep_size)
    h, e, i = arch.hidden_size, arch.num_experts, arch.moe_ffn_size
    out: StateDict = {"embedding.word_embeddings.weight": _take(hf_state_dict, "model.embed_tokens.weight")}
    for layer in range(arch.num_layers):
        hf, mc = _HF_LAYER.format(layer), _MC_LAYER.format(layer)
        for hf_key, mc_key in _attention_pairs(arch):
            out[mc + mc_key] = _take(hf_state_dict, hf + hf_key)
        for kind in ("weight", "bias") if arch.qkv_bias else ("weight",):
            q, k, v = (_take(hf_state_dict, f"{hf}self_attn.{p}_proj.{kind}") for p in "qkv")
            _check_shape(f"{hf}self_attn.q_proj.{kind}", q, (arch.num_heads * arch.head_dim, h)[: q.dim()])
            out[f"{mc}self_attention.linear_qkv.{kind}"] = interleave_qkv(q, k, v, arch)
        if not arch.moe_layers[layer]:
            gate, up = (_take(hf_state_dict, f"{hf}mlp.{p}_proj.weight") for p in ("gate", "up"))
            out[mc + "mlp.linear_fc1.weight"] = torch.cat([gate, up], dim=0)
            out[mc + "mlp.linear_fc2.weight"] = _take(hf_state_dict, hf + "mlp.down_proj.weight")
            continue
        out[mc + "mlp.router.weight"] = _check_shape(
            hf + "mlp.gate.weight", _take(hf_state_dict, hf + "mlp.gate.weight"), (e, h)
        )
        gate_up_E2IH = _check_shape(
            hf + "mlp.experts.gate_up_proj",
            _take(hf_state_dict, hf + "mlp.experts.gate_up_proj"),
            (e, 2 * i, h),
        )
        down_EHI = _check_shape(
            hf + "mlp.experts.down_proj", _take(hf_state_dict, hf + "mlp.experts.down_proj"), (e, h, i)
        )
        for local, expert in enumerate(experts):
            prefix = f"{mc}mlp.experts.local_experts.{local}."
            out[prefix + "linear_fc1.weight"] = gate_up_E2IH[expert]
            out[prefix + "linear_fc2.weight"] = down_EHI[expert]
        if arch.shared_expert_size:
            shared = hf + "mlp.shared_expert."
            gate_SH, up_SH = (_take(hf_state_dict, f"{shared}{p}_proj.weight") for p in ("gate", "up"))
            out[mc + "mlp.shared_experts.linear_fc1.weight"] = torch.cat([gate_SH, up_SH], dim=0)
            out[mc + "mlp.shared_experts.linear_fc2.weight"] = _take(
                hf_state_dict, shared + "down_proj.weight"
            )
            if arch.shared_expert_gate:
                out[mc + "mlp.shared_experts.gate_weight"] = _take(
                    hf_state_dict, hf + "mlp.shared_expert_gate.weight"
                )
    out["decoder.final_layernorm.weight"] = _take(hf_state_dict, "model.norm.weight")
    if not arch.tie_word_embeddings:
        out["output_layer.weight"] = _take(hf_state_dict, "lm_head.weight")
    return out


def megatron_to_hf(mcore_state_dict: Mapping[str, Any], hf_config: Any) -> StateDict:
    """Map a full (EP=1, TP=1) megatron ``GPTModel`` state dict back to the HF in-memory state dict.

    The result loads into the HF model with ``load_state_dict(..., strict=True)``; the round trip
    ``megatron_to_hf(hf_to_megatron(sd, cfg), cfg)`` reproduces ``sd`` bit for bit.
    """
    arch = read_hf_arch(hf_config)
    sd = mcore_state_dict
    embed_VH = _take(sd, "embedding.word_embeddings.weight")
    out: StateDict = {"model.embed_tokens.weight": embed_VH}
    for layer in range(arch.num_layers):
        hf, mc = _HF_LAYER.format(layer), _MC_LAYER.format(layer)
        for hf_key, mc_key in _attention_pairs(arch):
            out[hf + hf_key] = _take(sd, mc + mc_key)
        for kind in ("weight", "bias") if arch.qkv_bias else ("weight",):
            q, k, v = split_qkv(_take(sd, f"{mc}self_attention.linear_qkv.{kind}"), arch)
            for name, tensor in zip("qkv", (q, k, v), strict=True):
                out[f"{hf}self_attn.{name}_proj.{kind}"] = tensor.contiguous()
        if not arch.moe_layers[layer]:
            gate_FH, up_FH = _take(sd, mc + "mlp.linear_fc1.weight").chunk(2, dim=0)
            out[hf + "mlp.gate_proj.weight"] = gate_FH.contiguous()
            out[hf + "mlp.up_proj.weight"] = up_FH.contiguous()
            out[hf + "mlp.down_proj.weight"] = _take(sd, mc + "mlp.linear_fc2.weight")
            continue
        out[hf + "mlp.gate.weight"] = _take(sd, mc + "mlp.router.weight")
        experts = [f"{mc}mlp.experts.local_experts.{e}." for e in range(arch.num_experts)]
        out[hf + "mlp.experts.gate_up_proj"] = torch.stack(
            [_take(sd, p + "linear_fc1.weight") for p in experts]
        )
        out[hf + "mlp.experts.down_proj"] = torch.stack([_take(sd, p + "linear_fc2.weight") for p in experts])
        if arch.shared_expert_size:
            shared = hf + "mlp.shared_expert."
            gate_SH, up_SH = _take(sd, mc + "mlp.shared_experts.linear_fc1.weight").chunk(2, dim=0)
            out[shared + "gate_proj.weight"] = gate_SH.contiguous()
            out[shared + "up_proj.weight"] = up_SH.contiguous()
            out[shared + "down_proj.weight"] = _take(sd, mc + "mlp.shared_experts.linear_fc2.weight")
            if arch.shared_expert_gate:
                out[hf + "mlp.shared_expert_gate.weight"] = _take(sd, mc + "mlp.shared_experts.gate_weight")
    out["model.norm.weight"] = _take(sd, "decoder.final_layernorm.weight")
    out["lm_head.weight"] = embed_VH if arch.tie_word_embeddings else _take(sd, "output_layer.weight")
    return out
