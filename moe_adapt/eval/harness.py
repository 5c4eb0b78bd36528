"""lm-evaluation-harness tasks, run in-process on an already-loaded HF model, with no download.

The shipped task YAMLs under ``moe_adapt/eval/tasks/`` read local JSONL files through the
``datasets`` JSON builder; their data path is the placeholder ``@BENCHMARKS_DIR@``, replaced at run
time by ``eval.harness_data_dir`` (or ``$MOE_ADAPT_BENCHMARKS``) when they are rendered into the
stage's ``harness/tasks/`` folder. Extra task folders (``eval.harness_include``) are indexed as
they are. While the harness runs, the Hugging Face Hub and ``datasets`` are forced offline, so a
task whose data is not local fails instead of downloading.

Needs the optional ``lm-eval`` package (``pip install lm-eval==0.4.13``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from moe_adapt.errors import MoEAdaptConfigError, MoEAdaptError

__all__ = ["TASKS_DIR", "render_tasks", "run_harness", "shipped_tasks"]

log = logging.getLogger("moe_adapt.eval")

TASKS_DIR = Path(__file__).parent / "tasks"
"""Folder of the shipped task templates."""
PLACEHOLDER = "@BENCHMARKS_DIR@"
"""Replaced by the benchmark folder when the templates are rendered."""
DATA_ENV = "MOE_ADAPT_BENCHMARKS"
"""Environment variable naming the benchmark folder when ``eval.harness_data_dir`` is null."""


def shipped_tasks() -> list[str]:
    """Names of the shipped tasks (one YAML per task, named after it)."""
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def render_tasks(out_dir: str | Path, data_dir: str | Path) -> dict[str, int]:
    """Render the shipped task YAMLs into ``out_dir`` reading clean copies of their data files.

    Each task's ``<data_dir>/<task>.jsonl`` is read with :func:`~moe_adapt.eval.mc.load_mc_items`;
    malformed lines are counted and left out of the copy in ``out_dir/data/`` (the ``datasets``
    JSON reader would otherwise fail on the whole file). Tasks whose file is missing are not rendered.

    Returns:
        task -> number of malformed lines skipped, for every rendered task.
    """
    from moe_adapt.eval.mc import load_mc_items

    out = Path(out_dir)
    (out / "data").mkdir(parents=True, exist_ok=True)
    skipped: dict[str, int] = {}
    for template in sorted(TASKS_DIR.glob("*.yaml")):
        source = Path(data_dir) / f"{template.stem}.jsonl"
        if not source.is_file():
            continue
        mc = load_mc_items(source)
        rows = [
            {
                "id": i.id,
                "source_key": i.pair_key,
                "question": i.question,
                "choices": list(i.choices),
                "answer": i.answer,
            }
            for i in mc.items
        ]
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (out / "data" / source.name).write_text(text, encoding="utf-8")
        yaml_text = template.read_text(encoding="utf-8").replace(PLACEHOLDER, str((out / "data").resolve()))
        (out / template.name).write_text(yaml_text, encoding="utf-8")
        skipped[template.stem] = mc.malformed  # load_mc_items warned about them
    return skipped


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Force the Hub and ``datasets`` offline (environment and already-imported module flags)."""
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved_env = {n: os.environ.get(n) for n in names}
    patched: list[tuple[Any, str, Any]] = []
    for n in names:
        os.environ[n] = "1"
    for module_name, attr in (
        ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
        ("datasets.config", "HF_HUB_OFFLINE"),
    ):
        with contextlib.suppress(ImportError):
            module = __import__(module_name, fromlist=[attr])
            if hasattr(module, attr):
                patched.append((module, attr, getattr(module, attr)))
                setattr(module, attr, True)
    try:
        yield
    finally:
        for module, attr, value in patched:
            setattr(module, attr, value)
        for n, v in saved_env.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


def _numeric_results(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{"task": {"acc,none": 0.5, "acc_stderr,none": "N/A", ...}}`` -> ``{"task": {"acc": 0.5}}``."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results.items():
        clean: dict[str, float] = {}
        for name, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                continue
            metric, _, filt = name.partition(",")
            if metric in ("sample_len", "sample_count"):
                continue
            clean[metric if filt in ("", "none") else f"{metric}.{filt}"] = float(value)
        out[task] = clean
    return out


def run_harness(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    work_dir: str | Path,
    *,
    data_dir: str | Path | None = None,
    include: Sequence[str | Path] = (),
    include_defaults: bool = False,
    batch_size: int = 8,
    num_fewshot: int = 0,
    limit: int | None = None,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Run lm-eval ``tasks`` on ``model`` (an HF causal LM already on its device) and return scores.

    Args:
        model: the loaded model; lm-eval's ``HFLM`` wraps it as is.
        tokenizer: its Hugging Face tokenizer (``PreTrainedTokenizerBase``).
        tasks: task (or group/tag) names, shipped or from ``include`` folders.
        work_dir: where the shipped tasks are rendered (``work_dir/tasks``).
        data_dir: folder with the shipped tasks' JSONL files; default ``$MOE_ADAPT_BENCHMARKS``.
        include: extra folders of task YAMLs.
        include_defaults: also index lm-eval's built-in tasks (their data must be cached locally).

    Returns:
        task -> metric -> value (e.g. ``{"hadith_qa_ar": {"acc": 0.25, "acc_norm": 0.5}}``).

    Raises:
        MoEAdaptError: if lm-eval is not installed, a task is unknown, or its data is not local.
    """
    try:
        import lm_eval
        from datasets.exceptions import DatasetGenerationError
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise MoEAdaptError(
            f"eval.harness_tasks needs lm-evaluation-harness ({err}): pip install 'moe-adapt[eval]' "
            "(or set eval.harness_tasks=[])"
        ) from err
    paths: list[str] = []
    rendered: dict[str, int] = {}
    data = data_dir if data_dir is not None else os.environ.get(DATA_ENV)
    wanted_shipped = [t for t in tasks if t in shipped_tasks() or t == "hadith_qa"]
    if data is not None:
        rendered = render_tasks(Path(work_dir) / "tasks", data)
        paths.append(str(Path(work_dir) / "tasks"))
    elif wanted_shipped:
        raise MoEAdaptConfigError(
            f"eval.harness_data_dir=None is invalid: the shipped tasks {wanted_shipped} need the folder "
            f"holding their JSONL files (set eval.harness_data_dir or ${DATA_ENV})"
        )
    for folder in include:
        if not Path(folder).is_dir():
            raise MoEAdaptConfigError(f"eval.harness_include={str(folder)!r} is invalid: not a folder")
        paths.append(str(Path(folder).resolve()))
    for name in wanted_shipped:
        for template in TASKS_DIR.glob(f"{name}*.yaml"):
            if template.stem not in rendered:
                jsonl = Path(str(data)) / f"{template.stem}.jsonl"
                raise MoEAdaptError(f"harness task {template.stem}: data file {str(jsonl)!r} does not exist")
    manager = TaskManager(include_path=paths or None, include_defaults=include_defaults)
    known = set(manager.all_tasks) | set(manager.all_groups) | set(manager.all_tags)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise MoEAdaptConfigError(
            f"eval.harness_tasks={list(tasks)!r} is invalid: unknown task(s) {unknown}; shipped: "
            f"{shipped_tasks()}; add folders with eval.harness_include or set eval.harness_defaults=true"
        )
    device = next(model.parameters()).device
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    log.info("eval: lm-eval %s on %s", getattr(lm_eval, "__version__", "?"), ", ".join(tasks))
    with _offline():
        try:
            raw = lm_eval.simple_evaluate(
                model=lm,
                tasks=list(tasks),
                num_fewshot=num_fewshot or None,
                limit=limit,
                task_manager=manager,
                bootstrap_iters=0,
                log_samples=False,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
        except (FileNotFoundError, ConnectionError, OSError, DatasetGenerationError) as err:
            raise MoEAdaptError(
                f"lm-eval could not read a task's data offline ({type(err).__name__}: {err}); "
                "every harness task must read local files (see docs/eval.md)"
            ) from err
    if raw is None:  # lm-eval returns None on non-zero ranks
        return {}
    return _numeric_results(raw.get("results", {}))
