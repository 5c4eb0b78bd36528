"""Build a megatron-core ``GPTModel`` with MoE layers that computes what an HF MoE model computes.

One call, :func:`build_gpt_model`, turns an HF config (Mixtral, Qwen2-MoE, Qwen3-MoE) into a
``TransformerConfig`` and a ``GPTModel`` built from the TransformerEngine-free local layer spec
(``get_gpt_layer_local_spec`` per layer, via ``get_gpt_decoder_block_spec``): torch RMSNorm, local
``DotProductAttention`` and ``SequentialMLP`` experts. Weights are loaded separately with
:func:`moe_adapt.engines.megatron.mapping.hf_to_megatron`. Grouped-GEMM experts (GPU) have another
weight layout that the mapping does not cover yet, so they are not offered here.

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

The model's parallel layout (TP, EP) comes from megatron's ``parallel_state``, which the caller
initialises; this module only builds.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.transformer_config import TransformerConfig

from moe_adapt.engines.megatron.hf_arch import HFMoEArch, read_hf_arch
from moe_adapt.errors import MoEAdaptConfigError, MoEAdaptError

Dispatcher = Literal["alltoall", "allgather"]


def transformer_config_from_hf(
    hf_config: Any,
    *,
    params_dtype: torch.dtype = torch.float32,
    dispatcher: Dispatcher = "alltoall",
    tensor_parallel: int = 1,
    expert_parallel: int = 1,
    aux_loss_coeff: float = 0.0,
    use_cpu_initialization: bool = True,
    **overrides: Any,
) -> TransformerConfig:
    """The ``TransformerConfig`` that reproduces ``hf_config``'s forward pass.

    Args:
        hf_config: a transformers ``PretrainedConfig`` of model_type mixtral, qwen2_moe or qwen3_moe.
        params_dtype: dtype of the parameters (fp32 for the CPU reference, bf16 on GPU).
        dispatcher: megatron token dispatcher; ``alltoall`` for expert parallel.
        tensor_parallel: tensor-parallel size (must match ``parallel_state``). The weight mapping
            does not slice for TP yet, so only 1 loads HF weights today.
        expert_parallel: expert-parallel size (must match ``parallel_state``).
        aux_loss_coeff: load-balancing loss coefficient; 0 disables the auxiliary loss.
        use_cpu_initialization: initialise parameters on the CPU (required without CUDA).
        **overrides: any further ``TransformerConfig`` field, applied last.
    """
    arch = read_hf_arch(hf_config)
    if dispatcher not in ("alltoall", "allgather"):
        raise MoEAdaptConfigError(
            f"dispatcher={dispatcher!r} is not supported; use 'alltoall' or 'allgather'"
        )
    if arch.num_experts % expert_parallel:
        raise MoEAdaptConfigError(
            f"expert_parallel={expert_parallel} must divide the number of experts ({arch.num_experts})"
        )
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
        moe_grouped_gemm=False,
        moe_shared_expert_intermediate_size=arch.shared_expert_size or None,
        moe_shared_expert_gate=arch.shared_expert_gate,
    )
    kwargs.update(overrides)
    if kwargs["moe_grouped_gemm"]:
        raise MoEAdaptConfigError(
            "moe_grouped_gemm=True is not supported yet: the weight mapping covers SequentialMLP"
        )
    return TransformerConfig(**kwargs)


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
        **config_kwargs: passed to :func:`transformer_config_from_hf` when ``config`` is None.

    Megatron's ``parallel_state`` must be initialised (world size 1 is fine).
    """
    arch: HFMoEArch = read_hf_arch(hf_config)
    if config is None:
        config = transformer_config_from_hf(hf_config, **config_kwargs)
    elif config_kwargs:
        raise TypeError(f"pass either config or config keyword arguments, not both: {sorted(config_kwargs)}")
    # The TransformerEngine-free local spec, per layer: a MoE layer or (moe_layer_freq 0) a dense FFN.
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
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
