"""The generate phase: sharded, seeded, resumable; a crash loses no finished shard and duplicates nothing."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_adapt.distill import generate as gen
from moe_adapt.distill.config import GenerateConfig
from moe_adapt.distill.prompts import PromptRecord, load_prompts
from moe_adapt.errors import MoEAdaptConfigError

PROMPTS = [
    PromptRecord(id=f"p{i}", lang="en" if i % 2 else "ar", prompt=f"What is {i} + {i}?", answer=str(2 * i))
    for i in range(7)
]
GCFG = GenerateConfig(samples=2, temperature=1.0, max_new_tokens=6, batch_size=2, shard_size=3, store_topk=4)


def _traces(folder: Path) -> list[dict]:
    return sorted(gen.iter_traces(folder), key=lambda r: r["id"])


def test_generate_writes_shards_with_topk(lm_factory: Callable[..., Path], tmp_path: Path) -> None:
    teacher = lm_factory("llama")
    summary = gen.run_generate(PROMPTS, str(teacher), GCFG, tmp_path, seed=0, chat_template=None)
    assert summary["shards"] == 3 and summary["traces"] == 14
    traces = _traces(tmp_path)
    assert len({t["id"] for t in traces}) == 14
    # the stored top-k are the teacher's log-softmax at each response position
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moe_adapt.distill.sft_data import chat_prompt_ids

    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    tok = AutoTokenizer.from_pretrained(teacher)
    t = next(t for t in traces if t["response_ids"])
    ids = chat_prompt_ids(tok, t["prompt"]) + t["response_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    p = len(ids) - len(t["response_ids"])
    expected = torch.topk(logp[p - 1 : len(ids) - 1], 4, dim=-1)
    stored = gen.load_topk(tmp_path, t["shard"])
    assert np.array_equal(stored[f"{t['id']}.ids"], expected.indices.numpy())
    np.testing.assert_allclose(stored[f"{t['id']}.logp"], expected.values.numpy(), atol=2e-2)


def test_crash_mid_generate_loses_no_shard_and_duplicates_nothing(
    lm_factory: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    teacher = str(lm_factory("llama"))
    clean = tmp_path / "clean"
    gen.run_generate(PROMPTS, teacher, GCFG, clean, seed=0, chat_template=None)

    crashed = tmp_path / "crashed"
    real = gen._generate_shard
    calls = {"n": 0}

    def dies_on_second(*args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(gen, "_generate_shard", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        gen.run_generate(PROMPTS, teacher, GCFG, crashed, seed=0, chat_template=None)
    first = crashed / "shard-00000.jsonl"
    assert first.is_file() and not (crashed / "shard-00001.jsonl").exists()
    stamp = first.stat().st_mtime_ns
    monkeypatch.setattr(gen, "_generate_shard", real)
    gen.run_generate(PROMPTS, teacher, GCFG, crashed, seed=0, chat_template=None)
    assert first.stat().st_mtime_ns == stamp  # the finished shard was not generated again
    assert _traces(crashed) == [dict(t) for t in _traces(clean)]  # same traces as without the crash
    assert not list(crashed.glob("*.tmp*"))


def test_changed_settings_start_over(lm_factory: Callable[..., Path], tmp_path: Path) -> None:
    teacher = str(lm_factory("llama"))
    gen.run_generate(PROMPTS[:3], teacher, GCFG, tmp_path, seed=0, chat_template=None)
    before = _traces(tmp_path)
    gen.run_generate(PROMPTS[:3], teacher, GCFG, tmp_path, seed=1, chat_template=None)
    after = _traces(tmp_path)
    assert len(after) == len(before) and after != before


def test_prompt_sets_bad_input(tmp_path: Path) -> None:
    with pytest.raises(MoEAdaptConfigError, match="distill.prompts='/nope.jsonl' is not a JSONL prompt file"):
        load_prompts("/nope.jsonl", ["ar"], key="distill.prompts")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(MoEAdaptConfigError, match="holds no prompt"):
        load_prompts(empty, ["ar"], key="distill.prompts")
    other = tmp_path / "he.jsonl"
    other.write_text(json.dumps({"id": "a", "lang": "he", "prompt": "מה?"}) + "\n")
    with pytest.raises(MoEAdaptConfigError, match="languages seen"):
        load_prompts(other, ["ar"], key="distill.prompts")
    dup = tmp_path / "dup.jsonl"
    dup.write_text("".join(json.dumps({"id": "a", "lang": "ar", "prompt": "كم؟"}) + "\n" for _ in range(2)))
    with pytest.raises(MoEAdaptConfigError, match="appears twice"):
        load_prompts(dup, ["ar"], key="distill.prompts")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "lang": "ar", "prompt": "كم؟", "answer_type": "essay"}) + "\n")
    with pytest.raises(MoEAdaptConfigError, match="answer_type='essay'"):
        load_prompts(bad, ["ar"], key="distill.prompts")
