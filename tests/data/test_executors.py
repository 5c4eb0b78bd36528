"""The data stage on datatrove's executors: the same bytes for any number of tasks and workers, a
killed or failed run resumed task by task, and the SLURM submission of the executor stages."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from moe_adapt.data import dtsteps
from moe_adapt.errors import MoEAdaptError
from tests.data.conftest import make_cfg, run

REPO = Path(__file__).resolve().parents[2]
OUTPUTS = ("shards", "heldout", "benchmarks", "contamination.json")


def output_bytes(stage_dir: Path) -> dict[str, bytes]:
    """Every file of the stage's outputs that the later stages read, by relative path."""
    files: dict[str, bytes] = {}
    for name in OUTPUTS:
        path = stage_dir / name
        for f in sorted([path] if path.is_file() else path.rglob("*")):
            if f.is_file() and f.name != "_COMPLETE.json":
                files[str(f.relative_to(stage_dir))] = f.read_bytes()
    return files


@pytest.fixture(scope="module")
def one_task(corpus, tiny_tokenizer, tmp_path_factory) -> dict[str, bytes]:
    run_dir = tmp_path_factory.mktemp("one_task")
    run(make_cfg(corpus, tiny_tokenizer, run_dir))
    return output_bytes(run_dir / "data")


def test_output_is_the_same_bytes_for_any_number_of_tasks_and_workers(
    corpus, tiny_tokenizer, tmp_path, one_task
):
    summary = run(make_cfg(corpus, tiny_tokenizer, tmp_path, tasks=4, workers=2))
    assert summary["train_documents"] > 0
    assert output_bytes(tmp_path / "data") == one_task
    assert any(k.endswith(".bin") for k in one_task)
    stats = json.loads((tmp_path / "data" / "stats.json").read_text())
    assert stats["executor"] == {"kind": "local", "tasks": 4, "workers": 2}
    # per-task shards were concatenated: one shard per (source, language, bucket), as with one task
    manifest = json.loads((tmp_path / "data" / "shards" / "manifest.json").read_text())
    assert len({(s["source"], s["lang"], s["bucket"]) for s in manifest["shards"]}) == len(manifest["shards"])


def test_a_failed_task_names_its_log_and_a_rerun_runs_only_unfinished_tasks(
    corpus, tiny_tokenizer, tmp_path, monkeypatch, one_task
):
    cfg = make_cfg(corpus, tiny_tokenizer, tmp_path, tasks=3)
    real_start = dtsteps.ScoreStep.start
    started: list[tuple[str, int]] = []

    def failing(self, rank, world_size):
        if rank == 1:
            raise RuntimeError("disk on fire")
        return real_start(self, rank, world_size)

    monkeypatch.setattr(dtsteps.ScoreStep, "start", failing)
    with pytest.raises(MoEAdaptError, match=r"task 1 of executor stage 6_score failed .*task_00001\.log"):
        run(cfg)
    assert not (tmp_path / "data").exists()
    logs = tmp_path / ".work" / "data" / "dt" / "logs"
    assert sorted(p.name for p in (logs / "6_score" / "completions").iterdir()) == ["00000"]
    assert len(list((logs / "1_filter" / "completions").iterdir())) == 3

    def recording(name):
        real = real_start if name == "ScoreStep" else getattr(dtsteps, name).start

        def start(self, rank, world_size):
            started.append((name, rank))
            return real(self, rank, world_size)

        return start

    monkeypatch.setattr(dtsteps.ScoreStep, "start", recording("ScoreStep"))
    monkeypatch.setattr(dtsteps.CleanStep, "start", recording("CleanStep"))
    run(cfg)
    assert started == [("ScoreStep", 1), ("ScoreStep", 2)]  # the filter stage was not redone
    assert output_bytes(tmp_path / "data") == one_task


_KILLER = """
import os, pickle, signal, sys
sys.path.insert(0, {repo!r})
from omegaconf import OmegaConf
from moe_adapt.data import dtsteps
from moe_adapt.runner import run_pipeline

real, real_start = dtsteps.DecontamMatchStep.process, dtsteps.DecontamMatchStep.start
seen = []

def start(self, rank, world_size):
    self.killer_rank = rank
    return real_start(self, rank, world_size)

def process(self, doc, st):
    seen.append(self.killer_rank)
    if seen.count(1) == 20:  # inside the second of four tasks
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, doc, st)

dtsteps.DecontamMatchStep.start = start
dtsteps.DecontamMatchStep.process = process
cfg = pickle.load(open({cfg!r}, "rb"))
run_pipeline(cfg, OmegaConf.structured(cfg))
"""


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_kill_9_mid_task_then_rerun_gives_the_same_bytes(corpus, tiny_tokenizer, tmp_path, one_task):
    cfg = make_cfg(corpus, tiny_tokenizer, tmp_path / "run", tasks=4)
    (tmp_path / "cfg.pkl").write_bytes(pickle.dumps(cfg))
    script = tmp_path / "killed.py"
    script.write_text(_KILLER.format(repo=str(REPO), cfg=str(tmp_path / "cfg.pkl")))
    log = tmp_path / "killed.log"
    with open(log, "w") as out:  # not a pipe: datatrove's manager process outlives the kill
        proc = subprocess.Popen([sys.executable, str(script)], stdout=out, stderr=out, start_new_session=True)
        try:
            code = proc.wait(timeout=600)
        finally:
            os.killpg(proc.pid, signal.SIGKILL) if _group_alive(proc.pid) else None
    assert code == -9, log.read_text()[-2000:]
    assert not (tmp_path / "run" / "data").exists()
    done = tmp_path / "run" / ".work" / "data" / "dt" / "logs" / "6_score" / "completions"
    assert sorted(p.name for p in done.iterdir()) == ["00000"]
    run(cfg)
    assert output_bytes(tmp_path / "run" / "data") == one_task


def test_slurm_submits_one_array_job_per_executor_stage_each_after_the_last(
    corpus, tiny_tokenizer, tmp_path, monkeypatch
):
    import datatrove.executor.slurm as slurm

    from moe_adapt.data import executors, pipeline

    submitted: list[tuple[str, tuple[str, ...]]] = []

    def sbatch(contents, retriever, *args):
        submitted.append((contents, args))
        return str(1000 + len(submitted))

    monkeypatch.setattr(slurm, "launch_slurm_job", sbatch)
    from moe_adapt.data.config import SlurmConfig

    slurm_cfg = SlurmConfig(
        partition="cpu", qos="high", time="01:30:00", env_command="source /opt/venv/bin/activate"
    )
    cfg = make_cfg(corpus, tiny_tokenizer, tmp_path, tasks=3, executor="slurm", slurm=slurm_cfg)
    d = cfg.data
    root = tmp_path / "dt"
    bench = {b.name: b.path for b in d.decontam.benchmarks}
    stages = pipeline._executors(d, root, list(d.sources), bench, str(tiny_tokenizer), "<|endoftext|>")
    stages[-1][1].run()
    assert len(submitted) == 9  # one per executor stage: no datatrove stats-merging jobs
    jobs = {}
    for contents, args in submitted:
        name = next(x.split("=", 1)[1] for x in contents.splitlines() if x.startswith("#SBATCH --job-name="))
        jobs[name] = (contents, args)
    expected = {
        "1_filter": 3,
        "2_buckets": d.dedup.num_buckets,
        "3_duplicates": 1,
        "4_dedup": 3,
        "5_common": 1,
        "6_score": 3,
        "7_quantiles": 1,
        "8_shards": 3,
        "9_merge": 1,
    }
    previous = None
    for stage, tasks in expected.items():
        contents, args = jobs[f"moe_adapt_data_{stage}"]
        assert f"#SBATCH --array=0-{tasks - 1}\n" in contents
        for line in (
            "--partition=cpu",
            "--qos=high",
            "--time=01:30:00",
            "--cpus-per-task=1",
            "--mem-per-cpu=2G",
        ):
            assert f"#SBATCH {line}\n" in contents
        assert "source /opt/venv/bin/activate" in contents
        assert f"launch_pickled_pipeline {root / 'logs' / stage / 'executor.pik'}" in contents
        job_id = str(1001 + [c for c, _ in submitted].index(contents))
        if previous is None:
            assert not any(a.startswith("--dependency") for a in args)
        else:
            assert f"--dependency=afterok:{previous}" in args
        previous = job_id
        assert (root / "logs" / stage / "launch_script.slurm").read_text() == contents
    # SLURM lost every job while tasks were unfinished: the wait fails naming the first one's log
    cancelled: list[list[str]] = []
    monkeypatch.setattr(executors, "cancel_jobs", cancelled.append)
    monkeypatch.setattr(executors, "_queued", lambda ids: set())
    with pytest.raises(
        MoEAdaptError, match=r"SLURM ran executor stage 1_filter but task 0 did not finish.*task_00000"
    ):
        executors.wait_for_slurm(d, stages, root)
    # the first stage's job left the queue unfinished while the later ones wait on it: they are
    # cancelled (SLURM would keep them pending forever, DependencyNeverSatisfied) and the stage fails
    monkeypatch.setattr(executors, "_queued", lambda ids: {i for i in ids if i != "1001"})
    with pytest.raises(MoEAdaptError, match=r"1_filter but task 0 .*cancelled the later stages' jobs 10"):
        executors.wait_for_slurm(d, stages, root)
    assert cancelled[-1] == [str(1002 + i) for i in range(8)]
    # squeue not answering is waited out, then all jobs gone with every task complete: done
    answers = iter([None, {"1009"}, set()])
    monkeypatch.setattr(executors, "_queued", lambda ids: next(answers))
    monkeypatch.setattr(executors.time, "sleep", lambda s: None)
    for _, ex in stages:
        monkeypatch.setattr(ex, "get_incomplete_ranks", lambda: [])
    executors.wait_for_slurm(d, stages, root)
    assert next(answers, "all asked") == "all asked"


@pytest.mark.slow
def test_a_ray_local_cluster_gives_the_same_bytes(corpus, tiny_tokenizer, tmp_path, one_task):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        run(make_cfg(corpus, tiny_tokenizer, tmp_path, tasks=3, executor="ray"))
    finally:
        ray.shutdown()
    assert output_bytes(tmp_path / "data") == one_task


def test_sbatch_refusing_a_stage_fails_naming_it_and_cancels_the_jobs_before(
    corpus, tiny_tokenizer, tmp_path, monkeypatch
):
    import datatrove.executor.slurm as slurm

    from moe_adapt.data import executors, pipeline
    from moe_adapt.data.config import SlurmConfig

    submitted: list[str] = []

    def sbatch(contents, retriever, *args):
        if len(submitted) == 2:  # the third stage: sbatch exits 1 (e.g. over the partition's limits)
            raise subprocess.CalledProcessError(1, ["sbatch"])
        submitted.append(str(1001 + len(submitted)))
        return submitted[-1]

    cancelled: list[list[str]] = []
    monkeypatch.setattr(slurm, "launch_slurm_job", sbatch)
    monkeypatch.setattr(executors, "cancel_jobs", cancelled.append)
    cfg = make_cfg(
        corpus, tiny_tokenizer, tmp_path, tasks=2, executor="slurm", slurm=SlurmConfig(partition="cpu")
    )
    d = cfg.data
    bench = {b.name: b.path for b in d.decontam.benchmarks}
    stages = pipeline._executors(d, tmp_path / "dt", list(d.sources), bench, str(tiny_tokenizer), None)
    with pytest.raises(
        MoEAdaptError, match=r"submitting executor stage 3_duplicates to SLURM failed .*1001,1002"
    ):
        pipeline._run_executors(d, stages, tmp_path / "dt")
    assert cancelled == [["1001", "1002"]]
