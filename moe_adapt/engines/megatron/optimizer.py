"""megatron-core's ``DistributedOptimizer`` (ZeRO-1) for ``engine.distributed_optimizer``; see
docs/engines.md ("Distributed optimizer")."""

from __future__ import annotations

from typing import Any

import torch

from moe_adapt.engines.megatron.config import MegatronConfig
from moe_adapt.engines.optim import scheduled_lr


def distributed_optimizer(ddp: Any, cfg: MegatronConfig, dtype: torch.dtype) -> Any:
    """megatron's ``DistributedOptimizer`` (Adam with decoupled weight decay) over ``ddp``'s buffers:
    cfg's betas, eps, weight decay and clip; one ``DistributedOptimizer`` for the dense parameters and
    one for the experts under EP, chained.

    Its parameter groups put norms and biases (1-d tensors) at ``wd_mult`` 0, the torch-AdamW path's
    rule; :meth:`MegatronEngine.step` sets each group's ``lr`` and ``weight_decay`` (wd × ``wd_mult``)
    every step, the job of megatron's LR scheduler, which the engine does not use. fp16 parameters get
    a constant loss scale of 1 (the loss is never scaled; megatron's dynamic scaler would divide the
    gradients by its scale).
    """
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam",
        lr=scheduled_lr(cfg, 0, None),
        min_lr=0.0,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.betas[0],
        adam_beta2=cfg.betas[1],
        adam_eps=cfg.eps,
        clip_grad=cfg.grad_clip or 0.0,
        use_distributed_optimizer=True,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        loss_scale=1.0 if dtype == torch.float16 else None,
    )
    return get_megatron_optimizer(config, [ddp])
