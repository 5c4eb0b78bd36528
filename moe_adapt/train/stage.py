"""The ``cpt`` stage: continued pretraining on the bilingual curriculum, with exact resume.

Inputs: an HF MoE checkpoint (``cpt.init_from``) and the data stage's shards (``cpt.shards``).
Outputs in the stage folder: ``model/`` (HF checkpoint), ``metrics.jsonl`` (one line per step),
``heldout.jsonl`` (per-language held-out loss at each evaluation), ``curves.png`` (both drawn:
:mod:`moe_adapt.train.curves`) and ``summary.json`` (held-out loss
before/after per language and, with ``cpt.forgetting_bound``, whether each bounded language stayed
within its bound: :func:`forgetting_report`).

Checkpoints live in ``<run_dir>/.work/cpt`` while the stage runs: after a crash the same command
resumes from the latest one and, on CPU, reproduces the uninterrupted run's losses bit for bit.

Under torchrun every rank runs this function: the engine spreads each global batch over the ranks
(``engine.parallel``), every rank resumes from the checkpoint rank 0 found, evaluates the held-out
sample and takes the same decisions; only rank 0 writes (checkpoints, metrics, held-out log, model,
summary). The runner gives the other ranks a scratch folder as ``out`` and waits for rank 0 to rename
the stage folder.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from moe_adapt import distributed
from moe_adapt.checkpoint.trainer_state import latest_checkpoint
from moe_adapt.errors import MoEAdaptConfigError
from moe_adapt.fs import atomic_write_json
from moe_adapt.train.callbacks import (
    Callback,
    CheckpointCallback,
    MetricsCallback,
    NaNGuardCallback,
    main_only,
)
from moe_adapt.train.curves import write_training_curves
from moe_adapt.train.trainer import Trainer

log = logging.getLogger(__name__)


def _eval_model(engine: Any) -> Any:
    """The module the held-out loss is computed with: the engine's ``eval_model`` (under FSDP2 a
    whole-forward wrapper, see :attr:`moe_adapt.engines.hf.HFEngine.eval_model`), else its ``model``."""
    return getattr(engine, "eval_model", engine.model)


class HeldoutLossCallback(Callback):
    """Per-language loss on a fixed held-out sample every ``every`` steps (and at the end).

    With several processes every rank evaluates (a sharded model needs all ranks in its forward) and
    only the one with ``write`` (rank 0) appends to ``path``.
    """

    name = "heldout"
    order = 50

    def __init__(
        self, docs: dict[str, list[Any]], path: Path, every: int, window: int, *, write: bool = True
    ) -> None:
        self.docs, self.path, self.every, self.window, self.write = docs, path, every, window, write
        self.history: list[dict[str, Any]] = []

    def evaluate(self, model: Any, step: int) -> dict[str, Any]:
        from moe_adapt.eval.perplexity import evaluate_perplexity

        was_training = model.training
        model.eval()
        try:
            result = evaluate_perplexity(model, self.docs, window=self.window, stride=self.window)
        finally:
            model.train(was_training)
        record = {"step": step, **{f"loss_{lang}": round(r.mean_loss, 6) for lang, r in result.items()}}
        self.history.append(record)
        if not self.write:
            return record
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        log.info(
            "cpt: step %d held-out %s",
            step,
            "  ".join(f"{k.removeprefix('loss_')} {v:.4f}" for k, v in record.items() if k != "step"),
        )
        return record

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        if self.every and step % self.every == 0 and step != trainer.max_steps:
            self.evaluate(_eval_model(trainer.engine), step)

    def on_train_end(self, trainer: Trainer) -> None:
        if not self.history or self.history[-1]["step"] != trainer.step:
            self.evaluate(_eval_model(trainer.engine), trainer.step)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state["history"])
        if not self.write:
            return
        # the file may hold lines from after the checkpoint: rewrite it from the restored history
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.history), encoding="utf-8")


def forgetting_report(
    before: Mapping[str, Any], after: Mapping[str, Any], bound: Mapping[str, float]
) -> dict[str, dict[str, Any]]:
    """Whether each language of ``bound`` kept its held-out loss within its stated bound.

    ``before``/``after`` are held-out records (``{"step": s, "loss_<lang>": loss, ...}``, the first and
    the last of ``heldout.jsonl``); ``bound`` maps a language to the largest rise allowed (nats per
    token). Per language: ``{"bound", "before", "after", "rise", "held"}`` with ``rise = after - before``
    and ``held = rise <= bound``; a language the held-out set does not have gets ``held: None`` and a
    ``note``.
    """
    report: dict[str, dict[str, Any]] = {}
    for lang, limit in bound.items():
        key = f"loss_{lang}"
        if key not in before or key not in after:
            report[lang] = {"bound": limit, "held": None, "note": f"the held-out set has no {lang} documents"}
            continue
        rise = float(after[key]) - float(before[key])
        report[lang] = {
            "bound": limit,
            "before": before[key],
            "after": after[key],
            "rise": round(rise, 6),
            "held": rise <= limit,
        }
    return report


def _log_forgetting(report: Mapping[str, Mapping[str, Any]]) -> None:
    for lang, r in report.items():
        if r["held"] is None:
            log.warning("cpt: forgetting bound for %s not checked: %s", lang, r["note"])
            continue
        line = (
            f"cpt: forgetting {lang}: held-out loss {r['before']:.4f} -> {r['after']:.4f} "
            f"({r['rise']:+.4f} nats/token), bound +{r['bound']:.4f}"
        )
        if r["held"]:
            log.info("%s: held", line)
        else:
            log.warning("%s: EXCEEDED (cpt.forgetting_bound)", line)


def run(cfg: Any, out: Path) -> dict[str, Any]:
    """Train ``cfg.cpt.init_from`` on ``cfg.cpt.shards`` with the mixture/curriculum/engine groups."""
    from moe_adapt.engines import build_engine
    from moe_adapt.train.progress import stage_logging_callbacks
    from moe_adapt.train.sampler import MixtureSampler, load_manifest

    c = cfg.cpt
    if not c.init_from or not Path(c.init_from, "config.json").is_file():
        raise MoEAdaptConfigError(
            f"cpt.init_from={c.init_from!r} is not an HF checkpoint folder "
            "(run the upcycle stage first, or point it at one)"
        )
    if not c.shards or not Path(c.shards, "manifest.json").is_file():
        raise MoEAdaptConfigError(f"cpt.shards={c.shards!r} has no manifest.json (run the data stage first)")
    ctx = distributed.current()
    if c.batch_size % ctx.world_size:
        raise MoEAdaptConfigError(
            f"cpt.batch_size={c.batch_size} is invalid: with {ctx.world_size} processes it must be a "
            f"multiple of {ctx.world_size} (each process trains on an equal share of every batch)"
        )
    work = Path(cfg.run_dir) / ".work" / "cpt"
    if ctx.is_main:
        work.mkdir(parents=True, exist_ok=True)
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
        *main_only([MetricsCallback(work / "metrics.jsonl"), *stage_logging_callbacks(cfg, "cpt")], ctx),
        NaNGuardCallback(c.max_bad_steps),
        CheckpointCallback(work / "checkpoints", c.checkpoint_every, c.keep_last, dist=ctx),
    ]
    heldout_cb = None
    if c.heldout:
        from moe_adapt.eval.heldout import load_heldout

        held = load_heldout(c.heldout, max_docs=c.eval_docs, seed=cfg.seed, key="cpt.heldout")
        heldout_cb = HeldoutLossCallback(
            held.docs, work / "heldout.jsonl", c.eval_every, cfg.mixture.seq_len, write=ctx.is_main
        )
        callbacks.append(heldout_cb)
    trainer = Trainer(engine, sampler, callbacks, max_steps=c.max_steps, batch_size=c.batch_size)
    # every rank resumes from the checkpoint rank 0 sees (the run directory must be on a shared disk)
    found = latest_checkpoint(work / "checkpoints")
    latest = distributed.broadcast_from_main(str(found) if found is not None else None, ctx)
    if latest is not None:
        log.info("cpt: resuming from %s", latest)
        trainer.resume(latest)
    elif heldout_cb is not None:
        if ctx.is_main:
            (work / "heldout.jsonl").unlink(missing_ok=True)
        heldout_cb.evaluate(_eval_model(engine), 0)
    trainer.fit()
    engine.save_hf(out / "model")  # rank 0 writes it; every rank returns once it is there
    summary: dict[str, Any] = {
        "model": "model",
        "steps": trainer.step,
        "tokens": trainer.step * c.batch_size * cfg.mixture.seq_len,
    }
    if heldout_cb is not None and heldout_cb.history:
        first, last = heldout_cb.history[0], heldout_cb.history[-1]
        summary["heldout_before"], summary["heldout_after"] = first, last
        summary["heldout_delta"] = {k: round(last[k] - first[k], 6) for k in last if k.startswith("loss_")}
        if c.forgetting_bound:
            summary["forgetting"] = forgetting_report(first, last, c.forgetting_bound)
    if not ctx.is_main:
        return summary
    _log_forgetting(summary.get("forgetting", {}))
    for name in ("metrics.jsonl", "heldout.jsonl"):
        if (work / name).is_file():
            shutil.copy2(work / name, out / name)
    heldout = out / "heldout.jsonl"
    write_training_curves(out / "metrics.jsonl", out / "curves.png", heldout=heldout, title="cpt")
    atomic_write_json(out / "summary.json", summary)
    shutil.rmtree(work, ignore_errors=True)
    if not any(work.parent.iterdir()):
        work.parent.rmdir()
    return summary
