"""``wanda``: pruning by weights and activations (Wanda, Sun et al. 2023), written from the paper.

The score of ``W[i, j]`` is ``|W[i, j]| * ||X_j||_2``, the weight's magnitude times the norm of its
input feature over the calibration tokens (the diagonal of ``X^T X``, :mod:`moe_adapt.export.calibrate`
with ``full=False``). Per output row the lowest-scoring weights are zeroed: ``floor(in * sparsity)``
of them (``unstructured``), or 2 of every 4 consecutive inputs (``2:4``). No weight is updated.
"""

from __future__ import annotations

import torch

from moe_adapt.export.sparsegpt import _mask_block

__all__ = ["wanda_prune"]


def wanda_prune(
    weight: torch.Tensor, sq_norms: torch.Tensor, pattern: str, *, sparsity: float = 0.5
) -> torch.Tensor:
    """Wanda of ``weight [out, in]`` with the per-input squared norms ``sq_norms [in]``."""
    W = weight.detach().float()
    score = W.abs() * torch.sqrt(sq_norms.float().clamp_min(0)).to(W.device).unsqueeze(0)
    mask = _mask_block(score, pattern, int(W.shape[1] * sparsity))
    return torch.where(mask, torch.zeros_like(W), W).to(weight.dtype)
