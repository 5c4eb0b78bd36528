"""What an engine trains on: :class:`TrainBatch` (packed token rows plus the optional fields of
fine-tuning and distillation), and the checked conversion of its fields to tensors.

Shape legend: ``B`` rows, ``T1`` = T + 1 packed tokens, ``T`` label positions, ``K`` teacher top-k
entries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moe_adapt.errors import MoEAdaptError


@dataclass
class TrainBatch:
    """A batch with everything an engine may use besides the tokens (fine-tuning, distillation).

    Shape legend: ``B`` rows, ``T`` label positions (``T1 - 1``), ``K`` teacher top-k entries.
    """

    tokens: np.ndarray
    """``tokens_BT1``: inputs are ``[:, :-1]``, labels ``[:, 1:]``."""

    loss_mask: np.ndarray | None = None
    """``[B, T]`` bool: which labels count (e.g. response tokens only); None: all."""

    position_ids: np.ndarray | None = None
    """``[B, T]`` positions of the inputs, restarting at 0 where a packed example starts."""

    lang_ids: np.ndarray | None = None
    """``[B, T]`` index into ``langs`` of the example each label belongs to."""

    langs: tuple[str, ...] = ()
    """Language names that ``lang_ids`` index."""

    topk_ids: np.ndarray | None = None
    """``[B, T, K]`` the teacher's most likely next tokens at each label position (offline KD)."""

    topk_logp: np.ndarray | None = None
    """``[B, T, K]`` their log-probabilities."""


def batch_tokens(
    tokens_BT1: torch.Tensor | np.ndarray, vocab_size: int, device: torch.device
) -> torch.Tensor:
    """``tokens_BT1`` as a long tensor on ``device``, checked: ``[batch, seq_len + 1]`` ids below
    ``vocab_size`` (both engines read batches through this)."""
    tokens = torch.as_tensor(tokens_BT1).to(device=device, dtype=torch.long)
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise MoEAdaptError(
            f"tokens must be [batch, seq_len + 1] with seq_len >= 1, got {tuple(tokens.shape)}"
        )
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab_size:
        raise MoEAdaptError(
            f"token ids span [{lo}, {hi}] but the model's vocab_size is {vocab_size}: "
            "the shards were tokenized with another tokenizer"
        )
    return tokens


def batch_field(batch: Any, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """Optional field ``name`` of a batch (see :class:`TrainBatch`) as a tensor."""
    value = getattr(batch, name, None)
    return None if value is None else torch.as_tensor(value).to(device=device, dtype=dtype)
