"""The server teacher backend against a real OpenAI-compatible server started here (`transformers serve`
on a tiny checkpoint): same shards as the hf backend, resumable after a kill, retried through a server
restart, and refused in one line before any work when the URL or the log-probabilities are wrong."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from moe_adapt.distill import generate as gen
from moe_adapt.distill.backends import ServerConfig
from moe_adapt.distill.config import GenerateConfig
from moe_adapt.distill.prompts import PromptRecord
from moe_adapt.distill.server import parse_choice
from moe_adapt.errors import MoEAdaptConfigError
from tests.distill.serve import Server, free_port

PROMPTS = [
    PromptRecord(id=f"p{i}", lang="en" if i % 2 else "ar", prompt=f"What is {i} + {i}?", answer=str(2 * i))
    for i in range(7)
]


@pytest.fixture(scope="module")
def server(lm_factory: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    pytest.importorskip("httpx")
    pytest.importorskip(
        "fastapi", reason="transformers serve needs the serve extra (pip install -e .[serve])"
    )
    pytest.importorskip("uvicorn")
    srv = Server(lm_factory("llama"), tmp_path_factory.mktemp("hub_cache"))
    srv.start()
    yield srv
    srv.stop()


def _gcfg(server: Server, **server_kw: object) -> GenerateConfig:
    scfg = ServerConfig(
        base_url=server.url, model=str(server.model), concurrency=4, retries=2, backoff_s=0.2, timeout_s=60.0
    )
    return GenerateConfig(
        samples=2,
        temperature=1.0,
        max_new_tokens=6,
        batch_size=2,
        shard_size=3,
        store_topk=0,
        backend="server",
        server=replace(scfg, **server_kw),  # type: ignore[arg-type]
    )


def _traces(folder: Path) -> list[dict]:
    return sorted(gen.iter_traces(folder), key=lambda r: r["id"])


def test_server_traces_match_the_hf_backend(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOE_TEST_TEACHER_KEY", "sk-never-written-0123")
    gcfg = _gcfg(server, api_key_env="MOE_TEST_TEACHER_KEY")
    s = gen.run_generate(
        PROMPTS, None, gcfg, tmp_path / "server", seed=0, chat_template=None, student=str(server.model)
    )
    h = gen.run_generate(
        PROMPTS, str(server.model), replace(gcfg, backend="hf"), tmp_path / "hf", seed=0, chat_template=None
    )
    assert s["shards"] == h["shards"] == 3 and s["traces"] == h["traces"] == 14
    assert s["traces_per_lang"] == h["traces_per_lang"]
    st, ht = _traces(tmp_path / "server"), _traces(tmp_path / "hf")
    assert [t["id"] for t in st] == [t["id"] for t in ht]
    assert [sorted(t) for t in st] == [sorted(t) for t in ht]  # the same record format
    # transformers serve gives text only: response_ids are the text in the student's vocabulary
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(server.model)
    assert all(tok.decode(t["response_ids"], skip_special_tokens=True) == t["response"] for t in st)
    assert all(t["response_ids"][-1] == tok.eos_token_id for t in st if t["finished"])
    assert sorted(p.name for p in (tmp_path / "server").iterdir()) == sorted(
        p.name for p in (tmp_path / "hf").iterdir()
    )
    # the API key never reaches a file
    for path in (tmp_path / "server").rglob("*"):
        assert b"sk-never-written-0123" not in path.read_bytes()

    # greedy: the server and this process decode the same tokens
    greedy = replace(gcfg, samples=1, temperature=0.0, max_new_tokens=8)
    gen.run_generate(
        PROMPTS, None, greedy, tmp_path / "gs", seed=0, chat_template=None, student=str(server.model)
    )
    gen.run_generate(
        PROMPTS, str(server.model), replace(greedy, backend="hf"), tmp_path / "gh", seed=0, chat_template=None
    )
    assert [t["response"] for t in _traces(tmp_path / "gs")] == [
        t["response"] for t in _traces(tmp_path / "gh")
    ]


def _one_line_error(call: Callable[[], object]) -> str:
    with pytest.raises(MoEAdaptConfigError) as err:
        call()
    assert "\n" not in str(err.value)
    return str(err.value)


def test_bad_url_and_missing_logprobs_are_one_line_errors_before_any_work(
    server: Server, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    student = str(server.model)
    closed = f"http://127.0.0.1:{free_port()}/v1"
    msg = _one_line_error(
        lambda: gen.run_generate(
            PROMPTS, None, _gcfg(server, base_url=closed), out, seed=0, chat_template=None, student=student
        )
    )
    assert "distill.generate.server.base_url" in msg and "no server answers" in msg
    no_v1 = server.url.removesuffix("/v1")
    msg = _one_line_error(
        lambda: gen.run_generate(
            PROMPTS, None, _gcfg(server, base_url=no_v1), out, seed=0, chat_template=None, student=student
        )
    )
    assert "OpenAI model list" in msg
    msg = _one_line_error(
        lambda: gen.run_generate(
            PROMPTS,
            None,
            _gcfg(server, api_key_env="MOE_TEST_UNSET_KEY"),
            out,
            seed=0,
            chat_template=None,
            student=student,
        )
    )
    assert "MOE_TEST_UNSET_KEY" in msg
    # offline token KD needs the served model's token ids in the student's vocabulary: refused without
    # the served model's tokenizer ...
    topk = replace(_gcfg(server), store_topk=4)
    msg = _one_line_error(
        lambda: gen.run_generate(PROMPTS, None, topk, out, seed=0, chat_template=None, student=student)
    )
    assert "distill.generate.server.tokenizer" in msg and "store_topk=0" in msg and "seq_kd" in msg
    # ... and refused when the server (transformers serve) returns no log-probabilities with ids
    topk = replace(_gcfg(server, tokenizer=student), store_topk=4)
    msg = _one_line_error(
        lambda: gen.run_generate(PROMPTS, None, topk, out, seed=0, chat_template=None, student=student)
    )
    assert "returns no top log-probabilities" in msg and "store_topk=0" in msg and "seq_kd" in msg
    assert not out.exists() or not any(out.iterdir())  # nothing was generated


SCRIPT = """
import json, sys
from moe_adapt.distill import generate as gen
from moe_adapt.distill.backends import ServerConfig
from moe_adapt.distill.config import GenerateConfig
from moe_adapt.distill.prompts import PromptRecord
a = json.loads(sys.argv[1])
prompts = [PromptRecord(**p) for p in a["prompts"]]
g = GenerateConfig(**{**a["gcfg"], "server": ServerConfig(**a["server"])})
out = __import__("pathlib").Path(a["out"])
gen.run_generate(prompts, None, g, out, seed=0, chat_template=None, student=a["student"])
"""


def _wait_for(path: Path, proc_alive: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        assert proc_alive() and time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.01)


def kill_generate_after(
    shard: str, prompts: list[PromptRecord], gcfg: GenerateConfig, out: Path, student: str
) -> dict[str, tuple[int, bytes]]:
    """Run the server backend's generation into ``out`` in a child process, SIGKILL it once ``shard``
    is written, and return each finished shard's mtime and bytes."""
    args = {
        "prompts": [vars(p) for p in prompts],
        "gcfg": {k: v for k, v in vars(gcfg).items() if k not in ("server", "vllm")},
        "server": vars(gcfg.server),
        "out": str(out),
        "student": student,
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, json.dumps(args)], env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    try:
        _wait_for(out / shard, lambda: proc.poll() is None)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("shard-*.jsonl")}


def test_killed_run_resumes_without_regenerating_finished_shards(server: Server, tmp_path: Path) -> None:
    prompts = [replace(p, id=f"k{i}") for i, p in enumerate(PROMPTS * 3)]  # 21 prompts, 11 shards of 2
    gcfg = replace(_gcfg(server, concurrency=1), shard_size=2, max_new_tokens=16)
    out = tmp_path / "gen"
    finished = kill_generate_after("shard-00001.jsonl", prompts, gcfg, out, str(server.model))
    assert 2 <= len(finished) < 11, "the kill came after the run had finished"
    summary = gen.run_generate(
        prompts, None, gcfg, out, seed=0, chat_template=None, student=str(server.model)
    )
    assert summary["shards"] == 11 and summary["traces"] == 42
    for name, (mtime, data) in finished.items():  # finished shards were not written again
        assert (out / name).stat().st_mtime_ns == mtime and (out / name).read_bytes() == data
    assert len({t["id"] for t in gen.iter_traces(out)}) == 42
    assert not list(out.glob("*.tmp"))


def test_server_that_dies_mid_shard_is_retried_and_the_shard_completed(
    server: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    prompts = [replace(p, id=f"d{i}") for i, p in enumerate(PROMPTS * 2)]  # 14 prompts, 7 shards of 2
    gcfg = replace(_gcfg(server, concurrency=2, retries=8, backoff_s=0.25), shard_size=2, max_new_tokens=16)
    out = tmp_path / "gen"
    result: dict[str, object] = {}

    def work() -> None:
        try:
            result["summary"] = gen.run_generate(
                prompts, None, gcfg, out, seed=0, chat_template=None, student=str(server.model)
            )
        except BaseException as err:  # reported below
            result["error"] = err

    caplog.set_level(logging.WARNING, logger="moe_adapt.distill.server")
    thread = threading.Thread(target=work)
    thread.start()
    _wait_for(out / "shard-00000.jsonl", thread.is_alive)
    server.stop()  # mid-run: requests of the next shard are in flight or about to be
    done_at_kill = len(list(out.glob("shard-*.jsonl")))
    time.sleep(1.0)
    server.start()
    thread.join(timeout=300)
    assert not thread.is_alive() and "error" not in result, result.get("error")
    assert done_at_kill < 7, "the server died after the run had finished"
    assert result["summary"]["traces"] == 28 and result["summary"]["shards"] == 7  # type: ignore[index]
    assert any("retrying" in r.getMessage() for r in caplog.records)


def test_log_probabilities_with_token_ids_in_vllm_and_llamacpp_formats() -> None:
    # vLLM with return_tokens_as_token_ids: the token is "token_id:<id>"
    vllm = {
        "message": {"content": "4"},
        "finish_reason": "stop",
        "logprobs": {
            "content": [
                {
                    "token": "token_id:19",
                    "logprob": -0.1,
                    "top_logprobs": [
                        {"token": "token_id:7", "logprob": -2.5},
                        {"token": "token_id:19", "logprob": -0.1},
                    ],
                }
            ]
        },
    }
    c = parse_choice(vllm, 2)
    assert c.token_ids == [19] and c.finished and c.topk_ids is not None and c.topk_logp is not None
    assert c.topk_ids.tolist() == [[19, 7]]
    np.testing.assert_allclose(c.topk_logp.astype(np.float32), [[-0.1, -2.5]], atol=1e-3)
    # llama.cpp: an "id" beside each token; without ids (plain OpenAI) there is nothing for token KD
    llama = {
        **vllm,
        "logprobs": {
            "content": [
                {
                    "id": 5,
                    "token": "4",
                    "logprob": -0.2,
                    "top_logprobs": [{"id": 5, "token": "4", "logprob": -0.2}],
                }
            ]
        },
    }
    assert parse_choice(llama, 1).topk_ids is not None
    plain = {**vllm, "logprobs": {"content": [{"token": "4", "logprob": -0.2, "top_logprobs": []}]}}
    assert parse_choice(plain, 1).token_ids is None and parse_choice(plain, 1).text == "4"


def test_server_settings_are_checked_and_transport_settings_keep_the_shards() -> None:
    with pytest.raises(MoEAdaptConfigError, match="distill.generate.backend"):
        GenerateConfig(backend="vllm-typo")
    with pytest.raises(MoEAdaptConfigError, match="distill.generate.server.base_url"):
        GenerateConfig(backend="server", server=ServerConfig(model="m"))
    a = GenerateConfig(backend="server", server=ServerConfig(base_url="http://a/v1", model="m"))
    b = GenerateConfig(
        backend="server", server=ServerConfig(base_url="http://b/v1", model="m", concurrency=64)
    )
    assert gen.generation_settings(a) == gen.generation_settings(b)
    c = GenerateConfig(backend="server", server=ServerConfig(base_url="http://a/v1", model="other"))
    assert gen.generation_settings(a) != gen.generation_settings(c)


def test_offline_token_kd_from_a_server_needs_the_served_tokenizer(lm_factory: Callable[..., Path]) -> None:
    from moe_adapt.distill.config import DistillConfig
    from moe_adapt.distill.pipeline import _check_inputs

    student = str(lm_factory("llama"))
    gcfg = GenerateConfig(backend="server", server=ServerConfig(base_url="http://h/v1", model="m"))
    d = DistillConfig(student=student, prompts="p.jsonl", phases=["generate", "token_kd"], generate=gcfg)
    with pytest.raises(MoEAdaptConfigError, match=r"distill.generate.server.tokenizer .*seq_kd"):
        _check_inputs(d)
    # seq_kd works with any teacher tokenizer, and distill.teacher is not needed
    _check_inputs(replace(d, phases=["generate", "seq_kd"]))


def test_distill_stage_trains_seq_kd_on_server_traces(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moe_adapt.config import compose, to_config
    from moe_adapt.distill.tasks import make_problems, write_problem_set
    from moe_adapt.runner import run_pipeline

    monkeypatch.setenv("MOE_TEST_TEACHER_KEY", "sk-never-written-4567")
    write_problem_set(tmp_path / "train.jsonl", make_problems(3, split="train"))
    phase = "{steps: 2, batch_size: 2, seq_len: 128, lr: 1.0e-3, warmup_steps: 1, checkpoint_every: 2}"
    raw = compose(
        [
            "stages=[distill]",
            f"run_dir={tmp_path / 'run'}",
            "logger=none",
            f"distill.student={server.model}",  # distill.teacher stays null: the server is the teacher
            f"distill.prompts={tmp_path / 'train.jsonl'}",
            "distill.phases=[generate,verify,seq_kd]",
            "distill.generate.backend=server",
            f"distill.generate.server.base_url={server.url}",
            f"distill.generate.server.model={server.model}",
            "distill.generate.server.api_key_env=MOE_TEST_TEACHER_KEY",
            "distill.generate.store_topk=0",
            "distill.generate.max_new_tokens=8",
            "distill.verify.checks=[duplicate,length]",  # a random teacher writes no well-formed trace
            "distill.verify.length.min_reasoning_chars=0",
            "distill.verify.length.min_answer_chars=0",
            f"distill.seq_kd={phase}",
            "distill.heldout=null",  # no data stage here: no held-out loss per phase
        ]
    )
    summary = run_pipeline(to_config(raw), raw)
    distill = json.loads((tmp_path / "run" / "distill" / "summary.json").read_text())
    assert distill["generate"]["traces"] == 12 and distill["seq_kd"]["steps"] == 2, summary
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            assert b"sk-never-written-4567" not in path.read_bytes(), path
