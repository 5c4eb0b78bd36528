"""The cpt stage's held-out measurements: the per-language loss on a fixed held-out sample during
training (:class:`HeldoutLossCallback`, written to ``heldout.jsonl``) and whether each language kept
its loss within ``cpt.forgetting_bound`` (:func:`forgetting_report`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moe_adapt.train.callbacks import Callback
from moe_adapt.train.trainer import Trainer

log = logging.getLogger(__name__)


def eval_model(engine: Any) -> Any:
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
            self.evaluate(eval_model(trainer.engine), step)

    def on_train_end(self, trainer: Trainer) -> None:
        if not self.history or self.history[-1]["step"] != trainer.step:
            self.evaluate(eval_model(trainer.engine), trainer.step)

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


def log_forgetting(report: Mapping[str, Mapping[str, Any]]) -> None:
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
