"""Build a megatron-core ``GPTModel`` with MoE layers that computes what an HF MoE model computes.

One call, :func:`build_gpt_model`, turns an HF config (Mixtral, Qwen2-MoE, Qwen3-MoE) into a
``TransformerConfig`` and a ``GPTModel`` built from the TransformerEngine-free local layer spec
(``get_gpt_layer_local_spec`` per layer, via ``get_gpt_decoder_block_spec``): torch RMSNorm, local
``DotProductAttention`` and ``SequentialMLP`` experts, or with ``grouped_gemm=True`` the legacy
``GroupedMLP`` (one grouped GEMM per expert projection; needs the ``grouped_gemm`` package and bf16).
Weights are loaded separately with :func:`moe_adapt.engines.megatron.mapping.hf_to_megatron`, whose
``expert_layout`` must match (:func:`expert_layout`) and whose tensor-/expert-parallel slice is this
rank's (:func:`current_shard`).

How each HF behaviour is reproduced:

- Router: HF Mixtral, and Qwen with ``norm_topk_prob=True``, take softmax over all experts, keep
  the top k and renormalise; that equals a softmax over the top-k logits, which is megatron's
  ``moe_router_pre_softmax=False``. Qwen with ``norm_topk_prob=False`` keeps the raw top-k
  probabilities of the full softmax: ``moe_router_pre_softmax=True``.
- Experts: SwiGLU (``gated_linear_unit=True``, silu), no biases.
- Qwen2-MoE's shared expert: ``moe_shared_expert_intermediate_size`` + ``moe_shared_expert_gate``
  (sigmoid gate, a ``[1, H]`` weight).
- Attention: GQA (``num_query_groups``), RoPE with the HF ``rope_theta``, q/k biases (Qwen2-MoE),
  per-head q/k RMSNorm (Qwen3-MoE), no dropout.
- Dense layers inside a Qwen MoE model (``mlp_only_layers``, ``decoder_sparse_step``): ``moe_layer_freq``.

The model's parallel layout (TP, EP, expert TP) comes from megatron's ``parallel_state``, which
the caller initialises with the same sizes as the config; this module only builds. Tensor parallel
turns sequence parallel on by default: megatron-core refuses to train MoE layers with TP > 1
without it, and it leaves the logits unchanged. The local spec's torch norm refuses sequence
parallel, so with it the norms are :class:`SequenceParallelRMSNorm` (same math, weight marked for
megatron's gradient all-reduce over the TP group; ``finalize_model_grads`` must run, as megatron's
DDP training loop does).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Literal

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.transformer_config import TransformerConfig

from moe_adapt.engines.megatron.hf_arch import HFMoEArch, read_hf_arch
from moe_adapt.engines.megatron.mapping import ExpertLayout, MegatronShard, check_parallel_sizes
from moe_adapt.errors import MoEAdaptConfigError, MoEAdaptError

Dispatcher = Literal["alltoall", "allgather"]


def transformer_config_from_hf(
    hf_config: Any,
    *,
    params_dtype: torch.dtype = torch.float32,
    dispatcher: Dispatcher = "alltoall",
    tensor_parallel: int = 1,
    expert_parallel: int = 1,
    expert_tensor_parallel: int = 1,
    sequence_parallel: bool | None = None,
    grouped_gemm: bool = False,
    aux_loss_coeff: float = 0.0,
    use_cpu_initialization: bool = True,
    **overrides: Any,
) -> TransformerConfig:
    """The ``TransformerConfig`` that reproduces ``hf_config``'s forward pass.

    Args:
        hf_config: a transformers ``PretrainedConfig`` of model_type mixtral, qwen2_moe or qwen3_moe.
        params_dtype: dtype of the parameters (fp32 for the CPU reference, bf16 on GPU).
        dispatcher: megatron token dispatcher; ``alltoall`` for expert parallel.
        tensor_parallel: tensor-parallel size (must match ``parallel_state``); must divide the
            key/value heads, the vocabulary, dense and shared-expert FFN sizes.
        expert_parallel: expert-parallel size (must match ``parallel_state``).
        expert_tensor_parallel: how many ranks split each expert (megatron's
            ``expert_tensor_parallel_size``; must match ``parallel_state``, whose own default is the
            TP size). 1 keeps every expert whole on its rank, the usual choice with expert parallel.
        sequence_parallel: split activations along the sequence between TP ranks; default: on when
            ``tensor_parallel > 1`` (megatron-core refuses to train MoE with TP but without it).
        grouped_gemm: build the experts as megatron's legacy ``GroupedMLP`` (the
            TransformerEngine-free grouped-GEMM experts, expert layout ``grouped``); needs bf16
            parameters and the ``grouped_gemm`` package at build time.
        aux_loss_coeff: load-balancing loss coefficient; 0 disables the auxiliary loss.
        use_cpu_initialization: initialise parameters on the CPU (required without CUDA).
        **overrides: any further ``TransformerConfig`` field, applied last.

    Raises:
        MoEAdaptConfigError: an unsupported dispatcher, parallel size or grouped-GEMM setting.
    """
    arch = read_hf_arch(hf_config)
    if dispatcher not in ("alltoall", "allgather"):
        raise MoEAdaptConfigError(
            f"dispatcher={dispatcher!r} is not supported; use 'alltoall' or 'allgather'"
        )
    check_parallel_sizes(
        arch,
        tensor_parallel=tensor_parallel,
        expert_parallel=expert_parallel,
        expert_tensor_parallel=expert_tensor_parallel,
    )
    if sequence_parallel is None:
        sequence_parallel = tensor_parallel > 1
    elif sequence_parallel and tensor_parallel == 1:
        raise MoEAdaptConfigError("sequence_parallel=True is invalid with tensor_parallel=1: it needs TP > 1")
    kwargs: dict[str, Any] = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.dense_ffn_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        qk_layernorm=arch.qk_norm,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        gated_linear_unit=True,
        activation_func=F.silu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=use_cpu_initialization,
        tensor_model_parallel_size=tensor_parallel,
        expert_model_parallel_size=expert_parallel,
        expert_tensor_parallel_size=expert_tensor_parallel,
        sequence_parallel=sequence_parallel,
        num_moe_experts=arch.num_experts,
        moe_layer_freq=[int(m) for m in arch.moe_layers],
        moe_ffn_hidden_size=arch.moe_ffn_size,
        moe_router_topk=arch.top_k,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not arch.renormalize_topk,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="aux_loss" if aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=aux_loss_coeff,
        moe_token_dispatcher_type=dispatcher,
        moe_grouped_gemm=grouped_gemm,
        moe_shared_expert_intermediate_size=arch.shared_expert_size or None,
        moe_shared_expert_gate=arch.shared_expert_gate,
        deterministic_mode=torch.are_deterministic_algorithms_enabled(),  # the run's `deterministic`
    )
    kwargs.update(overrides)
    if kwargs["moe_grouped_gemm"] and kwargs["params_dtype"] != torch.bfloat16:
        raise MoEAdaptConfigError(
            f"grouped_gemm=True is invalid with params_dtype={kwargs['params_dtype']}: megatron-core "
            "0.16.1's TransformerEngine-free GroupedMLP runs only in bf16; use params_dtype=torch.bfloat16 "
            "or grouped_gemm=False (SequentialMLP)"
        )
    return TransformerConfig(**kwargs)


def expert_layout(config: TransformerConfig) -> ExpertLayout:
    """The mapping's ``expert_layout`` for a model built by :func:`build_gpt_model` from ``config``."""
    return "grouped" if config.moe_grouped_gemm else "sequential"


def current_shard() -> MegatronShard:
    """This rank's place in megatron's initialised ``parallel_state`` (for the weight mapping).

    ``hf_to_megatron(sd, cfg, **dataclasses.asdict(current_shard()))`` emits this rank's tensors;
    ``megatron_to_hf`` takes the ``(shard, state_dict)`` pairs of all ranks.
    """
    from megatron.core import parallel_state as ps

    return MegatronShard(
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        ep_size=ps.get_expert_model_parallel_world_size(),
        etp_rank=ps.get_expert_tensor_parallel_rank(),
        etp_size=ps.get_expert_tensor_parallel_world_size(),
    )


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """torch ``RMSNorm`` built from a megatron spec, usable with sequence parallel.

    The local spec's ``WrappedTorchNorm`` refuses ``sequence_parallel`` (and megatron's fused
    alternatives need apex or TransformerEngine). Normalising is per token, so a sequence-parallel
    rank can normalise its own tokens; what sequence parallel needs is that the weight's gradient,
    computed from a part of the tokens, is summed over the tensor-parallel ranks. Like megatron's
    own norms, this one marks its weight ``sequence_parallel`` so that megatron's
    ``finalize_model_grads`` all-reduces it.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_: Any) -> None:
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel  # type: ignore[attr-defined]


def _with_norm(node: Any, norm: type) -> Any:
    """A copy of a megatron layer spec tree with every ``WrappedTorchNorm`` class replaced by ``norm``."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    if node is WrappedTorchNorm:
        return norm
    if isinstance(node, list):
        return [_with_norm(child, norm) for child in node]
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        node = copy.copy(node)
        for field in dataclasses.fields(node):
            setattr(node, field.name, _with_norm(getattr(node, field.name), norm))
    return node


def build_gpt_model(
    hf_config: Any,
    *,
    config: TransformerConfig | None = None,
    max_sequence_length: int | None = None,
    parallel_output: bool = True,
    **config_kwargs: Any,
) -> GPTModel:
    """A randomly initialised megatron-core ``GPTModel`` with ``hf_config``'s architecture.

    Args:
        hf_config: a transformers ``PretrainedConfig`` (mixtral / qwen2_moe / qwen3_moe).
        config: a ready ``TransformerConfig``; by default :func:`transformer_config_from_hf`.
        max_sequence_length: longest sequence; defaults to ``max_position_embeddings``.
        parallel_output: keep logits split over the tensor-parallel vocab shards (training; the
            loss from ``labels=`` is vocab-parallel). ``False`` gathers full logits for inference;
            megatron-core 0.16.1 cannot backpropagate ``labels=`` losses through that gather.
        **config_kwargs: passed to :func:`transformer_config_from_hf` when ``config`` is None
            (e.g. ``tensor_parallel=2``, ``grouped_gemm=True``).

    Megatron's ``parallel_state`` must be initialised (world size 1 is fine) with the config's sizes.

    Raises:
        MoEAdaptError: grouped GEMM is asked for but the ``grouped_gemm`` package is missing.
    """
    arch: HFMoEArch = read_hf_arch(hf_config)
    if config is None:
        config = transformer_config_from_hf(hf_config, **config_kwargs)
    elif config_kwargs:
        raise TypeError(f"pass either config or config keyword arguments, not both: {sorted(config_kwargs)}")
    if config.moe_grouped_gemm:
        from megatron.core.transformer.moe import grouped_gemm_util

        if not grouped_gemm_util.grouped_gemm_is_available():
            raise MoEAdaptError(
                "grouped_gemm=True needs the grouped_gemm package (megatron-core 0.16.1's "
                "TransformerEngine-free GroupedMLP calls grouped_gemm.ops.gmm; it builds on CUDA only): "
                "install it or use grouped_gemm=False"
            )
    # The TransformerEngine-free local spec, per layer: a MoE layer or (moe_layer_freq 0) a dense FFN.
    # With moe_grouped_gemm it builds the legacy GroupedMLP experts (weight1/weight2).
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
    if config.sequence_parallel:
        spec = _with_norm(spec, SequenceParallelRMSNorm)
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=arch.vocab_size,
        max_sequence_length=max_sequence_length or arch.max_position_embeddings,
        pre_process=True,
        post_process=True,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=arch.rope_theta,  # type: ignore[arg-type]  # megatron annotates int; float works
    )


def load_megatron_state(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a mapped state dict into ``model``, requiring every parameter to be covered.

    Megatron modules carry ``_extra_state`` entries (TransformerEngine/FP8 metadata, ``None`` here)
    that the mapping does not produce; they are the only keys allowed to be missing.

    Raises:
        MoEAdaptError: a parameter is missing from ``state_dict`` or ``state_dict`` has extra keys.
    """
    result = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("._extra_state")]
    if missing or result.unexpected_keys:
        raise MoEAdaptError(
            f"megatron state dict does not match the model: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {result.unexpected_keys[:5]}"
        )
