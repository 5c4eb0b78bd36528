"""Process groups and parallel layout of the megatron engine: starting ``parallel_state``, the device,
what the engine supports, and the tensor-parallel marks megatron would set while initialising weights.

megatron-core is imported inside the functions (style rule 7: importing this module needs none).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from moe_adapt.errors import MoEAdaptConfigError, MoEAdaptError

__all__ = ["check_parallel_state", "cuda_stand_in", "init_parallel", "mark_tensor_parallel", "resolve_device"]


def init_parallel(*, expert_parallel: int = 1, tensor_parallel: int = 1, seed: int = 1234) -> bool:
    """Start ``torch.distributed`` and megatron's ``parallel_state`` unless they are running.

    Under torchrun (``RANK``/``WORLD_SIZE`` set) the process group comes from its environment;
    otherwise a one-process group is made in memory (no port). The backend is nccl with CUDA and
    gloo without (CPU only works with the test shim). Then megatron's model-parallel groups are
    built with ``expert_parallel`` EP ranks (tensor/pipeline/context parallel 1) and its RNG
    tracker is seeded. With ``tensor_parallel`` > 1 the TP groups are made too (expert tensor
    parallel stays 1: every expert whole on its rank). Returns True when this call initialised
    anything.

    Raises:
        MoEAdaptError: no CUDA (the same error as :class:`MegatronEngine`), before anything starts.
        MoEAdaptConfigError: ``parallel_state`` is already initialised with another EP or TP size.
    """
    resolve_device(None)
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    started = False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend)
        else:
            if torch.cuda.is_available():
                torch.cuda.set_device(0)
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        started = True
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_parallel,
            expert_model_parallel_size=expert_parallel,
            expert_tensor_parallel_size=1,
        )
        model_parallel_cuda_manual_seed(seed)
        started = True
    else:
        running = (
            parallel_state.get_expert_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_world_size(),
        )
        if running != (expert_parallel, tensor_parallel):
            raise MoEAdaptConfigError(
                f"expert_parallel={expert_parallel}, tensor_parallel={tensor_parallel} is invalid: "
                f"megatron's parallel_state is already initialised with {running[0]} expert-parallel and "
                f"{running[1]} tensor-parallel ranks"
            )
    return started


def cuda_stand_in() -> bool:
    """Whether ``torch.cuda`` answers with the CPU: a CPU stand-in for megatron-core's CUDA calls is
    installed (the tests' shim). Then the engine trains on the CPU."""
    try:
        current = torch.cuda.current_device()
        torch.cuda.Stream()
    except Exception:
        return False
    return isinstance(current, torch.device) and current.type == "cpu"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to train on; raises the one no-CUDA error when megatron-core cannot run here."""
    stand_in = cuda_stand_in()
    if device is None:
        device = "cpu" if stand_in or not torch.cuda.is_available() else "cuda"
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available() and not stand_in:
        return dev
    if dev.type == "cpu" and stand_in:
        return dev
    if not torch.cuda.is_available() and not stand_in:
        raise MoEAdaptError(
            "the megatron engine needs CUDA: megatron-core 0.16 calls torch.cuda (streams, events, its "
            "RNG tracker) and this machine has no usable GPU (torch.cuda.is_available() is False); use "
            "engine=hf (engine=auto picks it without CUDA)"
        )
    raise MoEAdaptConfigError(
        f"device={str(dev)!r} is invalid for the megatron engine here: use "
        + ("'cpu' (torch.cuda is a CPU stand-in)" if stand_in else "'cuda'")
    )


def check_parallel_state() -> tuple[int, int, int, int]:
    """``(ep_rank, ep_size, tp_rank, tp_size)``; refuses a missing or unsupported ``parallel_state``."""
    from megatron.core import parallel_state as ps

    if not dist.is_initialized() or not ps.model_parallel_is_initialized():
        raise MoEAdaptError(
            "the megatron engine needs torch.distributed and megatron's parallel_state initialised: call "
            "moe_adapt.engines.megatron.engine.init_parallel(expert_parallel=...) first"
        )
    sizes = {
        "pipeline": ps.get_pipeline_model_parallel_world_size(),
        "context": ps.get_context_parallel_world_size(),
        "expert tensor": ps.get_expert_tensor_parallel_world_size(),
    }
    unsupported = {k: v for k, v in sizes.items() if v != 1}
    if unsupported:
        raise MoEAdaptConfigError(
            "the megatron engine supports data, tensor and expert parallel only; parallel_state has "
            + ", ".join(f"{k} parallel = {v}" for k, v in unsupported.items())
            + ": initialise with size 1"
        )
    return (
        ps.get_expert_model_parallel_rank(),
        ps.get_expert_model_parallel_world_size(),
        ps.get_tensor_model_parallel_rank(),
        ps.get_tensor_model_parallel_world_size(),
    )


def mark_tensor_parallel(model: torch.nn.Module) -> None:
    """Give the tensor-parallel weights megatron's ``tensor_model_parallel`` marks.

    megatron sets them while it initialises a weight, which the engine skips (every weight comes from
    the checkpoint); without them its helpers (``param_is_not_tensor_parallel_duplicate``, the
    distributed optimizer's gradient norm) would count each slice as a replica. Column-parallel
    weights and biases and vocabulary-parallel embeddings are split on dim 0, row-parallel weights on
    dim 1; experts (expert tensor parallel 1) stay whole.
    """
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        set_tensor_model_parallel_attributes,
    )

    for module in model.modules():
        if getattr(module, "is_expert", False):
            continue
        if isinstance(module, ColumnParallelLinear | VocabParallelEmbedding):
            tensors = [(module.weight, 0), (getattr(module, "bias", None), 0)]
        elif isinstance(module, RowParallelLinear):
            tensors = [(module.weight, 1)]
        else:
            continue
        for tensor, dim in tensors:
            if tensor is not None and not hasattr(tensor, "tensor_model_parallel"):
                set_tensor_model_parallel_attributes(tensor, True, dim, 1)
