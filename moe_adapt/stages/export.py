"""The ``export`` stage: compressed / converted artefacts of one checkpoint and what each keeps per
language (:func:`moe_adapt.export.run.export`, which lists the files it writes).

``export.model: null`` (the default) exports the newest model the pipeline wrote in the run directory
(distill, else cpt, else upcycle); expert_prune reads the eval stage's routing of that model when the
run has it.

``export.serve=true``: once the pipeline is done (this stage ran or was complete), :func:`after` serves
the browser page (:mod:`moe_adapt.export.web`) with ``gguf/model-<export.web.gguf_type>.gguf``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from moe_adapt.config.schema import Config
from moe_adapt.errors import MoEAdaptError
from moe_adapt.export.run import export
from moe_adapt.stages.base import StageContext

log = logging.getLogger(__name__)

KEYS = ("export", "eval.benchmarks", "eval.benchmark_max_items", "eval.bootstrap_resamples", "seed")
DISTRIBUTED = False

LATEST = ("distill/model", "cpt/model", "upcycle/model")
"""The pipeline's models, newest first, as folders of the run directory."""


def source_model(model: str | None, run_dir: Path) -> Path:
    """``export.model``, else the first folder of :data:`LATEST` in ``run_dir``.

    Raises:
        MoEAdaptError: neither is a checkpoint folder (one line naming what was looked for).
    """
    if model:
        if not (Path(model) / "config.json").is_file():
            raise MoEAdaptError(f"export.model={model!r} is not an HF checkpoint folder (no config.json)")
        return Path(model)
    for folder in LATEST:
        if (run_dir / folder / "config.json").is_file():
            return run_dir / folder
    looked = ", ".join(f"{run_dir}/{f}" for f in LATEST)
    raise MoEAdaptError(
        f"export.model=None (auto) found no model: none of {looked} exists; run the stages that make them "
        "or set export.model=/path/to/hf_checkpoint"
    )


def run(ctx: StageContext) -> dict[str, Any]:
    """Export ``export.model`` (or :func:`source_model`) into the stage folder."""
    run_dir = Path(ctx.cfg.run_dir)
    if ctx.cfg.export.serve:
        _check_web_runtime()  # before minutes of exporting
    source = source_model(ctx.cfg.export.model, run_dir)
    log.info("export: %s -> %s", source, ", ".join(ctx.cfg.export.methods))
    return export(
        ctx.cfg.export, source, ctx.out, seed=ctx.cfg.seed, eval_dir=run_dir / "eval", eval_cfg=ctx.cfg.eval
    )


def _check_web_runtime() -> None:
    from moe_adapt.export.web import RUNTIME, runtime_installed

    if not runtime_installed():
        raise MoEAdaptError(
            f"export.serve=true needs the browser page's runtime (@wllama/wllama) in {RUNTIME}: run "
            "python -m moe_adapt.export.web install (npm ci), or set export.serve=false"
        )


def after(cfg: Config) -> None:
    """With ``export.serve=true``: serve the browser page with the run's exported GGUF until Ctrl-C."""
    ecfg = cfg.export
    if not ecfg.serve:
        return
    from moe_adapt.export.web import serve

    _check_web_runtime()
    file = Path(cfg.run_dir) / "export" / "gguf" / f"model-{ecfg.web.gguf_type}.gguf"
    if not file.is_file():
        raise MoEAdaptError(f"export.serve=true: {file} does not exist; run the export stage with gguf first")
    serve(file, host=ecfg.web.host, port=ecfg.web.port)
