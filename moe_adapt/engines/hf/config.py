"""Settings of the ``hf`` engine (the ``engine`` Hydra group, conf/engine/hf.yaml): the shared
:class:`~moe_adapt.engines.base.EngineConfig` plus how the engine spreads over processes.

Until the engine is chosen by its own group option, this schema also carries the megatron engine's
layout settings (expert_parallel, tensor_parallel, distributed_optimizer, grouped_gemm): the
megatron engine reads them from here, and the hf engine refuses or ignores them.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_adapt.engines.base import EngineConfig, fail

PARALLEL = ("auto", "none", "ddp", "fsdp2")


@dataclass
class HFConfig(EngineConfig):
    """Settings of the ``hf`` engine: the shared optimizer, schedule and loss settings, the
    multi-process layout, and the megatron engine's layout settings."""

    parallel: str = "auto"
    """How the engine spreads over several processes (torchrun): ddp (each process holds the whole
    model; gradients are averaged), fsdp2 (parameters, gradients and optimizer state sharded over the
    processes, one FSDP unit per decoder layer: models that do not fit one device), none (one process)
    or auto (ddp with several processes, none with one). With one process every value trains as none."""

    expert_parallel: int = 1
    """megatron engine only: processes that split each MoE layer's experts (expert parallel, alltoall
    dispatcher); the number of processes must be a multiple of it and the experts divide over it. The
    hf engine does not shard experts: 1 there."""

    tensor_parallel: int = 1
    """megatron engine only: processes that split every attention, dense-MLP and embedding matrix
    (megatron's tensor parallel, with sequence parallel; experts stay whole, expert tensor parallel 1).
    The number of processes must be a multiple of it; it must divide the attention key/value heads,
    the vocabulary and the dense FFN size, and mixture.seq_len. Not combined with l2_anchor_coef.
    The hf engine does not shard this way: 1 there."""

    distributed_optimizer: bool = False
    """megatron engine only: megatron-core's DistributedOptimizer (ZeRO-1). The optimizer state (fp32
    main parameters and Adam moments) is sharded over the data-parallel ranks; gradients are
    reduce-scattered and the updated parameters all-gathered. Same metrics and skip rule as false
    (torch AdamW on every rank), and in float32 the same update (bfloat16/float16 parameters get fp32
    master copies). Its checkpoints resume at the same expert_parallel. The hf engine refuses true: it
    shards with parallel=fsdp2."""

    grouped_gemm: bool = False
    """megatron engine only: build each MoE layer's experts as megatron-core's GroupedMLP (one grouped
    GEMM per projection over all local experts) instead of SequentialMLP (a loop over the experts).
    Needs dtype=bfloat16 and the grouped_gemm package (CUDA). The hf engine's experts already run
    transformers' grouped_mm; it ignores this setting."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.expert_parallel < 1:
            fail("expert_parallel", self.expert_parallel, "must be >= 1")
        if self.tensor_parallel < 1:
            fail("tensor_parallel", self.tensor_parallel, "must be >= 1")
        if self.parallel not in PARALLEL:
            fail("parallel", self.parallel, f"choose one of {', '.join(PARALLEL)}")
        if not isinstance(self.grouped_gemm, bool):
            fail("grouped_gemm", self.grouped_gemm, "must be true or false")
        if not isinstance(self.distributed_optimizer, bool):
            fail("distributed_optimizer", self.distributed_optimizer, "must be true or false")
