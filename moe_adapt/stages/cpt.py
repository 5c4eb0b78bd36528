"""The ``cpt`` stage: continued pretraining on the bilingual curriculum, with exact resume.

Inputs: an HF MoE checkpoint (``cpt.init_from``) and the data stage's shards (``cpt.shards``).
Outputs in the stage folder: ``model/`` (HF checkpoint), ``metrics.jsonl`` (one line per step),
``heldout.jsonl`` (per-language held-out loss at each evaluation), ``curves.png`` (both drawn:
:mod:`moe_adapt.train.curves`) and ``summary.json`` (held-out loss
before/after per language and, with ``cpt.forgetting_bound``, whether each bounded language stayed
within its bound: :func:`moe_adapt.cpt.heldout.forgetting_report`).

Checkpoints live in the stage's scratch folder ``<run_dir>/.work/cpt`` while the stage runs: after a
crash the same command resumes from the latest one and, on CPU, reproduces the uninterrupted run's
losses bit for bit.

Under torchrun every rank runs this function: the engine spreads each global batch over the ranks
(``engine.parallel``), every rank resumes from the checkpoint rank 0 found, evaluates the held-out
sample and takes the same decisions; only rank 0 writes (checkpoints, metrics, held-out log, model,
summary). The runner gives the other ranks a scratch folder as ``out`` and waits for rank 0 to rename
the stage folder.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from moe_adapt.checkpoint.hf import check_seq_len
from moe_adapt.cpt.curriculum import unreached_phases
from moe_adapt.cpt.heldout import HeldoutLossCallback, eval_model, forgetting_report, log_forgetting
from moe_adapt.engines.plan import announce, plan_training
from moe_adapt.errors import MoEAdaptConfigError
from moe_adapt.fs import atomic_write_json
from moe_adapt.stages.base import StageContext
from moe_adapt.train.callbacks import (
    Callback,
    CheckpointCallback,
    MetricsCallback,
    NaNGuardCallback,
    main_only,
)
from moe_adapt.train.phase import train_into_folder

log = logging.getLogger(__name__)

KEYS = ("cpt", "mixture", "curriculum", "engine", "seed")
DISTRIBUTED = True


def run(ctx: StageContext) -> dict[str, Any]:
    """Train ``cpt.init_from`` on ``cpt.shards`` with the mixture/curriculum/engine groups."""
    from moe_adapt.cpt.sampler import MixtureSampler, load_manifest
    from moe_adapt.engines import build_engine

    cfg, out, work = ctx.cfg, ctx.out, ctx.work
    c = cfg.cpt
    if not c.init_from or not Path(c.init_from, "config.json").is_file():
        raise MoEAdaptConfigError(
            f"cpt.init_from={c.init_from!r} is not an HF checkpoint folder "
            "(run the upcycle stage first, or point it at one)"
        )
    if not c.shards or not Path(c.shards, "manifest.json").is_file():
        raise MoEAdaptConfigError(f"cpt.shards={c.shards!r} has no manifest.json (run the data stage first)")
    check_seq_len("mixture.seq_len", cfg.mixture.seq_len, c.init_from, "cpt.init_from")
    dist = ctx.dist
    if c.batch_size % dist.world_size:
        raise MoEAdaptConfigError(
            f"cpt.batch_size={c.batch_size} is invalid: with {dist.world_size} processes it must be a "
            f"multiple of {dist.world_size} (each process trains on an equal share of every batch)"
        )
    training_plan = plan(ctx)
    torch.manual_seed(cfg.seed)
    sampler = MixtureSampler(c.shards, cfg.mixture, cfg.curriculum, cfg.seed, global_batch_size=c.batch_size)
    engine = build_engine(cfg.engine, c.init_from, lr_multiplier=sampler.curriculum.lr_factor)
    shard_vocab = int(load_manifest(c.shards).get("vocab_size", 0))
    if shard_vocab > engine.vocab_size:
        raise MoEAdaptConfigError(
            f"cpt.shards={c.shards!r} were tokenized with {shard_vocab} ids but "
            f"cpt.init_from has a vocabulary of {engine.vocab_size}: use the model's tokenizer"
        )
    callbacks: list[Callback] = [
        *main_only([MetricsCallback(work / "metrics.jsonl"), *ctx.logging_callbacks("cpt")], dist),
        NaNGuardCallback(c.max_bad_steps),
        CheckpointCallback(work / "checkpoints", c.checkpoint_every, c.keep_last, dist=dist),
    ]
    heldout_cb = None
    if c.heldout:
        from moe_adapt.eval.heldout import load_heldout

        held = load_heldout(c.heldout, max_docs=c.eval_docs, seed=cfg.seed, key="cpt.heldout")
        heldout_cb = HeldoutLossCallback(
            held.docs,
            work / "heldout.jsonl",
            c.eval_every,
            cfg.mixture.seq_len,
            write=dist.is_main,
            token_sizes=held.token_sizes,
        )
        callbacks.append(heldout_cb)

    def fresh_start() -> None:  # no checkpoint: measure the held-out loss before any step
        if heldout_cb is not None:
            if dist.is_main:
                (work / "heldout.jsonl").unlink(missing_ok=True)
            heldout_cb.evaluate(eval_model(engine), 0)

    # every rank resumes from the checkpoint rank 0 sees (the run directory must be on a shared disk);
    # rank 0 writes the model and draws curves.png, every rank returns once the model is there
    trainer = train_into_folder(
        "cpt",
        engine,
        sampler,
        callbacks,
        max_steps=c.max_steps,
        batch_size=c.batch_size,
        work=work,
        model_dir=out / "model",
        curves=out / "curves.png",
        heldout=work / "heldout.jsonl",
        dist=dist,
        on_fresh_start=fresh_start,
    )
    summary: dict[str, Any] = {
        "plan": training_plan,
        "model": "model",
        "steps": trainer.step,
        "tokens": trainer.step * c.batch_size * cfg.mixture.seq_len,
    }
    if heldout_cb is not None and heldout_cb.history:
        first, last = heldout_cb.history[0], heldout_cb.history[-1]
        summary["heldout_before"], summary["heldout_after"] = first, last
        summary["heldout_delta"] = {
            k: round(last[k] - first[k], 6) for k in last if k.startswith(("loss_", "bpb_")) and k in first
        }
        if c.forgetting_bound:
            summary["forgetting"] = forgetting_report(first, last, c.forgetting_bound)
    if not dist.is_main:
        return summary
    log_forgetting(summary.get("forgetting", {}))
    for name in ("metrics.jsonl", "heldout.jsonl"):
        if (work / name).is_file():
            shutil.copy2(work / name, out / name)
    atomic_write_json(out / "summary.json", summary)
    return summary


def plan(ctx: StageContext) -> dict[str, Any]:
    """Log the training plan (parameters, memory per rank, tokens: :mod:`moe_adapt.engines.plan`) and
    warn when the curriculum is longer than ``cpt.max_steps``, before any weight is loaded; returns the
    plan for the summary.

    Raises:
        MoEAdaptConfigError: the plan does not fit the device (unless ``engine.check_memory=false``).
    """
    cfg, dist = ctx.cfg, ctx.dist
    c = cfg.cpt
    assert c.init_from is not None  # run checked it
    training_plan = plan_training(
        "cpt",
        cfg.engine,
        c.init_from,
        steps=c.max_steps,
        batch_size=c.batch_size,
        seq_len=cfg.mixture.seq_len,
        world_size=dist.world_size,
        key="cpt.init_from",
    )
    announce(training_plan, check=cfg.engine.check_memory, main=dist.is_main)
    late = unreached_phases(cfg.curriculum, c.max_steps, c.batch_size * cfg.mixture.seq_len)
    if late and dist.is_main:
        log.warning("cpt: %s", late)
    return training_plan.as_dict()
