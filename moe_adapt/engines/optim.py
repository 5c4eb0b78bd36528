"""The optimizer and learning-rate schedule both engines use: AdamW with weight decay on matrices only,
linear warmup then cosine decay to ``min_lr_ratio · lr``, times an optional per-step multiplier (a
curriculum's re-warm factor).

Both engines build their optimizer and read their LR here, so for the same settings they update the
same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from moe_adapt.engines.base import EngineConfig


def lr_at(cfg: EngineConfig, step: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine to min_lr_ratio·lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.decay_steps is None:
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / (cfg.decay_steps - cfg.warmup_steps))
    floor = cfg.min_lr_ratio
    return cfg.lr * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def scheduled_lr(cfg: EngineConfig, step: int, multiplier: Callable[[int], float] | None) -> float:
    """:func:`lr_at` times ``multiplier(step)`` (e.g. a curriculum's re-warm factor), for both engines."""
    return lr_at(cfg, step) * (multiplier(step) if multiplier is not None else 1.0)


def build_adamw(
    decay: Sequence[torch.Tensor], no_decay: Sequence[torch.Tensor], cfg: EngineConfig, device: torch.device
) -> torch.optim.AdamW:
    """AdamW with weight decay on ``decay`` (matrices) only, the schedule's first LR and cfg's betas/eps;
    both engines build their optimizer here, so they update the same way."""
    return torch.optim.AdamW(
        [
            {"params": list(decay), "weight_decay": cfg.weight_decay},
            {"params": list(no_decay), "weight_decay": 0.0},
        ],
        lr=lr_at(cfg, 0),
        betas=cfg.betas,
        eps=cfg.eps,
        fused=device.type == "cuda",
    )
