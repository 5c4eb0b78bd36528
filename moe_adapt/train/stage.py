"""The ``cpt`` stage: continued pretraining on the bilingual curriculum, with exact resume.

Inputs: an HF MoE checkpoint (``cpt.init_from``) and the data stage's shards (``cpt.shards``).
Outputs in the stage folder: ``model/`` (HF checkpoint), ``metrics.jsonl`` (one line per step),
``heldout.jsonl`` (per-language held-out loss at each evaluation) and ``summary.json``.

Checkpoints live in ``<run_dir>/.work/cpt`` while the stage runs: after a crash the same command
resumes from the latest one and, on CPU, reproduces the uninterrupted run's losses bit for bit.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from moe_adapt.errors import MoEAdaptConfigError
from moe_adapt.fs import atomic_write_json
from moe_adapt.train.callbacks import (
    Callback,
    CheckpointCallback,
    MetricsCallback,
    NaNGuardCallback,
    latest_checkpoint,
)
from moe_adapt.train.trainer import Trainer

log = logging.getLogger(__name__)


class HeldoutLossCallback(Callback):
    """Per-language loss on a fixed held-out sample every ``every`` steps (and at the end)."""

    name = "heldout"
    order = 50

    def __init__(self, docs: dict[str, list[Any]], path: Path, every: int, window: int) -> None:
        self.docs, self.path, self.every, self.window = docs, path, every, window
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
            self.evaluate(trainer.engine.model, step)  # type: ignore[attr-defined]

    def on_train_end(self, trainer: Trainer) -> None:
        if not self.history or self.history[-1]["step"] != trainer.step:
            self.evaluate(trainer.engine.model, trainer.step)  # type: ignore[attr-defined]

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state["history"])
        # the file may hold lines from after the checkpoint: rewrite it from the restored history
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.history), encoding="utf-8")


def run(cfg: Any, out: Path) -> dict[str, Any]:
    """Train ``cfg.cpt.init_from`` on ``cfg.cpt.shards`` with the mixture/curriculum/engine groups."""
    from moe_adapt.engines.hf import HFEngine
    from moe_adapt.train.progress import stage_logging_callbacks
    from moe_adapt.train.sampler import MixtureSampler, load_manifest

    c = cfg.cpt
    if c.engine == "megatron":
        raise MoEAdaptConfigError(
            "cpt.engine=megatron is not available yet: the megatron engine's model "
            "and weight mapping exist, its training step does not; use cpt.engine=hf"
        )
    if not c.init_from or not Path(c.init_from, "config.json").is_file():
        raise MoEAdaptConfigError(
            f"cpt.init_from={c.init_from!r} is not an HF checkpoint folder "
            "(run the upcycle stage first, or point it at one)"
        )
    if not c.shards or not Path(c.shards, "manifest.json").is_file():
        raise MoEAdaptConfigError(f"cpt.shards={c.shards!r} has no manifest.json (run the data stage first)")
    work = Path(cfg.run_dir) / ".work" / "cpt"
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    sampler = MixtureSampler(c.shards, cfg.mixture, cfg.curriculum, cfg.seed, global_batch_size=c.batch_size)
    engine = HFEngine(c.init_from, cfg.engine, lr_multiplier=sampler.curriculum.lr_factor)
    shard_vocab = int(load_manifest(c.shards).get("vocab_size", 0))
    if shard_vocab > engine.vocab_size:
        raise MoEAdaptConfigError(
            f"cpt.shards={c.shards!r} were tokenized with {shard_vocab} ids but "
            f"cpt.init_from has a vocabulary of {engine.vocab_size}: use the model's tokenizer"
        )
    callbacks: list[Callback] = [
        MetricsCallback(work / "metrics.jsonl"),
        NaNGuardCallback(c.max_bad_steps),
        CheckpointCallback(work / "checkpoints", c.checkpoint_every, c.keep_last),
        *stage_logging_callbacks(cfg, "cpt"),
    ]
    heldout_cb = None
    if c.heldout:
        from moe_adapt.eval.heldout import load_heldout

        held = load_heldout(c.heldout, max_docs=c.eval_docs, seed=cfg.seed, key="cpt.heldout")
        heldout_cb = HeldoutLossCallback(held.docs, work / "heldout.jsonl", c.eval_every, cfg.mixture.seq_len)
        callbacks.append(heldout_cb)
    trainer = Trainer(engine, sampler, callbacks, max_steps=c.max_steps, batch_size=c.batch_size)
    latest = latest_checkpoint(work / "checkpoints")
    if latest is not None:
        log.info("cpt: resuming from %s", latest)
        trainer.resume(latest)
    elif heldout_cb is not None:
        (work / "heldout.jsonl").unlink(missing_ok=True)
        heldout_cb.evaluate(engine.model, 0)
    trainer.fit()
    engine.save_hf(out / "model")
    for name in ("metrics.jsonl", "heldout.jsonl"):
        if (work / name).is_file():
            shutil.copy2(work / name, out / name)
    summary: dict[str, Any] = {
        "model": "model",
        "steps": trainer.step,
        "tokens": trainer.step * c.batch_size * cfg.mixture.seq_len,
    }
    if heldout_cb is not None and heldout_cb.history:
        first, last = heldout_cb.history[0], heldout_cb.history[-1]
        summary["heldout_before"], summary["heldout_after"] = first, last
        summary["heldout_delta"] = {k: round(last[k] - first[k], 6) for k in last if k.startswith("loss_")}
    atomic_write_json(out / "summary.json", summary)
    shutil.rmtree(work, ignore_errors=True)
    if not any(work.parent.iterdir()):
        work.parent.rmdir()
    return summary
