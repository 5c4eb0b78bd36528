"""Run a recipe's stages in order, each into its own folder of the run directory.

A stage is a function ``run(cfg, out_dir) -> summary``. The runner hands it an empty temporary
folder and renames it to ``<run_dir>/<stage>`` only when the stage returns, after writing the
completion marker ``_COMPLETE.json`` into it — so a crash never leaves a half-written stage, and a
stage whose folder exists is complete. A re-run skips complete stages, but refuses to reuse one
that was made with different settings (it names the settings that changed). Once a stage runs,
every stage after it runs too, since its inputs changed.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from moe_adapt.config.schema import Config
from moe_adapt.errors import MoEAdaptConfigError
from moe_adapt.fs import atomic_dir, atomic_write_json

log = logging.getLogger("moe_adapt")

MARKER = "_COMPLETE.json"
SECRET_KEY = re.compile(r"(secret|password|passwd|api_?key|credential|(^|_)(token|auth)$)", re.IGNORECASE)
"""Config keys whose values never reach a file or a log (hf_token, wandb_api_key, ...; not tokenizer)."""


@dataclass(frozen=True)
class Stage:
    """A stage: where its code is and which config keys its output depends on."""

    entry: str  # "module:function"
    keys: tuple[str, ...]

    def load(self) -> Callable[[Config, Path], dict[str, Any]]:
        module, fn = self.entry.split(":")
        return getattr(importlib.import_module(module), fn)  # type: ignore[no-any-return]


STAGES: dict[str, Stage] = {
    "init_dense": Stage("moe_adapt.init_dense:run", ("init_dense", "seed")),
    "data": Stage("moe_adapt.data.stage:run", ("data", "model", "seed")),
    "upcycle": Stage("moe_adapt.upcycle.stage:run", ("model", "upcycle", "seed")),
    "cpt": Stage("moe_adapt.train.stage:run", ("cpt", "mixture", "curriculum", "engine", "seed")),
    "teacher": Stage(
        "moe_adapt.distill.teacher:run",
        ("teacher", "engine", "distill.format", "distill.chat_template", "distill.eval", "seed"),
    ),
    "distill": Stage("moe_adapt.distill.stage:run", ("distill", "engine", "seed")),
    "eval": Stage("moe_adapt.eval.stage:run", ("eval", "seed")),
    "report": Stage("moe_adapt.eval.report_stage:run", ("report", "seed")),
}


def redact(obj: Any) -> Any:
    """A copy of a plain config tree with values of secret-looking keys replaced."""
    if isinstance(obj, dict):
        return {k: "***" if SECRET_KEY.search(str(k)) and v else redact(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def _stage_settings(raw: DictConfig, keys: tuple[str, ...]) -> dict[str, Any]:
    container = OmegaConf.to_container(raw, resolve=True, enum_to_str=True)
    assert isinstance(container, dict)
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
    """Run ``cfg.stages`` in order into ``cfg.run_dir``; returns each stage's summary."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its dataset readers log every file at INFO
    container = OmegaConf.to_container(raw, resolve=True, enum_to_str=True)
    atomic_write_json(run_dir / "config.json", redact(container))
    summaries: dict[str, Any] = {}
    upstream_ran = False
    for name in cfg.stages:
        stage = STAGES[name]
        settings = _stage_settings(raw, stage.keys)
        marker = run_dir / name / MARKER
        if marker.is_file() and name not in cfg.force and not upstream_ran:
            done = json.loads(marker.read_text(encoding="utf-8"))
            if done.get("fingerprint") == _fingerprint(settings):
                log.info("%s: complete in %s, skipping (force=[%s] runs it again)", name, marker.parent, name)
                summaries[name] = done.get("summary", {})
                continue
            changes = _changed(done.get("settings", {}), settings)
            raise MoEAdaptConfigError(
                f"stage {name} in {run_dir} was completed with other settings ({'; '.join(changes[:4])}): "
                f"use another run_name, or force=[{name}] to replace it"
            )
        if upstream_ran and marker.is_file():
            log.info("%s: its inputs were just rebuilt, running it again", name)
        log.info("%s: running -> %s", name, run_dir / name)
        start = time.perf_counter()
        with atomic_dir(run_dir / name) as tmp:
            summary = stage.load()(cfg, tmp)
            elapsed = time.perf_counter() - start
            atomic_write_json(
                tmp / MARKER,
                {
                    "stage": name,
                    "fingerprint": _fingerprint(settings),
                    "settings": redact(settings),
                    "summary": summary,
                    "seconds": round(elapsed, 3),
                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                },
            )
        log.info("%s: done in %.1f s", name, elapsed)
        summaries[name] = summary
        upstream_ran = True
    return summaries
