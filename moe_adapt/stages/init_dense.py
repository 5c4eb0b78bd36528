"""The ``init_dense`` stage: a small dense checkpoint for the demo and tests, random or briefly pretrained
(the model, tokenizer and pretraining: :mod:`moe_adapt.demo.dense`)."""

from __future__ import annotations

import logging
import shutil
from typing import Any

import torch
from transformers import GenerationConfig

from moe_adapt.demo.dense import (
    SPECIAL_TOKENS,
    build_tokenizer,
    pretrain,
    tokenizer_text,
    write_dense_model,
)
from moe_adapt.stages.base import StageContext
from moe_adapt.train.phase import move_outputs

log = logging.getLogger(__name__)

KEYS = ("init_dense", "seed")
DISTRIBUTED = False


def run(ctx: StageContext) -> dict[str, Any]:
    """Write ``out/model``: config, safetensors weights, tokenizer, generation config (and, when
    pretraining, ``out/metrics.jsonl``: one line per pretraining step, drawn in ``out/curves.png``).

    Returns the stage summary; paths in it are relative to the stage folder.
    """
    cfg, out = ctx.cfg, ctx.out
    torch.manual_seed(cfg.seed)
    icfg = cfg.init_dense
    tokenizer = build_tokenizer(tokenizer_text(icfg.tokenizer_corpus), icfg.vocab_size)
    pad, bos, eos = (tokenizer.vocab[t] for t in SPECIAL_TOKENS)
    model_dir = out / "model"
    start_dir = out / "random" if icfg.pretrain.steps else model_dir
    params = write_dense_model(icfg, tokenizer, start_dir, bos=bos, eos=eos, pad=pad)
    log.info(
        "init_dense: %s with %s parameters, vocabulary %d",
        cfg.init_dense.family,
        f"{params:,}",
        len(tokenizer),
    )
    summary: dict[str, Any] = {"model": "model", "params": params, "family": cfg.init_dense.family}
    if icfg.pretrain.steps:
        work = out / "pretrain"  # inside the stage's temporary folder: a crash leaves nothing behind
        callbacks = ctx.logging_callbacks("init_dense")
        summary["pretrain"] = pretrain(
            icfg.pretrain, start_dir, tokenizer, work, seed=cfg.seed, callbacks=callbacks
        )
        move_outputs(work, out)  # model/ (= model_dir), metrics.jsonl, curves.png
        GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad).save_pretrained(model_dir)
        shutil.rmtree(work)
        shutil.rmtree(start_dir)
        summary["metrics"] = "metrics.jsonl"
    return summary
