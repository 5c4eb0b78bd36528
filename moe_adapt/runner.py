"""Run a recipe's stages in order, each into its own folder of the run directory.

A stage is a module of :mod:`moe_adapt.stages` (the registry :data:`~moe_adapt.stages.STAGES`, in
pipeline order): ``run(ctx) -> summary`` with its fingerprint keys and whether it is distributed
(:mod:`moe_adapt.stages.base`). The runner hands it an empty temporary folder (``ctx.out``) and
renames it to ``<run_dir>/<stage>`` only when the stage returns, after writing the
completion marker ``_COMPLETE.json`` into it (:mod:`moe_adapt.resume`, the one resume mechanism, with
the fingerprint of the stage's settings) — so a crash never leaves a half-written stage, and a
stage whose folder exists is complete. It also creates the stage's scratch folder
``<run_dir>/.work/<stage>`` (``ctx.work``: checkpoints, finished steps) before the stage and removes
it once the stage has returned, before the marker is written; a stage that fails leaves it in place
(unless it is empty), so the same command resumes from it. A re-run skips complete stages, but
refuses to reuse one that was made with different settings (it names the settings that changed).
Once a stage runs, every stage after it runs too, since its inputs changed.

Under torchrun (several processes, :mod:`moe_adapt.distributed`) every process runs the
pipeline, but only rank 0 writes the run directory: it decides whether a stage is skipped and tells
the others. A distributed stage (``cpt``, ``teacher``, ``distill``, ``eval``) runs on every rank, the
other ranks writing into a scratch folder that is thrown away; any other stage runs on rank 0 alone
while the others wait. Every rank leaves a stage only once rank 0 has renamed its folder into place.
The run directory must be on a disk every node sees.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from moe_adapt import distributed
from moe_adapt.config.schema import Config
from moe_adapt.errors import MoEAdaptConfigError
from moe_adapt.fs import atomic_dir, atomic_write_json
from moe_adapt.lock import RunLock
from moe_adapt.redact import redact
from moe_adapt.resume import MARKER, changed, fingerprint, read_marker, write_marker
from moe_adapt.stages import STAGES, Stage, StageContext

log = logging.getLogger("moe_adapt")


LAYOUT_KEYS = ("engine.parallel", "engine.check_memory", "export.serve", "export.web")
"""Settings that decide how a stage runs or is used (processes, sharding, the memory check, the browser
page served after export), not what it produces: they are left out of its fingerprint, so a stage made
with one layout is reused, or resumed, under another."""


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


def run_pipeline(cfg: Config, raw: DictConfig) -> dict[str, Any]:
    """Run ``cfg.stages`` in order into ``cfg.run_dir``; returns each stage's summary.

    Starts the process group when launched by torchrun (and ends it on return).
    """
    with distributed.session() as ctx, deterministic_kernels(cfg.deterministic):
        summaries = _run_stages(cfg, raw, ctx)
        if ctx.is_main:  # the run directory is unlocked: e.g. the export stage's page, served until Ctrl-C
            for name in cfg.stages:
                if (after := STAGES[name].after) is not None:
                    after(cfg)
        return summaries


@contextlib.contextmanager
def deterministic_kernels(on: bool) -> Iterator[None]:
    """Within the block, torch picks deterministic kernels (``on``) or its fastest ones; the process's
    previous choice is restored after it.

    ``warn_only``: an op with no deterministic kernel warns, naming itself, instead of failing the run.
    cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG`` set before its first call to be deterministic.
    """
    was_on, was_warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=was_warn_only)


def _run_stages(cfg: Config, raw: DictConfig, ctx: distributed.DistContext) -> dict[str, Any]:
    run_dir = Path(cfg.run_dir)
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its dataset readers log every file at INFO
    lock = RunLock(run_dir)
    distributed.run_on_main(lock.acquire, ctx)  # a busy run directory stops every rank
    try:
        if ctx.is_main:
            _remove_leftovers(run_dir)
            container = OmegaConf.to_container(raw, resolve=True, enum_to_str=True)
            atomic_write_json(run_dir / "config.json", redact(container))
        if cfg.model.dense and str(cfg.model.dense).endswith(".gguf"):
            cfg = _with_imported_dense(cfg, ctx)
        return _each_stage(cfg, raw, ctx)
    finally:
        lock.release()


def _with_imported_dense(cfg: Config, ctx: distributed.DistContext) -> Config:
    """``model.dense=FILE.gguf``: rank 0 imports it into ``<run_dir>/import/<stem>/`` (once; a re-run
    reuses it) and every stage sees that folder as ``model.dense``. The stages' settings keep the
    file's path, so the same file resumes the run."""
    from moe_adapt.checkpoint.gguf import import_into_run

    src = str(cfg.model.dense)
    folder = distributed.run_on_main(lambda: str(import_into_run(src, cfg.run_dir)), ctx)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dense=folder))


def _remove_leftovers(run_dir: Path) -> None:
    """Remove the hidden temporary folders of stages whose run died (``.<stage>.tmp-<pid>``,
    ``.<stage>.old-<pid>`` of :func:`moe_adapt.fs.atomic_dir`), and those of GGUF imports in
    ``import/``: with the lock held, no live run owns one."""
    found = [p for p in run_dir.glob(".*.*-*") if p.name[1:].split(".", 1)[0] in STAGES]
    found += list((run_dir / "import").glob(".*.*-*"))
    for path in sorted(found):
        if path.is_dir() and path.name.rsplit("-", 1)[0].rsplit(".", 1)[-1] in ("tmp", "old"):
            log.warning("removing %s, left by a run that did not finish", path)
            shutil.rmtree(path, ignore_errors=True)


def _each_stage(cfg: Config, raw: DictConfig, ctx: distributed.DistContext) -> dict[str, Any]:
    run_dir = Path(cfg.run_dir)
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
        done = read_marker(marker.parent)  # None when the marker is damaged (and logged): not complete
        if done is None:
            log.warning("%s: running it again, since its marker %s cannot be trusted", name, marker)
            _check_scratch(cfg, name, settings, upstream_ran)
            return {"run": True}
        if done.get("fingerprint") == fingerprint(settings):
            log.info("%s: complete in %s, skipping (force=[%s] runs it again)", name, marker.parent, name)
            return {"skip": done.get("summary", {})}
        changes = changed(done.get("settings", {}), settings)
        raise MoEAdaptConfigError(
            f"stage {name} in {marker.parent.parent} was completed with other settings "
            f"({'; '.join(changes[:4])}): use another run_name, or force=[{name}] to replace it"
        )
    if upstream_ran and marker.is_file():
        log.info("%s: its inputs were just rebuilt, running it again", name)
    _check_scratch(cfg, name, settings, upstream_ran)
    return {"run": True}


def _check_scratch(cfg: Config, name: str, settings: dict[str, Any], upstream_ran: bool) -> None:
    """Keep the scratch state of an earlier attempt only when it was made with these settings from
    these inputs: refuse other settings (naming them) unless the stage is forced, and start over when
    the stage is forced or a stage before it was just rebuilt."""
    work, stamp = _scratch(cfg, name), _scratch_stamp(cfg, name)
    if not work.is_dir() and not stamp.is_file():
        return
    if name in cfg.force or upstream_ran:
        why = f"force=[{name}]" if name in cfg.force else "its inputs were just rebuilt"
        log.warning("%s: starting over (%s): removing the unfinished attempt in %s", name, why, work)
        _remove_scratch(work, keep_contents=False)
        return
    try:
        made = json.loads(stamp.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        made = {}
    if made.get("fingerprint") == fingerprint(settings):
        log.info("%s: resuming the unfinished attempt in %s", name, work)
        return
    changes = changed(made.get("settings", {}), settings) if made else []
    made_with = f"other settings ({'; '.join(changes[:4])})" if changes else "settings it does not record"
    raise MoEAdaptConfigError(
        f"stage {name} has an unfinished attempt in {work} made with {made_with}: run with those "
        f"settings to resume it, or force=[{name}] to start over"
    )


def _scratch_stamp(cfg: Config, name: str) -> Path:
    """Where the runner records the settings of a stage's scratch state: ``<run_dir>/.work/<name>.json``
    (beside the folder, so the stage's own caches inside it never touch it)."""
    return Path(cfg.run_dir) / ".work" / f"{name}.json"


def _scratch(cfg: Config, name: str) -> Path:
    """The stage's scratch folder, ``<run_dir>/.work/<name>``."""
    return Path(cfg.run_dir) / ".work" / name


def _remove_scratch(work: Path, *, keep_contents: bool) -> None:
    """Remove ``work`` and its settings stamp (only if empty with ``keep_contents``), then ``.work`` once
    it is empty."""
    if keep_contents:
        if work.is_dir() and not any(work.iterdir()):
            work.rmdir()
            work.with_name(f"{work.name}.json").unlink(missing_ok=True)
    else:
        shutil.rmtree(work, ignore_errors=True)
        work.with_name(f"{work.name}.json").unlink(missing_ok=True)
    if work.parent.is_dir() and not any(work.parent.iterdir()):
        work.parent.rmdir()


def _run_and_mark(stage: Stage, cfg: Config, final: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Run ``stage`` into a temporary folder, remove its scratch folder, write the marker last, rename
    the folder to ``final``."""
    start = time.perf_counter()
    work = _scratch(cfg, stage.name)
    work.mkdir(parents=True, exist_ok=True)
    made_with = {"stage": stage.name, "fingerprint": fingerprint(settings), "settings": redact(settings)}
    atomic_write_json(_scratch_stamp(cfg, stage.name), made_with)
    with atomic_dir(final) as tmp:
        try:
            summary = stage.run(StageContext(cfg, tmp, work, distributed.current()))
        except BaseException:
            _remove_scratch(work, keep_contents=True)  # a resume starts from what it holds
            raise
        _remove_scratch(work, keep_contents=False)
        write_marker(
            tmp,
            {
                "stage": final.name,
                "fingerprint": fingerprint(settings),
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
    the same code into a scratch folder (with rank 0's ``work`` folder, which only rank 0 writes);
    everyone leaves once ``final`` is in place, with rank 0's summary."""
    if ctx.is_main:
        summary = _run_and_mark(stage, cfg, final, settings)
    else:
        with tempfile.TemporaryDirectory(prefix=f"moe_adapt-{final.name}-rank{ctx.rank}-") as scratch:
            stage.run(StageContext(cfg, Path(scratch), _scratch(cfg, stage.name), ctx))
        summary = {}
    distributed.barrier(ctx)
    result: dict[str, Any] = distributed.broadcast_from_main(summary, ctx)
    return result
