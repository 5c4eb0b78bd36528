"""Several processes under torchrun: who this process is, the process group, and the few collectives
training needs.

torchrun (alone, or under SLURM's srun: ``launch/``) starts one process per device and tells each
who it is through its environment: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT``. :func:`context_from_env` reads them into a :class:`DistContext`;
:func:`init` also starts the process group, once per process: nccl with CUDA (process ``LOCAL_RANK``
of a node drives ``cuda:LOCAL_RANK``), gloo on CPU. Without those variables (or with
``WORLD_SIZE=1``) there is one process, no group is started and every code path is the
single-process one.

SLURM tasks started by ``srun`` without torchrun (the ``submitit_slurm`` sweep launcher: one task per
GPU) join one process group too: when ``RANK`` and ``WORLD_SIZE`` are absent, ``SLURM_PROCID``,
``SLURM_NTASKS``, ``SLURM_LOCALID`` and ``SLURM_NTASKS_PER_NODE`` stand in for ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` (:func:`torchrun_env_from_slurm`), provided
the job exported ``MASTER_ADDR`` (the first node) and ``MASTER_PORT``, as
``conf/hydra/launcher/submitit_slurm.yaml``'s ``setup`` lines do. Without ``MASTER_ADDR`` a SLURM
task stays one process (a warning says so when ``SLURM_NTASKS`` > 1).

The rules every several-process component follows:

- every rank runs the same training code in lockstep and takes every decision (skip a step, stop,
  resume from a checkpoint, skip a complete stage) from values that are identical on all ranks:
  all-reduced metrics, or what rank 0 decided and broadcast (:func:`run_on_main`);
- only rank 0 (:attr:`DistContext.is_main`) writes files; the other ranks wait at a
  :func:`barrier` wherever rank 0 renames something they will read next.

Besides the default group, :func:`init` makes a gloo group with a long timeout (:data:`WAIT_TIMEOUT`)
for waiting: the other ranks wait there while rank 0 alone runs a stage that is not distributed
(data, upcycle, eval ...), which may take longer than the default group's timeout.

Shape legend: ``L`` MoE layers, ``T`` tokens routed by one rank, ``E`` experts, ``K`` top-k.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist

from moe_adapt.errors import MoEAdaptError

log = logging.getLogger(__name__)

T = TypeVar("T")
WAIT_TIMEOUT = timedelta(days=2)
"""How long ranks wait for rank 0 to finish a stage it runs alone."""
_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_HELP = "start the run with torchrun (launch/README.md), or unset these variables for one process"


@dataclass(frozen=True)
class DistContext:
    """Where this process stands among the processes of one training run."""

    rank: int = 0
    """Global rank in [0, world_size)."""

    world_size: int = 1
    """Number of processes (one per device)."""

    local_rank: int = 0
    """Rank among the processes of this node; picks the GPU (cuda:local_rank)."""

    local_world_size: int = 1
    """Processes on this node."""

    backend: str = "none"
    """nccl (CUDA), gloo (CPU) or none (one process: no process group)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """The device this process trains on."""

    group: Any = None
    """The process group of these ranks for this module's collectives (``rank`` and ``world_size``
    are within it); None: the default group of all processes. The megatron engine uses one for its
    data-parallel ranks when tensor parallel makes them fewer than the processes."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """True when several processes train together."""
        return self.world_size > 1


SINGLE = DistContext()
"""One process, on the CPU."""

_context: DistContext | None = None  # what init() set up
_started = False  # whether init() started the process group (and so shutdown() ends it)
_wait_group: Any = None  # the long-timeout gloo group
_override: list[DistContext] = []  # local_only() nesting


def _fail(message: str) -> NoReturn:
    raise MoEAdaptError(f"torchrun environment: {message}; {_HELP}")


def _int(env: Mapping[str, str], key: str) -> int:
    raw = env[key]
    try:
        return int(raw)
    except ValueError:
        _fail(f"{key}={raw!r} is not an integer")


def torchrun_env_from_slurm(env: Mapping[str, str]) -> dict[str, str] | None:
    """torchrun's variables as a SLURM task's environment gives them, or None when ``env`` is not a
    SLURM task of a several-task job with ``MASTER_ADDR`` exported (or torchrun's variables are set).

    ``SLURM_PROCID`` -> ``RANK``, ``SLURM_NTASKS`` -> ``WORLD_SIZE``, ``SLURM_LOCALID`` ->
    ``LOCAL_RANK``, ``SLURM_NTASKS_PER_NODE`` (or ``SLURM_NTASKS / SLURM_JOB_NUM_NODES``) ->
    ``LOCAL_WORLD_SIZE``; ``MASTER_ADDR`` and ``MASTER_PORT`` are taken as they are.
    """
    if any(env.get(k, "") != "" for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return None
    procid, ntasks = env.get("SLURM_PROCID", ""), env.get("SLURM_NTASKS", "")
    if procid == "" or ntasks == "":
        return None
    if env.get("MASTER_ADDR", "") == "":
        if ntasks.isdigit() and int(ntasks) > 1:
            log.warning(
                "SLURM_NTASKS=%s but MASTER_ADDR is not set: this task runs as one process; export "
                "MASTER_ADDR and MASTER_PORT in the job (launch/README.md, SLURM sweeps) to train together",
                ntasks,
            )
        return None
    mapped = {"RANK": procid, "WORLD_SIZE": ntasks, "MASTER_ADDR": env["MASTER_ADDR"]}
    for key, slurm_key in (("LOCAL_RANK", "SLURM_LOCALID"), ("MASTER_PORT", "MASTER_PORT")):
        if env.get(slurm_key, "") != "":
            mapped[key] = env[slurm_key]
    per_node, nodes = env.get("SLURM_NTASKS_PER_NODE", ""), env.get("SLURM_JOB_NUM_NODES", "")
    if per_node.isdigit():  # "8"; heterogeneous jobs write "8(x2),4": fall back on tasks / nodes
        mapped["LOCAL_WORLD_SIZE"] = per_node
    elif nodes.isdigit() and ntasks.isdigit() and int(nodes) > 0:
        mapped["LOCAL_WORLD_SIZE"] = str(int(ntasks) // int(nodes))
    return mapped


def context_from_env(env: Mapping[str, str] | None = None, *, cuda: bool | None = None) -> DistContext:
    """The :class:`DistContext` torchrun's variables describe (``env`` defaults to ``os.environ``);
    without them, those of a SLURM task (:func:`torchrun_env_from_slurm`).

    ``cuda`` (default: whether CUDA is available) picks nccl and ``cuda:LOCAL_RANK`` over gloo and
    the CPU. Starts nothing.

    Raises:
        MoEAdaptError: the variables are inconsistent: only one of RANK and WORLD_SIZE, a value that
            is not an integer or is out of range, LOCAL_RANK or MASTER_ADDR/MASTER_PORT missing with
            several processes, or more local ranks than visible GPUs.
    """
    env = os.environ if env is None else env
    env = torchrun_env_from_slurm(env) or env
    cuda = torch.cuda.is_available() if cuda is None else cuda
    present = {k for k in _ENV_KEYS if env.get(k, "") != ""}
    if not present & {"RANK", "WORLD_SIZE"}:
        if "LOCAL_RANK" in present:
            _fail(f"LOCAL_RANK={env['LOCAL_RANK']!r} is set but RANK and WORLD_SIZE are not")
        return SINGLE
    for key, other in (("RANK", "WORLD_SIZE"), ("WORLD_SIZE", "RANK")):
        if key in present and other not in present:
            _fail(f"{key}={env[key]!r} is set but {other} is not")
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    if world < 1:
        _fail(f"WORLD_SIZE={world} must be >= 1")
    if not 0 <= rank < world:
        _fail(f"RANK={rank} must be in [0, WORLD_SIZE={world})")
    if world == 1:
        return SINGLE
    if "LOCAL_RANK" not in present:
        _fail(f"LOCAL_RANK is not set (RANK={rank}, WORLD_SIZE={world})")
    local_rank = _int(env, "LOCAL_RANK")
    local_world = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in present else world
    if not 1 <= local_world <= world:
        _fail(f"LOCAL_WORLD_SIZE={local_world} must be in [1, WORLD_SIZE={world}]")
    if not 0 <= local_rank < local_world:
        _fail(f"LOCAL_RANK={local_rank} must be in [0, LOCAL_WORLD_SIZE={local_world})")
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if key not in present:
            _fail(f"{key} is not set (needed to find rank 0 with WORLD_SIZE={world})")
    port = _int(env, "MASTER_PORT")
    if not 1 <= port <= 65535:
        _fail(f"MASTER_PORT={port} is not a TCP port")
    if cuda:
        visible = torch.cuda.device_count()
        if local_rank >= visible:
            _fail(
                f"LOCAL_RANK={local_rank} but this node shows {visible} CUDA device(s): start at most "
                f"{visible} processes per node (--nproc-per-node)"
            )
        return DistContext(rank, world, local_rank, local_world, "nccl", torch.device("cuda", local_rank))
    return DistContext(rank, world, local_rank, local_world, "gloo", torch.device("cpu"))


def init(env: Mapping[str, str] | None = None, *, cuda: bool | None = None) -> DistContext:
    """Read torchrun's environment and start the process group if there are several processes.

    Idempotent: a second call returns the first call's context. A process group that someone else
    started (e.g. the megatron engine) is used as it is, after checking that it matches the
    environment.
    """
    global _context, _started, _wait_group
    if _context is not None:
        return _context
    ctx = context_from_env(env, cuda=cuda)
    if not ctx.is_distributed:
        return ctx
    if dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (ctx.rank, ctx.world_size):
            raise MoEAdaptError(
                f"a process group is already running as rank {dist.get_rank()} of {dist.get_world_size()}, "
                f"but the environment says RANK={ctx.rank} of WORLD_SIZE={ctx.world_size}"
            )
    else:
        if ctx.device.type == "cuda":
            torch.cuda.set_device(ctx.device)
        dist.init_process_group(
            ctx.backend,
            init_method="env://",
            rank=ctx.rank,
            world_size=ctx.world_size,
            device_id=ctx.device if ctx.device.type == "cuda" else None,
        )
        _started = True
    _wait_group = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    _context = ctx
    log.info(
        "process %d of %d (local %d of %d) on %s, backend %s",
        ctx.rank, ctx.world_size, ctx.local_rank, ctx.local_world_size, ctx.device, ctx.backend,
    )  # fmt: skip
    return ctx


def shutdown() -> None:
    """End the process group if :func:`init` started it; forget the context."""
    global _context, _started, _wait_group
    if _started and dist.is_initialized():
        dist.destroy_process_group()
    _context, _started, _wait_group = None, False, None


@contextlib.contextmanager
def session(env: Mapping[str, str] | None = None) -> Iterator[DistContext]:
    """:func:`init` on entry; on exit, :func:`shutdown` if this call started the group."""
    first = _context is None
    ctx = init(env)
    # not in a `finally`: after an error other ranks may be inside a collective, and tearing the group
    # down could block; the process exits and torchrun stops the others
    yield ctx
    if first:
        shutdown()


def current() -> DistContext:
    """The context of this process: :func:`local_only`'s while inside it, else what :func:`init` set
    up, else (a group started elsewhere) one read from ``torch.distributed``, else :data:`SINGLE`."""
    if _override:
        return _override[-1]
    if _context is not None:
        return _context
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        backend = str(dist.get_backend())
        cuda = backend == "nccl"
        local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        world = dist.get_world_size()
        return DistContext(dist.get_rank(), world, local_rank, world, backend, device)
    return SINGLE


@contextlib.contextmanager
def local_only() -> Iterator[None]:
    """Inside, :func:`current` is :data:`SINGLE`: for work rank 0 does alone (engines built there
    train in one process and start no collective)."""
    _override.append(SINGLE)
    try:
        yield
    finally:
        _override.pop()


def multirun_refusal(env: Mapping[str, str] | None = None) -> str | None:
    """The one line that refuses a Hydra multirun (``-m``) in a torchrun process, or None outside one.

    Under torchrun every process would run the whole sweep in-process, starting and ending its
    process group once per job (rank 1 dies in gloo); a sweep runs outside torchrun, with
    ``hydra/launcher=torchrun`` starting one torchrun per job.
    """
    env = os.environ if env is None else env
    found = [f"{k}={env[k]}" for k in ("RANK", "WORLD_SIZE") if env.get(k, "") != ""]
    if not found:
        return None
    return (
        f"-m (a Hydra multirun) under torchrun ({', '.join(found)}) is refused: every process would run "
        "the whole sweep; run the sweep outside torchrun with hydra/launcher=torchrun "
        "hydra.launcher.nproc_per_node=N (launch/README.md, Sweeps)"
    )


# -- collectives ------------------------------------------------------------------------------------
def barrier(ctx: DistContext | None = None) -> None:
    """Wait until every rank gets here (long timeout: rank 0 may be writing a large checkpoint)."""
    ctx = ctx or current()
    if not ctx.is_distributed:
        return
    if _wait_group is None and ctx.backend == "nccl":
        dist.barrier(device_ids=[ctx.device.index])
    else:
        dist.barrier(group=_wait_group)


def all_reduce_sum(values: torch.Tensor, ctx: DistContext | None = None) -> torch.Tensor:
    """Sum ``values`` over ranks, in place (and returned); a no-op with one process."""
    ctx = ctx or current()
    if ctx.is_distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM, group=ctx.group)
    return values


def _wait_device(ctx: DistContext) -> torch.device:
    """Where tensors of the waiting group live: the CPU (gloo), or the device when there is no gloo
    group because someone else started the process group with nccl."""
    return torch.device("cpu") if _wait_group is not None or ctx.backend != "nccl" else ctx.device


def _broadcast_json(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` (JSON-able) on every rank; no pickling."""
    device = _wait_device(ctx)
    payload = json.dumps(obj).encode("utf-8") if ctx.is_main else b""
    size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    dist.broadcast(size, src=0, group=_wait_group)
    data = (
        torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
        if ctx.is_main
        else torch.empty(int(size), dtype=torch.uint8, device=device)
    )
    dist.broadcast(data, src=0, group=_wait_group)
    return json.loads(data.cpu().numpy().tobytes().decode("utf-8"))


def broadcast_from_main(obj: T, ctx: DistContext | None = None) -> T:
    """Rank 0's value of ``obj`` (JSON-able: None, numbers, strings, lists, dicts) on every rank."""
    ctx = ctx or current()
    if not ctx.is_distributed:
        return obj
    return _broadcast_json(obj, ctx)  # type: ignore[no-any-return]


class MainRankError(MoEAdaptError):
    """Raised on the other ranks when rank 0 failed in work it did alone."""


def run_on_main(fn: Callable[[], T], ctx: DistContext | None = None) -> T:
    """Rank 0 runs ``fn`` (inside :func:`local_only`) while the others wait; everyone gets its result.

    The result must be JSON-able. If ``fn`` raises on rank 0, the exception propagates there and the
    other ranks raise :class:`MainRankError` with its message, so no rank is left waiting. With one
    process this is just ``fn()``.
    """
    ctx = ctx or current()
    if not ctx.is_distributed:
        return fn()
    if ctx.is_main:
        try:
            with local_only():
                result = fn()
        except BaseException as err:
            _broadcast_json({"error": f"{type(err).__name__}: {err}"}, ctx)
            raise
        _broadcast_json({"result": result}, ctx)
        return result
    reply = _broadcast_json(None, ctx)
    if "error" in reply:
        raise MainRankError(f"rank 0 failed: {reply['error']}")
    return reply["result"]  # type: ignore[no-any-return]
