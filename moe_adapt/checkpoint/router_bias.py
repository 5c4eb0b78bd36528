"""Per-expert router biases of aux-loss-free load balancing: the hook that applies them to a
transformers router and their file beside an HF checkpoint.

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

Shape legend: ``L`` MoE layers, ``T`` tokens routed in one call, ``E`` routed experts, ``K`` top-k.
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

__all__ = ["BIAS_FILE", "SUPPORTED_ROUTERS", "RouterBias", "load_router_bias", "save_router_bias"]


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
