"""Settings of the ``megatron`` engine (``engine=megatron``, conf/engine/megatron.yaml): the shared
:class:`~moe_adapt.engines.base.EngineConfig` plus megatron's parallel layout and expert kernels.
No megatron-core import here: the schema composes on machines without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moe_adapt.engines.base import EngineConfig, fail


@dataclass
class MegatronConfig(EngineConfig):
    """Settings of the ``megatron`` engine: the shared optimizer, schedule and loss settings and
    megatron's layout (expert and tensor parallel, the distributed optimizer, grouped GEMM experts)."""

    NAME: ClassVar[str] = "megatron"

    name: str = "megatron"
    """The engine: megatron (set by engine=megatron)."""

    expert_parallel: int = 1
    """Processes that split each MoE layer's experts (expert parallel, alltoall
    dispatcher); the number of processes must be a multiple of it and the experts divide over it. (engine=auto
    falling back to the hf engine trains without it, with a warning.)"""

    tensor_parallel: int = 1
    """Processes that split every attention, dense-MLP and embedding matrix
    (megatron's tensor parallel, with sequence parallel; experts stay whole, expert tensor parallel 1).
    The number of processes must be a multiple of it; it must divide the attention key/value heads,
    the vocabulary and the dense FFN size, and mixture.seq_len. Not combined with l2_anchor_coef."""

    distributed_optimizer: bool = False
    """megatron-core's DistributedOptimizer (ZeRO-1). The optimizer state (fp32
    main parameters and Adam moments) is sharded over the data-parallel ranks; gradients are
    reduce-scattered and the updated parameters all-gathered. Same metrics and skip rule as false
    (torch AdamW on every rank), and in float32 the same update (bfloat16/float16 parameters get fp32
    master copies). Its checkpoints resume at the same expert_parallel. (The hf engine shards optimizer
    state with engine.parallel=fsdp2.)"""

    grouped_gemm: bool = False
    """Build each MoE layer's experts as megatron-core's GroupedMLP (one grouped
    GEMM per projection over all local experts) instead of SequentialMLP (a loop over the experts).
    Needs dtype=bfloat16 and the grouped_gemm package (CUDA). (The hf engine's experts already
    run transformers' grouped_mm.)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.expert_parallel < 1:
            fail("expert_parallel", self.expert_parallel, "must be >= 1")
        if self.tensor_parallel < 1:
            fail("tensor_parallel", self.tensor_parallel, "must be >= 1")
        if not isinstance(self.grouped_gemm, bool):
            fail("grouped_gemm", self.grouped_gemm, "must be true or false")
        if not isinstance(self.distributed_optimizer, bool):
            fail("distributed_optimizer", self.distributed_optimizer, "must be true or false")
