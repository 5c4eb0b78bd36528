"""Test-only shim that lets megatron-core 0.16.1 run on a CPU-only torch with gloo.

megatron-core assumes CUDA in a handful of places (streams, events, the RNG tracker, a literal
``device="cuda"`` in the causal mask, CPU split sizes in the alltoall dispatcher, a missing
``te_general_gemm`` when TransformerEngine is absent, the CUDA-only ``grouped_gemm`` package
behind the legacy ``GroupedMLP``, CUDA type names: the ``DistributedOptimizer`` sorts parameters by
``param.type()`` and the gradient clipping asserts ``'torch.cuda.FloatTensor'``) and gloo where NCCL
is assumed (allgather of unequal parts); and it hands dist_checkpointing's synchronous save an
in-process results queue (speed only).
:class:`CpuMegatron` patches exactly those places, remembers what it replaced and puts everything
back on :meth:`CpuMegatron.restore`.
It belongs to the tests: the product never imports it (see /work/shared/facts.md).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode


class _NoopEvent:
    """Stands in for ``torch.cuda.Event``: every method is a no-op."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait(self, *args: Any, **kwargs: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


class _NoopStream(contextlib.AbstractContextManager):
    """Stands in for ``torch.cuda.Stream``; all instances compare equal (there is one CPU 'stream')."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> Any:
        return event if event is not None else _NoopEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _NoopStream)

    def __hash__(self) -> int:
        return 0

    def __exit__(self, *exc: Any) -> None:
        return None


def _names_cuda(device: Any) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaToCpu(TorchFunctionMode):
    """Rewrites ``device="cuda"`` keyword arguments and ``.to("cuda")`` calls to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = dict(kwargs or {})
        if _names_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _names_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _grouped_mm(
    a_TK: torch.Tensor, b_EKN: torch.Tensor, batch_sizes_E: torch.Tensor, trans_b: bool = False
) -> torch.Tensor:
    """Stands in for ``grouped_gemm.ops.gmm``: rows of ``a`` in consecutive expert groups of
    ``batch_sizes`` rows, group e times ``b[e]`` (``b[e].T`` with ``trans_b``), via ``torch._grouped_mm``."""
    b_EKN = b_EKN.transpose(1, 2) if trans_b else b_EKN
    offsets_E = batch_sizes_E.to("cpu", torch.int64).cumsum(0).to(torch.int32)
    return torch._grouped_mm(a_TK.contiguous(), b_EKN.contiguous(), offs=offsets_E)


def _uneven_all_gather(original: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.distributed.all_gather`` that also takes parts of different lengths on gloo.

    Gloo's allgather needs equal shapes; megatron's alltoall dispatcher gathers tokens over the
    expert-tensor-parallel group with uneven split sizes (ETP > 1 with EP > 1). Pad every part to
    the longest, gather, and copy each rank's rows back. Forward only: the backward's uneven
    reduce-scatter is not emulated.
    """

    def all_gather(
        tensor_list: list[torch.Tensor], tensor: torch.Tensor, group: Any = None, async_op: bool = False
    ) -> Any:
        if async_op or len({tuple(t.shape) for t in tensor_list}) <= 1:
            return original(tensor_list, tensor, group=group, async_op=async_op)
        longest = max(t.shape[0] for t in tensor_list)
        padded = tensor.new_zeros(longest, *tensor.shape[1:])
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in tensor_list]
        original(parts, padded, group=group)
        for out, part in zip(tensor_list, parts, strict=True):
            out.copy_(part[: out.shape[0]])
        return None

    return all_gather


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _type_names_cuda(original: Callable[..., Any]) -> Callable[..., Any]:
    """``Tensor.type`` whose query form (no argument) names CPU float tensors by their CUDA type.

    megatron-core 0.16.1's DistributedOptimizer groups parameters by the ``param.type()`` string
    (``torch.cuda.FloatTensor``, ``...HalfTensor``, ``...BFloat16Tensor``; anything else is a TypeError)
    and ``clip_grad_by_total_norm_fp32`` asserts ``grad.type() == 'torch.cuda.FloatTensor'``. Only the
    query is changed: ``t.type(dtype)`` conversions go to the original.
    """

    def type_(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any) -> Any:
        if dtype is None and not kwargs:
            name = original(self)
            return _CUDA_TYPE_NAMES.get(name, name) if self.device.type == "cpu" else name
        return original(self, dtype, non_blocking, **kwargs)

    return type_


class _GroupedGemmOps:
    """The ``grouped_gemm.ops`` namespace megatron's GroupedMLP calls."""

    gmm = staticmethod(_grouped_mm)


class _GroupedGemmPackage:
    """A stand-in for the ``grouped_gemm`` package (CUDA-only) on the CPU."""

    ops = _GroupedGemmOps


def allow_fp32_grouped_mlp(model: torch.nn.Module) -> int:
    """Let megatron's legacy ``GroupedMLP`` modules of ``model`` run in fp32; returns how many.

    ``GroupedMLP.forward`` asserts ``config.bf16`` because the CUDA grouped_gemm kernels are bf16-only
    (the product refuses fp32 grouped GEMM for that reason). The CPU stand-in computes in any dtype,
    so the fp32 reference tests give each GroupedMLP its own config copy with ``bf16=True``; the
    flag is read nowhere else in that module, and the rest of the model keeps fp32 semantics.
    """
    import copy

    from megatron.core.transformer.moe.experts import GroupedMLP

    count = 0
    for module in model.modules():
        if isinstance(module, GroupedMLP):
            module.config = copy.copy(module.config)
            module.config.bf16 = True
            count += 1
    return count


class CpuMegatron:
    """Installs the CPU patches on construction; :meth:`restore` undoes every one of them."""

    def __init__(self) -> None:
        self._saved: list[tuple[Any, str, Any, bool]] = []
        self._mode: _CudaToCpu | None = None
        self._install()

    def _set(self, owner: Any, name: str, value: Any) -> None:
        had = name in vars(owner)  # an inherited method (Tensor.type) is restored by deleting the patch
        self._saved.append((owner, name, getattr(owner, name, None), had))
        setattr(owner, name, value)

    def _install(self) -> None:
        import megatron.core.tensor_parallel.random as mc_random
        import megatron.core.transformer.moe.moe_utils as moe_utils
        import megatron.core.transformer.moe.token_dispatcher as token_dispatcher

        cuda = torch.cuda
        stream = _NoopStream()
        cpu_rng_get: Callable[..., torch.Tensor] = lambda *a, **k: torch.get_rng_state()  # noqa: E731
        cpu_rng_set: Callable[..., None] = lambda state, *a, **k: torch.set_rng_state(state)  # noqa: E731
        for name, value in {
            "Stream": _NoopStream,
            "Event": _NoopEvent,
            "current_stream": lambda *a, **k: stream,
            "default_stream": lambda *a, **k: stream,
            "stream": lambda s=None: contextlib.nullcontext(),
            "current_device": lambda: torch.device("cpu"),
            "synchronize": lambda *a, **k: None,
            "set_device": lambda *a, **k: None,
            "device_count": lambda: 0,
            "get_rng_state": cpu_rng_get,
            "set_rng_state": cpu_rng_set,
            "manual_seed": lambda seed: torch.default_generator.manual_seed(int(seed)),
            "manual_seed_all": lambda seed: None,
        }.items():
            self._set(cuda, name, value)
        self._set(mc_random, "_get_cuda_rng_state", cpu_rng_get)
        self._set(mc_random, "_set_cuda_rng_state", cpu_rng_set)
        if getattr(moe_utils, "te_general_gemm", None) is None:
            self._set(moe_utils, "te_general_gemm", None)

        original_move = moe_utils.maybe_move_tensor_to_cpu

        def move_to_cpu(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
            if torch.is_tensor(tensor) and not tensor.is_cuda:
                return tensor.numpy() if as_numpy else tensor
            return original_move(tensor, as_numpy=as_numpy, record_stream=record_stream)

        self._set(moe_utils, "maybe_move_tensor_to_cpu", move_to_cpu)
        self._set(token_dispatcher, "maybe_move_tensor_to_cpu", move_to_cpu)
        import megatron.core.transformer.moe.grouped_gemm_util as grouped_gemm_util

        if not grouped_gemm_util.grouped_gemm_is_available():
            self._set(grouped_gemm_util, "grouped_gemm", _GroupedGemmPackage)
            self._set(grouped_gemm_util, "ops", _GroupedGemmOps)
        import torch.distributed as dist

        self._set(dist, "all_gather", _uneven_all_gather(dist.all_gather))
        self._set(torch.Tensor, "cuda", lambda self, *a, **k: self)
        self._set(torch.Tensor, "type", _type_names_cuda(torch.Tensor.type))
        import queue

        import megatron.core.dist_checkpointing.strategies.filesystem_async as filesystem_async

        # dist_checkpointing's synchronous save passes its write results to the caller through a
        # multiprocessing Manager queue, whose server process imports torch on the first save (2-4 s
        # per process on 2 cores). The save runs in the calling process: an in-process queue will do.
        self._set(filesystem_async, "_results_queue", queue.Queue())
        self._mode = _CudaToCpu()
        self._mode.__enter__()

    def restore(self) -> None:
        """Leave the device mode and put back every attribute that was replaced, newest first."""
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
        for owner, name, value, had in reversed(self._saved):
            if had:
                setattr(owner, name, value)
            else:
                delattr(owner, name)
        self._saved.clear()


def free_port() -> int:
    """A TCP port that is free right now on localhost."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def megatron_on_cpu(
    rank: int = 0,
    world_size: int = 1,
    port: int | None = None,
    expert_parallel: int = 1,
    seed: int = 1234,
    tensor_parallel: int = 1,
    expert_tensor_parallel: int = 1,
) -> Iterator[None]:
    """Patch megatron-core for CPU, start gloo and megatron's model parallel state; undo it all on exit.

    ``expert_tensor_parallel`` defaults to 1 like :func:`transformer_config_from_hf` (megatron's own
    default would be the TP size).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    shim = CpuMegatron()
    started_pg = False
    try:
        if not dist.is_initialized():
            dist.init_process_group(
                "gloo",
                init_method=f"tcp://127.0.0.1:{port or free_port()}",
                rank=rank,
                world_size=world_size,
            )
            started_pg = True
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_parallel,
            expert_model_parallel_size=expert_parallel,
            expert_tensor_parallel_size=expert_tensor_parallel,
        )
        model_parallel_cuda_manual_seed(seed)
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if started_pg:
            dist.destroy_process_group()
        shim.restore()
