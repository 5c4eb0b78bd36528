"""The megatron engine's state: in memory (:func:`state_dict`, this rank's, same layout only) and
sharded on disk with megatron-core's ``dist_checkpointing`` (:func:`save_sharded` /
:func:`load_sharded`, every rank together, any expert-parallel size). See docs/engines.md
("Checkpoints").

Shape legend: ``L`` MoE layers, ``E`` experts.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moe_adapt.engines.megatron import checkpoint as dist_ckpt
from moe_adapt.engines.megatron.model import load_megatron_state
from moe_adapt.errors import CheckpointError, MoEAdaptError

if TYPE_CHECKING:
    from moe_adapt.engines.megatron.engine import MegatronEngine

log = logging.getLogger(__name__)

STATE_VERSION = 1
ENGINE_NAME = "megatron"


def model_tensors(engine: MegatronEngine) -> dict[str, torch.Tensor]:
    """This rank's model state without megatron's ``_extra_state`` entries."""
    return {
        k: v
        for k, v in engine.model.state_dict().items()
        if torch.is_tensor(v) and not k.endswith("_extra_state")
    }


def state_dict(engine: MegatronEngine) -> dict[str, Any]:
    """This rank's whole engine state, in memory: model (megatron names), optimizer, schedule
    position and RNG, as tensors and JSON values.

    Tensors are cloned (safetensors refuses shared memory); the optimizer's per-parameter state
    is keyed by the parameter index as a string. Under expert parallel the model and optimizer
    hold this rank's experts only, so the state fits the same EP rank and size only. Training
    checkpoints do not use it: the trainer saves with :func:`save_sharded`, which every rank
    writes together and any EP size resumes.

    Raises:
        MoEAdaptError: with ``engine.distributed_optimizer`` (each rank holds a shard of the
            optimizer state in megatron's own layout): save with :func:`save_sharded`.
    """
    _refuse_in_memory_state(engine, "state_dict")
    opt = engine.optimizer.state_dict()
    rng: dict[str, Any] = {"torch": torch.get_rng_state()}
    if engine.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(engine.device)
    return {
        "version": STATE_VERSION,
        "engine": ENGINE_NAME,
        "expert_parallel": {"rank": engine.ep_rank, "size": engine.ep_size},
        "model": {k: v.detach().clone() for k, v in model_tensors(engine).items()},
        "optimizer": {
            "state": {str(i): dict(s) for i, s in opt["state"].items()},
            "param_groups": opt["param_groups"],
        },
        "steps": engine.steps,
        "rng": rng,
        **_router_bias_state(engine),
    }


def load_state_dict(engine: MegatronEngine, state: dict[str, Any]) -> None:
    """Restore a :func:`state_dict` into an engine built from the same checkpoint, config and layout
    (the same EP rank and size). A training checkpoint is restored with :func:`load_sharded`.
    Refused with ``engine.distributed_optimizer`` (as :func:`state_dict`)."""
    _refuse_in_memory_state(engine, "load_state_dict")
    _check_state(engine, state)
    layout = {"rank": engine.ep_rank, "size": engine.ep_size}
    if state.get("expert_parallel") != layout:
        raise CheckpointError(
            f"this checkpoint holds expert-parallel rank/size {state.get('expert_parallel')}, this "
            f"process is {layout}: resume with the same expert_parallel size"
        )
    if "model" not in state:
        raise CheckpointError(
            "this engine state holds no model: it is the small part of a sharded checkpoint "
            "(MegatronEngine.save_sharded); restore it with load_sharded (Trainer.resume does)"
        )
    _check_router_bias(engine, state)
    try:
        load_megatron_state(engine.model, state["model"])
    except MoEAdaptError as err:
        raise CheckpointError(f"checkpoint does not fit the megatron model: {err}") from None
    opt = state["optimizer"]
    engine.optimizer.load_state_dict(
        {"state": {int(i): s for i, s in opt["state"].items()}, "param_groups": opt["param_groups"]}
    )
    _load_router_bias(engine, state)
    engine.steps = int(state["steps"])
    torch.set_rng_state(state["rng"]["torch"].to(torch.uint8))
    if "cuda" in state["rng"] and engine.device.type == "cuda":
        torch.cuda.set_rng_state(state["rng"]["cuda"].to(torch.uint8), engine.device)


def _refuse_in_memory_state(engine: MegatronEngine, method: str) -> None:
    if engine.cfg.distributed_optimizer:
        raise MoEAdaptError(
            f"MegatronEngine.{method} is not available with engine.distributed_optimizer=true (every "
            "rank holds a shard of the optimizer state in megatron's layout): checkpoint with "
            "save_sharded / load_sharded, as the trainer does"
        )


def save_sharded(engine: MegatronEngine, path: str | Path) -> dict[str, Any]:
    """Write the model and the AdamW moments into folder ``path`` with megatron-core's
    ``dist_checkpointing``; return the rest of the engine state for the trainer's checkpoint.

    Collective: every rank calls it with the same ``path``, a folder all ranks see (made if
    missing; :class:`~moe_adapt.train.callbacks.CheckpointCallback` passes a fresh temporary
    folder and renames the step folder once everything is written). Each rank writes its own
    experts under their global indices and the dense tensors are written once, so the folder
    holds the whole model and optimizer whatever the EP size (:mod:`.checkpoint`). With
    ``engine.distributed_optimizer`` each rank writes its shard of megatron's optimizer state
    (``dp_reshardable``) instead of the AdamW moments.

    The returned state (tensors and JSON values, the same on every rank; the trainer's rank 0
    writes it as safetensors + JSON) holds ``version``, ``engine``, ``expert_parallel`` (the EP
    size that saved), ``sharded`` (format, the model's global layout, AdamW's common step and
    hyperparameters), ``steps``, ``rng`` (every rank's RNG state, ``[ranks, N]``) and the router
    biases with aux-loss-free balancing.
    """
    meta = dist_ckpt.save_sharded(Path(path), engine.model, engine.optimizer)
    return {
        "version": STATE_VERSION,
        "engine": ENGINE_NAME,
        "expert_parallel": {"size": engine.ep_size},
        "sharded": meta,
        "steps": engine.steps,
        "rng": dist_ckpt.gather_rng(engine.device),
        **_router_bias_state(engine),
    }


def load_sharded(engine: MegatronEngine, path: str | Path, state: dict[str, Any]) -> None:
    """Restore what :func:`save_sharded` wrote to ``path`` and returned (``state``), at any EP size.

    Collective. The engine must be built from the run's checkpoint and config; the expert
    parallel size may differ from the one that saved (each rank reads the experts it holds now:
    a checkpoint saved at EP=2 resumes at EP=1 and the other way round, with the same weights and
    AdamW moments; with ``engine.distributed_optimizer`` the EP size must be the saving one, the
    number of data-parallel ranks may change). RNG: each rank takes the state its rank saved, or
    rank ``rank % saved_ranks``'s when the number of processes changed (training draws no random
    numbers: no dropout, no router jitter). megatron's model-parallel RNG tracker is not saved
    for the same reason.

    Raises:
        CheckpointError: naming the folder, when it is missing or not a dist_checkpointing
            folder, when ``state`` was written by another engine or by :func:`state_dict`, or
            when the checkpoint holds another model (layout, dtype), router-bias setting or
            optimizer kind (``engine.distributed_optimizer``; with it, another EP size).
    """
    folder = Path(path)
    _check_state(engine, state)
    if "sharded" not in state:
        raise CheckpointError(
            f"{folder}: this engine state has no sharded part (it is a MegatronEngine.state_dict); "
            "restore it with load_state_dict"
        )
    _check_router_bias(engine, state)
    saved_ep = state.get("expert_parallel", {}).get("size")
    if saved_ep != engine.ep_size:
        log.info(
            "resharding %s: saved at expert_parallel=%s, loading at %d", folder, saved_ep, engine.ep_size
        )
    dist_ckpt.load_sharded(folder, engine.model, engine.optimizer, state["sharded"])
    _load_router_bias(engine, state)
    engine.steps = int(state["steps"])
    dist_ckpt.restore_rng(state["rng"], engine.device)


def _check_state(engine: MegatronEngine, state: dict[str, Any]) -> None:
    if state.get("version") != STATE_VERSION:
        raise CheckpointError(f"engine state version {state.get('version')!r} is not {STATE_VERSION}")
    if state.get("engine") != ENGINE_NAME:
        raise CheckpointError(
            "this training checkpoint was not written by the megatron engine: resume it with the "
            "engine that wrote it (engine=hf)"
        )


def _router_bias_state(engine: MegatronEngine) -> dict[str, Any]:
    if engine.expert_bias_LE is None:
        return {}
    return {"router_bias": {"expert_bias_LE": engine.expert_bias_LE.detach().cpu().clone()}}


def _check_router_bias(engine: MegatronEngine, state: dict[str, Any]) -> None:
    if (engine.expert_bias_LE is not None) != ("router_bias" in state):
        raise CheckpointError(
            "the checkpoint's router bias does not match engine.bias_update_rate "
            "(resume with the run's engine.bias_update_rate)"
        )
    if engine.expert_bias_LE is not None:
        saved_LE = state["router_bias"]["expert_bias_LE"]
        if tuple(saved_LE.shape) != tuple(engine.expert_bias_LE.shape):
            raise CheckpointError(
                f"router bias {tuple(saved_LE.shape)} does not fit {tuple(engine.expert_bias_LE.shape)}"
            )


def _load_router_bias(engine: MegatronEngine, state: dict[str, Any]) -> None:
    if engine.expert_bias_LE is not None:
        engine.expert_bias_LE.copy_(state["router_bias"]["expert_bias_LE"].to(engine.expert_bias_LE))
