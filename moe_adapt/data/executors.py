"""The data stage's executor stages on datatrove's executors: local processes, SLURM array jobs or Ray.

:func:`make_executor` builds one executor stage (a pipeline of steps run in ``tasks`` tasks, after
``depends``) for ``data.executor``; every stage keeps datatrove's completion markers in its logging
folder (``completions/<rank>``), so a re-run after a crash runs only the tasks that did not finish.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datatrove.executor.slurm import SlurmPipelineExecutor

from moe_adapt.data.config import DataConfig
from moe_adapt.errors import MoEAdaptConfigError


class SlurmExecutor(SlurmPipelineExecutor):  # type: ignore[misc]
    """datatrove's ``SlurmPipelineExecutor`` submitting one array job per executor stage and nothing else.

    datatrove also queues, after each stage, a job merging that stage's stats into
    ``logs/<stage>/stats.json``. The data stage sums its own per-task counts (``stats/<step>/<rank>.json``),
    so those jobs only doubled the jobs; worse, the one after the last stage was still queued when the
    stage had finished and removed its scratch folder, and failed (seen on a real SLURM:
    ``JobState=FAILED``, its output folder gone).
    """

    def launch_merge_stats(self) -> None:
        return None


def make_executor(
    dcfg: DataConfig,
    name: str,
    pipeline: list[Any],
    tasks: int,
    logs: Path,
    depends: Any = None,
    *,
    slurm_logs: Path | None = None,
) -> Any:
    """One executor stage ``name`` of ``pipeline`` in ``tasks`` tasks, logging under ``logs``."""
    if dcfg.executor == "local":
        from moe_adapt.data.dedup import _QuietExecutor

        workers = tasks if dcfg.workers == -1 else min(dcfg.workers, tasks)
        return _QuietExecutor(
            pipeline,
            tasks=tasks,
            workers=workers,
            logging_dir=str(logs),
            depends=depends,
            skip_completed=True,
            start_method="fork",
        )
    if dcfg.executor == "slurm":
        s = dcfg.slurm
        return SlurmExecutor(
            pipeline,
            tasks=tasks,
            time=s.time,
            partition=s.partition,
            cpus_per_task=s.cpus_per_task,
            mem_per_cpu_gb=s.mem_per_cpu_gb,
            qos=s.qos,
            env_command=s.env_command,
            job_name=f"{s.job_name}_{name}",
            logging_dir=str(logs),
            slurm_logs_folder=str(s.logs_folder or slurm_logs or logs / "slurm_logs"),
            depends=depends,
            skip_completed=True,
            workers=-1,  # as many of an array's tasks at once as SLURM allows
        )
    try:
        import ray  # noqa: F401
        from datatrove.executor.ray import RayPipelineExecutor
    except ImportError:
        raise MoEAdaptConfigError(
            "data.executor=ray needs ray: pip install 'moe-adapt[ray]' (or choose local or slurm)"
        ) from None
    return RayPipelineExecutor(
        pipeline,
        tasks=tasks,
        workers=dcfg.workers,
        depends=depends,
        logging_dir=str(logs),
        cpus_per_task=dcfg.ray.cpus_per_task,
        mem_per_cpu_gb=dcfg.ray.mem_per_cpu_gb,
        skip_completed=True,
    )


def start_cluster(dcfg: DataConfig) -> None:
    """Connect to the Ray cluster of ``data.ray.address`` (or start a local one) when
    ``data.executor=ray`` and none is connected yet; nothing for the other executors."""
    if dcfg.executor != "ray":
        return
    try:
        import ray
    except ImportError:
        raise MoEAdaptConfigError(
            "data.executor=ray needs ray: pip install 'moe-adapt[ray]' (or choose local or slurm)"
        ) from None
    if not ray.is_initialized():
        ray.init(address=dcfg.ray.address, include_dashboard=False, log_to_driver=False)
