"""``gptq``: weight quantization with second-order error feedback (GPTQ, Frantar et al. 2022),
written from the paper's algorithm.

For a weight ``W [out, in]`` and the Hessian ``H = 2 X^T X / n`` of its calibration inputs
(:mod:`moe_adapt.export.calibrate`): ``H`` is damped (``+ damp * mean(diag H) * I``; a column no input
reached is zeroed), inverted through Cholesky, and the columns are quantized one by one, each one's
rounding error ``(w - q) / [H^-1]_jj`` pushed onto the columns not yet quantized along row ``j`` of the
upper Cholesky factor of ``H^-1``; columns are processed in blocks (lazy batch updates).

Schemes (symmetric integers, what compressed-tensors and vLLM call them):

- ``W4A16``: int4 weights, one scale per ``group_size`` input columns of each row;
- ``W8A16``: int8 weights, the same groups;
- ``W8A8``: int8 weights, one scale per row, and int8 activations quantized per token at run time
  (dynamic; nothing to calibrate for them).

``act_order`` quantizes the columns in decreasing ``diag H`` (the inputs with most energy first, so
later columns absorb their error); the group scales are then fixed before the pass from the
original weights ("static groups"), so the stored layout is the plain group layout (no ``g_idx``).
Without it, a group's scale is taken from the error-updated weights when the pass reaches it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["SCHEMES", "Scheme", "gptq_quantize", "quant_dequant", "quantize_activations", "scheme_of"]


class Scheme:
    """One of :data:`SCHEMES`: weight bits, whether scales are per group (else per row), activations."""

    def __init__(self, name: str, bits: int, grouped: bool, act_bits: int | None) -> None:
        self.name, self.bits, self.grouped, self.act_bits = name, bits, grouped, act_bits

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1


SCHEMES = {
    "W4A16": Scheme("W4A16", 4, True, None),
    "W8A16": Scheme("W8A16", 8, True, None),
    "W8A8": Scheme("W8A8", 8, False, 8),
}
"""The GPTQ schemes built, by name."""


def scheme_of(name: str) -> Scheme:
    return SCHEMES[name]


def _scale(w: torch.Tensor, qmax: int) -> torch.Tensor:
    """Symmetric scale of each row of ``w`` (max |w| / qmax; a zero row gets 1)."""
    s = w.abs().amax(dim=-1) / qmax
    return torch.where(s > 0, s, torch.ones_like(s))


def quant_dequant(w: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """Round ``w`` to the integer grid ``scale * [-qmax-1, qmax]`` (``scale`` broadcast over ``w``)."""
    return torch.clamp(torch.round(w / scale), -qmax - 1, qmax) * scale


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scheme: Scheme,
    *,
    group_size: int,
    act_order: bool = False,
    damp: float = 0.01,
    block: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ of ``weight [out, in]`` with ``hessian [in, in]``: ``(dequantized weight, scales)``, scales
    ``[out, in / group_size]`` (grouped schemes) or ``[out, 1]``. ``in`` must divide by ``group_size``
    for grouped schemes (checked by the caller)."""
    W = weight.detach().clone().float()
    rows, cols = W.shape
    H = hessian.detach().clone().float().to(W.device)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    gs = group_size if scheme.grouped else cols
    groups = cols // gs
    scales = torch.zeros(rows, groups, device=W.device)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols, device=W.device)
    static = act_order or not scheme.grouped
    if static:  # every group's scale from the weights as they are before the pass
        for g in range(groups):
            scales[:, g] = _scale(W[:, g * gs : (g + 1) * gs], scheme.qmax)
    W = W[:, perm]
    H = H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, device=W.device)
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    Q = torch.zeros_like(W)
    group_of = perm // gs
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        H1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            g = int(group_of[j])
            if not static and int(perm[j]) % gs == 0:  # natural order: the group starts here
                scales[:, g] = _scale(torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :gs], scheme.qmax)
            w = W1[:, i]
            q = quant_dequant(w, scales[:, g], scheme.qmax)
            Q[:, j] = q
            err = (w - q) / H1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * H1[i, i:].unsqueeze(0)
            E1[:, i] = err
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]
    inv = torch.argsort(perm)
    return Q[:, inv].to(weight.dtype), scales


def _per_token(x: torch.Tensor, bits: int | None) -> torch.Tensor:
    """``x`` rounded to ``bits``-bit symmetric integers with one scale per token (last dim); None =
    unchanged."""
    if bits is None:
        return x
    qmax = 2 ** (bits - 1) - 1
    s = x.abs().amax(dim=-1, keepdim=True) / qmax
    s = torch.where(s > 0, s, torch.ones_like(s))
    return torch.clamp(torch.round(x / s), -qmax - 1, qmax) * s


def quantize_activations(model: torch.nn.Module, bits: int | None = 8) -> list[Any]:
    """Round the inputs of every matrix that W8A8 quantizes to ``bits``-bit integers per token, as
    the W8A8 kernels do at run time: a pre-hook on each decoder Linear (routers and one-output
    gates left out, as :func:`moe_adapt.export.calibrate.layer_targets` selects), and the fused
    experts' forward replaced by one that rounds each expert's input and its ``act(gate) * up``.
    ``bits=None`` rounds nothing (the replacement's own check). Returns the hook handles."""
    from moe_adapt.export.calibrate import _decoder_layers, layer_targets

    handles: list[Any] = []
    for layer in _decoder_layers(model):
        t = layer_targets(layer)
        for lin in t.linears.values():
            handles.append(lin.register_forward_pre_hook(lambda _m, a: (_per_token(a[0], bits), *a[1:])))
        for mod in t.experts.values():
            mod.forward = _experts_forward(mod, bits)
    return handles


def _experts_forward(mod: Any, bits: int | None) -> Any:
    def forward(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden)
        for e in range(mod.gate_up_proj.shape[0]):
            tok, pos = torch.where(top_k_index == e)
            if tok.numel() == 0:
                continue
            gate, up = F.linear(_per_token(hidden[tok], bits), mod.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(_per_token(mod.act_fn(gate) * up, bits), mod.down_proj[e])
            out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
        return out

    return forward
