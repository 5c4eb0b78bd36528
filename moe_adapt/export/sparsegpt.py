"""``sparsegpt``: one-shot pruning with OBS-style mask selection and weight reconstruction
(SparseGPT, Frantar & Alistarh 2023), written from the paper's algorithm.

With the same damped inverse-Hessian Cholesky factor as GPTQ (:mod:`moe_adapt.export.gptq`), the
columns of ``W [out, in]`` are visited in blocks. At the start of a block the mask is chosen per row
from the saliency ``w^2 / [H^-1]_jj^2`` (the loss increase of removing ``w`` alone, OBS): for
``unstructured`` the ``k`` least salient weights of the block's columns in each row, ``k`` such that
each row ends with exactly ``floor(in * sparsity)`` zeros; for ``2:4`` the two least salient of every
four consecutive columns. Then column by column the pruned weights are set to zero and their error
``w / [H^-1]_jj`` is pushed onto the columns not visited yet, as in GPTQ, so the kept weights
compensate for the removed ones.
"""

from __future__ import annotations

import torch

__all__ = ["PATTERNS", "check_pattern", "sparsegpt_prune"]

PATTERNS = ("unstructured", "2:4")
"""Sparsity patterns: 50% of each row (``unstructured``), or 2 of every 4 consecutive inputs (``2:4``)."""


def check_pattern(pattern: str, width: int) -> str | None:
    """Why ``pattern`` cannot apply to a matrix ``width`` inputs wide, or None."""
    if pattern == "2:4" and width % 4:
        return f"2:4 needs an input width divisible by 4, got {width}"
    return None


def _mask_block(score: torch.Tensor, pattern: str, k: int) -> torch.Tensor:
    """True where a weight of the block (``score`` [out, b]) is pruned."""
    if pattern == "2:4":
        rows, b = score.shape
        grp = score.reshape(rows, b // 4, 4)
        idx = torch.topk(grp, 2, dim=-1, largest=False).indices
        mask = torch.zeros_like(grp, dtype=torch.bool).scatter_(-1, idx, True)
        return mask.reshape(rows, b)
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k:
        mask.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, True)
    return mask


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: str,
    *,
    sparsity: float = 0.5,
    damp: float = 0.01,
    block: int = 128,
) -> torch.Tensor:
    """SparseGPT of ``weight [out, in]`` with ``hessian [in, in]``: the pruned, reconstructed weight."""
    W = weight.detach().clone().float()
    cols = W.shape[1]
    H = hessian.detach().clone().float().to(W.device)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, device=W.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    if pattern == "2:4":
        block = max(4, block - block % 4)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        H1 = Hinv[i1:i2, i1:i2]
        k = int(i2 * sparsity) - int(i1 * sparsity)
        mask = _mask_block(W1**2 / torch.diag(H1).unsqueeze(0) ** 2, pattern, k)
        for i in range(i2 - i1):
            w = W1[:, i]
            q = torch.where(mask[:, i], torch.zeros_like(w), w)
            err = (w - q) / H1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * H1[i, i:].unsqueeze(0)
            W1[:, i] = q
            E1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]
    return W.to(weight.dtype)
