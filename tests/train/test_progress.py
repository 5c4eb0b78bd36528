"""The logger group: config checks, the progress display (log lines, rich bar) and the wandb mirror.

A real :class:`Trainer` drives a counting engine over constant batches, so each test takes
milliseconds apart from the wandb ones (about a second each: wandb starts its service process).
"""

from __future__ import annotations

import io
import json
import logging
import re
import socket
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from omegaconf import OmegaConf
from rich.console import Console

from moe_adapt.config import compose, conf_dir
from moe_adapt.errors import MoEAdaptConfigError
from moe_adapt.redact import redact_override
from moe_adapt.train.callbacks import Callback
from moe_adapt.train.progress import (
    LoggerConfig,
    ProgressCallback,
    WandbCallback,
    logging_callbacks,
)
from moe_adapt.train.trainer import Trainer

SEQ = 8  # tokens per sequence (+1 for the labels)
BATCH = 2
LINE = re.compile(r"train step (\d+)/(\d+) \(\d+%\) \| loss [\d.]+ \| lr [\d.e+-]+ \| .* tok/s \| phase (\d)")


# -- a trivial engine and sampler -----------------------------------------------------------------
@dataclass
class _Batch:
    tokens: np.ndarray


class _Sampler:
    def next_batch(self, batch_size: int) -> _Batch:
        return _Batch(np.zeros((batch_size, SEQ + 1), dtype=np.int64))

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class _Engine:
    """loss 1/n at step n; phase 0 for the first 5 steps, then 1."""

    def __init__(self) -> None:
        self.n = 0

    def step(self, batch: Any) -> dict[str, float]:
        self.n += 1
        tokens = float(getattr(batch, "tokens", batch)[:, 1:].size)  # a batch, or its tokens_BT1
        return {
            "loss": 1.0 / self.n,
            "lr": 1e-3,
            "tokens": tokens,
            "skipped": 0.0,
            "phase": float(self.n > 5),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n = int(state["n"])

    # the checkpoint hooks of moe_adapt.engines.base.Engine: nothing on disk, the state in the trainer's
    writes_folder = False

    def save(self, folder: Path) -> dict[str, Any]:
        return self.state_dict()

    def load(self, state: dict[str, Any], folder: Path | None = None, checkpoint: Path | None = None) -> None:
        self.load_state_dict(state)


def train(callbacks: list[Callback], max_steps: int, resume_from: dict[str, Any] | None = None) -> Trainer:
    trainer = Trainer(_Engine(), _Sampler(), callbacks, max_steps=max_steps, batch_size=BATCH)
    if resume_from is not None:
        trainer.load_state_dict(resume_from)
    trainer.fit()
    return trainer


def progress_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, int, int]]:
    found = [LINE.search(r.getMessage()) for r in caplog.records if r.name == "moe_adapt"]
    return [(int(m[1]), int(m[2]), int(m[3])) for m in found if m]


# -- config ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"kind": "tensorboard"}, "logger.kind"),
        ({"mode": "cloud"}, "logger.mode"),
        ({"kind": "none", "mode": "online"}, "logger.mode"),
        ({"progress": "tqdm"}, "logger.progress"),
        ({"log_every": 0}, "logger.log_every"),
        ({"project": ""}, "logger.project"),
        ({"project": "a/b"}, "logger.project"),
        ({"entity": ""}, "logger.entity"),
        ({"dir": ""}, "logger.dir"),
        ({"tags": ["ok", "x" * 65]}, "logger.tags"),
    ],
)
def test_bad_settings_fail_naming_the_key(overrides: dict[str, Any], key: str) -> None:
    with pytest.raises(MoEAdaptConfigError, match=rf"^{re.escape(key)}=.* is invalid: "):
        LoggerConfig(**overrides)


def test_shipped_options_are_valid_and_offline_is_the_default() -> None:
    # composed, not read as YAML: wandb and none start from offline through their defaults lists
    names = [p.stem for p in (conf_dir() / "logger").glob("*.yaml")]
    options = {name: OmegaConf.to_container(compose([f"logger={name}"]).logger) for name in names}
    assert set(options) == {"offline", "wandb", "none"}
    configs = {name: LoggerConfig(**data) for name, data in options.items()}
    assert configs["offline"] == LoggerConfig()  # the schema's defaults are the default option
    assert (configs["offline"].kind, configs["offline"].mode) == ("wandb", "offline")
    assert (configs["wandb"].kind, configs["wandb"].mode) == ("wandb", "online")
    assert configs["none"].kind == "none"


def test_factory_builds_what_the_config_asks_for(tmp_path: Path) -> None:
    def kinds(**kw: Any) -> list[type]:
        return [type(cb) for cb in logging_callbacks(LoggerConfig(**kw), tmp_path, {})]

    assert kinds() == [WandbCallback, ProgressCallback]
    assert kinds(kind="none") == [ProgressCallback]
    assert kinds(mode="disabled") == [ProgressCallback]
    assert kinds(progress="none") == [WandbCallback]
    assert logging_callbacks(LoggerConfig(), tmp_path, {}, rank=1) == []


# -- progress: log lines --------------------------------------------------------------------------
def test_log_mode_writes_a_line_every_log_every_steps_and_at_the_end(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.INFO, logger="moe_adapt")
    train([ProgressCallback("log", log_every=3)], max_steps=10)
    assert progress_lines(caplog) == [(3, 10, 0), (6, 10, 1), (9, 10, 1), (10, 10, 1)]
    assert "eta 0:00:00" in caplog.records[-1].getMessage()
    assert capsys.readouterr() == ("", "")  # through logging only, never straight to the terminal


def test_log_mode_continues_from_a_resumed_step(caplog: pytest.LogCaptureFixture) -> None:
    first = train([ProgressCallback("log", log_every=3)], max_steps=4)
    state = first.state_dict()
    assert state["callbacks"]["progress"] == {}
    caplog.clear()
    caplog.set_level(logging.INFO, logger="moe_adapt")
    train([ProgressCallback("log", log_every=3)], max_steps=10, resume_from=state)
    messages = [r.getMessage() for r in caplog.records if r.name == "moe_adapt"]
    assert messages[0] == "train: 6 steps to go of 10 (resumed at step 4)"
    assert progress_lines(caplog) == [(6, 10, 1), (9, 10, 1), (10, 10, 1)]


def test_log_mode_reports_the_last_step_when_stopped_early(caplog: pytest.LogCaptureFixture) -> None:
    class StopAt(Callback):
        name = "stop"

        def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
            trainer.should_stop = step == 4

    caplog.set_level(logging.INFO, logger="moe_adapt")
    train([StopAt(), ProgressCallback("log", log_every=3)], max_steps=10)
    assert [s for s, _, _ in progress_lines(caplog)] == [3, 4]


def test_auto_picks_the_bar_only_on_a_terminal() -> None:
    plain = ProgressCallback("auto", console=Console(file=io.StringIO()))
    tty = ProgressCallback("auto", console=Console(file=io.StringIO(), force_terminal=True))
    assert (plain._resolve(), tty._resolve()) == ("log", "rich")


# -- progress: the rich bar -----------------------------------------------------------------------
def test_rich_bar_renders_and_routes_log_lines_above_it(caplog: pytest.LogCaptureFixture) -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160, color_system=None)
    handler = logging.StreamHandler(sys.stderr)  # like Hydra's console handler
    logger = logging.getLogger("moe_adapt.test_progress")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)

    class Talk(Callback):
        name = "talk"

        def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
            if step == 5:
                logger.info("a line from another callback")

    stderr = sys.stderr
    try:
        state = train([Talk(), ProgressCallback("rich", console=console)], max_steps=3).state_dict()
        train([Talk(), ProgressCallback("rich", console=console)], max_steps=7, resume_from=state)
    finally:
        logger.removeHandler(handler)
    text = out.getvalue()
    assert "3/3" in text and "7/7" in text and "loss 0.1429" in text and "phase 1" in text
    assert "tok/s" in text and "a line from another callback" in text
    assert handler.stream is stderr and sys.stderr is stderr  # restored once the bar is gone
    assert not any(r.levelno >= logging.WARNING for r in caplog.records)


# -- wandb ----------------------------------------------------------------------------------------
def wandb_records(run_file: Path) -> list[Any]:
    """Records of a ``.wandb`` transaction log (LevelDB log format: 32 KiB blocks of chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunks, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += block - pos % block
            continue
        chunks = (b"" if kind in (1, 2) else chunks) + data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, or last chunk of a record
            record = pb.Record()  # type: ignore[attr-defined]
            record.ParseFromString(chunks)
            records.append(record)
    return records


def finished_records(run_file: Path, timeout: float = 20.0) -> list[Any]:
    """The records once the run's ``exit`` record is on disk: offline, ``run.finish()`` returns before
    wandb-core has flushed the file."""
    deadline = time.monotonic() + timeout
    while True:
        records = wandb_records(run_file)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def history(run_file: Path) -> list[dict[str, Any]]:
    rows = []
    for r in finished_records(run_file):
        if r.WhichOneof("record_type") == "history":
            rows.append({i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    return rows


def run_config(run_file: Path) -> dict[str, Any]:
    run = next(r.run for r in finished_records(run_file) if r.WhichOneof("record_type") == "run")
    return {u.key: json.loads(u.value_json) for u in run.config.update}


SECRETS = ("hf-secret-0123", "wandb-secret-4567", "argv-secret-89ab")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Records every host name lookup made in this process (wandb's telemetry would make one)."""
    lookups: list[Any] = []
    real = socket.getaddrinfo

    def spy(*args: Any, **kwargs: Any) -> Any:
        lookups.append(args[:2])
        return real(*args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", spy)
    return lookups


def test_wandb_offline_mirrors_metrics_and_config_without_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["moe_adapt", "stages=[cpt]", f"+model.hf_token={SECRETS[2]}"])
    config = {"seed": 3, "model": {"hf_token": SECRETS[0], "dense": "/m"}, "wandb_api_key": SECRETS[1]}
    cb = WandbCallback(LoggerConfig(tags=["test"]), tmp_path, config, job_type="cpt")
    trainer = train([cb], max_steps=6)

    (run_dir,) = (tmp_path / "wandb").glob(f"offline-run-*-{cb.run_id}")
    assert trainer.state_dict()["callbacks"]["wandb"] == {"run_id": cb.run_id}
    assert cb.run is None and not cb.failed  # finished, never failed
    rows = history(run_dir / f"run-{cb.run_id}.wandb")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["loss"] == pytest.approx(1 / 6) and rows[-1]["phase"] == 1 and rows[-1]["lr"] == 1e-3
    assert cb.last_logged["loss"] == pytest.approx(1 / 6)
    logged = run_config(run_dir / f"run-{cb.run_id}.wandb")
    assert logged["seed"] == 3 and logged["model"] == {"hf_token": "***", "dense": "/m"}
    assert logged["wandb_api_key"] == "***"
    for path in (tmp_path / "wandb").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(s.encode() in data for s in SECRETS), f"a secret reached {path}"
    assert no_network == []  # offline never looks a host up (wandb's telemetry would)
    assert capsys.readouterr().out == ""  # wandb is silent


def test_wandb_resume_after_a_crash_continues_the_same_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class CrashAt3(Callback):
        name, order = "crash", 50  # after the wandb callback has logged the step

        def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
            if step == 3:
                raise RuntimeError("killed")

    first = WandbCallback(LoggerConfig(), tmp_path, {})
    crashed = Trainer(_Engine(), _Sampler(), [first, CrashAt3()], max_steps=5, batch_size=BATCH)
    with pytest.raises(RuntimeError, match="killed"):
        crashed.fit()  # on_train_end never runs: the wandb run is left open
    second = WandbCallback(LoggerConfig(), tmp_path, {})
    train([second], max_steps=5, resume_from=crashed.state_dict())
    assert second.run_id == first.run_id and not second.failed
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "wandb" in r.getMessage()]
    # offline, each start writes its own folder (suffixed -1, -2... when started in the same second);
    # `wandb sync` uploads them in order
    folders = sorted((tmp_path / "wandb").glob(f"offline-run-*-{first.run_id}*"))
    steps = [[r["step"] for r in history(f / f"run-{first.run_id}.wandb")] for f in folders]
    assert steps == [[1, 2, 3], [4, 5]]


def test_wandb_failing_to_start_or_log_only_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import wandb

    def refuse(**kwargs: Any) -> Any:
        raise RuntimeError("no wandb today")

    monkeypatch.setattr(wandb, "init", refuse)
    cb = WandbCallback(LoggerConfig(mode="online"), tmp_path, {})
    trainer = train([cb, ProgressCallback("none")], max_steps=4)
    assert trainer.step == 4 and cb.failed and cb.state_dict() == {"run_id": None}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "wandb could not start (RuntimeError: no wandb today)" in warnings[0]

    class BrokenRun:
        id, dir, url = "abc", str(tmp_path), "http://example.invalid"

        def define_metric(self, *args: Any, **kwargs: Any) -> None:
            pass

        def log(self, record: dict[str, float]) -> None:
            raise OSError("service died")

    monkeypatch.setattr(wandb, "init", lambda **kwargs: BrokenRun())
    caplog.clear()
    cb = WandbCallback(LoggerConfig(mode="online"), tmp_path, {})
    assert train([cb], max_steps=4).step == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "wandb stopped working (OSError: service died)" in warnings[0]


def test_secret_looking_overrides_are_hidden_from_wandb_metadata() -> None:
    assert redact_override("+model.hf_token=abc") == "+model.hf_token=***"
    assert redact_override("--wandb-api-key=abc") == "--wandb-api-key=***"
    assert redact_override("logger.password=") == "logger.password="  # nothing to hide
    assert redact_override("model.tokenizer=/t") == "model.tokenizer=/t"
    assert redact_override("stages=[cpt]") == "stages=[cpt]"
