"""``hydra/launcher=torchrun``: run each job of a Hydra sweep as its own torchrun process group.

Hydra's basic launcher runs every job of a multirun inside the one process that parsed the command
line, so a sweep cannot train on several processes: under an outer torchrun each process would
run the whole sweep, starting and ending its process group once per job. This launcher keeps the
sweep in one plain process and starts, for each job in turn,

    python -m torch.distributed.run --standalone --nproc-per-node=N -m moe_adapt OVERRIDES \\
        hydra.run.dir=<sweep dir>/<subdir>

with ``N = hydra.launcher.nproc_per_node``. Each job's output folder is the one Hydra gives the job
of a multirun (``hydra.sweep.dir``/``hydra.sweep.subdir``, ``hydra.job.num`` = its number), with
the usual ``.hydra/overrides.yaml`` (the job's overrides only), so the ``report`` stage reads the
sweep as it reads an in-process one. A job that fails is a failed ``JobReturn`` and the next job
still runs; Hydra's sweeper then raises the first failure. The jobs return no value (the task
function's value stays in the child processes): a sweeper that optimises a returned value (Optuna,
Nevergrad) needs the basic launcher.
"""

import copy
import logging
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from moe_adapt.distributed import multirun_refusal
from moe_adapt.errors import MoEAdaptConfigError, MoEAdaptError

log = logging.getLogger(__name__)

USERS_FULL_ERROR = "MOE_ADAPT_USERS_HYDRA_FULL_ERROR"
"""Set by ``moe_adapt``'s entry point (``moe_adapt/__main__.py``, same name) while it holds
``HYDRA_FULL_ERROR=1`` for composing: the user's own value ("" = unset), which the jobs get back."""

_SWEEP_ONLY = re.compile(r"^[+~]*(hydra/launcher|hydra/sweeper|hydra\.launcher|hydra\.sweeper|hydra\.sweep\b|"
                         r"hydra\.mode|hydra\.run\.dir)")  # fmt: skip
"""Hydra overrides of the sweep itself, not passed on to a job (each job is one run)."""


@dataclass
class TorchrunLauncherConf:
    """``hydra/launcher=torchrun``: the settings under ``hydra.launcher``."""

    _target_: str = "hydra_plugins.moe_adapt_launchers.torchrun_launcher.TorchrunLauncher"

    nproc_per_node: int = 1
    """Processes per job (``torchrun --nproc-per-node``): one per GPU, or CPU processes over gloo."""

    module: str = "moe_adapt"
    """The module every process of a job runs (``torchrun -m MODULE OVERRIDES``)."""

    torchrun_args: list[str] = field(default_factory=list)
    """More torchrun options before ``-m``, e.g. ``[--local-ranks-filter=0]``."""

    python: str | None = None
    """The interpreter that runs torchrun; null = the one running the sweep."""


ConfigStore.instance().store(
    group="hydra/launcher", name="torchrun", node=TorchrunLauncherConf, provider="moe_adapt"
)


def _quote(value: str) -> str:
    """``value`` as a Hydra override value (quoted when it holds more than path characters)."""
    if re.fullmatch(r"[\w./\-]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class TorchrunLauncher(Launcher):
    """Runs the jobs of a sweep one after another, each as ``torchrun --nproc-per-node=N``."""

    def __init__(
        self,
        nproc_per_node: int = 1,
        module: str = "moe_adapt",
        torchrun_args: Sequence[str] = (),
        python: str | None = None,
    ) -> None:
        if not isinstance(nproc_per_node, int) or nproc_per_node < 1:
            raise MoEAdaptConfigError(
                f"hydra.launcher.nproc_per_node={nproc_per_node!r} is invalid: processes per job, >= 1"
            )
        self.nproc_per_node = nproc_per_node
        self.module = module
        self.torchrun_args = [str(a) for a in torchrun_args]
        self.python = python or sys.executable
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context

    def command(self, overrides: Sequence[str], job_dir: str) -> list[str]:
        """The command line of one job."""
        assert self.config is not None
        passed_on = [o for o in self.config.hydra.overrides.hydra if not _SWEEP_ONLY.match(o)]
        return [
            self.python, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={self.nproc_per_node}", *self.torchrun_args,
            "-m", self.module, *overrides, *passed_on, f"hydra.run.dir={_quote(job_dir)}",
        ]  # fmt: skip

    def job_env(self) -> dict[str, str]:
        """This process's environment, with the user's own ``HYDRA_FULL_ERROR``."""
        env = dict(os.environ)
        if USERS_FULL_ERROR in env:
            users = env.pop(USERS_FULL_ERROR)
            if users:
                env["HYDRA_FULL_ERROR"] = users
            else:
                env.pop("HYDRA_FULL_ERROR", None)
        return env

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None
        line = multirun_refusal(os.environ)
        if line is not None:
            raise MoEAdaptError(line)
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info(
            f"Launching {len(job_overrides)} jobs, each as torchrun --nproc-per-node={self.nproc_per_node}"
        )
        runs: list[JobReturn] = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = idx
                sweep_config.hydra.job.num = idx
            HydraConfig.instance().set_config(sweep_config)
            job_dir = str(Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir))
            cmd = self.command(overrides, job_dir)
            code = subprocess.run(cmd, env=self.job_env(), check=False).returncode
            runs.append(self._job_return(sweep_config, list(overrides), job_dir, idx, code))
        return runs

    @staticmethod
    def _job_return(
        sweep_config: DictConfig, overrides: list[str], job_dir: str, idx: int, code: int
    ) -> JobReturn:
        ret = JobReturn()
        ret.overrides = overrides
        task_cfg = copy.deepcopy(sweep_config)
        with open_dict(task_cfg):
            del task_cfg["hydra"]
        ret.cfg = task_cfg
        ret.hydra_cfg = OmegaConf.masked_copy(sweep_config, "hydra")
        ret.working_dir = os.getcwd()
        ret.task_name = str(sweep_config.hydra.job.name)
        if code == 0:
            ret.status, ret.return_value = JobStatus.COMPLETED, None
        else:
            how = f"signal {-code}" if code < 0 else f"status {code}"
            ret.status = JobStatus.FAILED
            ret.return_value = MoEAdaptError(
                f"sweep job {idx} ({' '.join(filter_overrides(overrides))}) failed: torchrun ended with "
                f"{how}; its output folder is {job_dir}"
            )
        return ret
