"""The data stage's executor stages on datatrove's executors: local processes, SLURM array jobs or Ray.

:func:`make_executor` builds one executor stage (a pipeline of steps run in ``tasks`` tasks, after
``depends``) for ``data.executor``; every stage keeps datatrove's completion markers in its logging
folder (``completions/<rank>``), so a re-run after a crash runs only the tasks that did not finish.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from datatrove.executor.slurm import SlurmPipelineExecutor

from moe_adapt.data.config import DataConfig
from moe_adapt.errors import MoEAdaptConfigError, MoEAdaptError

log = logging.getLogger(__name__)


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


def _queued(job_ids: list[str]) -> set[str] | None:
    """The ids among ``job_ids`` that SLURM still has pending or running (``squeue --me``), or None
    when squeue fails (the controller not answering)."""
    import subprocess

    try:
        out = subprocess.run(
            ["squeue", "-h", "--me", "-o", "%F"], capture_output=True, text=True, check=False, timeout=60
        )
    except subprocess.TimeoutExpired:
        return None
    if out.returncode != 0:
        log.warning("data: squeue failed (%s); asking again", out.stderr.strip().splitlines()[-1:])
        return None
    return {line.strip() for line in out.stdout.splitlines() if line.strip()} & set(job_ids)


def cancel_jobs(job_ids: list[str]) -> None:
    """``scancel`` the run's jobs still queued (a failed stage's dependants would wait forever:
    SLURM leaves them pending with reason ``DependencyNeverSatisfied``)."""
    import subprocess

    if job_ids:
        subprocess.run(["scancel", *job_ids], capture_output=True, check=False, timeout=60)


_SQUEUE_PATIENCE_S = 600.0  # how long squeue may keep failing before the wait gives up


def wait_for_slurm(dcfg: DataConfig, stages: list[tuple[str, Any]], root: Path) -> None:
    """Wait until every executor stage's SLURM job has left the queue with its tasks complete.

    A stage whose job has left the queue with a task unfinished failed: its dependants would stay
    pending forever (``DependencyNeverSatisfied``), so they are cancelled and the stage fails naming
    that task's log. squeue is asked before the completion markers are read, so a job seen gone has
    written every marker it will write."""
    ids = {name: str(ex.job_id) for name, ex in stages if ex.job_id not in (None, -1)}
    failing_since: float | None = None
    while True:
        queued = _queued(list(ids.values()))
        if queued is None:
            failing_since = failing_since or time.monotonic()
            if time.monotonic() - failing_since > _SQUEUE_PATIENCE_S:
                raise MoEAdaptError(
                    f"data: squeue has failed for {_SQUEUE_PATIENCE_S:.0f} s while waiting for the SLURM "
                    f"jobs {','.join(ids.values())}; re-run once SLURM answers (finished tasks are kept)"
                )
            time.sleep(dcfg.slurm.poll_seconds)
            continue
        failing_since = None
        for stage_name, ex in stages:
            if ids.get(stage_name) in queued:
                continue
            if left := ex.get_incomplete_ranks():
                still = sorted(queued, key=int)
                cancel_jobs(still)
                raise MoEAdaptError(
                    f"data: SLURM ran executor stage {stage_name} but task {left[0]} did not finish; its "
                    f"log: {root / 'logs' / stage_name / 'logs' / f'task_{left[0]:05d}.log'} (SLURM's "
                    f"output: {dcfg.slurm.logs_folder or root / 'slurm_logs'}); "
                    + (f"cancelled the later stages' jobs {','.join(still)}" if still else "none left queued")
                )
        if not queued:
            return
        name = next(n for n, _ in stages if ids.get(n) in queued)
        log.info("data: waiting for SLURM: executor stage %s and %d later job(s)", name, len(queued) - 1)
        time.sleep(dcfg.slurm.poll_seconds)
