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

With ``engine.distributed_optimizer`` the optimizer is megatron's ``DistributedOptimizer`` (each
data-parallel rank holds a flat shard of the fp32 main parameters and Adam moments): its own
``sharded_state_dict`` in the ``dp_reshardable`` format writes those shards, keyed by its gradient
buckets (:func:`save_sharded` and :func:`load_sharded` pick the path from the optimizer's type). That
format follows the buckets, so such a checkpoint resumes at the expert-parallel size that saved it
(the model part still reshards; ``fully_reshardable`` and ``fully_sharded_model_space``, which would
reshard over EP too, fail in megatron-core 0.16.1). Each kind
of optimizer refuses the other's checkpoint, naming ``engine.distributed_optimizer``. Three steps work
around megatron-core 0.16.1 with torch's AdamW inside (no TransformerEngine/Apex):
:func:`_init_adam_state` before building the state dict (``DistributedOptimizer.state_dict`` wants a
``step`` for every parameter), loading under ``no_grad`` (its loader copies into parameter views in
place), and :func:`_restore_adam_steps` after (its loader leaves one shared ``step`` tensor holding
the template's 0; the true step is in the param groups).

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

import json
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

__all__ = ["FORMAT", "folder_problem", "gather_rng", "load_sharded", "restore_rng", "save_sharded"]

FORMAT = "megatron-core dist_checkpointing (torch_dist)"
"""What :func:`save_sharded` writes; recorded in the returned part and checked on load."""
_BACKEND = ("torch_dist", 1)
_MOMENTS = ("exp_avg", "exp_avg_sq")
DISTRIBUTED_SHARDING = "dp_reshardable"
"""The ``DistributedOptimizer`` checkpoint format :func:`save_sharded` writes (megatron's name)."""


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
def save_sharded(path: Path, model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    """Write ``model`` and the AdamW moments into folder ``path`` (made if missing), every rank its part.

    Collective: every rank of the default process group calls it with the same ``path`` (a folder
    all ranks see). Returns the small part every loader needs (format, model layout, AdamW step and
    param-group hyperparameters): JSON values, the same on every rank. ``optimizer`` is a
    ``torch.optim.AdamW`` or megatron's (chained) ``DistributedOptimizer``.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy

    path.mkdir(parents=True, exist_ok=True)
    dist.barrier()  # the folder exists (and is empty) before any rank writes into it
    model_sharded = model_sharded_state(model)
    if _is_distributed(optimizer):
        _init_adam_state(optimizer)
        step = _distributed_step(optimizer)
        sharded_state = {
            "model": model_sharded,
            "optimizer": optimizer.sharded_state_dict(model_sharded, metadata=_distributed_metadata()),
        }
        dist_checkpointing.save(
            sharded_state, str(path), sharded_strategy=get_default_save_sharded_strategy(*_BACKEND)
        )
        return {
            "format": FORMAT,
            "layout": model_layout(model_sharded),
            "optimizer": {"distributed": _distributed_layout(), "step": step},
        }
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


def folder_problem(path: Path) -> str | None:
    """What is wrong with the dist_checkpointing folder ``path`` of a trainer checkpoint (one phrase),
    or None when its files look intact: the folder is there, ``metadata.json`` is a JSON object,
    ``torch.distributed.checkpoint``'s ``.metadata`` (not empty) and at least one ``*.distcp`` shard
    are there. Reads no tensors (and unpickles nothing): a resume uses it to pass over a
    damaged checkpoint for the one before it."""
    if not path.is_dir():
        return f"its sharded model and optimizer folder {path.name}/ is missing"
    try:
        config = json.loads((path / "metadata.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{path.name}/metadata.json is missing"
    except (OSError, ValueError) as err:
        return f"{path.name}/metadata.json is not valid JSON ({err})"
    if not isinstance(config, dict):
        return f"{path.name}/metadata.json is not a JSON object"
    plan = path / ".metadata"
    if not plan.is_file():
        return f"{path.name}/.metadata is missing"
    if plan.stat().st_size == 0:  # (a *.distcp shard may be empty: a rank with nothing to write)
        return f"{path.name}/.metadata is empty"
    if not any(path.glob("*.distcp")):
        return f"{path.name}/ holds no *.distcp shard"
    return None


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


def load_sharded(path: Path, model: torch.nn.Module, optimizer: Any, meta: Mapping[str, Any]) -> None:
    """Read ``model`` and the AdamW state back from ``path`` (any EP size), given :func:`save_sharded`'s
    returned part ``meta``.

    Collective. The checks run on every rank before any reads (same files, same answer), so a bad
    folder raises a :class:`CheckpointError` naming it on every rank; so does a checkpoint of the other
    optimizer kind (``engine.distributed_optimizer``) or, with the distributed optimizer, of another
    expert-parallel size.
    """

    _check_folder(path, meta)
    _check_optimizer_kind(path, meta, _is_distributed(optimizer))
    model_sharded = model_sharded_state(model)
    _check_layout(path, meta.get("layout", {}), model_layout(model_sharded))
    if _is_distributed(optimizer):
        _load_distributed(path, model, optimizer, model_sharded, meta["optimizer"]["distributed"])
        return
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
    with torch.no_grad():
        loaded = _read_into_model(path, sharded, model)
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


def _read_into_model(path: Path, template: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """``dist_checkpointing.load`` of ``template`` (``model`` and optionally ``optimizer`` entries)
    from ``path`` with the torch_dist strategy; the model part is loaded into ``model``. Returns
    what was read. Errors name the folder."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        loaded: dict[str, Any] = dist_checkpointing.load(
            template, str(path), sharded_strategy=TorchDistLoadShardedStrategy()
        )
    except (CheckpointingException, CheckpointException, RuntimeError, ValueError, OSError) as err:
        raise CheckpointError(f"cannot read the sharded checkpoint {path}: {err}") from None
    try:
        load_megatron_state(model, loaded["model"])
    except MoEAdaptError as err:
        raise CheckpointError(f"{path} does not fit the megatron model: {err}") from None
    return loaded


# -- megatron's DistributedOptimizer ------------------------------------------------------------------
def _is_distributed(optimizer: Any) -> bool:
    """Whether ``optimizer`` is megatron's (chained) optimizer rather than a torch one."""
    return not isinstance(optimizer, torch.optim.Optimizer)


def _distributed_metadata() -> dict[str, Any]:
    return {"distrib_optim_sharding_type": DISTRIBUTED_SHARDING}


def _distributed_layout() -> dict[str, Any]:
    """What a distributed-optimizer checkpoint's loader must match: the format and the EP size."""
    from megatron.core import parallel_state

    return {
        "sharding": DISTRIBUTED_SHARDING,
        "expert_parallel": parallel_state.get_expert_model_parallel_world_size(),
    }


def _torch_adams(optimizer: Any) -> list[torch.optim.Optimizer]:
    """The torch Adam(W) optimizers inside megatron's chained optimizer (none with TE/Apex FusedAdam,
    which keep ``step`` in their param groups and need none of the workarounds)."""
    inner = [sub.optimizer for sub in optimizer.chained_optimizers]
    return [opt for opt in inner if isinstance(opt, torch.optim.Adam | torch.optim.AdamW)]


def _init_adam_state(optimizer: Any) -> None:
    """Give every parameter without state torch AdamW's initial state (step 0, zero moments).

    ``DistributedOptimizer.state_dict`` (under ``sharded_state_dict``, also when building the template
    a load fills) asserts one common ``step`` over the state; a fresh optimizer has none. AdamW makes
    exactly this state on its first step, so the next update is unchanged.
    """
    for adam in _torch_adams(optimizer):
        for group in adam.param_groups:
            for param in group["params"]:
                state = adam.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    for key in _MOMENTS:
                        state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)


def _distributed_step(optimizer: Any) -> float | None:
    """The common AdamW step of megatron's torch optimizers (None with TE/Apex: kept by megatron)."""
    steps = {float(s["step"]) for adam in _torch_adams(optimizer) for s in adam.state.values() if s}
    if len(steps) > 1:
        raise MoEAdaptError(f"the distributed optimizer's parameters are at different steps {sorted(steps)}")
    return steps.pop() if steps else None


def _restore_adam_steps(optimizer: Any) -> None:
    """Give every parameter its own ``step`` tensor with the loaded step.

    megatron-core 0.16.1's ``DistributedOptimizer.load_state_dict`` puts one ``step`` tensor object into
    every parameter's state (torch AdamW would then add 1 to it once per parameter per update), and
    the ``dp_reshardable`` loader copies the template's step (0) into it. The saved step is in each
    param group (``step``, from the checkpoint's param groups): use it and drop the key.
    """
    for adam in _torch_adams(optimizer):
        for group in adam.param_groups:
            step = group.pop("step", None)
            if step is None:
                raise CheckpointError("the distributed optimizer's checkpoint holds no AdamW step")
            for param in group["params"]:
                if param in adam.state:
                    adam.state[param]["step"] = torch.tensor(float(step), dtype=torch.float32)


def _check_optimizer_kind(path: Path, meta: Mapping[str, Any], distributed: bool) -> None:
    saved = "distributed" in meta.get("optimizer", {})
    if saved != distributed:
        name = {True: "true (megatron's DistributedOptimizer)", False: "false (torch AdamW)"}
        raise CheckpointError(
            f"{path} was written with engine.distributed_optimizer={name[saved]}, this engine has "
            f"engine.distributed_optimizer={name[distributed]}: the optimizer state is stored differently; "
            f"resume with engine.distributed_optimizer={str(saved).lower()}"
        )
    if distributed:
        saved_layout, here = meta["optimizer"]["distributed"], _distributed_layout()
        if saved_layout.get("sharding") != here["sharding"]:
            raise CheckpointError(
                f"{path}: the distributed optimizer's state is in format {saved_layout.get('sharding')!r}; "
                f"this engine reads {here['sharding']!r}"
            )
        if saved_layout.get("expert_parallel") != here["expert_parallel"]:
            raise CheckpointError(
                f"{path} was saved at engine.expert_parallel={saved_layout.get('expert_parallel')}, this "
                f"run has {here['expert_parallel']}: the distributed optimizer's state (megatron's "
                f"{DISTRIBUTED_SHARDING} format) reshards over data-parallel ranks only; resume with "
                f"engine.expert_parallel={saved_layout.get('expert_parallel')}"
            )


def _load_distributed(
    path: Path,
    model: torch.nn.Module,
    optimizer: Any,
    model_sharded: dict[str, Any],
    saved: Mapping[str, Any],
) -> None:
    """Read the model and megatron's DistributedOptimizer state (its shards on this rank) from ``path``."""

    with torch.no_grad():  # the loaders copy into views of parameters that require grad
        _init_adam_state(optimizer)
        template = {
            "model": model_sharded,
            "optimizer": optimizer.sharded_state_dict(
                model_sharded, is_loading=True, metadata=_distributed_metadata()
            ),
        }
        loaded = _read_into_model(path, template, model)
        try:
            optimizer.load_state_dict(loaded["optimizer"])
        except (AssertionError, KeyError, RuntimeError, ValueError) as err:
            raise CheckpointError(
                f"{path}: the distributed optimizer's state does not fit this optimizer "
                f"(saved at {dict(saved)}): {err!r}"
            ) from None
    _restore_adam_steps(optimizer)


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
