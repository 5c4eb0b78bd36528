"""The command line: the demo runs, user errors are one line with exit status 2, --cfg job prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moe_adapt", *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env={**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})},
        timeout=900,
    )


# the demo's teacher and distillation phases, shortened: this test checks the plumbing, the demo's
# numbers are measured by `make demo` (docs/distill.md)
SHORT_DISTILL = [
    "teacher.train_per_lang=60",
    "teacher.test_per_lang=10",
    "teacher.train.steps=10",
    "teacher.train.warmup_steps=2",
    "distill.seq_kd.steps=6",
    "distill.seq_kd.warmup_steps=2",
    "distill.token_kd.steps=4",
    "distill.token_kd.warmup_steps=1",
    "distill.verify.checks=[duplicate]",  # a teacher trained for 10 steps gets nothing right
    "distill.eval.max_prompts=10",
]


def test_tiny_recipe_end_to_end(tmp_path):
    proc = cli("+recipe=tiny", f"run_dir={tmp_path}", *SHORT_DISTILL)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "upcycle" / "model" / "config.json").is_file()
    assert (tmp_path / "upcycle" / "model" / "tokenizer.json").is_file()
    assert (tmp_path / "upcycle" / "model" / "generation_config.json").is_file()
    assert "top-1 agreement 1.0000" in proc.stdout + proc.stderr
    distill = json.loads((tmp_path / "distill" / "summary.json").read_text())
    assert {"teacher", "student_before", "after_seq_kd", "after_token_kd"} <= set(distill["accuracy"])
    assert set(distill["accuracy"]["after_token_kd"]) == {"ar", "en", "gap"}
    assert {"student_before", "after_seq_kd", "after_token_kd"} <= set(distill["heldout"])
    assert distill["seq_kd"]["replay"]["batches"] >= 1 and set(distill["forgetting"]) == {"ar", "en"}
    assert distill["verify"]["kept"] + distill["verify"]["rejected"] == distill["generate"]["traces"]
    assert (tmp_path / "distill" / "model" / "config.json").is_file()
    for trained in ("init_dense", "cpt", "teacher", "distill/seq_kd", "distill/token_kd"):
        assert (tmp_path / trained / "curves.png").is_file(), trained
    assert list((tmp_path / "wandb").glob("offline-run-*"))  # the default logger mirrors offline


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["upcycle.top_k=abc"], "upcycle.top_k: Value 'abc' of type 'str' could not be converted to Integer"),
        (["upcycle.foo=1"], "upcycle.foo is not a setting; upcycle has: method, num_experts"),
        (["upcycle=nope"], "Could not find 'upcycle/nope'; available: copy, drop, fine_grained"),
        (
            ["+recipe=nope"],
            "Could not find 'recipe/nope'; available: acai, arabic_r1, hebatron, marco_moe, tiny",
        ),
        (["model.dense=/x", "upcycle.top_k=6"], "upcycle.top_k=6 is invalid: must be a multiple"),
        (["model.dense=/does/not/exist"], "model.dense=/does/not/exist does not exist"),
        ([], "model.dense is required by stage upcycle"),
        (["model.dense=/x", "seed=-1"], "seed=-1 is invalid: must be in [0, 2**32)"),
        (["model.dense=/x", "engine.betas=[1.5,0.9]"], "engine.betas=[1.5, 0.9] is invalid"),
    ],
)
def test_user_errors_are_one_line(tmp_path, args, needle):
    proc = cli(*args, f"run_dir={tmp_path}")
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert errors == [f"error: {errors[0].removeprefix('error: ')}"] and needle in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_run_name_that_leaves_runs_is_refused_before_hydra_makes_its_folder(tmp_path):
    """hydra.run.dir is runs/<run_name>, made before the app starts: run_name=.. would write .hydra/
    and the log beside runs/."""
    proc = cli("model.dense=/x", "run_name=..", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        "error: run_name='..' is invalid: must be a single file name: not empty, not '.' or '..', "
        "without '/', '\\' or NUL"
    )
    assert list(tmp_path.iterdir()) == []


def test_cfg_job_prints_the_resolved_config():
    proc = cli("--cfg", "job", "+recipe=tiny", "upcycle.granularity=2", "upcycle.num_experts=8")
    assert proc.returncode == 0, proc.stderr
    assert "granularity: 2" in proc.stdout and "stages:" in proc.stdout


def test_checkout_finds_recipes_from_another_directory(tmp_path):
    """From a checkout, +recipe=NAME composes whatever the working directory (recipes/ is found beside the
    package, not through the working directory)."""
    proc = cli("--cfg", "job", "+recipe=tiny", cwd=tmp_path, env={"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    assert "run_name: tiny" in proc.stdout


CRASH_PROGRAM = """
import os, sys
import moe_adapt.runner

def crash(cfg, raw):
    print("HYDRA_FULL_ERROR in the job:", os.environ.get("HYDRA_FULL_ERROR"), file=sys.stderr)
    raise RuntimeError("a bug")

moe_adapt.runner.run_pipeline = crash
sys.argv = ["moe-adapt", "model.dense=/x", f"run_dir={sys.argv[1]}", "hydra.output_subdir=null"]
from moe_adapt.__main__ import main
main()
"""


@pytest.mark.parametrize("full_error", [None, "1"])
def test_a_bug_in_the_job_keeps_hydras_report(tmp_path, full_error):
    """main() sets HYDRA_FULL_ERROR=1 only while Hydra composes: the job sees the user's value, and a bug
    in the pipeline is reported by Hydra as without the one-line errors (a trace, exit status 1)."""
    program = tmp_path / "crash.py"
    program.write_text(CRASH_PROGRAM)
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env |= {"PYTHONPATH": str(ROOT)} | ({"HYDRA_FULL_ERROR": full_error} if full_error else {})
    proc = subprocess.run(
        [sys.executable, str(program), str(tmp_path)], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 1, proc.stderr
    assert f"HYDRA_FULL_ERROR in the job: {full_error}" in proc.stderr
    assert "RuntimeError: a bug" in proc.stderr and "Traceback" in proc.stderr
    hint = "Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace."
    assert (hint in proc.stderr) == (full_error is None), proc.stderr


@pytest.mark.slow
def test_installed_wheel_finds_recipes_from_another_directory(tmp_path):
    """Build the wheel, unpack it elsewhere, and compose +recipe=tiny from an unrelated directory."""
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if build.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {build.stderr.strip().splitlines()[-1:]}")
    wheel = next((tmp_path / "dist").glob("*.whl"))
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    assert (site / "moe_adapt" / "_recipes" / "tiny.yaml").is_file()
    assert (site / "moe_adapt" / "_conf" / "config.yaml").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.path.insert(0, sys.argv[1]); "
            "sys.argv = ['moe-adapt', '+recipe=tiny', '--cfg', 'job']; "
            "import moe_adapt.__main__ as m; assert 'site' in m.__file__, m.__file__; m.main()",
            str(site),
        ],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        timeout=900,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "run_name: tiny" in proc.stdout


SIGTERM_PROGRAM = """
import os, signal, sys, time
from pathlib import Path
from moe_adapt.__main__ import _exit_on_sigterm

_exit_on_sigterm()
out = Path(sys.argv[1])
ready_r, ready_w = os.pipe()
child = os.fork()
if child == 0:  # a forked worker: SIGTERM still kills it outright, no cleanup runs
    try:
        os.write(ready_w, b"1")  # running Python: a signal sent now is not lost in the fork's reset
        time.sleep(60)
    finally:
        (out / "child_cleaned").touch()
    os._exit(0)
os.read(ready_r, 1)
os.kill(child, signal.SIGTERM)
_, status = os.waitpid(child, 0)
(out / "child_status").write_text(str(os.waitstatus_to_exitcode(status)))
try:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(60)
finally:
    (out / "parent_cleaned").touch()
"""


def test_sigterm_runs_cleanup_in_the_main_process_only(tmp_path):
    """torchrun and Slurm stop processes with SIGTERM: ``finally`` blocks (scratch folders, temporary
    checkpoint folders) must run in the app's process, while forked workers die as before."""
    program = tmp_path / "term.py"
    program.write_text(SIGTERM_PROGRAM)
    done = subprocess.run([sys.executable, str(program), str(tmp_path)], capture_output=True, timeout=60)
    assert done.returncode == 128 + 15, done.stderr
    assert (tmp_path / "parent_cleaned").exists()
    assert (tmp_path / "child_status").read_text() == "-15" and not (tmp_path / "child_cleaned").exists()


def test_a_key_of_another_engine_lists_the_chosen_engines_settings():
    """engine=hf engine.expert_parallel=2: the line lists what engine=hf has (parallel), not the base."""
    from moe_adapt.__main__ import describe
    from moe_adapt.config import compose

    with pytest.raises(Exception) as info:
        compose(["engine=hf", "engine.expert_parallel=2", "run_dir=/x"])
    line = describe(info.value)
    assert line is not None and line.startswith("engine.expert_parallel is not a setting; engine has: ")
    known = line.split("has: ", 1)[1].split(", ")
    assert "parallel" in known and "lr" in known and "expert_parallel" not in known


def secrets_on_disk(root: Path, secrets: tuple[str, ...]) -> list[str]:
    """Every file and folder under ``root`` whose name or bytes hold one of ``secrets``."""
    found = []
    for path in sorted(root.rglob("*")):
        names = str(path.relative_to(root))
        content = path.read_bytes() if path.is_file() else b""
        found += [f"{names}: {s}" for s in secrets if s in names or s.encode() in content]
    return found


def test_secrets_given_on_the_command_line_reach_no_file(tmp_path):
    """Hydra dumps the config and the overrides (.hydra/*.yaml, multirun.yaml) before the job starts, and
    names directories after the overrides with ${hydra.job.override_dirname}: a secret given as an
    override must leave no trace there, whether the config refuses its key (exit 2) or accepts it."""
    from moe_adapt.eval.report import load_sweep

    env = {"PYTHONPATH": str(ROOT)}
    secrets = ("hf_SECRET123", "hf_SECRET456", "hf_SECRET789", "31415926", "27182818", "hf_SECRETsweep")
    # refused: top-level and nested keys the schema lacks; a Hydra setting (an environment variable)
    refused = cli(
        "stages=[]",
        "+hf_token=hf_SECRET123",
        "++logger.foo.api_key=hf_SECRET456",
        "+hydra.job.env_set.HF_TOKEN=hf_SECRET789",
        f"hydra.run.dir={tmp_path}/refused/" + "${hydra.job.override_dirname}",
        cwd=tmp_path,
        env=env,
    )
    assert refused.returncode == 2 and "is not a setting" in refused.stderr, refused.stderr
    # accepted (a free-form mapping takes any key): the run writes config.json
    accepted = cli(
        "stages=[]",
        "+cpt.forgetting_bound.access_key=31415926.5",
        f"hydra.run.dir={tmp_path}/ok",
        cwd=tmp_path,
        env=env,
    )
    assert accepted.returncode == 0, accepted.stderr
    assert json.loads((tmp_path / "ok" / "config.json").read_text())["cpt"]["forgetting_bound"] == {
        "access_key": "***"
    }
    # a sweep: multirun.yaml and each job's dumps, job folders named after the overrides
    sweep = cli(
        "-m",
        "stages=[]",
        "seed=1,2",
        "+cpt.forgetting_bound.access_key=27182818.5",
        f"hydra.sweep.dir={tmp_path}/sweep",
        "hydra.sweep.subdir=${hydra.job.override_dirname}",
        cwd=tmp_path,
        env=env,
    )
    assert sweep.returncode == 0, sweep.stderr
    assert "#0 : " in sweep.stdout and "access_key=***" in sweep.stdout  # the launcher's line, redacted
    assert all(s not in p.stdout + p.stderr for p in (refused, accepted, sweep) for s in secrets)
    # a sweep whose jobs fail to compose: multirun.yaml is written, no job starts
    failed = cli(
        "-m",
        "stages=[]",
        "+hf_token=hf_SECRETsweep",
        "upcycle=nope,copy",
        f"hydra.sweep.dir={tmp_path}/failed",
        cwd=tmp_path,
        env=env,
    )
    assert failed.returncode == 2 and (tmp_path / "failed" / "multirun.yaml").is_file(), failed.stderr

    for job in ("refused", "ok", "sweep/seed=1,stages=[]", "sweep/seed=2,stages=[]"):
        job_dir = next((tmp_path / job).rglob(".hydra")).parent
        assert {p.name for p in (job_dir / ".hydra").iterdir()} == {
            "config.yaml",
            "hydra.yaml",
            "overrides.yaml",
        }
        assert (job_dir / "__main__.log").is_file()  # Hydra's job log is searched too
    assert (tmp_path / "sweep" / "multirun.yaml").is_file()
    assert secrets_on_disk(tmp_path, secrets) == []

    # the report stage still reads the redacted overrides
    for job in ("seed=1,stages=[]", "seed=2,stages=[]"):
        (tmp_path / "sweep" / job / "m.json").write_text('{"loss": 1.0}')
    runs = load_sweep(tmp_path / "sweep", metrics_path="m.json").runs
    assert [(r.seed, r.overrides["cpt.forgetting_bound.access_key"]) for r in runs] == [
        (1, "***"),
        (2, "***"),
    ]


def test_secret_keys_stay_out_of_directory_names(monkeypatch):
    """``${hydra.job.override_dirname}`` leaves out the keys of secret-looking overrides, added to the
    user's own ``exclude_keys`` when given; torchrun's quiet ranks keep their overrides."""
    from moe_adapt.__main__ import _quiet_other_ranks, _secrets_out_of_dirnames

    exclude = "hydra.job.config.override_dirname.exclude_keys"
    assert _secrets_out_of_dirnames(["seed=1"]) == ["seed=1"]
    assert _secrets_out_of_dirnames(["-m", "+hf_token=x", "++a.b.api_key=y", "seed=1"]) == [
        "-m",
        "+hf_token=x",
        "++a.b.api_key=y",
        "seed=1",
        f"{exclude}=[hf_token,a.b.api_key]",
    ]
    assert _secrets_out_of_dirnames([f"{exclude}=[seed]", "+hf_token=x"]) == [
        f"{exclude}=[seed,hf_token]",
        "+hf_token=x",
    ]
    monkeypatch.setenv("RANK", "1")
    args = _secrets_out_of_dirnames(_quiet_other_ranks(["+hf_token=x"]))
    assert args[:2] == ["+hf_token=x", "hydra.output_subdir=null"] and args[-1] == f"{exclude}=[hf_token]"


def test_hydra_files_follow_run_dir(tmp_path):
    """run_dir=DIR puts Hydra's .hydra/ and log in DIR, not in ./runs/run (issue 13); secrets in the
    overrides are still redacted there; without run_dir they go to runs/<run_name> as before."""
    run_dir = tmp_path / "elsewhere" / "my_run"
    proc = cli("stages=[]", f"run_dir={run_dir}", "+cpt.forgetting_bound.access_key=31415926.5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in run_dir.iterdir()} >= {".hydra", "__main__.log", "config.json"}
    assert (run_dir / ".hydra" / "overrides.yaml").is_file()
    assert not any("31415926" in p.read_text() for p in (run_dir / ".hydra").iterdir())
    assert not (tmp_path / "runs").exists()
    proc = cli("stages=[]", "run_name=plain", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "runs" / "plain" / ".hydra" / "config.yaml").is_file()
    assert json.loads((tmp_path / "runs" / "plain" / "config.json").read_text())["run_dir"] == str(
        tmp_path / "runs" / "plain"
    )
