"""The ``eval`` stage: every checkpoint of ``eval.models`` on held-out text, benchmarks and routing
(:func:`moe_adapt.eval.evaluate.evaluate`, which lists the files it writes).

``eval.models: []`` (the default) evaluates ``model.dense`` and the newest model the pipeline wrote in
the run directory (:data:`LATEST`): ``stages=[eval]`` after a run scores what the run made.

Under torchrun every rank runs the stage and evaluates its share of the models (rank ``r``: models
``r, r+W, ...``); rank 0 gathers the results and writes the same files as one process."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from moe_adapt.config.schema import Config
from moe_adapt.errors import MoEAdaptError
from moe_adapt.eval.config import ModelEntry
from moe_adapt.eval.evaluate import evaluate
from moe_adapt.stages.base import StageContext

log = logging.getLogger(__name__)

KEYS = ("eval", "model", "seed")
DISTRIBUTED = True

LATEST = (("distill", "distill/model"), ("cpt", "cpt/model"), ("moe", "upcycle/model"))
"""The pipeline's models, newest first: the name they get in metrics and their folder in run_dir."""


def default_models(cfg: Config) -> list[ModelEntry]:
    """``model.dense`` (when it is a folder) and the first folder of :data:`LATEST` present in run_dir.

    Raises:
        MoEAdaptError: neither is there: one line saying what was looked for and how to name models.
    """
    models = []
    if cfg.model.dense and (Path(cfg.model.dense) / "config.json").is_file():
        models.append(ModelEntry("dense", str(cfg.model.dense)))
    run_dir = Path(cfg.run_dir)
    for name, folder in LATEST:
        if (run_dir / folder / "config.json").is_file():
            models.append(ModelEntry(name, str(run_dir / folder)))
            break
    if not models:
        looked = ", ".join(f"{run_dir}/{folder}" for _, folder in LATEST)
        raise MoEAdaptError(
            f"eval.models=[] (auto) found no model: model.dense={cfg.model.dense!r} is not a checkpoint "
            f"folder and none of {looked} exists; run the stages that make them, or name the models: "
            "eval.models='[{name: moe, path: /ckpt/moe}]'"
        )
    return models


def run(ctx: StageContext) -> dict[str, Any]:
    """Evaluate ``eval.models`` (or :func:`default_models`) into the stage folder, drawing samples with
    ``seed``."""
    ecfg = ctx.cfg.eval
    if not ecfg.models:
        ecfg = dataclasses.replace(ecfg, models=default_models(ctx.cfg))
        log.info("eval: eval.models=[] -> %s", ", ".join(f"{m.name}={m.path}" for m in ecfg.models))
    return evaluate(ecfg, ctx.out, seed=ctx.cfg.seed, work=ctx.work)
