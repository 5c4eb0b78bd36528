"""Sharded training checkpoints of the megatron engine, with megatron-core's ``dist_checkpointing``.

Every rank writes its part of the model and of the AdamW moments into one folder, together
(:func:`save_sharded`, the ``torch_dist`` format of ``torch.distributed.checkpoint``); each tensor is
stored once, under its *global* name and shape: the experts of all EP ranks form one tensor per
layer and weight (``...mlp.experts.experts.linear_fc2.weight`` ``[E, H, I]``, megatron's
``SequentialMLP.sharded_state_dict`` gives each local expert its global offset), and a dense tensor
held by every data-parallel rank is written by one of them. :func:`load_sharded` reads back
exactly the slices this rank holds, whatever the EP size that wrote them: a checkpoint saved at
EP=2 loads at EP=1 and the other way round (resharding).

The optimizer is ``torch.optim.AdamW``: its ``exp_avg`` and ``exp_avg_sq`` have the shape of their
parameter, so megatron's helpers (:mod:`megatron.core.dist_checkpointing.optimizer`, as its own
``FP32Optimizer.sharded_state_dict`` uses them) give them the parameter's sharding under the key
``optimizer.state.<moment>.<parameter key>``. The AdamW ``step`` is one number shared by every
parameter (the engine steps all of them or none); like megatron's optimizers the engine stores it
once, in the small JSON part with the param-group hyperparameters (:func:`save_sharded` returns
that part; the trainer's rank 0 writes it beside the folder).

What is left out: megatron's ``_extra_state`` entries (TransformerEngine/FP8 metadata, ``None`` with
the local layer spec; they would be pickled objects). The ``layout`` of the returned part, ``{key:
[*global_shape, dtype]}`` of the model, lets :func:`load_sharded` refuse a checkpoint of another
model (or dtype) with a clear :class:`~moe_adapt.errors.CheckpointError` before any rank reads.

Trust: ``torch.distributed.checkpoint`` pickles its ``.metadata`` file, and megatron writes a small
``common.pt`` (read with ``torch.load``'s ``weights_only``). Only checkpoints this run wrote (in its
own work directory) are resumed; weights given to users are safetensors (``save_hf``). Loading
always uses the ``torch_dist`` strategy, whatever another backend ``metadata.json`` names.

Shape legend: ``R`` ranks, ``N`` bytes of one RNG state.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from itertools import chain
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moe_adapt.engines.megatron.model import load_megatron_state
from moe_adapt.errors import CheckpointError, MoEAdaptError

log = logging.getLogger(__name__)

__all__ = ["FORMAT", "gather_rng", "load_sharded", "restore_rng", "save_sharded"]

FORMAT = "megatron-core dist_checkpointing (torch_dist)"
"""What :func:`save_sharded` writes; recorded in the returned part and checked on load."""
_BACKEND = ("torch_dist", 1)
_MOMENTS = ("exp_avg", "exp_avg_sq")


# -- sharded state dicts ----------------------------------------------------------------------------
def model_sharded_state(model: torch.nn.Module) -> dict[str, Any]:
    """megatron's ``sharded_state_dict`` of ``model`` (global keys, shapes and offsets) without the
    ``_extra_state`` objects."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    sharded: dict[str, Any] = model.sharded_state_dict()  # type: ignore[operator]
    return {
        k: v for k, v in sharded.items() if not (isinstance(v, ShardedObject) and k.endswith("_extra_state"))
    }


def model_layout(model_sharded: Mapping[str, Any]) -> dict[str, list[Any]]:
    """``{checkpoint key: [*global shape, dtype]}``: the same for every EP size of one model."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    layout: dict[str, list[Any]] = {}
    for value in model_sharded.values():
        built = value.build() if isinstance(value, ShardedTensorFactory) else value
        for tensor in nested_values(built) if isinstance(built, dict | list) else [built]:
            if isinstance(tensor, ShardedTensor):
                layout[tensor.key] = [
                    *map(int, tensor.global_shape),
                    str(tensor.dtype).removeprefix("torch."),
                ]
    return dict(sorted(layout.items()))


def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's parameters in its state-dict order (group by group)."""
    return list(chain.from_iterable(group["params"] for group in optimizer.param_groups))


def _common_step(optimizer: torch.optim.Optimizer) -> float | None:
    """AdamW's ``step``, the same for every parameter; None before the first update."""
    params = _params(optimizer)
    steps = {float(optimizer.state[p]["step"]) for p in params if "step" in optimizer.state[p]}
    have = sum(1 for p in params if optimizer.state[p])
    if not steps and have == 0:
        return None
    if len(steps) != 1 or have != len(params):
        raise MoEAdaptError(
            f"the optimizer state is not shared by all {len(params)} parameters (steps {sorted(steps)}, "
            f"{have} with state): the sharded checkpoint stores one AdamW step"
        )
    return steps.pop()


def optimizer_sharded_state(
    optimizer: torch.optim.Optimizer,
    model_sharded: Mapping[str, Any],
    moments: Mapping[int, Mapping[str, torch.Tensor]],
) -> dict[str, Any]:
    """``moments`` (``{param index: {"exp_avg": t, "exp_avg_sq": t}}``) as megatron sharded tensors
    placed like their parameters (megatron's own helpers)."""
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        optim_state_to_sharding_state,
    )

    id_to_sharded = get_param_id_to_sharded_param_map(dict(model_sharded), _params(optimizer))
    state: dict[str, Any] = {
        "state": {i: dict(m) for i, m in moments.items()},
        "param_groups": optimizer.state_dict()["param_groups"],
    }
    try:
        optim_state_to_sharding_state(state, id_to_sharded, exclude_keys=("step",))
    except ValueError as err:  # a parameter the model's sharded state dict does not name
        raise MoEAdaptError(f"cannot shard the optimizer state like the model: {err}") from None
    return state


# -- save / load -----------------------------------------------------------------------------------
def save_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Write ``model`` and the AdamW moments into folder ``path`` (made if missing), every rank its part.

    Collective: every rank of the default process group calls it with the same ``path`` (a folder
    all ranks see). Returns the small part every loader needs (format, model layout, AdamW step and
    param-group hyperparameters): JSON values, the same on every rank.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy

    path.mkdir(parents=True, exist_ok=True)
    dist.barrier()  # the folder exists (and is empty) before any rank writes into it
    model_sharded = model_sharded_state(model)
    step = _common_step(optimizer)
    sharded: dict[str, Any] = {"model": model_sharded}
    if step is not None:
        moments = {i: {k: optimizer.state[p][k] for k in _MOMENTS} for i, p in enumerate(_params(optimizer))}
        sharded["optimizer"] = optimizer_sharded_state(optimizer, model_sharded, moments)
    dist_checkpointing.save(sharded, str(path), sharded_strategy=get_default_save_sharded_strategy(*_BACKEND))
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.state_dict()["param_groups"]]
    return {
        "format": FORMAT,
        "layout": model_layout(model_sharded),
        "optimizer": {"step": step, "param_groups": groups},
    }


def _check_folder(path: Path, meta: Mapping[str, Any]) -> None:
    """Refuse, with the folder's name, what :func:`load_sharded` could not read."""
    from megatron.core.dist_checkpointing.core import maybe_load_config

    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: the checkpoint's engine state names format {meta.get('format')!r}, not {FORMAT!r}"
        )
    if not path.is_dir():
        raise CheckpointError(
            f"{path} is missing: the checkpoint's sharded model and optimizer folder is not there "
            "(an incomplete or copied checkpoint); resume from an earlier one"
        )
    try:
        config = maybe_load_config(str(path))
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: cannot read its metadata.json ({err})") from None
    if config is None:
        raise CheckpointError(f"{path} is not a megatron dist_checkpointing folder (no metadata.json)")
    if config.sharded_backend != _BACKEND[0]:
        raise CheckpointError(
            f"{path} was written with the {config.sharded_backend!r} backend; the megatron engine reads "
            f"{_BACKEND[0]!r} only"
        )


def _check_layout(path: Path, saved: Mapping[str, Any], here: Mapping[str, Any]) -> None:
    if dict(saved) == dict(here):
        return
    missing = sorted(set(here) - set(saved))
    extra = sorted(set(saved) - set(here))
    differ = sorted(k for k in set(here) & set(saved) if list(saved[k]) != list(here[k]))
    parts = []
    if missing:
        parts.append(f"lacks {missing[:3]}")
    if extra:
        parts.append(f"has extra {extra[:3]}")
    for key in differ[:3]:
        parts.append(f"{key} is {saved[key]} there, {here[key]} here")
    raise CheckpointError(
        f"{path} holds another model: it " + "; ".join(parts) + " ([*global shape, dtype]); resume with "
        "the run's cpt.init_from and engine.dtype"
    )


def load_sharded(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: Mapping[str, Any]
) -> None:
    """Read ``model`` and the AdamW state back from ``path`` (any EP size), given :func:`save_sharded`'s
    returned part ``meta``.

    Collective. The checks run on every rank before any reads (same files, same answer), so a bad
    folder raises a :class:`CheckpointError` naming it on every rank.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy
    from torch.distributed.checkpoint.api import CheckpointException

    _check_folder(path, meta)
    model_sharded = model_sharded_state(model)
    _check_layout(path, meta.get("layout", {}), model_layout(model_sharded))
    opt_meta = meta["optimizer"]
    groups = opt_meta["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError(
            f"{path}: the checkpoint has {len(groups)} optimizer param groups, this optimizer "
            f"{len(optimizer.param_groups)}"
        )
    params = _params(optimizer)
    step = opt_meta["step"]
    sharded: dict[str, Any] = {"model": model_sharded}
    if step is not None:
        zeros = {i: {k: torch.zeros_like(p) for k in _MOMENTS} for i, p in enumerate(params)}
        sharded["optimizer"] = optimizer_sharded_state(optimizer, model_sharded, zeros)
    try:
        with torch.no_grad():
            loaded = dist_checkpointing.load(
                sharded, str(path), sharded_strategy=TorchDistLoadShardedStrategy()
            )
    except (CheckpointingException, CheckpointException, RuntimeError, ValueError, OSError) as err:
        raise CheckpointError(f"cannot read the sharded checkpoint {path}: {err}") from None
    try:
        load_megatron_state(model, loaded["model"])
    except MoEAdaptError as err:
        raise CheckpointError(f"{path} does not fit the megatron model: {err}") from None
    state: dict[int, dict[str, Any]] = {}
    if step is not None:
        for i in range(len(params)):
            moments = loaded["optimizer"]["state"][i]
            state[i] = {"step": torch.tensor(float(step), dtype=torch.float32)}
            state[i].update({k: moments[k] for k in _MOMENTS})
    current = optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict(
        {
            "state": state,
            "param_groups": [
                {**saved, "params": now["params"]} for saved, now in zip(groups, current, strict=True)
            ],
        }
    )


# -- RNG --------------------------------------------------------------------------------------------
def gather_rng(device: torch.device) -> dict[str, torch.Tensor]:
    """Every rank's torch RNG state (and CUDA's on a GPU), stacked by global rank: ``{"torch_RN": ...}``.

    Collective with several processes (an all-gather on ``device``)."""
    local = {"torch_RN": torch.get_rng_state()}
    if device.type == "cuda":
        local["cuda_RN"] = torch.cuda.get_rng_state(device)
    world = dist.get_world_size() if dist.is_initialized() else 1
    out = {}
    for key, state_N in local.items():
        if world == 1:
            out[key] = state_N[None].clone()
            continue
        mine = state_N.to(device)
        parts = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(parts, mine)
        out[key] = torch.stack(parts).cpu()
    return out


def restore_rng(rng: Mapping[str, torch.Tensor], device: torch.device) -> None:
    """Set this rank's RNG from :func:`gather_rng`'s states: its own row when the number of ranks is
    the one that saved, else row ``rank % saved`` (the model draws no random numbers in training: no
    dropout, no router jitter; the states only matter to what else the run samples)."""
    rank = dist.get_rank() if dist.is_initialized() else 0

    def row(states_RN: torch.Tensor) -> torch.Tensor:
        # a fresh tensor: torch.set_rng_state ignores a view's storage offset (and crashes on it)
        return states_RN[rank % states_RN.shape[0]].to(torch.uint8).clone()

    torch.set_rng_state(row(rng["torch_RN"]))
    if "cuda_RN" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(row(rng["cuda_RN"]), device)
