"""The ``teacher`` stage (demo): a bilingual reasoning task and a small teacher trained on it.

Real recipes point ``distill.teacher`` at a large reasoning model. The CPU demo has none, so this
stage renders a built-in task (:mod:`moe_adapt.distill.tasks`) in every ``teacher.langs`` language,
writes ``prompts/train.jsonl`` and ``prompts/test.jsonl``, builds a small dense model with the
student's tokenizer (so token-level KD can compare them id by id), trains it on the reference
solutions as an ``sft`` phase and reports its held-out accuracy.

Under torchrun every rank runs the stage: rank 0 writes the initial model into the scratch folder,
every rank trains it data-parallel (as the distill stage's phases), rank 0 alone measures the accuracy
and writes the stage folder.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from moe_adapt import distributed
from moe_adapt.config.schema import Config
from moe_adapt.demo.config import InitDenseConfig
from moe_adapt.demo.dense import write_dense_model
from moe_adapt.distill.accuracy import evaluate_accuracy
from moe_adapt.distill.config import DistillEvalConfig
from moe_adapt.distill.prompts import PromptRecord, load_prompts
from moe_adapt.distill.tasks import TASKS, write_problem_set
from moe_adapt.distill.train_phase import reference_examples, run_train_phase
from moe_adapt.engines import as_auto
from moe_adapt.errors import MoEAdaptConfigError, invalid
from moe_adapt.fs import atomic_write_json
from moe_adapt.stages.base import StageContext
from moe_adapt.train.phase import move_outputs

log = logging.getLogger(__name__)

KEYS = ("teacher", "engine", "distill.format", "distill.chat_template", "distill.eval", "seed")
DISTRIBUTED = True


def run(ctx: StageContext) -> dict[str, Any]:
    """Write ``prompts/`` and ``model/`` (plus ``metrics.jsonl``, ``curves.png`` and ``summary.json``)
    into the stage folder."""
    from transformers import AutoTokenizer

    cfg, out, work = ctx.cfg, ctx.out, ctx.work
    t = cfg.teacher
    if t.task not in TASKS:
        invalid("teacher.task", t.task, f"choose one of {', '.join(TASKS)}")
    if not t.tokenizer or not Path(t.tokenizer).is_dir():
        raise MoEAdaptConfigError(f"teacher.tokenizer={t.tokenizer!r} is not a folder with a tokenizer")
    make = TASKS[t.task]
    prompt_dir = out / "prompts"
    prompt_dir.mkdir()
    for split, n in (("train", t.train_per_lang), ("test", t.test_per_lang)):
        try:
            problems = make(n, t.langs, split=split, seed=cfg.seed, max_operand=t.max_operand, ops=t.ops)
        except MoEAdaptConfigError as err:  # the task names its own keys; say which teacher key it was
            key = f"teacher.{split}_per_lang" if "n_per_lang" in str(err) else "teacher"
            raise MoEAdaptConfigError(
                str(err).replace("distill.task.n_per_lang", key).replace("distill.task", "teacher")
            ) from None
        write_problem_set(prompt_dir / f"{split}.jsonl", problems)

    tokenizer = AutoTokenizer.from_pretrained(t.tokenizer)
    init = work / "init"  # rank 0 writes it; every rank trains from it
    arch = InitDenseConfig(
        family="llama",
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_layers=t.num_layers,
        num_heads=t.num_heads,
        num_kv_heads=t.num_heads,
        max_position_embeddings=max(512, t.train.seq_len),
        vocab_size=len(tokenizer),
    )

    def write_init() -> None:
        shutil.rmtree(init, ignore_errors=True)  # an earlier attempt's: the same weights again
        torch.manual_seed(cfg.seed)
        write_dense_model(
            arch,
            tokenizer,
            init,
            bos=tokenizer.bos_token_id,
            eos=tokenizer.eos_token_id,
            pad=tokenizer.pad_token_id,
        )

    distributed.run_on_main(write_init, ctx.dist)

    train = load_prompts(prompt_dir / "train.jsonl", t.langs, key="teacher.task")
    test = load_prompts(prompt_dir / "test.jsonl", t.langs, key="teacher.task")
    # a dense teacher: no router terms, no anchors; engine auto (hf: megatron maps MoE models only)
    # (bias_update_rate too: a recipe may set aux-loss-free balancing for its MoE's cpt)
    engine_cfg = replace(
        as_auto(cfg.engine), l2_anchor_coef=0.0, kl_anchor_coef=0.0, reference=None, bias_update_rate=0.0
    )
    train_summary = run_train_phase(
        "teacher",
        t.train,
        init_from=init,
        examples=reference_examples(tokenizer, train, cfg.distill.chat_template),
        langs=t.langs,
        engine_cfg=engine_cfg,
        work=work,
        seed=cfg.seed,
        callbacks=ctx.logging_callbacks("teacher"),
    )
    return distributed.run_on_main(lambda: _finish(cfg, out, work, test, train_summary), ctx.dist)


def _finish(
    cfg: Config, out: Path, work: Path, test: list[PromptRecord], train_summary: dict[str, Any]
) -> dict[str, Any]:
    """Rank 0: move the trained model into ``out``, measure its held-out accuracy, write the summary."""
    t = cfg.teacher
    move_outputs(work, out)
    shutil.rmtree(work / "init")
    eval_cfg = DistillEvalConfig(max_prompts=t.test_per_lang, max_new_tokens=cfg.distill.eval.max_new_tokens)
    accuracy = evaluate_accuracy(
        out / "model", test, eval_cfg, cfg.distill.format, chat_template=cfg.distill.chat_template
    )
    log.info("teacher: held-out accuracy %s", {k: v["accuracy"] for k, v in accuracy.items() if k != "gap"})
    summary = {
        "task": t.task,
        "model": "model",
        "prompts": {"train": "prompts/train.jsonl", "test": "prompts/test.jsonl"},
        "train": train_summary,
        "accuracy": accuracy,
    }
    atomic_write_json(out / "summary.json", summary)
    return summary
