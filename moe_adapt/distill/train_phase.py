"""One training phase of distillation (sft, seq_kd, token_kd, select_kd) on the shared trainer.

The phase packs its examples (:mod:`moe_adapt.distill.sft_data`), builds the engine from the previous
phase's model, and trains it into its folder with :func:`moe_adapt.train.phase.train_into_folder`
and the same callbacks as continued pretraining (metrics, NaN guard, atomic checkpoints). A crashed
phase resumes from its latest checkpoint; the finished model is written as an HF checkpoint folder.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_adapt import distributed
from moe_adapt.checkpoint.hf import load_causal_lm
from moe_adapt.cpt.heldout import HeldoutLossCallback
from moe_adapt.distill.config import TrainPhaseConfig
from moe_adapt.distill.decoding import pad_id_of
from moe_adapt.distill.generate import load_topk
from moe_adapt.distill.prompts import PromptRecord
from moe_adapt.distill.replay import (
    ReplayMixer,
    ReplaySource,
    realised_share,
    shard_vocab,
    steps_with_replay,
)
from moe_adapt.distill.sft_data import Example, PackedSampler, chat_prompt_ids, pack_examples, response_ids
from moe_adapt.engines import build_engine
from moe_adapt.engines.base import EngineConfig
from moe_adapt.engines.objectives import KDSettings
from moe_adapt.engines.plan import announce, plan_training
from moe_adapt.errors import MoEAdaptConfigError, MoEAdaptError
from moe_adapt.eval.heldout import HeldOut
from moe_adapt.train.callbacks import (
    Callback,
    CheckpointCallback,
    MetricsCallback,
    NaNGuardCallback,
    main_only,
)
from moe_adapt.train.phase import train_into_folder

log = logging.getLogger(__name__)


def reference_examples(
    tokenizer: Any, prompts: Sequence[PromptRecord], chat_template: str | None
) -> list[Example]:
    """Examples from the prompts' reference responses (the ``sft`` phase)."""
    missing = [p.id for p in prompts if not p.reference_response]
    if missing:
        raise MoEAdaptConfigError(
            f"the sft phase trains on reference responses, but {len(missing)} prompts have none "
            f"(e.g. {missing[0]!r}): add reference_response to distill.prompts, "
            "or drop sft from distill.phases"
        )
    return [
        Example(
            chat_prompt_ids(tokenizer, p.prompt, chat_template),
            response_ids(tokenizer, p.reference_response or ""),
            p.lang,
        )
        for p in prompts
    ]


def trace_examples(
    tokenizer: Any,
    traces: Sequence[dict[str, Any]],
    chat_template: str | None,
    *,
    topk_dir: Path | None = None,
) -> list[Example]:
    """Examples from verified teacher traces, with their stored top-k when ``topk_dir`` is given.

    The teacher's response token ids are used as written (no re-tokenisation), so they line up with
    the stored top-k log-probabilities.
    """
    if not traces:
        raise MoEAdaptError(
            "no verified traces to train on: every generated trace was rejected (see verify/report.md)"
        )
    cache: dict[str, dict[str, np.ndarray]] = {}
    examples = []
    for t in traces:
        ex = Example(
            chat_prompt_ids(tokenizer, t["prompt"], chat_template), list(t["response_ids"]), t["lang"]
        )
        if topk_dir is not None:
            if t["shard"] not in cache:
                cache = {t["shard"]: load_topk(topk_dir, t["shard"])}  # traces come shard by shard
            ex.topk_ids = cache[t["shard"]][f"{t['id']}.ids"].astype(np.int64)
            ex.topk_logp = cache[t["shard"]][f"{t['id']}.logp"].astype(np.float32)
        examples.append(ex)
    return examples


def check_same_tokenizer(student: str | Path, teacher: str | Path) -> None:
    """Token KD compares distributions id by id: the vocabularies must be the same."""
    from transformers import AutoTokenizer

    a, b = AutoTokenizer.from_pretrained(str(student)), AutoTokenizer.from_pretrained(str(teacher))
    if a.get_vocab() != b.get_vocab():
        raise MoEAdaptConfigError(
            f"token KD needs the same tokenizer for student and teacher: {student} has {len(a)} tokens and "
            f"{teacher} has {len(b)}, with different ids; use seq_kd instead, or a teacher with the "
            "student's tokenizer"
        )


def run_train_phase(
    name: str,
    pcfg: TrainPhaseConfig,
    *,
    init_from: Path,
    examples: Sequence[Example],
    langs: Sequence[str],
    engine_cfg: EngineConfig,
    work: Path,
    seed: int,
    kd: KDSettings | None = None,
    teacher: str | None = None,
    callbacks: Sequence[Callback] = (),
    replay: ReplaySource | None = None,
    heldout: HeldOut | None = None,
    heldout_window: int = 0,
) -> dict[str, Any]:
    """Train ``init_from`` on ``examples``; writes ``work/model``, ``work/metrics.jsonl`` and
    ``work/curves.png`` (:mod:`moe_adapt.train.curves`).

    ``callbacks`` are added to the metrics, NaN-guard and checkpoint ones (progress, wandb);
    ``engine_cfg.name`` picks the engine (:func:`moe_adapt.engines.build_engine`), with the phase's own
    anchors (``pcfg.l2_anchor_coef``, ``pcfg.kl_anchor_coef``: to ``init_from``). ``replay`` mixes its
    share of general-text batches into the phase (:mod:`moe_adapt.distill.replay`; with
    ``replay.adds_steps`` on top of ``pcfg.steps`` task batches, the phase longer); ``heldout`` is
    scored at the end of the phase in windows of ``heldout_window`` tokens (``work/heldout.jsonl``,
    the summary's ``heldout``).
    """
    from transformers import AutoTokenizer

    if replay is not None and replay.adds_steps:  # the task keeps its pcfg.steps batches
        pcfg = dataclasses.replace(pcfg, steps=steps_with_replay(pcfg.steps, replay.share))
    tokenizer = AutoTokenizer.from_pretrained(str(init_from))
    pad_id = pad_id_of(tokenizer)
    order = np.random.default_rng([seed, 17]).permutation(len(examples))
    rows = pack_examples([examples[i] for i in order], pcfg.seq_len, int(pad_id), langs)
    if rows.truncated:
        log.warning(
            "%s: %d of %d responses cut to fit seq_len=%d", name, rows.truncated, len(examples), pcfg.seq_len
        )
    response_tokens = int(rows.loss_mask.sum())
    log.info(
        "%s: %d examples packed into %d rows of %d tokens (%d response tokens; %.1f epochs in %d steps)",
        name,
        len(examples),
        len(rows),
        pcfg.seq_len,
        response_tokens,
        pcfg.steps * pcfg.batch_size / len(rows),
        pcfg.steps,
    )
    ecfg = dataclasses.replace(
        engine_cfg,
        lr=pcfg.lr,
        warmup_steps=pcfg.warmup_steps,
        decay_steps=pcfg.steps,
        l2_anchor_coef=pcfg.l2_anchor_coef,
        kl_anchor_coef=pcfg.kl_anchor_coef,
        reference=str(init_from) if pcfg.kl_anchor_coef > 0 else None,
    )
    dist = distributed.current()  # under torchrun: every rank trains its share of each batch (DDP)
    if pcfg.batch_size % dist.world_size:
        raise MoEAdaptConfigError(
            f"distill.{name}.batch_size={pcfg.batch_size} is invalid: with {dist.world_size} processes it "
            f"must be a multiple of {dist.world_size} (each process trains on an equal share of every batch)"
        )
    training_plan = plan_training(
        name,
        ecfg,
        init_from,
        steps=pcfg.steps,
        batch_size=pcfg.batch_size,
        seq_len=pcfg.seq_len,
        world_size=dist.world_size,
        teacher=teacher if kd is not None else None,
        lora=pcfg.lora,
    )
    announce(training_plan, check=ecfg.check_memory, main=dist.is_main)
    torch.manual_seed(seed)
    trained = build_engine(ecfg, init_from, kd=kd, teacher=teacher, lora=pcfg.lora)
    task = PackedSampler(rows, seed)
    source: PackedSampler | ReplayMixer = task
    if replay is not None:
        vocab = shard_vocab(replay.shards)
        if vocab > trained.vocab_size:
            raise MoEAdaptConfigError(
                f"distill.shards={str(replay.shards)!r} were tokenized with {vocab} ids but the {name} "
                f"phase's model has a vocabulary of {trained.vocab_size}: replay needs the model's tokenizer"
            )
        source = ReplayMixer.build(task, replay, pcfg.seq_len, seed, kd=kd is not None)
        log.info(
            "%s: %.0f%% of the %s replay general text from %s",
            name,
            100 * replay.share,
            "rows of every batch" if source.rows else "batches",
            replay.shards,
        )
    all_callbacks: list[Callback] = [
        *main_only([MetricsCallback(work / "metrics.jsonl"), *callbacks], dist),
        NaNGuardCallback(),
        CheckpointCallback(work / "checkpoints", pcfg.checkpoint_every, keep_last=1, dist=dist),
    ]
    heldout_cb = None
    if heldout is not None:
        heldout_cb = HeldoutLossCallback(
            heldout.docs,
            work / "heldout.jsonl",
            0,  # at the end of the phase only
            heldout_window or pcfg.seq_len,
            token_sizes=heldout.token_sizes,
            label=f"distill {name}",
            write=dist.is_main,
        )
        all_callbacks.append(heldout_cb)
    trainer = train_into_folder(
        name,
        trained,
        source,
        all_callbacks,
        max_steps=pcfg.steps,
        batch_size=pcfg.batch_size,
        work=work,
        model_dir=work / "model",
        curves=work / "curves.png",
        dist=dist if dist.is_distributed else None,
    )
    if dist.is_main:
        shutil.rmtree(work / "checkpoints", ignore_errors=True)
    rows_logged = _metrics_rows(work / "metrics.jsonl")
    no_row: dict[str, Any] = {}
    last = next((r for r in reversed(rows_logged) if "loss" in r), no_row)  # the last task step
    extra: dict[str, Any] = {}
    if replay is not None:
        last_replay = next((r for r in reversed(rows_logged) if "replay/lm_loss" in r), no_row)
        extra["replay"] = {
            "share": replay.share,
            "adds_steps": replay.adds_steps,
            "rows": isinstance(source, ReplayMixer) and source.rows,
            "realised": realised_share(rows_logged),
            "batches": int(sum(float(r.get("replay", 0)) == 1.0 for r in rows_logged)),
            "final_lm_loss": last_replay.get("replay/lm_loss"),
        }
    if heldout_cb is not None and heldout_cb.history:
        extra["heldout"] = heldout_cb.history[-1]
    return {
        "plan": training_plan.as_dict(),
        "steps": trainer.step,
        "examples": len(examples),
        "rows": len(rows),
        "response_tokens": response_tokens,
        "truncated": rows.truncated,
        "final_loss": last.get("loss"),
        **(
            {
                "selected_share": {
                    k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("kd_selected/")
                }
            }
            if kd
            else {}
        ),
        **extra,
    }


def evaluate_heldout(model: Path | str, heldout: HeldOut, window: int) -> dict[str, Any]:
    """Held-out loss per language of the HF checkpoint ``model`` (the record
    :class:`~moe_adapt.cpt.heldout.HeldoutLossCallback` writes: ``loss_<lang>``, ``bpb_<lang>``, ...)."""
    lm = load_causal_lm(model, torch.float32)
    scorer = HeldoutLossCallback(
        heldout.docs, Path(), 0, window, write=False, token_sizes=heldout.token_sizes
    )
    return scorer.evaluate(lm, 0)


def _metrics_rows(path: Path) -> list[dict[str, Any]]:
    import json

    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
