"""The cpt stage's held-out measurements: the per-language loss on a fixed held-out sample during
training (:class:`HeldoutLossCallback`, written to ``heldout.jsonl``) and whether each language kept
its loss within ``cpt.forgetting_bound`` (:func:`forgetting_report`).

Each record holds ``loss_<lang>`` (nats per token) and, when the held-out shards' tokenizer could be
loaded, ``bpb_<lang>`` and ``bpc_<lang>`` (bits per UTF-8 byte and per character of the scored text,
:mod:`moe_adapt.eval.bits`): per token, a language the tokenizer splits finely (Arabic under an
English-centred tokenizer) looks better than it is; per byte the languages compare. The forgetting
bound stays in nats per token; the report also gives the rise and the bound in bits per byte.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moe_adapt.eval.bits import TokenSizes
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
        self,
        docs: dict[str, list[Any]],
        path: Path,
        every: int,
        window: int,
        *,
        write: bool = True,
        token_sizes: TokenSizes | None = None,
        label: str = "cpt",
    ) -> None:
        self.docs, self.path, self.every, self.window, self.write = docs, path, every, window, write
        self.token_sizes = token_sizes
        self.label = label
        """Names the training in the log line (cpt, distill seq_kd, ...)."""
        self.history: list[dict[str, Any]] = []

    def evaluate(self, model: Any, step: int) -> dict[str, Any]:
        from moe_adapt.eval.perplexity import evaluate_perplexity

        was_training = model.training
        model.eval()
        try:
            result = evaluate_perplexity(
                model, self.docs, window=self.window, stride=self.window, token_sizes=self.token_sizes
            )
        finally:
            model.train(was_training)
        record: dict[str, Any] = {"step": step}
        for lang, r in result.items():
            record[f"loss_{lang}"] = round(r.mean_loss, 6)
            if r.bits_per_byte is not None:
                record[f"bpb_{lang}"] = round(r.bits_per_byte, 6)
            if r.bits_per_char is not None:
                record[f"bpc_{lang}"] = round(r.bits_per_char, 6)
        self.history.append(record)
        if not self.write:
            return record
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        log.info(
            "%s: step %d held-out nats/token (bits/byte) %s",
            self.label,
            step,
            "  ".join(
                f"{lang} {record[f'loss_{lang}']:.4f}"
                + (f" ({record[f'bpb_{lang}']:.4f})" if f"bpb_{lang}" in record else "")
                for lang in result
            ),
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
    the last of ``heldout.jsonl``); ``bound`` maps a language to the largest rise allowed, in nats per
    token (the unit of ``cpt.forgetting_bound``). Per language: ``{"unit", "bound", "before", "after",
    "rise", "held"}`` with ``rise = after - before`` and ``held = rise <= bound``; a language the
    held-out set does not have gets ``held: None`` and a ``note``.

    When the records also hold ``bpb_<lang>``, the same rise and bound are given in bits per byte:
    ``before_bpb``, ``after_bpb``, ``rise_bpb`` and ``bound_bpb``. The held-out text is the same at
    every evaluation, so bits per byte is nats per token times one constant (tokens / bytes / ln 2,
    read off ``before``); the bound in bits per byte is the nats bound times that constant and the
    verdict is the same in both units.
    """
    report: dict[str, dict[str, Any]] = {}
    for lang, limit in bound.items():
        key = f"loss_{lang}"
        if key not in before or key not in after:
            report[lang] = {"bound": limit, "held": None, "note": f"the held-out set has no {lang} documents"}
            continue
        rise = float(after[key]) - float(before[key])
        report[lang] = {
            "unit": "nats/token",
            "bound": limit,
            "before": before[key],
            "after": after[key],
            "rise": round(rise, 6),
            "held": rise <= limit,
        }
        bkey = f"bpb_{lang}"
        if bkey in before and bkey in after and float(before[key]) > 0:
            per_nat = float(before[bkey]) / float(before[key])  # tokens / bytes / ln 2
            report[lang] |= {
                "before_bpb": before[bkey],
                "after_bpb": after[bkey],
                "rise_bpb": round(float(after[bkey]) - float(before[bkey]), 6),
                "bound_bpb": round(limit * per_nat, 6),
            }
    return report


def log_forgetting(
    report: Mapping[str, Mapping[str, Any]], label: str = "cpt", key: str = "cpt.forgetting_bound"
) -> None:
    """Log each language's verdict of :func:`forgetting_report` (a breach as a warning naming ``key``)."""
    for lang, r in report.items():
        if r["held"] is None:
            log.warning("%s: forgetting bound for %s not checked: %s", label, lang, r["note"])
            continue
        line = (
            f"{label}: forgetting {lang}: held-out loss {r['before']:.4f} -> {r['after']:.4f} "
            f"({r['rise']:+.4f} nats/token), bound +{r['bound']:.4f} nats/token"
        )
        if "rise_bpb" in r:
            line += (
                f"; bits/byte {r['before_bpb']:.4f} -> {r['after_bpb']:.4f} ({r['rise_bpb']:+.4f}), "
                f"bound +{r['bound_bpb']:.4f}"
            )
        if r["held"]:
            log.info("%s: held", line)
        else:
            log.warning("%s: EXCEEDED (%s)", line, key)
