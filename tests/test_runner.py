"""The runner: stages in order, atomic stage folders, skip when complete, refuse stale settings."""

from __future__ import annotations

import json

import pytest

from moe_adapt import runner
from moe_adapt.config import compose, to_config
from moe_adapt.errors import MoEAdaptConfigError
from moe_adapt.redact import redact
from moe_adapt.runner import MARKER, run_pipeline

FAST = [
    "stages=[init_dense,upcycle]",
    "init_dense.tokenizer_corpus=builtin",
    "init_dense.vocab_size=384",
    "init_dense.pretrain.steps=0",  # a random model: the runner's behaviour is what is tested here
]


def run(tmp_path, *overrides):
    raw = compose(["+recipe=tiny", f"run_dir={tmp_path}", *FAST, *overrides])
    return run_pipeline(to_config(raw), raw)


def test_tiny_pipeline_skips_complete_stages_and_refuses_changed_settings(tmp_path, caplog):
    first = run(tmp_path)
    assert first["upcycle"]["verify"]["max_rel_diff"] < 1e-5
    marker = json.loads((tmp_path / "upcycle" / MARKER).read_text())
    assert marker["settings"]["upcycle"]["granularity"] == 4
    stamp = (tmp_path / "upcycle" / MARKER).stat().st_mtime_ns

    caplog.set_level("INFO")
    second = run(tmp_path)
    assert (tmp_path / "upcycle" / MARKER).stat().st_mtime_ns == stamp
    assert "upcycle: complete" in caplog.text and second["upcycle"] == first["upcycle"]

    with pytest.raises(
        MoEAdaptConfigError, match=r"stage upcycle .* other settings \(upcycle.num_experts: 16 -> 8"
    ):
        run(tmp_path, "upcycle.num_experts=8")

    third = run(tmp_path, "upcycle.num_experts=8", "force=[upcycle]")
    assert third["upcycle"]["params"]["total"] < first["upcycle"]["params"]["total"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "init_dense", "upcycle"]


def test_rebuilding_a_stage_reruns_the_stages_after_it(tmp_path, caplog):
    run(tmp_path)
    caplog.set_level("INFO")
    run(tmp_path, "force=[init_dense]")
    assert "upcycle: its inputs were just rebuilt" in caplog.text


def test_a_crashing_stage_leaves_no_folder(tmp_path, monkeypatch):
    def boom(ctx):
        (ctx.out / "partial").write_text("half")
        raise RuntimeError("killed")

    monkeypatch.setitem(runner.STAGES, "init_dense", runner.Stage("init_dense", boom, ("seed",)))
    with pytest.raises(RuntimeError, match="killed"):
        run(tmp_path, "stages=[init_dense]")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_a_stage_whose_marker_is_damaged_runs_again(tmp_path, monkeypatch, caplog):
    """A truncated _COMPLETE.json is not trusted: the stage is run again, with a warning naming the
    file, instead of a JSON traceback (issue 12)."""
    runs = []

    def stage(ctx):
        runs.append(1)
        return {"n": len(runs)}

    monkeypatch.setitem(runner.STAGES, "init_dense", runner.Stage("init_dense", stage, ("seed",)))
    run(tmp_path, "stages=[init_dense]")
    marker = tmp_path / "init_dense" / MARKER
    marker.write_text(marker.read_text()[:30])
    caplog.set_level("WARNING")
    assert run(tmp_path, "stages=[init_dense]")["init_dense"] == {"n": 2}
    assert f"{marker} is damaged" in caplog.text
    assert json.loads(marker.read_text())["summary"] == {"n": 2}
    assert run(tmp_path, "stages=[init_dense]")["init_dense"] == {"n": 2}  # whole again: skipped


def test_secrets_are_redacted():
    cfg = {"logger": {"wandb_api_key": "abc", "project": "p"}, "hf_token": "t", "x": [{"password": "pw"}]}
    assert redact(cfg) == {
        "logger": {"wandb_api_key": "***", "project": "p"},
        "hf_token": "***",
        "x": [{"password": "***"}],
    }
    kept = {"data": {"tokenize": {"tokenizer": "/tok"}}, "max_tokens": 5, "auth": "", "access_token": None}
    assert redact(kept) == kept  # tokenizer settings are not secrets; empty values stay as they are


HOLDER = """
import sys, time
from moe_adapt.lock import RunLock
RunLock(sys.argv[1]).acquire()
print("holding", flush=True)
time.sleep(60)
"""


def test_one_run_at_a_time_holds_the_run_dir_and_a_dead_holder_is_taken_over(tmp_path, caplog):
    import os
    import subprocess
    import sys

    from moe_adapt.lock import LOCK_FILE, RunDirectoryBusy

    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        with pytest.raises(RunDirectoryBusy, match=rf"run_dir={tmp_path} is in use by pid {holder.pid} on "):
            run(tmp_path)
        assert not (tmp_path / "init_dense").exists()  # nothing of the refused run was written
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the lock file stays with its record
        holder.wait()
    assert (tmp_path / LOCK_FILE).is_file()
    caplog.set_level("WARNING")
    run(tmp_path)
    assert f"taking over the lock left by pid {holder.pid}" in caplog.text
    assert not (tmp_path / LOCK_FILE).exists() and (tmp_path / "upcycle").is_dir()
    assert os.getpid() != holder.pid


def test_an_unfinished_attempt_resumes_only_with_its_settings(tmp_path, monkeypatch):
    """A stage that died leaves its scratch state with the settings it was made with: the same
    settings resume it, other ones are refused by name, force=[stage] starts it over."""
    seen: list[list[str]] = []

    def crash_after_a_checkpoint(ctx):
        seen.append(sorted(p.name for p in ctx.work.iterdir()))
        (ctx.work / "step_000030").mkdir(exist_ok=True)
        raise RuntimeError("killed")

    stage = runner.Stage("init_dense", crash_after_a_checkpoint, ("init_dense", "seed"))
    monkeypatch.setitem(runner.STAGES, "init_dense", stage)
    for _ in range(2):  # the same settings: the second attempt finds the first one's state
        with pytest.raises(RuntimeError, match="killed"):
            run(tmp_path, "stages=[init_dense]")
    assert seen == [[], ["step_000030"]]
    with pytest.raises(
        MoEAdaptConfigError,
        match=r"stage init_dense has an unfinished attempt in .* made with other settings "
        r"\(init_dense.hidden_size: 64 -> 32\).*force=\[init_dense\] to start over",
    ):
        run(tmp_path, "stages=[init_dense]", "init_dense.hidden_size=32")
    with pytest.raises(RuntimeError, match="killed"):
        run(tmp_path, "stages=[init_dense]", "init_dense.hidden_size=32", "force=[init_dense]")
    assert seen[-1] == []  # forced: started over


def test_temporary_folders_of_dead_runs_are_removed(tmp_path):
    (tmp_path / ".upcycle.tmp-999999").mkdir(parents=True)
    (tmp_path / ".upcycle.tmp-999999" / "model").mkdir()
    (tmp_path / ".init_dense.old-999999").mkdir()
    (tmp_path / ".keep.tmp-1").mkdir()  # not a stage's: left alone
    (tmp_path / "import" / ".smol.tmp-999999").mkdir(parents=True)  # a GGUF import that died
    (tmp_path / "import" / "smol").mkdir()  # a finished one: kept
    run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".keep.tmp-1",
        "config.json",
        "import",
        "init_dense",
        "upcycle",
    ]
    assert [p.name for p in (tmp_path / "import").iterdir()] == ["smol"]


def test_the_redaction_rule_hides_credentials_not_vocabulary_tokens():
    cfg = {
        "aws_access_key": "AKIA",
        "ssh_private_key": "-----BEGIN",
        "accessKey": "k",
        "auth_token": "t",
        "client_secret": "s",
        "tokenize": {"eod_token": "<|endoftext|>", "pad_token": "<pad>", "tokenizer": "/tok"},
        "max_new_tokens": 96,
    }
    assert redact(cfg) == {
        "aws_access_key": "***",
        "ssh_private_key": "***",
        "accessKey": "***",
        "auth_token": "***",
        "client_secret": "***",
        "tokenize": {"eod_token": "<|endoftext|>", "pad_token": "<pad>", "tokenizer": "/tok"},
        "max_new_tokens": 96,
    }


def test_hydra_dumps_hide_secret_overrides_and_their_copies():
    from moe_adapt.redact import redact_dump

    dump = {
        "hydra": {
            "overrides": {
                "task": ["+hf_token=s3cr3t", "seed=1", "+a.b.api_key=k3y"],
                "hydra": ["hydra.mode=RUN"],
            },
            "job": {
                "override_dirname": "+a.b.api_key=k3y,+hf_token=s3cr3t,seed=1",
                "env_set": {"HF_TOKEN": "e"},
            },
            "callbacks": {"redaction": {"_target_": "x.Y"}},
        },
        "model": {"dense": "/m", "password": "pw"},
    }
    assert redact_dump(dump) == {
        "hydra": {
            "overrides": {
                "task": ["+hf_token=***", "seed=1", "+a.b.api_key=***"],
                "hydra": ["hydra.mode=RUN"],
            },
            "job": {
                "override_dirname": "+a.b.api_key=***,+hf_token=***,seed=1",
                "env_set": {"HF_TOKEN": "***"},
            },
            "callbacks": {"redaction": {"_target_": "x.Y"}},
        },
        "model": {"dense": "/m", "password": "***"},
    }
    overrides = ["stages=[cpt]", "~x.password", "logger.secret=", "data.tokenize.eod_token=<|x|>"]
    assert redact_dump(overrides) == overrides  # nothing to hide


def test_the_hydra_callback_leaves_ranks_without_a_hydra_folder_alone(tmp_path):
    """Under torchrun, ranks other than 0 run with ``hydra.output_subdir=null``: nothing to rewrite."""
    from omegaconf import OmegaConf

    from moe_adapt.hydra_dumps import RedactHydraDumps

    def config(subdir: str | None) -> object:
        return OmegaConf.create(
            {"hydra": {"output_subdir": subdir, "mode": "RUN", "runtime": {"output_dir": str(tmp_path)}}}
        )

    RedactHydraDumps().on_job_start(config(None), task_function=print)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- +hf_token=abc\n- seed=1\n")
    RedactHydraDumps().on_job_start(config(".hydra"), task_function=print)
    assert (tmp_path / ".hydra" / "overrides.yaml").read_text() == "- +hf_token=***\n- seed=1\n"
