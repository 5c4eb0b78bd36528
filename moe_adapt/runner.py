"""Run a recipe's stages in order, each into its own folder of the run directory.

A stage is a function ``run(cfg, out_dir) -> summary``. The runner hands it an empty temporary
folder and renames it to ``<run_dir>/<stage>`` only when the stage returns, after writing the
completion marker ``_COMPLETE.json`` into it — so a crash never leaves a half-written stage, and a
stage whose folder exists is complete. A re-run skips complete stages, but refuses to reuse one
that was made with different settings (it names the settings that changed). Once a stage runs,
every stage after it runs too, since its inputs changed.

Under torchrun (several processes, :mod:`moe_adapt.distributed`) every process runs the
pipeline, but only rank 0 writes the run directory: it decides whether a stage is skipped and tells
the others. A distributed stage (``cpt``) runs on every rank, the other ranks writing into a scratch
folder that is thrown away; any other stage runs on rank 0 alone while the others wait. Every rank
leaves a stage only once rank 0 has renamed its folder into place. The run directory must be on a
disk every node sees.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from moe_adapt import distributed
from moe_adapt.config.schema import Config
from moe_adapt.errors import MoEAdaptConfigError
from moe_adapt.fs import atomic_dir, atomic_write_json
from moe_adapt.redact import redact

log = logging.getLogger("moe_adapt")

MARKER = "_COMPLETE.json"


@dataclass(frozen=True)
class Stage:
    """A stage: where its code is and which config keys its output depends on."""

    entry: str  # "module:function"
    keys: tuple[str, ...]
    distributed: bool = False  # every rank runs it under torchrun (else rank 0 alone)

    def load(self) -> Callable[[Config, Path], dict[str, Any]]:
        module, fn = self.entry.split(":")
        return getattr(importlib.import_module(module), fn)  # type: ignore[no-any-return]


STAGES: dict[str, Stage] = {
    "init_dense": Stage("moe_adapt.init_dense:run", ("init_dense", "seed")),
    "data": Stage("moe_adapt.data.stage:run", ("data", "model", "seed")),
    "upcycle": Stage("moe_adapt.upcycle.stage:run", ("model", "upcycle", "seed")),
    "cpt": Stage(
        "moe_adapt.train.stage:run", ("cpt", "mixture", "curriculum", "engine", "seed"), distributed=True
    ),
    "teacher": Stage(
        "moe_adapt.distill.teacher:run",
        ("teacher", "engine", "distill.format", "distill.chat_template", "distill.eval", "seed"),
    ),
    "distill": Stage("moe_adapt.distill.stage:run", ("distill", "engine", "seed")),
    "eval": Stage("moe_adapt.eval.stage:run", ("eval", "seed")),
    "report": Stage("moe_adapt.eval.report_stage:run", ("report", "seed")),
}


LAYOUT_KEYS = ("engine.parallel",)
"""Settings that decide how a stage runs (processes, sharding), not what it produces: they are left out
of its fingerprint, so a stage made with one layout is reused, or resumed, under another."""


def _stage_settings(raw: DictConfig, keys: tuple[str, ...]) -> dict[str, Any]:
    container = OmegaConf.to_container(raw, resolve=True, enum_to_str=True)
    assert isinstance(container, dict)
    for layout in LAYOUT_KEYS:
        *path, leaf = layout.split(".")
        node: Any = container
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    settings: dict[str, Any] = {}
    for key in keys:  # "a.b" picks one entry of a group
        value: Any = container
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        settings[key] = value
    return settings


def _fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


def _changed(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def run_pipeline(cfg: Config, raw: DictConfig) -> dict[str, Any]:
    """Run ``cfg.stages`` in order into ``cfg.run_dir``; returns each stage's summary.

    Starts the process group when launched by torchrun (and ends it on return).
    """
    with distributed.session() as ctx:
        return _run_stages(cfg, raw, ctx)


def _run_stages(cfg: Config, raw: DictConfig, ctx: distributed.DistContext) -> dict[str, Any]:
    run_dir = Path(cfg.run_dir)
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its dataset readers log every file at INFO
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        container = OmegaConf.to_container(raw, resolve=True, enum_to_str=True)
        atomic_write_json(run_dir / "config.json", redact(container))
    summaries: dict[str, Any] = {}
    upstream_ran = False
    for name in cfg.stages:
        stage = STAGES[name]
        settings = _stage_settings(raw, stage.keys)
        marker = run_dir / name / MARKER
        # rank 0 reads the marker and decides; a stale stage raises on every rank
        decide = functools.partial(_decide, cfg, name, settings, marker, upstream_ran)
        decision = distributed.run_on_main(decide, ctx)
        if "skip" in decision:
            summaries[name] = decision["skip"]
            continue
        log.info("%s: running -> %s", name, run_dir / name)
        start = time.perf_counter()
        if stage.distributed and ctx.is_distributed:
            summary = _run_on_every_rank(stage, cfg, run_dir / name, settings, ctx)
        else:
            run = functools.partial(_run_and_mark, stage, cfg, run_dir / name, settings)
            summary = distributed.run_on_main(run, ctx)
        log.info("%s: done in %.1f s", name, time.perf_counter() - start)
        summaries[name] = summary
        upstream_ran = True
    return summaries


def _decide(
    cfg: Config, name: str, settings: dict[str, Any], marker: Path, upstream_ran: bool
) -> dict[str, Any]:
    """``{"skip": summary}`` for a complete stage made with these settings, else ``{"run": True}``."""
    if marker.is_file() and name not in cfg.force and not upstream_ran:
        done = json.loads(marker.read_text(encoding="utf-8"))
        if done.get("fingerprint") == _fingerprint(settings):
            log.info("%s: complete in %s, skipping (force=[%s] runs it again)", name, marker.parent, name)
            return {"skip": done.get("summary", {})}
        changes = _changed(done.get("settings", {}), settings)
        raise MoEAdaptConfigError(
            f"stage {name} in {marker.parent.parent} was completed with other settings "
            f"({'; '.join(changes[:4])}): use another run_name, or force=[{name}] to replace it"
        )
    if upstream_ran and marker.is_file():
        log.info("%s: its inputs were just rebuilt, running it again", name)
    return {"run": True}


def _run_and_mark(stage: Stage, cfg: Config, final: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Run ``stage`` into a temporary folder, write the marker last, rename it to ``final``."""
    start = time.perf_counter()
    with atomic_dir(final) as tmp:
        summary = stage.load()(cfg, tmp)
        atomic_write_json(
            tmp / MARKER,
            {
                "stage": final.name,
                "fingerprint": _fingerprint(settings),
                "settings": redact(settings),
                "summary": summary,
                "seconds": round(time.perf_counter() - start, 3),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            },
        )
    return summary


def _run_on_every_rank(
    stage: Stage, cfg: Config, final: Path, settings: dict[str, Any], ctx: distributed.DistContext
) -> dict[str, Any]:
    """A distributed stage: rank 0 writes ``final`` as :func:`_run_and_mark` does, the other ranks run
    the same code into a scratch folder; everyone leaves once ``final`` is in place, with rank 0's
    summary."""
    if ctx.is_main:
        summary = _run_and_mark(stage, cfg, final, settings)
    else:
        with tempfile.TemporaryDirectory(prefix=f"moe_adapt-{final.name}-rank{ctx.rank}-") as scratch:
            stage.load()(cfg, Path(scratch))
        summary = {}
    distributed.barrier(ctx)
    result: dict[str, Any] = distributed.broadcast_from_main(summary, ctx)
    return result
