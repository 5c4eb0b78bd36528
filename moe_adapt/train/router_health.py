"""Router health: expert-load metrics and aux-loss-free load balancing (engine-agnostic).

Load metrics
    :func:`expert_load` counts the top-k assignments each expert received in each MoE layer,
    :func:`dropped_tokens` how many of them a capacity-limited router (Megatron's
    ``moe_expert_capacity_factor``) would drop, and :func:`load_metrics` turns both into a bounded set
    of float metrics, so the dropless ``hf`` engine and the ``megatron`` engine log the same keys.

Aux-loss-free balancing (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for
Mixture-of-Experts"; DeepSeek-V3)
    Every router gets a per-expert bias ``b_e`` that is added to its scores for the top-k *selection*
    only; the gate weights that scale the experts' outputs are still the unbiased scores of the chosen
    experts (renormalised when the model normalises). After each optimizer step
    ``b_e += u · sign(mean_load − load_e)``: underloaded experts become easier to pick, overloaded ones
    harder, without a loss term that fights the language-modelling gradient. The bias is added to the
    router's softmax probabilities (the scores transformers ranks), as in the paper's
    ``s_{i,t} + b_i``; ``u`` is therefore in probability units.

    Mechanism: :meth:`RouterBias.install` registers a *forward hook* on each router module. The supported
    routers (``Qwen3MoeTopKRouter``, ``Qwen2MoeTopKRouter``, ``MixtralTopKRouter`` in transformers 5.23)
    return ``(router_logits, top_k_weights, top_k_index)``; the hook keeps the logits and recomputes the
    last two from them with the bias. This was preferred to replacing ``forward`` (a subclass or a bound
    method) because it leaves the router's class, code, parameters and ``state_dict`` untouched: the
    isinstance-based ``OutputRecorder`` that collects ``output_router_logits`` still finds the router and
    records the unbiased logits (index 0 is passed through unchanged), ``save_pretrained`` writes a
    vanilla checkpoint (the bias buffer is non-persistent; resume goes through
    :meth:`RouterBias.state_dict`), and :meth:`RouterBias.remove` undoes everything. The price is one
    extra softmax and top-k over ``[T, E]`` per layer, negligible next to the experts. The hook replays
    each family's own arithmetic (softmax dtype, ``norm_topk_prob``, the cast of the weights), so with a
    zero bias its outputs are bit-identical to the unmodified router's.

    The bias is part of how the trained model routes, but the three architectures have no place for it
    in their HF checkpoints: :func:`save_router_bias` writes it beside the weights (``router_bias.json``)
    and :func:`load_router_bias` re-installs it for evaluation. Vanilla transformers ignores the file
    and routes without the bias.

Shape legend: ``L`` MoE layers, ``T`` tokens routed in one call (batch × sequence flattened), ``E`` routed
experts, ``K`` experts chosen per token (top-k).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from moe_adapt.errors import CheckpointError, MoEAdaptError
from moe_adapt.fs import atomic_write_json

__all__ = [
    "BIAS_FILE",
    "SUPPORTED_ROUTERS",
    "RouterBias",
    "dropped_tokens",
    "expert_load",
    "load_metrics",
    "load_router_bias",
    "save_router_bias",
]


# -- load metrics -------------------------------------------------------------------------------
def expert_load(
    router_logits_LTE: Sequence[torch.Tensor], top_k: int, expert_bias_LE: torch.Tensor | None = None
) -> torch.Tensor:
    """Top-k assignments per expert and layer, ``[L, E]`` int64 (no gradient).

    Selection is ``topk(softmax(logits) + bias)`` per token, i.e. what the model routed: pass
    :meth:`RouterBias.bias_LE` when the routers are biased (the ``router_logits`` the model returns are the
    unbiased ones), None otherwise. Each row sums to ``T · K``. All layers must route the same tokens.
    """
    if len(router_logits_LTE) == 0:
        raise MoEAdaptError("expert_load: no router logits given (is the model a Mixture-of-Experts?)")
    shapes = {tuple(x.shape) for x in router_logits_LTE}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise MoEAdaptError(f"expert_load: router logits must all be [tokens, experts], got {sorted(shapes)}")
    num_layers = len(router_logits_LTE)
    num_experts = router_logits_LTE[0].shape[1]
    if not 1 <= top_k <= num_experts:
        raise MoEAdaptError(f"expert_load: top_k={top_k} must be in [1, {num_experts}]")
    if expert_bias_LE is not None and tuple(expert_bias_LE.shape) != (num_layers, num_experts):
        raise MoEAdaptError(
            f"expert_load: expert bias {tuple(expert_bias_LE.shape)} does not match the router logits "
            f"({num_layers} layers, {num_experts} experts)"
        )
    with torch.no_grad():
        scores_LTE = torch.softmax(torch.stack([x.detach().float() for x in router_logits_LTE]), dim=-1)
        if expert_bias_LE is not None:
            scores_LTE = scores_LTE + expert_bias_LE.to(scores_LTE)[:, None, :]
        idx_LTK = torch.topk(scores_LTE, top_k, dim=-1).indices
        # one bincount over (layer, expert) pairs: exact integer counts, deterministic without weights
        offset_L11 = torch.arange(num_layers, device=idx_LTK.device)[:, None, None] * num_experts
        flat = (idx_LTK + offset_L11).reshape(-1)
        return torch.bincount(flat, minlength=num_layers * num_experts).view(num_layers, num_experts)


def dropped_tokens(
    load_LE: torch.Tensor, capacity_factor: float | None, tokens: int, top_k: int
) -> torch.Tensor:
    """Assignments per layer that a capacity-limited router would drop, ``[L]`` int64.

    Megatron's semantics: each expert takes at most ``capacity = ceil(tokens · top_k / E · capacity_factor)``
    assignments of one routing call, the rest are dropped, so layer ``l`` drops
    ``Σ_e max(0, load_le − capacity)``. ``tokens`` is the number of tokens of that one call (per
    micro-batch, per rank); sum the results over calls. ``capacity_factor=None`` is a dropless router:
    zeros.
    """
    if load_LE.dim() != 2:
        raise MoEAdaptError(f"dropped_tokens: load must be [layers, experts], got {tuple(load_LE.shape)}")
    if capacity_factor is None:
        return torch.zeros(load_LE.shape[0], dtype=torch.int64, device=load_LE.device)
    if not (capacity_factor > 0 and math.isfinite(capacity_factor)):
        raise MoEAdaptError(f"dropped_tokens: capacity_factor={capacity_factor} must be a finite number > 0")
    num_experts = load_LE.shape[1]
    capacity = math.ceil(tokens * top_k / num_experts * capacity_factor)
    return (load_LE.to(torch.int64) - capacity).clamp(min=0).sum(dim=-1)


def load_metrics(
    load_LE: torch.Tensor, dropped_L: torch.Tensor | None = None, *, detail_layers: int = 8
) -> dict[str, float]:
    """Float metrics of an ``[L, E]`` load (from :func:`expert_load`), bounded in number for deep models.

    Loads are taken relative to the layer's mean load ``T · K / E`` (1.0 is perfect balance):

    * ``moe/layer{l}/max_load``: max load / mean load (the imbalance ratio), every layer;
    * ``moe/layer{l}/min_load`` and ``moe/layer{l}/load_cv`` (std / mean, the coefficient of variation),
      only when ``L <= detail_layers``;
    * summaries: ``moe/max_load`` (worst layer), ``moe/mean_max_load``, ``moe/min_load`` (worst layer),
      ``moe/load_cv`` (mean over layers), ``moe/idle_experts`` (layer-expert pairs with no token);
    * with ``dropped_L`` (:func:`dropped_tokens`): ``moe/dropped_tokens`` (assignments dropped, all layers)
      and ``moe/dropped_frac`` (their fraction of all assignments).
    """
    if load_LE.dim() != 2 or load_LE.numel() == 0:
        raise MoEAdaptError(
            f"load_metrics: load must be a non-empty [layers, experts], got {tuple(load_LE.shape)}"
        )
    load_LE = load_LE.detach().double()
    mean_L1 = load_LE.mean(dim=-1, keepdim=True)
    if bool((mean_L1 <= 0).any()):
        raise MoEAdaptError("load_metrics: a layer routed no tokens")
    rel_LE = load_LE / mean_L1
    max_L = rel_LE.max(dim=-1).values
    min_L = rel_LE.min(dim=-1).values
    cv_L = rel_LE.std(dim=-1, correction=0)
    # one transfer to the host for everything
    max_list, min_list, cv_list = torch.stack([max_L, min_L, cv_L]).cpu().tolist()
    num_layers = len(max_list)
    out: dict[str, float] = {}
    for layer, value in enumerate(max_list):
        out[f"moe/layer{layer}/max_load"] = value
    if num_layers <= detail_layers:
        for layer in range(num_layers):
            out[f"moe/layer{layer}/min_load"] = min_list[layer]
            out[f"moe/layer{layer}/load_cv"] = cv_list[layer]
    out["moe/max_load"] = max(max_list)
    out["moe/mean_max_load"] = sum(max_list) / num_layers
    out["moe/min_load"] = min(min_list)
    out["moe/load_cv"] = sum(cv_list) / num_layers
    out["moe/idle_experts"] = float((load_LE == 0).sum())
    if dropped_L is not None:
        dropped = float(dropped_L.sum())
        out["moe/dropped_tokens"] = dropped
        out["moe/dropped_frac"] = dropped / float(load_LE.sum())
    return out


# -- aux-loss-free balancing --------------------------------------------------------------------
@dataclass(frozen=True)
class _RouterSpec:
    """How one transformers router family turns logits into gate weights (replayed by the hook)."""

    probs: Callable[[torch.Tensor], torch.Tensor]
    """Router logits ``[T, E]`` -> float32 probabilities, exactly as the router computes them."""
    always_normalise: bool
    """Renormalise the top-k weights whatever the config (otherwise read ``router.norm_topk_prob``)."""
    cast_weights: bool
    """Cast the weights back to the logits' dtype (Qwen routers do; Mixtral keeps float32)."""


def _softmax_float_dtype(logits_TE: torch.Tensor) -> torch.Tensor:
    return F.softmax(logits_TE, dtype=torch.float, dim=-1)


def _softmax_of_float(logits_TE: torch.Tensor) -> torch.Tensor:
    return F.softmax(logits_TE.float(), dim=-1)


_QWEN = _RouterSpec(probs=_softmax_float_dtype, always_normalise=False, cast_weights=True)
_SPECS: dict[str, _RouterSpec] = {
    "Qwen3MoeTopKRouter": _QWEN,
    "Qwen2MoeTopKRouter": _QWEN,
    "MixtralTopKRouter": _RouterSpec(probs=_softmax_of_float, always_normalise=True, cast_weights=False),
}
SUPPORTED_ROUTERS = tuple(_SPECS)
"""Router classes (transformers 5.23) that :class:`RouterBias` can bias."""

BIAS_BUFFER = "expert_bias"


def _spec_of(module: nn.Module) -> _RouterSpec | None:
    cls = type(module)
    if cls.__module__.startswith("transformers.models.") and cls.__name__ in _SPECS:
        return _SPECS[cls.__name__]
    return None


def _biased_routing_hook(spec: _RouterSpec) -> Callable[[nn.Module, Any, Any], Any]:
    def hook(router: Any, args: Any, output: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits_TE = output[0]
        probs_TE = spec.probs(logits_TE)
        bias_E = getattr(router, BIAS_BUFFER)
        with torch.no_grad():
            topk_idx_TK = torch.topk(probs_TE + bias_E.to(probs_TE.dtype), router.top_k, dim=-1).indices
        weights_TK = probs_TE.gather(-1, topk_idx_TK)  # gate weights from the unbiased scores
        if spec.always_normalise or router.norm_topk_prob:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        if spec.cast_weights:
            weights_TK = weights_TK.to(logits_TE.dtype)
        return logits_TE, weights_TK, topk_idx_TK

    return hook


class RouterBias:
    """Per-expert selection biases on every router of a transformers MoE model (aux-loss-free balancing).

    Build it with :meth:`install`; after each optimizer step call :meth:`update` with the step's
    :func:`expert_load` (computed with :meth:`bias_LE`). Save :meth:`state_dict` with the engine's state:
    the bias is not part of the model's ``state_dict`` nor of ``save_pretrained``'s checkpoint.
    """

    def __init__(
        self, routers: Sequence[tuple[str, nn.Module]], handles: Sequence[RemovableHandle], update_rate: float
    ) -> None:
        self.names = [name for name, _ in routers]
        """Module names of the biased routers, in layer order (the order of ``router_logits``)."""
        self.routers = [module for _, module in routers]
        self.update_rate = update_rate
        self._handles = list(handles)
        self.num_experts = int(getattr(self.routers[0], BIAS_BUFFER).shape[0])

    @classmethod
    def install(cls, model: nn.Module, update_rate: float = 1e-3) -> RouterBias:
        """Give every router of ``model`` a zero ``expert_bias`` buffer ``[E]`` (float32, non-persistent,
        on the router's device) and a forward hook that selects with ``probs + bias``.

        Install after moving the model to its device and dtype: a later ``model.to(bfloat16)`` would round
        the bias (it is turned back to float32 on the next use, but the rounding stays).

        Raises :class:`MoEAdaptError` naming the class when the model has a router this module does not
        know, or none at all.
        """
        if not (update_rate > 0 and math.isfinite(update_rate)):
            raise MoEAdaptError(f"RouterBias: update_rate={update_rate} must be a finite number > 0")
        routers: list[tuple[str, Any, _RouterSpec]] = []
        unknown: set[str] = set()
        for name, module in model.named_modules():
            spec = _spec_of(module)
            if spec is not None:
                routers.append((name, module, spec))
            elif "router" in type(module).__name__.lower():
                unknown.add(type(module).__name__)
        supported = ", ".join(SUPPORTED_ROUTERS)
        if unknown:
            raise MoEAdaptError(
                f"aux-loss-free balancing does not support {', '.join(sorted(unknown))} "
                f"(in {type(model).__name__}); supported routers: {supported}"
            )
        if not routers:
            raise MoEAdaptError(
                f"aux-loss-free balancing found no router in {type(model).__name__} (a dense model?); "
                f"supported routers: {supported}"
            )
        for name, module, _ in routers:
            if hasattr(module, BIAS_BUFFER):
                raise MoEAdaptError(f"RouterBias: {name} already has an {BIAS_BUFFER!r} (installed twice?)")
        experts = {int(module.num_experts) for _, module, _ in routers}
        if len(experts) != 1:
            raise MoEAdaptError(f"RouterBias: routers differ in expert count {sorted(experts)}")
        handles = []
        for _, module, spec in routers:
            bias_E = torch.zeros(int(module.num_experts), dtype=torch.float32, device=module.weight.device)
            module.register_buffer(BIAS_BUFFER, bias_E, persistent=False)
            handles.append(module.register_forward_hook(_biased_routing_hook(spec)))
        return cls([(name, module) for name, module, _ in routers], handles, update_rate)

    @property
    def num_layers(self) -> int:
        return len(self.routers)

    def _bias(self, router: nn.Module) -> torch.Tensor:
        bias_E = getattr(router, BIAS_BUFFER)
        if bias_E.dtype != torch.float32:
            # the model was cast after install: restore float32, or updates of u ≪ 1 would round away
            bias_E = bias_E.float()
            setattr(router, BIAS_BUFFER, bias_E)
        return bias_E

    def bias_LE(self) -> torch.Tensor:
        """Current biases, ``[L, E]`` float32 (a copy, on the first router's device)."""
        device = self._bias(self.routers[0]).device
        return torch.stack([self._bias(router).detach().to(device) for router in self.routers])

    def update(self, load_LE: torch.Tensor) -> None:
        """One sign step: ``b_le += u · sign(mean_e load_le − load_le)`` for every layer ``l``.

        ``load_LE`` is the load of the step just taken (:func:`expert_load` with :meth:`bias_LE`, summed
        over micro-batches). Experts at exactly the mean are left alone.
        """
        if tuple(load_LE.shape) != (self.num_layers, self.num_experts):
            raise MoEAdaptError(
                f"RouterBias.update: load {tuple(load_LE.shape)} does not match "
                f"{self.num_layers} routers × {self.num_experts} experts"
            )
        with torch.no_grad():
            load_LE = load_LE.detach().double()
            step_LE = torch.sign(load_LE.mean(dim=-1, keepdim=True) - load_LE).float() * self.update_rate
            for router, step_E in zip(self.routers, step_LE, strict=True):
                bias_E = self._bias(router)
                bias_E.add_(step_E.to(bias_E.device))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{"expert_bias_LE": [L, E] float32}`` on the CPU, for an exact resume."""
        return {"expert_bias_LE": self.bias_LE().cpu().clone()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore a :meth:`state_dict` saved from the same model."""
        bias_LE = state.get("expert_bias_LE")
        if not isinstance(bias_LE, torch.Tensor) or tuple(bias_LE.shape) != (
            self.num_layers,
            self.num_experts,
        ):
            got = tuple(bias_LE.shape) if isinstance(bias_LE, torch.Tensor) else bias_LE
            raise CheckpointError(
                f"router bias state {got} does not fit {self.num_layers} routers × {self.num_experts} experts"
            )
        with torch.no_grad():
            for router, saved_E in zip(self.routers, bias_LE, strict=True):
                bias_E = self._bias(router)
                bias_E.copy_(saved_E.to(device=bias_E.device, dtype=torch.float32))

    def remove(self) -> None:
        """Detach the hooks and delete the buffers: the model routes exactly as before :meth:`install`."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for router in self.routers:
            if hasattr(router, BIAS_BUFFER):
                delattr(router, BIAS_BUFFER)


# -- export beside an HF checkpoint -------------------------------------------------------------
BIAS_FILE = "router_bias.json"
"""Side file of an HF checkpoint folder holding the routers' selection biases."""
_BIAS_FORMAT = "moe_adapt.router_bias/1"


def save_router_bias(bias: RouterBias, folder: str | Path) -> Path:
    """Write the biases to ``folder/router_bias.json`` (router names and ``[L, E]`` values; JSON numbers
    round-trip float32 exactly). Not ``.safetensors``, so weight loaders that glob those never see it."""
    bias_LE = bias.bias_LE().cpu()
    doc = {"format": _BIAS_FORMAT, "routers": bias.names, "expert_bias_LE": bias_LE.double().tolist()}
    return atomic_write_json(Path(folder) / BIAS_FILE, doc)


def load_router_bias(model: nn.Module, folder: str | Path, update_rate: float = 1e-3) -> RouterBias | None:
    """Install :class:`RouterBias` on ``model`` with the biases saved in ``folder`` by
    :func:`save_router_bias`; None (model untouched) when the folder has no such file."""
    path = Path(folder) / BIAS_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("format") != _BIAS_FORMAT:
            raise ValueError(f"format {doc.get('format')!r} is not {_BIAS_FORMAT!r}")
        names, bias_LE = list(doc["routers"]), torch.tensor(doc["expert_bias_LE"], dtype=torch.float32)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path} is not a router bias file: {err}") from None
    bias = RouterBias.install(model, update_rate)
    if names != bias.names:
        bias.remove()
        raise CheckpointError(f"{path} holds biases of routers {names}, the model has {bias.names}")
    bias.load_state_dict({"expert_bias_LE": bias_LE})
    return bias
