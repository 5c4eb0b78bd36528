"""The distill stage through the runner: every phase, resume after a crash, KD online = offline, bad input."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_adapt.config import compose, to_config
from moe_adapt.distill import train_phase
from moe_adapt.distill.sft_data import Example, pack_examples
from moe_adapt.engines.batch import TrainBatch
from moe_adapt.engines.hf import HFConfig, HFEngine
from moe_adapt.engines.objectives import KDSettings
from moe_adapt.errors import MoEAdaptConfigError, MoEAdaptError
from moe_adapt.runner import run_pipeline

PHASE = "{steps: 3, batch_size: 2, seq_len: 128, lr: 1.0e-3, warmup_steps: 1, checkpoint_every: 2}"


def overrides(lm: Callable[..., Path], prompts: tuple[Path, Path], run_dir: Path, *extra: str) -> list[str]:
    return [
        "stages=[distill]",
        f"run_dir={run_dir}",
        "logger=none",
        f"distill.teacher={lm('llama')}",
        f"distill.student={lm('qwen3_moe')}",
        f"distill.prompts={prompts[0]}",
        f"distill.eval_prompts={prompts[1]}",
        "distill.generate.max_new_tokens=12",
        "distill.generate.shard_size=5",
        "distill.generate.store_topk=4",
        "distill.verify.checks=[duplicate,length]",  # a random teacher writes no well-formed trace
        "distill.verify.length.min_reasoning_chars=0",
        "distill.eval.max_new_tokens=8",
        "distill.heldout=null",  # no data stage here (test_replay.py gives held-out shards)
        *[f"distill.{p}={PHASE}" for p in ("sft", "seq_kd", "token_kd", "select_kd")],
        *extra,
    ]


def run(args: list[str]) -> dict:
    raw = compose(args)
    return run_pipeline(to_config(raw), raw)


def test_every_phase_runs_and_reports(lm_factory, prompt_files, tmp_path) -> None:
    phases = "distill.phases=[generate,verify,sft,seq_kd,token_kd,select_kd]"
    summary = run(overrides(lm_factory, prompt_files, tmp_path, phases))["distill"]
    out = tmp_path / "distill"
    assert summary["generate"]["traces"] == 24  # 12 prompts x 2 samples
    assert summary["verify"]["kept"] + summary["verify"]["rejected"] == 24
    for name in ("sft", "seq_kd", "token_kd", "select_kd"):
        assert summary[name]["steps"] == 3
        assert (out / name / "metrics.jsonl").is_file() and (out / name / "curves.png").is_file()
    assert set(summary["accuracy"]) == {
        "teacher",
        "student_before",
        "after_sft",
        "after_seq_kd",
        "after_token_kd",
        "after_select_kd",
    }
    assert set(summary["accuracy"]["teacher"]) == {"ar", "en", "gap"}
    last = json.loads((out / "select_kd" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"kd_kl", "kd_ce", "kd_selected/ar", "kd_selected/en"} <= set(last)
    assert 0.0 <= last["kd_selected"] <= 1.0
    plain = json.loads((out / "token_kd" / "metrics.jsonl").read_text().splitlines()[-1])
    assert plain["kd_selected"] == 1.0  # token_kd without distill.select.theta distils every token
    assert (out / "model" / "config.json").is_file() and not (out / "select_kd" / "model").exists()
    assert (out / "verify" / "report.md").is_file() and "Held-out accuracy" in (out / "report.md").read_text()
    assert not (tmp_path / ".work").exists()


def test_a_crash_resumes_at_the_phase_it_hit(lm_factory, prompt_files, tmp_path, monkeypatch, caplog) -> None:
    args = overrides(lm_factory, prompt_files, tmp_path, "distill.eval_prompts=null")
    real = train_phase.run_train_phase

    def crash_in_token_kd(name: str, *a: object, **kw: object) -> dict:
        if name == "token_kd":
            raise RuntimeError("killed")
        return real(name, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr("moe_adapt.distill.pipeline.run_train_phase", crash_in_token_kd)
    with pytest.raises(RuntimeError, match="killed"):
        run(args)
    assert not (tmp_path / "distill").exists()  # the stage folder appears only when every phase is done
    assert (tmp_path / ".work" / "distill" / "seq_kd" / "_COMPLETE.json").is_file()
    monkeypatch.setattr("moe_adapt.distill.pipeline.run_train_phase", real)
    with caplog.at_level(logging.INFO, logger="moe_adapt.distill.pipeline"):
        run(args)
    skipped = [r.getMessage() for r in caplog.records if "already done" in r.getMessage()]
    assert skipped == [f"distill: phase {p} already done, skipping" for p in ("generate", "verify", "seq_kd")]
    assert (tmp_path / "distill" / "model" / "config.json").is_file()


def test_online_teacher_equals_full_top_k(lm_factory) -> None:
    """Token KD against the teacher model equals token KD against its stored top-k when K = V."""
    from transformers import AutoModelForCausalLM

    student, teacher_dir = lm_factory("qwen3_moe"), lm_factory("llama")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    vocab = teacher.config.vocab_size
    prompt, response = [5, 6, 7], [40, 41, 42, 43, 2]
    with torch.no_grad():
        logp = torch.log_softmax(teacher(input_ids=torch.tensor([prompt + response])).logits[0], -1)
    top = torch.topk(logp[len(prompt) - 1 : -1], vocab, dim=-1)
    rows = pack_examples(
        [Example(prompt, response, "ar", top.indices.numpy(), top.values.numpy())], 12, 0, ["ar"]
    )
    batch = TrainBatch(
        rows.tokens,
        rows.loss_mask,
        rows.position_ids,
        rows.lang_ids,
        rows.langs,
        rows.topk_ids,
        rows.topk_logp,
    )
    confidence = torch.softmax(logp[len(prompt) - 1 : -1] / 2.0, -1).max(-1).values
    kd = KDSettings(alpha=0.3, temperature=2.0, theta=float(confidence.median()))  # selects some positions
    online = HFEngine(student, HFConfig(), kd=kd, teacher=teacher_dir).forward_loss(batch)
    offline = HFEngine(student, HFConfig(), kd=kd).forward_loss(batch)
    for key in ("kd_loss", "kd_ce", "kd_kl", "kd_selected", "loss"):
        torch.testing.assert_close(online[key], offline[key], rtol=1e-5, atol=1e-6)
    assert 0 < online["kd_selected"].item() < 1


def test_bad_input(lm_factory, prompt_files, tmp_path) -> None:
    def fails(match: str, *extra: str) -> None:
        with pytest.raises(MoEAdaptConfigError, match=match):
            run(overrides(lm_factory, prompt_files, tmp_path, *extra))

    fails("distill.teacher=None is not an HF checkpoint folder", "distill.teacher=null")
    fails(r"distill.teacher='/nowhere' is not an HF checkpoint folder", "distill.teacher=/nowhere")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    fails("holds no prompt", f"distill.prompts={empty}")
    fails(
        "distill.verify.checks='spelling' is invalid: unknown check",
        "distill.verify.checks=[format,spelling]",
    )
    fails("unknown phase 'dpo'", "distill.phases=[generate,dpo]")
    fails("store_topk=0", "distill.generate.store_topk=0")
    fails("generate .* must come before", "distill.phases=[seq_kd]")
    fails(r"distill.seq_kd.lora.rank=-1 is invalid: must be an integer >= 0", "distill.seq_kd.lora.rank=-1")
    fails(r"distill.sft.lora.quantize='8bit' is invalid", "distill.sft.lora={rank: 4, quantize: 8bit}")
    fails(
        "distill.seq_kd.lora.rank=4 is invalid with engine=megatron",
        "engine=megatron",
        "distill.seq_kd.lora.rank=4",
    )
    other = lm_factory("llama", seed=1, vocab_texts=("a completely different tokenizer text",) * 50)
    fails("same tokenizer", f"distill.teacher={other}", "distill.token_kd.teacher=online")
    student = lm_factory("qwen3_moe")
    fails(
        rf"^distill.seq_kd.seq_len=1024 is invalid: must be <= max_position_embeddings=512 of "
        rf"distill.student={student} \(its config.json\)$",
        "distill.seq_kd.seq_len=1024",
    )
    short = lm_factory("llama", max_position_embeddings=256)
    fails(
        r"^distill.token_kd.seq_len=300 is invalid: .*=256 of distill.teacher=",
        f"distill.teacher={short}",
        "distill.token_kd.teacher=online",
        "distill.token_kd.seq_len=300",
    )


def test_offline_kd_without_top_k_is_an_error(lm_factory) -> None:
    engine = HFEngine(lm_factory("qwen3_moe"), HFConfig(), kd=KDSettings())
    with pytest.raises(MoEAdaptError, match="store_topk"):
        engine.forward_loss(TrainBatch(np.array([[5, 6, 7, 8]]), loss_mask=np.array([[True, True, True]])))


def test_lora_phases_write_plain_hf_models(lm_factory, prompt_files, tmp_path) -> None:
    """sft with LoRA on the MoE student's attention and experts, then seq_kd with LoRA on attention
    only from sft's merged model: adapters beside each phase's model, every model a merged checkpoint
    that vanilla transformers loads."""
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    args = overrides(
        lm_factory,
        prompt_files,
        tmp_path,
        "distill.phases=[generate,verify,sft,seq_kd]",
        "distill.eval_prompts=null",
        "distill.sft.lora={rank: 4, alpha: 8.0, experts: true}",
        "distill.seq_kd.lora={rank: 2, target_modules: [q_proj, v_proj]}",
    )
    summary = run(args)["distill"]
    out = tmp_path / "distill"
    assert summary["model"] == "model"
    for phase in ("sft", "seq_kd"):
        assert (out / phase / "adapter" / "adapter_model.safetensors").is_file()
        plan = summary[phase]["plan"]  # the plan printed before the phase counted its adapters
        assert plan["lora"]["trainable"] == plan["params_trainable"] < plan["params_total"]
        assert plan["bytes_per_rank"]["optimizer"] == 8 * plan["params_trainable"]  # fp32 moments
    sft = AutoModelForCausalLM.from_pretrained(out / "sft" / "model").state_dict()
    final = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    student = AutoModelForCausalLM.from_pretrained(lm_factory("qwen3_moe")).state_dict()
    assert not any("lora" in k for k in final)
    experts, router = "model.layers.0.mlp.experts.down_proj", "model.layers.0.mlp.gate.weight"
    assert not torch.equal(sft[experts], student[experts])  # sft adapted the experts
    assert torch.equal(sft[router], student[router])  # the router is not a target
    assert torch.equal(final[experts], sft[experts])  # seq_kd's adapters: attention q/v only
    q, k = "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"
    assert not torch.equal(final[q], sft[q]) and torch.equal(final[k], sft[k])
