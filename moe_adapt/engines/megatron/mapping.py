"""HF ⇄ megatron-core weight mapping for Mixtral, Qwen2-MoE and Qwen3-MoE, whole or sharded.

The HF side is the *in-memory* state dict of a transformers 5 model (``model.state_dict()``), in
which each MoE layer's experts are two fused 3-D tensors. (On disk, ``save_pretrained`` writes the
per-expert layout ``experts.{e}.gate_proj.weight``; transformers fuses it on load.) The megatron
side is the state dict of one rank's ``GPTModel`` from :mod:`.model`: the whole model (TP = EP = 1)
or one tensor-/expert-parallel shard of it, with the experts in one of three layouts.

Shape legend (suffixes on tensor names):
    V vocab, H hidden, Q query heads, G key/value heads (= megatron query groups),
    R = Q // G query heads per group, D head dim, E experts, I expert FFN size,
    S shared-expert FFN size, F dense FFN size, C = (R + 2) * D rows per group in linear_qkv,
    N = E / ep_size experts on one expert-parallel rank, and with a trailing ``t`` one
    tensor-parallel slice: Vt = V / tp_size, Gt = G / tp_size, Ft = F / tp_size, St = S / tp_size,
    It = I / etp_size (experts are split by the *expert*-tensor-parallel size).

Whole model, per layer ``L`` (HF prefix ``model.layers.L.``, megatron prefix ``decoder.layers.L.``):

======================================  ===========================================================
HF (in memory)                          megatron-core (local spec, SequentialMLP, TP = EP = 1)
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

Tensor parallel (``tp_size`` ranks; rank ``t`` holds slice ``t`` of every split tensor):

- column-parallel, split along output rows: ``linear_qkv`` weight/bias ``[Gt*C, H]`` — the
  interleaved layout keeps a group's query, key and value rows together, so rank ``t`` simply holds
  query groups ``t*Gt ... (t+1)*Gt - 1`` with their R query heads; vocab-parallel
  ``word_embeddings`` and ``output_layer`` ``[Vt, H]`` (vocabulary rows ``t*Vt ...``).
- column-parallel SwiGLU ``linear_fc1`` ``[2Ft, H]``: megatron chunks each rank's fc1 output into
  gate and up halves, so rank ``t`` holds ``[gate rows t*Ft...; up rows t*Ft...]``, *not* a
  contiguous slice of ``[gate; up]``.
- row-parallel, split along input columns: ``linear_proj`` ``[H, Qt*D]`` (the heads of the rank's
  query groups), ``linear_fc2`` ``[H, Ft]``.
- replicated on every rank: the RMSNorm weights, q/k layernorms, the router ``[E, H]`` and the
  shared-expert gate ``[1, H]``.

Expert parallel (``ep_size``) gives rank ``r`` experts ``r*N ... (r+1)*N - 1``, renumbered from 0;
expert tensor parallel (``etp_size``, megatron's ``expert_tensor_parallel_size``) splits each expert
like a dense MLP (fc1 by gate/up halves, fc2 by columns) with It = I / etp_size.

Expert layouts of one rank's MoE layer (``expert_layout``; prefix ``decoder.layers.L.mlp.experts.``):

- ``sequential`` — ``SequentialMLP`` (local spec, ``moe_grouped_gemm=False``): per local expert n,
  ``local_experts.n.linear_fc1.weight`` ``fc1_2ItH`` (rows gate then up) and
  ``local_experts.n.linear_fc2.weight`` ``fc2_HIt``.
- ``grouped`` — legacy ``GroupedMLP`` (what the TransformerEngine-free local spec builds with
  ``moe_grouped_gemm=True``): ``weight1`` of shape ``[H, N*2It]`` and ``weight2`` ``[N*It, H]``.
  GroupedMLP reads them with ``weight1.view(N, H, 2It)`` and ``weight2.view(N, It, H)``, so the
  memory of ``weight1`` is ``w1_NH2It`` (expert n's ``fc1_2ItH`` transposed; gate columns then up)
  — *not* the per-expert blocks side by side that the nominal ``[H, N*2It]`` shape suggests — and
  ``weight2`` is ``w2_NItH`` (each ``fc2_HIt`` transposed), stacked along rows.
- ``te_grouped`` — ``TEGroupedMLP`` (TransformerEngine spec; mapped, not built here):
  ``linear_fc1.weight{n}`` ``fc1_2ItH`` and ``linear_fc2.weight{n}`` ``fc2_HIt``.

:func:`hf_to_megatron` emits one rank's shard; :func:`megatron_to_hf` takes a whole model or the
shards of all ranks (:class:`MegatronShard` + state dict) and reassembles the HF tensors.
Unsharded outputs may share storage with the input; megatron ``_extra_state`` entries are ignored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal, get_args

import torch

from moe_adapt.engines.megatron.hf_arch import HFMoEArch, read_hf_arch
from moe_adapt.errors import MoEAdaptConfigError, MoEAdaptError

StateDict = dict[str, torch.Tensor]
ExpertLayout = Literal["sequential", "grouped", "te_grouped"]
"""How a megatron MoE layer stores its experts; see the module docstring."""
EXPERT_LAYOUTS: tuple[str, ...] = get_args(ExpertLayout)

_HF_LAYER = "model.layers.{}."
_MC_LAYER = "decoder.layers.{}."
_EXPERTS = ".mlp.experts."
_LOCAL_EXPERT = re.compile(r"^(.*\.mlp\.experts\.local_experts\.)(\d+)(\..*)$")


@dataclass(frozen=True)
class MegatronShard:
    """Where one rank sits in megatron's parallel layout: which slice of the model it holds."""

    tp_rank: int = 0
    """Index in the tensor-parallel group (attention, dense/shared MLPs, embeddings)."""
    tp_size: int = 1
    """Tensor-parallel size."""
    ep_rank: int = 0
    """Index in the expert-parallel group: the rank holds experts ``ep_rank*N ... (ep_rank+1)*N-1``."""
    ep_size: int = 1
    """Expert-parallel size (divides the number of experts)."""
    etp_rank: int = 0
    """Index in the expert-tensor-parallel group (slice of every local expert)."""
    etp_size: int = 1
    """Expert-tensor-parallel size (megatron's ``expert_tensor_parallel_size``; divides I)."""


class _Split(Enum):
    """How a tensor-parallel tensor is cut (see the module docstring)."""

    REPLICATED = "replicated"
    ROWS = "rows"  # dim 0 in contiguous slices
    GLU = "glu"  # dim 0: slice t of the gate half, then slice t of the up half
    COLUMNS = "columns"  # dim 1 in contiguous slices


def _split_of(key: str) -> _Split:
    """The tensor-parallel split of a megatron key in the sequential expert layout."""
    if key.endswith(
        ("word_embeddings.weight", "output_layer.weight", "linear_qkv.weight", "linear_qkv.bias")
    ):
        return _Split.ROWS
    if key.endswith("linear_fc1.weight"):
        return _Split.GLU
    if key.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return _Split.COLUMNS
    return _Split.REPLICATED


def _slice(tensor: torch.Tensor, split: _Split, rank: int, size: int) -> torch.Tensor:
    """Rank ``rank``'s part of a whole tensor (a view; the tensor itself when ``size`` is 1)."""
    if size == 1 or split is _Split.REPLICATED:
        return tensor
    if split is _Split.ROWS:
        return tensor.chunk(size, dim=0)[rank]
    if split is _Split.COLUMNS:
        return tensor.chunk(size, dim=1)[rank]
    gate, up = tensor.chunk(2, dim=0)
    return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]], dim=0)


def _merge(parts: Sequence[torch.Tensor], split: _Split) -> torch.Tensor:
    """Inverse of :func:`_slice`: the whole tensor from the parts of ranks 0, 1, ...."""
    if len(parts) == 1 or split is _Split.REPLICATED:
        return parts[0]
    if split is _Split.ROWS:
        return torch.cat(list(parts), dim=0)
    if split is _Split.COLUMNS:
        return torch.cat(list(parts), dim=1)
    halves = [part.chunk(2, dim=0) for part in parts]
    return torch.cat([gate for gate, _ in halves] + [up for _, up in halves], dim=0)


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


def check_parallel_sizes(
    arch: HFMoEArch, *, tensor_parallel: int = 1, expert_parallel: int = 1, expert_tensor_parallel: int = 1
) -> None:
    """Refuse parallel sizes that do not split the model's tensors evenly.

    Tensor parallel must divide the key/value heads (megatron's query groups), the vocabulary (no
    vocab padding is mapped), the dense FFN size of dense layers and the shared-expert size; expert
    parallel the number of experts; expert tensor parallel the expert FFN size.

    Raises:
        MoEAdaptConfigError: naming the size and the model dimension it does not divide.
    """
    checks = [
        ("tensor_parallel", tensor_parallel, "num_key_value_heads", arch.num_kv_heads),
        ("tensor_parallel", tensor_parallel, "vocab_size", arch.vocab_size),
        ("expert_parallel", expert_parallel, "the number of experts", arch.num_experts),
        ("expert_tensor_parallel", expert_tensor_parallel, "the expert FFN size", arch.moe_ffn_size),
    ]
    if not all(arch.moe_layers):
        checks.append(("tensor_parallel", tensor_parallel, "intermediate_size", arch.dense_ffn_size))
    if arch.shared_expert_size:
        checks.append(
            ("tensor_parallel", tensor_parallel, "shared_expert_intermediate_size", arch.shared_expert_size)
        )
    for name, size, what, value in checks:
        if size < 1 or value % size:
            raise MoEAdaptConfigError(
                f"{name}={size} is invalid: it must be >= 1 and divide {what} ({value})"
                + (" (megatron's vocab-parallel layers split rows evenly)" if what == "vocab_size" else "")
            )


def _check_shard(arch: HFMoEArch, shard: MegatronShard) -> None:
    check_parallel_sizes(
        arch,
        tensor_parallel=shard.tp_size,
        expert_parallel=shard.ep_size,
        expert_tensor_parallel=shard.etp_size,
    )
    for name, rank, size in (
        ("tp", shard.tp_rank, shard.tp_size),
        ("ep", shard.ep_rank, shard.ep_size),
        ("etp", shard.etp_rank, shard.etp_size),
    ):
        if not 0 <= rank < size:
            raise MoEAdaptError(f"{name}_rank={rank} is out of range for {name}_size={size}")


def _check_layout(expert_layout: str) -> None:
    if expert_layout not in EXPERT_LAYOUTS:
        raise MoEAdaptConfigError(
            f"expert_layout={expert_layout!r} is invalid: use one of {', '.join(EXPERT_LAYOUTS)}"
        )


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


# -- expert layouts -------------------------------------------------------------------------------
def _pack_experts(sd: StateDict, arch: HFMoEArch, layout: str, num_local: int) -> StateDict:
    """Move each MoE layer's experts from the sequential layout (in ``sd``) to ``layout``."""
    if layout == "sequential":
        return sd
    h = arch.hidden_size
    for layer in (i for i, moe in enumerate(arch.moe_layers) if moe):
        experts = _MC_LAYER.format(layer) + "mlp.experts."
        fc1_2ItH = [sd.pop(f"{experts}local_experts.{n}.linear_fc1.weight") for n in range(num_local)]
        fc2_HIt = [sd.pop(f"{experts}local_experts.{n}.linear_fc2.weight") for n in range(num_local)]
        if layout == "grouped":
            # reshape copies the transposed stack in (n, h, j) order: GroupedMLP's view(N, H, -1).
            sd[experts + "weight1"] = torch.stack(fc1_2ItH).transpose(1, 2).reshape(h, -1)
            sd[experts + "weight2"] = torch.stack(fc2_HIt).transpose(1, 2).reshape(-1, h)
        else:
            for n in range(num_local):
                sd[f"{experts}linear_fc1.weight{n}"] = fc1_2ItH[n]
                sd[f"{experts}linear_fc2.weight{n}"] = fc2_HIt[n]
    return sd


def unpack_experts(sd: Mapping[str, Any], arch: HFMoEArch, num_local: int) -> StateDict:
    """One rank's state dict with every MoE layer's experts in the sequential layout (detected per layer)."""
    out: StateDict = {k: v for k, v in sd.items() if torch.is_tensor(v) and not k.endswith("_extra_state")}
    h = arch.hidden_size
    for layer in (i for i, moe in enumerate(arch.moe_layers) if moe):
        experts = _MC_LAYER.format(layer) + "mlp.experts."
        local = experts + "local_experts.{}.linear_fc{}.weight"
        if experts + "weight1" in out:
            weight1, weight2 = out.pop(experts + "weight1"), out.pop(experts + "weight2")
            it = weight1.shape[-1] // (2 * num_local)  # It: this rank's slice of the expert FFN size
            if tuple(weight1.shape) != (h, num_local * 2 * it) or tuple(weight2.shape) != (num_local * it, h):
                raise MoEAdaptError(
                    f"{experts}weight1 {tuple(weight1.shape)} / weight2 {tuple(weight2.shape)} do not fit "
                    f"[H, N*2It] / [N*It, H] with H={h}, N={num_local} local experts"
                )
            fc1_N2ItH = weight1.reshape(num_local, h, -1).transpose(1, 2)
            fc2_NHIt = weight2.reshape(num_local, -1, h).transpose(1, 2)
            for n in range(num_local):
                out[local.format(n, 1)] = fc1_N2ItH[n]
                out[local.format(n, 2)] = fc2_NHIt[n]
        elif f"{experts}linear_fc1.weight0" in out:
            for n in range(num_local):
                out[local.format(n, 1)] = _take(out, f"{experts}linear_fc1.weight{n}")
                out[local.format(n, 2)] = _take(out, f"{experts}linear_fc2.weight{n}")
                del out[f"{experts}linear_fc1.weight{n}"], out[f"{experts}linear_fc2.weight{n}"]
    return out


# -- HF -> megatron -------------------------------------------------------------------------------
def _whole_megatron(hf_state_dict: Mapping[str, torch.Tensor], arch: HFMoEArch, experts: range) -> StateDict:
    """The unsliced megatron tensors (sequential layout) with only ``experts``, numbered from 0."""
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


def hf_to_megatron(
    hf_state_dict: Mapping[str, torch.Tensor],
    hf_config: Any,
    *,
    ep_rank: int = 0,
    ep_size: int = 1,
    tp_rank: int = 0,
    tp_size: int = 1,
    etp_rank: int = 0,
    etp_size: int = 1,
    expert_layout: ExpertLayout = "sequential",
) -> StateDict:
    """Map an HF MoE model's in-memory state dict to one rank's megatron ``GPTModel`` state dict.

    Args:
        hf_state_dict: ``model.state_dict()`` of a transformers Mixtral/Qwen2-MoE/Qwen3-MoE model.
        hf_config: that model's ``PretrainedConfig``.
        ep_rank: this rank's index in the expert-parallel group.
        ep_size: expert-parallel size; only experts of ``ep_rank`` are emitted, numbered from 0.
        tp_rank: this rank's index in the tensor-parallel group.
        tp_size: tensor-parallel size; attention, dense and shared MLPs, the embedding and the output
            layer are sliced as the module docstring describes.
        etp_rank: this rank's index in the expert-tensor-parallel group.
        etp_size: expert-tensor-parallel size (megatron's ``expert_tensor_parallel_size``, which
            defaults to the TP size in megatron but to 1 in :func:`.model.transformer_config_from_hf`).
        expert_layout: ``sequential`` (SequentialMLP), ``grouped`` (legacy GroupedMLP, the local spec
            with grouped GEMM) or ``te_grouped`` (TEGroupedMLP).

    Tensors that need no slicing or re-layout may share storage with ``hf_state_dict``; slices of
    split tensors are views or copies of it.

    Raises:
        MoEAdaptError: a tensor is missing or has the wrong shape; a rank is out of range.
        MoEAdaptConfigError: the config is unsupported or a parallel size does not divide the model.
    """
    arch = read_hf_arch(hf_config)
    shard = MegatronShard(tp_rank, tp_size, ep_rank, ep_size, etp_rank, etp_size)
    _check_shard(arch, shard)
    _check_layout(expert_layout)
    num_local = arch.num_experts // ep_size
    whole = _whole_megatron(hf_state_dict, arch, range(ep_rank * num_local, (ep_rank + 1) * num_local))
    out: StateDict = {}
    for key, tensor in whole.items():
        rank, size = (etp_rank, etp_size) if _EXPERTS in key else (tp_rank, tp_size)
        out[key] = _slice(tensor, _split_of(key), rank, size)
    return _pack_experts(out, arch, expert_layout, num_local)


# -- megatron -> HF -------------------------------------------------------------------------------
def gather_megatron_shards(
    shards: Sequence[tuple[MegatronShard, Mapping[str, Any]]], hf_config: Any
) -> StateDict:
    """The whole-model megatron state dict (TP = EP = 1, sequential layout) from per-rank state dicts.

    Args:
        shards: ``(shard, state_dict)`` of enough ranks to cover every tensor-parallel rank and every
            (expert-parallel, expert-tensor-parallel) pair; duplicates (data-parallel replicas, or the
            TP ranks of an ETP = 1 model) are ignored, the first one wins. Each state dict may use any
            expert layout.
        hf_config: the HF config of the model.

    Raises:
        MoEAdaptError: the shards disagree on the parallel sizes or a rank is missing.
    """
    arch = read_hf_arch(hf_config)
    if not shards:
        raise MoEAdaptError("no megatron shards to gather")
    sizes = {(s.tp_size, s.ep_size, s.etp_size) for s, _ in shards}
    if len(sizes) != 1:
        raise MoEAdaptError(f"megatron shards disagree on (tp_size, ep_size, etp_size): {sorted(sizes)}")
    tp_size, ep_size, etp_size = sizes.pop()
    for shard, _ in shards:
        _check_shard(arch, shard)
    num_local = arch.num_experts // ep_size
    dense: dict[int, StateDict] = {}
    experts: dict[tuple[int, int], StateDict] = {}
    for shard, sd in shards:
        if shard.tp_rank in dense and (shard.ep_rank, shard.etp_rank) in experts:
            continue
        local = unpack_experts(sd, arch, num_local)
        dense.setdefault(shard.tp_rank, local)
        experts.setdefault((shard.ep_rank, shard.etp_rank), local)
    missing = [f"tp_rank={r}" for r in range(tp_size) if r not in dense] + [
        f"ep_rank={e}/etp_rank={t}" for e in range(ep_size) for t in range(etp_size) if (e, t) not in experts
    ]
    if missing:
        raise MoEAdaptError(f"megatron shards do not cover the model: missing {', '.join(missing)}")

    out: StateDict = {}
    for key in dense[0]:
        if _EXPERTS not in key:
            out[key] = _merge([_take(dense[r], key) for r in range(tp_size)], _split_of(key))
    for ep_rank in range(ep_size):
        for key in experts[(ep_rank, 0)]:
            match = _LOCAL_EXPERT.match(key)
            if match is None:
                continue
            parts = [_take(experts[(ep_rank, t)], key) for t in range(etp_size)]
            head, index, tail = match.group(1), int(match.group(2)), match.group(3)
            out[f"{head}{ep_rank * num_local + index}{tail}"] = _merge(parts, _split_of(key))
    return out


def megatron_to_hf(
    mcore_state_dict: Mapping[str, Any] | Sequence[tuple[MegatronShard, Mapping[str, Any]]],
    hf_config: Any,
) -> StateDict:
    """Map a megatron ``GPTModel`` state dict back to the HF in-memory state dict.

    Args:
        mcore_state_dict: the whole model's state dict (TP = EP = 1, any expert layout), or the
            ``(MegatronShard, state_dict)`` pairs of the ranks of a sharded model, which are first
            reassembled with :func:`gather_megatron_shards`.
        hf_config: the HF config of the model.

    The result loads into the HF model with ``load_state_dict(..., strict=True)``; the round trip
    ``megatron_to_hf(hf_to_megatron(sd, cfg), cfg)`` reproduces ``sd`` bit for bit, and so does
    gathering the shards ``hf_to_megatron(sd, cfg, tp_rank=t, tp_size=T, ...)`` of every rank.
    """
    arch = read_hf_arch(hf_config)
    shards = (
        [(MegatronShard(), mcore_state_dict)] if isinstance(mcore_state_dict, Mapping) else mcore_state_dict
    )
    sd = gather_megatron_shards(shards, hf_config)
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
        gate_up_E2IH = torch.stack([_take(sd, p + "linear_fc1.weight") for p in experts])
        down_EHI = torch.stack([_take(sd, p + "linear_fc2.weight") for p in experts])
        h, e, i = arch.hidden_size, arch.num_experts, arch.moe_ffn_size
        out[hf + "mlp.experts.gate_up_proj"] = _check_shape(
            mc + "mlp.experts (fc1)", gate_up_E2IH, (e, 2 * i, h)
        )
        out[hf + "mlp.experts.down_proj"] = _check_shape(mc + "mlp.experts (fc2)", down_EHI, (e, h, i))
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
