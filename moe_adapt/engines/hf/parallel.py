"""How the ``hf`` engine spreads over processes: ``engine.parallel`` resolved for the number of
processes, and the model wrapped for DDP (every rank holds the whole model, gradients averaged) or
FSDP2 (``fully_shard`` per decoder layer: parameters, gradients and optimizer state sharded).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch

from moe_adapt.distributed import DistContext
from moe_adapt.errors import MoEAdaptConfigError

log = logging.getLogger(__name__)


def resolve_parallel(parallel: str, ctx: DistContext) -> str:
    """``engine.parallel`` for ``ctx``'s number of processes: none, ddp or fsdp2.

    Raises:
        MoEAdaptConfigError: none with several processes (each would train its own copy).
    """
    if not ctx.is_distributed:
        if parallel in ("ddp", "fsdp2"):
            log.warning(
                "engine.parallel=%s: there is one process, so it trains as engine.parallel=none", parallel
            )
        return "none"
    if parallel == "none":
        raise MoEAdaptConfigError(
            f"engine.parallel='none' is invalid with {ctx.world_size} processes: each would train its own "
            "copy of the model on the whole batch; use auto, ddp or fsdp2, or start one process"
        )
    return "ddp" if parallel == "auto" else parallel


def _decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The decoder layers of an HF causal LM (``model.model.layers``): FSDP2's units."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise MoEAdaptConfigError(
            f"engine.parallel='fsdp2' is invalid for {type(model).__name__}: its decoder layers are not at "
            "model.model.layers; use engine.parallel=ddp"
        )
    return list(layers)


def wrap_model(model: Any, parallel: str, device: torch.device, dist: DistContext) -> Any:
    """DDP around ``model``, or FSDP2's ``fully_shard`` on each decoder layer and the root (in place);
    the model itself with one process (``parallel`` is :func:`resolve_parallel`'s answer)."""
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # buffers (rotary tables, router biases) are kept equal on every rank by construction, so
        # they are not re-broadcast before each forward (torch 2.13 renamed the switch)
        params = inspect.signature(DistributedDataParallel).parameters
        switch = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
        no_sync: dict[str, Any] = {switch: False}
        return DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, **no_sync
        )
    if parallel == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (dist.world_size,))
        for layer in _decoder_layers(model):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


class WholeForward(torch.nn.Module):
    """Calls ``model`` as a whole; shows its ``config`` and parameters but not its sub-modules' accessors."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.inner = model
        self.config = model.config

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)
