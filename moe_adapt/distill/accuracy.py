"""Held-out accuracy of a model on a prompt set: greedy chain-of-thought, then the answer check.

The same answer check as the verify phase decides correctness, so "accuracy" and "a trace passes the
answer check" mean the same thing. Reported per language with a bootstrap interval, plus the gap
between English and each target language.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from moe_adapt.distill.config import DistillEvalConfig
from moe_adapt.distill.decoding import generate_for_prompts
from moe_adapt.distill.format import ResponseFormat
from moe_adapt.distill.prompts import PromptRecord
from moe_adapt.distill.verify import Trace, VerifyConfig, build_checks, check_trace
from moe_adapt.eval.stats import bootstrap_ci

log = logging.getLogger(__name__)


def evaluate_accuracy(
    model_path: str | Path,
    prompts: Sequence[PromptRecord],
    ecfg: DistillEvalConfig,
    fmt: ResponseFormat,
    *,
    chat_template: str | None,
    seed: int = 0,
) -> dict[str, Any]:
    """``{lang: {n, correct, accuracy, ci95, well_formed}, "gap": {lang: acc_en - acc_lang}}``."""
    from transformers import AutoTokenizer

    from moe_adapt.checkpoint.hf import load_causal_lm

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    model = load_causal_lm(model_path, torch.float32).eval()
    answer_check = build_checks(VerifyConfig(checks=["answer"]), fmt)
    scores: dict[str, list[float]] = {}
    formed: dict[str, int] = {}
    batches = generate_for_prompts(
        model,
        tokenizer,
        prompts,
        chat_template=chat_template,
        batch_size=ecfg.batch_size,
        max_new_tokens=ecfg.max_new_tokens,
    )
    for batch, _, outs in batches:
        for p, [resp] in zip(batch, outs, strict=True):
            text = str(tokenizer.decode(resp, skip_special_tokens=True))
            trace = Trace(
                id=p.id,
                prompt_id=p.id,
                lang=p.lang,
                prompt=p.prompt,
                response=text,
                reference=p.answer,
                answer_type=p.answer_type,
            )
            scores.setdefault(p.lang, []).append(0.0 if check_trace(trace, answer_check, fmt) else 1.0)
            formed[p.lang] = formed.get(p.lang, 0) + (fmt.split(text) is not None)
    result: dict[str, Any] = {}
    for lang, values in scores.items():
        ci = bootstrap_ci(values, n_resamples=2000, seed=seed)
        result[lang] = {
            "n": len(values),
            "correct": int(sum(values)),
            "accuracy": round(ci.mean, 4),
            "ci95": [round(ci.low, 4), round(ci.high, 4)],
            "well_formed": round(formed[lang] / len(values), 4),
        }
    if "en" in result:
        result["gap"] = {
            lang: round(result["en"]["accuracy"] - r["accuracy"], 4)
            for lang, r in result.items()
            if lang != "en"
        }
    return result
