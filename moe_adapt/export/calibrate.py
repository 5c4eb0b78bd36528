"""Calibration shared by ``gptq``, ``sparsegpt`` and ``wanda``: the calibration sequences in the
recipe's language mix, the per-weight statistics of their inputs, and the layer-sequential loop.

**Sequences** (:func:`calibration_batches`): documents of the data stage's shards (``manifest.json``
+ megatron-core ``.bin``/``.idx``, read by :func:`moe_adapt.eval.heldout.load_heldout`), per
language concatenated and cut into ``seq_len`` windows; language ``g`` gets ``round(samples * mix[g])``
of them (a seeded choice), so an 80/20 mix calibrates on 80% Arabic tokens.

**Statistics** (:class:`InputStats`): for every weight matrix ``W [out, in]`` of a decoder layer,
``H = 2 X^T X / n`` over the ``n`` input rows ``X`` it saw (the GPTQ/SparseGPT Hessian; Wanda uses
its diagonal, ``||X_j||^2``). Targets: every ``nn.Linear`` in a decoder layer except the router and
``shared_expert_gate`` (one output), and each routed expert's ``gate_up_proj[e]`` / ``down_proj[e]``
slice of transformers' fused ``experts`` modules.

**MoE**: an expert's statistics come from the tokens the router sends it (top-k, the inputs its
forward really receives; ``down_proj[e]`` sees ``act(gate) * up`` of those tokens). An expert that got
fewer than ``min_expert_tokens`` is calibrated on **all** calibration tokens of the layer, computed
beside the forward (the layer's output is not changed): no expert is quantized from zero samples.
What each expert saw, and which needed all tokens, is returned for the report.

**Layer-sequential** (:func:`calibrate_layers`): layer ``l`` is calibrated on the outputs of layers
``0..l-1`` *after* they were compressed, so each layer corrects the error of those before it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_adapt.errors import MoEAdaptError

log = logging.getLogger(__name__)

__all__ = ["InputStats", "LayerTargets", "calibrate_layers", "calibration_batches", "layer_targets"]


@dataclass
class InputStats:
    """Running ``X^T X`` (or only its diagonal) of the inputs one weight matrix saw."""

    width: int
    """Input features (columns of the weight)."""
    full: bool = True
    """Keep the whole ``in x in`` matrix (GPTQ, SparseGPT); False = its diagonal only (Wanda)."""
    rows: int = 0
    """Input rows (tokens) accumulated."""
    xtx: torch.Tensor | None = None
    """The sum of ``x x^T`` over rows (float32 on the rows' device), or of ``x^2`` when not full."""

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.width).float()
        if x.shape[0] == 0:
            return
        part = x.T @ x if self.full else (x * x).sum(0)
        self.xtx = part if self.xtx is None else self.xtx + part
        self.rows += int(x.shape[0])

    def hessian(self) -> torch.Tensor:
        """``2 X^T X / n`` in float32 (zeros when no row was seen)."""
        if self.xtx is None or self.rows == 0:
            shape = (self.width, self.width) if self.full else (self.width,)
            return torch.zeros(shape)
        return (2.0 * self.xtx / self.rows).float()


@dataclass
class LayerTargets:
    """The weight matrices of one decoder layer that a method compresses."""

    linears: dict[str, torch.nn.Linear] = field(default_factory=dict)
    """Name (inside the layer) -> Linear."""
    experts: dict[str, Any] = field(default_factory=dict)
    """Name (inside the layer) -> fused experts module (``gate_up_proj [E, 2I, H]``,
    ``down_proj [E, H, I]``)."""


def layer_targets(layer: torch.nn.Module) -> LayerTargets:
    """The Linear modules (routers and one-output gates left out) and fused expert modules of ``layer``."""
    t = LayerTargets()
    for name, mod in layer.named_modules():
        if isinstance(mod, torch.nn.Linear):
            if mod.out_features == 1 or name.endswith(".gate") or name == "gate":
                continue
            t.linears[name] = mod
        elif (
            isinstance(getattr(mod, "gate_up_proj", None), torch.nn.Parameter)
            and isinstance(getattr(mod, "down_proj", None), torch.nn.Parameter)
            and mod.gate_up_proj.dim() == 3
        ):
            t.experts[name] = mod
    return t


def calibration_batches(
    data: str | Path,
    mix: dict[str, float],
    *,
    samples: int,
    seq_len: int,
    seed: int,
    key: str = "export.calibration.data",
) -> tuple[torch.Tensor, dict[str, int]]:
    """``samples`` token windows of ``seq_len`` from the shards at ``data`` in the language ``mix``
    (empty = every language of the manifest equally); returns ``(ids [samples', seq_len], tokens per
    language)``. A language whose documents hold fewer windows than its share gives what it has.

    Raises:
        MoEAdaptError: the shards are missing, or a language of ``mix`` is not in them (one line).
    """
    from moe_adapt.eval.heldout import load_heldout

    if not (Path(data) / "manifest.json").is_file():
        raise MoEAdaptError(
            f"{key}={data} holds no manifest.json: run the data stage, or point it at the data stage's "
            "shards (gptq, sparsegpt and wanda calibrate on them)"
        )
    held = load_heldout(data, languages=list(mix) or None, max_docs=None, seed=seed, key=key)
    langs = list(mix) or sorted(held.docs)
    missing = [g for g in langs if not held.docs.get(g)]
    if missing:
        raise MoEAdaptError(
            f"export.calibration.mix={dict(mix)} names {missing}, which {key}={data} does not hold "
            f"(it has {sorted(held.docs)})"
        )
    weights = {g: float(mix[g]) if mix else 1.0 / len(langs) for g in langs}
    total = sum(weights.values())
    rng = np.random.default_rng(seed)
    rows: list[np.ndarray] = []
    tokens: dict[str, int] = {}
    for g in langs:
        want = round(samples * weights[g] / total)
        stream = np.concatenate(held.docs[g]).astype(np.int64)
        have = stream.size // seq_len
        if have == 0:
            raise MoEAdaptError(
                f"{key}={data}: language {g!r} has {stream.size} tokens, fewer than "
                f"export.calibration.seq_len={seq_len}"
            )
        pick = rng.choice(have, size=min(want, have), replace=False)
        rows += [stream[i * seq_len : (i + 1) * seq_len] for i in sorted(pick)]
        tokens[g] = int(min(want, have) * seq_len)
        if have < want:
            log.warning("export: calibration has %d of the %d %s windows asked for", have, want, g)
    return torch.from_numpy(np.stack(rows)), tokens


class _Stop(Exception):
    pass


def _decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise MoEAdaptError(
            f"export: {type(model).__name__} has no model.layers; gptq/sparsegpt/wanda need one"
        )
    return layers


def _expert_hook(
    stats: dict[Any, InputStats],
    name: str,
    mod: Any,
    counts: torch.Tensor,
    all_tokens: bool,
) -> Callable[..., None]:
    """Forward pre-hook of a fused experts module: add each expert's inputs to its statistics.

    ``all_tokens`` = every token of the batch for the experts in ``stats`` (the layer's output is
    whatever the forward computes, untouched); else the tokens routed to each expert."""

    def hook(_m: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        with torch.no_grad():
            for e in range(mod.gate_up_proj.shape[0]):
                key_gu, key_d = (f"{name}.gate_up_proj", e), (f"{name}.down_proj", e)
                if key_gu not in stats:
                    continue
                if all_tokens:
                    x = hidden
                else:
                    tok = (index == e).any(-1).nonzero().flatten()
                    counts[e] += tok.numel()
                    x = hidden[tok]
                if x.shape[0] == 0:
                    continue
                stats[key_gu].add(x)
                gate, up = torch.nn.functional.linear(x, mod.gate_up_proj[e]).chunk(2, dim=-1)
                stats[key_d].add(mod.act_fn(gate) * up)

    return hook


def _collect(
    layer: torch.nn.Module,
    targets: LayerTargets,
    inputs: list[tuple[torch.Tensor, dict[str, Any]]],
    full: bool,
    only: dict[str, list[int]] | None,
) -> tuple[dict[Any, InputStats], dict[str, torch.Tensor]]:
    """Run ``layer`` on ``inputs`` and gather input statistics: of every target (``only`` None), or of
    the experts in ``only`` ({module: [experts]}) on all tokens."""
    stats: dict[Any, InputStats] = {}
    counts: dict[str, torch.Tensor] = {}
    handles = []
    if only is None:
        for n, lin in targets.linears.items():
            st = stats[n] = InputStats(lin.in_features, full)
            handles.append(lin.register_forward_pre_hook(lambda _m, a, st=st: st.add(a[0].detach())))
    for n, mod in targets.experts.items():
        experts = range(mod.gate_up_proj.shape[0]) if only is None else only.get(n, [])
        for e in experts:
            stats[(f"{n}.gate_up_proj", e)] = InputStats(mod.gate_up_proj.shape[2], full)
            stats[(f"{n}.down_proj", e)] = InputStats(mod.down_proj.shape[2], full)
        counts[n] = torch.zeros(mod.gate_up_proj.shape[0], dtype=torch.long)
        hook = _expert_hook(stats, n, mod, counts[n], only is not None)
        handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            for hidden, kw in inputs:
                layer(hidden, **kw)
    finally:
        for h in handles:
            h.remove()
    return stats, counts


def calibrate_layers(
    model: torch.nn.Module,
    ids: torch.Tensor,
    compress: Callable[[str, torch.Tensor, InputStats], torch.Tensor],
    *,
    batch_size: int,
    min_expert_tokens: int,
    full: bool = True,
) -> dict[str, Any]:
    """Compress ``model`` in place, decoder layer by decoder layer, on the calibration ``ids``.

    ``compress(name, W [out, in], stats)`` returns the new weight of the matrix ``name`` (full model
    names; a routed expert's slice is ``<experts>.gate_up_proj.<e>`` / ``<experts>.down_proj.<e>``).
    Returns ``{expert_tokens: {layer: {experts module: [routed tokens per expert]}}, topped_up:
    {layer: {module: [experts calibrated on all tokens]}}, tokens}``.
    """
    layers = _decoder_layers(model)
    device = next(model.parameters()).device
    captured: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def grab(_m: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Stop

    h = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for i in range(0, ids.shape[0], batch_size):
                with contextlib.suppress(_Stop):
                    model(input_ids=ids[i : i + batch_size].to(device), use_cache=False)
    finally:
        h.remove()
    prefix = {id(m): n for n, m in model.named_modules()}
    report: dict[str, Any] = {"tokens": int(ids.numel()), "expert_tokens": {}, "topped_up": {}}
    for li, layer in enumerate(layers):
        lname = prefix[id(layer)]
        targets = layer_targets(layer)
        stats, counts = _collect(layer, targets, captured, full, None)
        low = {n: [int(e) for e in torch.nonzero(c < min_expert_tokens).flatten()] for n, c in counts.items()}
        low = {n: es for n, es in low.items() if es}
        if low:
            extra, _ = _collect(layer, targets, captured, full, low)
            stats.update(extra)
            report["topped_up"][str(li)] = low
        if counts:
            report["expert_tokens"][str(li)] = {n: c.tolist() for n, c in counts.items()}
        with torch.no_grad():
            for n, lin in targets.linears.items():
                lin.weight.copy_(
                    compress(f"{lname}.{n}", lin.weight.data.float(), stats[n]).to(lin.weight.dtype)
                )
            for n, mod in targets.experts.items():
                for p in ("gate_up_proj", "down_proj"):
                    w = getattr(mod, p)
                    for e in range(w.shape[0]):
                        new = compress(f"{lname}.{n}.{p}.{e}", w.data[e].float(), stats[(f"{n}.{p}", e)])
                        w.data[e].copy_(new.to(w.dtype))
            del stats
            outs = []
            for hidden, kw in captured:
                out = layer(hidden, **kw)
                outs.append((out[0] if isinstance(out, tuple) else out, kw))
        captured = outs
        log.info("export: calibrated layer %d of %d", li + 1, len(layers))
    return report
