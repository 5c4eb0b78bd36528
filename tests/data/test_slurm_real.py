"""The data stage through a real SLURM (``data.executor=slurm``): the same bytes as the local executor,
and a task failing inside a SLURM job fails the stage naming it, with the queued jobs cancelled.

Needs a SLURM whose ``sinfo`` answers (``launch/slurm_single_node.sh start`` makes one on a Debian
box; export the ``SLURM_CONF`` it prints). Skipped otherwise, as in CI. The jobs run on the machine(s)
of the partition: on more than one node, ``pytest --basetemp`` must be a folder they all see.
``MOE_ADAPT_SLURM_PARTITION`` picks the partition (default: the cluster's default partition).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moe_adapt.data.config import SlurmConfig
from moe_adapt.errors import MoEAdaptError
from tests.data.conftest import make_cfg, run
from tests.data.test_executors import output_bytes

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _partition() -> str:
    """The partition to submit to, or skip with the reason SLURM cannot be used here."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        pytest.skip("no SLURM here (sinfo/sbatch not on PATH); launch/slurm_single_node.sh makes one")
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-o", "%P %a"], capture_output=True, text=True, timeout=20, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.skip("sinfo did not answer in 20 s (is slurmctld running?)")
    if out.returncode != 0 or not out.stdout.strip():
        reason = (out.stderr.strip().splitlines() or ["no partition"])[-1]
        pytest.skip(f"sinfo does not answer ({reason}); start SLURM, e.g. launch/slurm_single_node.sh start")
    up = [line.split()[0] for line in out.stdout.splitlines() if line.split()[1:] == ["up"]]
    if wanted := os.environ.get("MOE_ADAPT_SLURM_PARTITION"):
        return wanted
    default = [p.rstrip("*") for p in up if p.endswith("*")]
    if not default and not up:
        pytest.skip("SLURM has no partition that is up")
    return (default or up)[0].rstrip("*")


def _slurm(partition: str) -> SlurmConfig:
    """Jobs that import this checkout's moe_adapt with this interpreter, polled every second."""
    bindir = Path(sys.executable).parent
    env = f'export PATH="{bindir}:$PATH" PYTHONPATH="{REPO}:$PYTHONPATH"'  # no ${...}: OmegaConf's syntax
    return SlurmConfig(
        partition=partition, time="00:20:00", mem_per_cpu_gb=1, env_command=env, poll_seconds=1
    )


def _my_jobs() -> set[str]:
    out = subprocess.run(["squeue", "-h", "--me", "-o", "%F"], capture_output=True, text=True, check=True)
    return {x.strip() for x in out.stdout.splitlines() if x.strip()}


@pytest.fixture(scope="module")
def partition() -> str:
    return _partition()


def test_a_real_slurm_gives_the_same_bytes_as_the_local_executor(partition, corpus, tiny_tokenizer, tmp_path):
    local = run(make_cfg(corpus, tiny_tokenizer, tmp_path / "local", tasks=2))
    slurm = _slurm(partition)
    cfg = make_cfg(corpus, tiny_tokenizer, tmp_path / "slurm", tasks=2, executor="slurm", slurm=slurm)
    summary = run(cfg)
    assert summary["train_documents"] == local["train_documents"] > 0
    expected = output_bytes(tmp_path / "local" / "data")
    assert any(k.endswith(".bin") for k in expected)
    assert output_bytes(tmp_path / "slurm" / "data") == expected
    assert not (tmp_path / "slurm" / ".work").exists()  # nothing of the run left queued or on disk


def test_a_task_failing_in_a_slurm_job_fails_the_stage_and_cancels_the_rest(
    partition, corpus, tiny_tokenizer, tmp_path, monkeypatch
):
    from moe_adapt.data import executors

    tok = tmp_path / "tok"
    shutil.copytree(tiny_tokenizer, tok)
    cfg = make_cfg(corpus, tok, tmp_path / "run", tasks=2, executor="slurm", slurm=_slurm(partition))
    real_wait = executors.wait_for_slurm

    def wait(dcfg, stages, root):  # the jobs are queued: take away the tokenizer 6_score's tasks load
        shutil.rmtree(tok)
        return real_wait(dcfg, stages, root)

    monkeypatch.setattr(executors, "wait_for_slurm", wait)
    before = _my_jobs()
    with pytest.raises(MoEAdaptError, match=r"executor stage 6_score .*task_0000\d\.log") as err:
        run(cfg)
    assert "cancelled" in str(err.value)
    assert not (tmp_path / "run" / "data").exists()
    assert _my_jobs() <= before  # the later stages' jobs do not wait forever on a dependency
