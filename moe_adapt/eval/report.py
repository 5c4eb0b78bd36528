"""Markdown report of a Hydra multirun sweep: metrics per condition over seeds, with CIs.

A sweep directory holds one sub-directory per run (``0/``, ``1/``, ...), each with
``.hydra/overrides.yaml`` (a YAML list such as ``["curriculum.order=easy_to_hard", "seed=1"]``) and a
metrics file (default ``eval/metrics.json``: a flat JSON object of metric name -> number).

Runs are grouped into *conditions* by their overrides other than the seed key. Each metric is
averaged over seeds with a Student t-interval (a percentile bootstrap from
:data:`~moe_adapt.eval.stats.BOOTSTRAP_MIN_N` seeds on: :func:`~moe_adapt.eval.stats.seed_interval`),
and every pair of conditions is compared on the difference ``A − B`` paired by seed, with the same
kind of interval. The report names the method of its intervals. A run whose metrics are missing or
unreadable is listed under "Failed runs" and left out; it does not stop the report.

Outputs in ``out_dir`` (default: the sweep directory): ``report.md``, ``report.json`` (the same
numbers) and ``plots/<metric>.png`` (mean and CI per condition, seeds as dots).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from moe_adapt.errors import MoEAdaptConfigError, MoEAdaptError
from moe_adapt.eval.config import ReportConfig
from moe_adapt.eval.stats import BOOTSTRAP, BOOTSTRAP_MIN_N, T_INTERVAL, paired_difference, seed_interval
from moe_adapt.fs import atomic_write_text
from moe_adapt.plots import new_figure, save_figure

__all__ = [
    "FailedRun",
    "RunRecord",
    "Sweep",
    "build_report",
    "contamination_lines",
    "load_sweep",
    "write_report",
]

log = logging.getLogger("moe_adapt.eval")


@dataclass(frozen=True)
class RunRecord:
    """One finished run of the sweep."""

    name: str
    """Sub-directory name, e.g. ``"3"``."""
    overrides: dict[str, str]
    """Override key -> value as written on the command line (``+``/``++`` prefixes dropped)."""
    seed: int | None
    """Value of the seed key, or None when the run did not set it."""
    metrics: dict[str, float]
    """Metric name -> value."""


@dataclass(frozen=True)
class FailedRun:
    """A run left out of the report, with the reason."""

    name: str
    """Sub-directory name."""
    reason: str
    """What was wrong (missing file, bad JSON, ...)."""


@dataclass
class Sweep:
    """All runs of a sweep directory, read and checked."""

    root: Path
    """The sweep directory."""
    runs: list[RunRecord] = field(default_factory=list)
    """Runs with readable overrides and metrics, in run order."""
    failed: list[FailedRun] = field(default_factory=list)
    """Runs that were skipped."""


def _parse_overrides(path: Path) -> dict[str, str]:
    items = yaml.safe_load(path.read_text(encoding="utf-8"))
    if items is None:
        return {}
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ValueError(f"{path} must be a YAML list of 'key=value' strings")
    out: dict[str, str] = {}
    for item in items:
        if item.startswith("~"):
            out[item.lstrip("~").split("=", 1)[0]] = "<deleted>"
            continue
        if "=" not in item:
            raise ValueError(f"override {item!r} in {path} is not of the form key=value")
        key, value = item.split("=", 1)
        out[key.lstrip("+")] = value
    return out


def _read_run(run_dir: Path, metrics_path: str, seed_key: str) -> RunRecord | FailedRun:
    name = run_dir.name
    ov_file = run_dir / ".hydra" / "overrides.yaml"
    try:
        overrides = _parse_overrides(ov_file)
    except (OSError, yaml.YAMLError, ValueError) as err:
        return FailedRun(name, f"cannot read {ov_file.relative_to(run_dir.parent)}: {err}")
    m_file = run_dir / metrics_path
    rel = m_file.relative_to(run_dir.parent)
    if not m_file.is_file():
        return FailedRun(name, f"no metrics file {rel}")
    try:
        raw = json.loads(m_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return FailedRun(name, f"unparsable JSON in {rel}: {err}")
    if not isinstance(raw, dict) or not raw:
        return FailedRun(name, f"{rel} is not a non-empty JSON object of metric -> number")
    bad = [
        k
        for k, v in raw.items()
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
    ]
    if bad:
        return FailedRun(name, f"{rel} has non-numeric or non-finite values for {bad[:5]}")
    seed_raw = overrides.get(seed_key)
    try:
        seed = None if seed_raw is None else int(seed_raw)
    except ValueError:
        return FailedRun(name, f"{seed_key}={seed_raw!r} is not an integer")
    return RunRecord(name, overrides, seed, {k: float(v) for k, v in raw.items()})


def load_sweep(
    sweep_dir: str | Path, *, metrics_path: str = "eval/metrics.json", seed_key: str = "seed"
) -> Sweep:
    """Read every run sub-directory (one holding ``.hydra/``) of a Hydra multirun directory.

    Raises:
        MoEAdaptError: if ``sweep_dir`` does not exist or holds no run directory.
    """
    root = Path(sweep_dir)
    if not root.is_dir():
        raise MoEAdaptError(f"sweep directory {str(root)!r} does not exist")
    run_dirs = [d for d in root.iterdir() if d.is_dir() and (d / ".hydra").is_dir()]
    if not run_dirs:
        raise MoEAdaptError(f"{str(root)!r} holds no run directory (a sub-directory with .hydra/ inside)")
    run_dirs.sort(key=lambda d: (0, int(d.name), "") if d.name.isdigit() else (1, 0, d.name))
    sweep = Sweep(root)
    for d in run_dirs:
        rec = _read_run(d, metrics_path, seed_key)
        if isinstance(rec, RunRecord):
            sweep.runs.append(rec)
        else:
            sweep.failed.append(rec)
    return sweep


def _fmt(x: float, signed: bool = False) -> str:
    if math.isnan(x):
        return "n/a"
    sign = "+" if signed else ""
    text = f"{x:{sign}.3f}" if 1e-3 <= abs(x) < 1e4 or x == 0 else f"{x:{sign}.3g}"
    return text.replace("-", "−")


def _ci_text(d: Mapping[str, Any], signed: bool = False) -> str:
    if math.isnan(d["low"]):
        return f"{_fmt(d['mean'], signed)} (n=1, no CI)"
    return f"{_fmt(d['mean'], signed)} [{_fmt(d['low'], signed)}, {_fmt(d['high'], signed)}]"


def _group(sweep: Sweep, seed_key: str) -> tuple[list[str], dict[str, str], dict[str, list[RunRecord]]]:
    """Swept keys, fixed overrides, and condition label -> runs (in order of first appearance)."""
    keys = sorted({k for r in sweep.runs for k in r.overrides if k != seed_key})
    values = {k: {r.overrides.get(k, "<unset>") for r in sweep.runs} for k in keys}
    swept = [k for k in keys if len(values[k]) > 1]
    fixed = {k: next(iter(values[k])) for k in keys if len(values[k]) == 1}
    groups: dict[str, list[RunRecord]] = {}
    for r in sweep.runs:
        parts = [r.overrides.get(k, "<unset>") for k in swept]
        label = (
            parts[0] if len(swept) == 1 else ", ".join(f"{k}={v}" for k, v in zip(swept, parts, strict=True))
        )
        groups.setdefault(label or "all runs", []).append(r)
    for label, runs in groups.items():
        seeds = [r.seed for r in runs if r.seed is not None]
        dup = sorted({s for s in seeds if seeds.count(s) > 1})
        if dup:
            names = [r.name for r in runs if r.seed in dup]
            raise MoEAdaptError(
                f"condition {label!r} has several runs with {seed_key}={dup} (runs {names}); "
                "each condition needs one run per seed"
            )
    return swept, fixed, groups


def contamination_lines(path: Path) -> list[str]:
    """Markdown section summarising a contamination JSON.

    Understands the data stage's ``contamination.json`` (totals plus ``benchmarks: {name: {items,
    docs_matched, docs_removed, ...}}``; examples and settings are left out) and, otherwise, an object
    of set -> counts or key -> value, optionally under ``"summary"``.
    """
    if not path.is_file():
        raise MoEAdaptError(f"contamination file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MoEAdaptError(f"contamination file {str(path)!r} is not valid JSON: {err}") from err
    data = data.get("summary", data) if isinstance(data, dict) else data
    if not isinstance(data, dict):
        raise MoEAdaptError(
            f"contamination file {str(path)!r} must hold a JSON object (optionally under 'summary')"
        )
    lines = ["## Contamination", "", f"From `{path}`.", ""]
    if isinstance(data.get("benchmarks"), dict):  # the data stage's decontamination report
        totals = {k: v for k, v in data.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        lines += ["| key | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in totals.items()] + [""]
        data = {
            name: {k: v for k, v in row.items() if not isinstance(v, list | dict)}
            for name, row in data["benchmarks"].items()
            if isinstance(row, dict)
        }
    if data and all(isinstance(v, dict) for v in data.values()):
        cols = list(dict.fromkeys(k for v in data.values() for k in v))
        lines += ["| set | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += [
            f"| {name} | " + " | ".join(str(row.get(c, "")) for c in cols) + " |"
            for name, row in data.items()
        ]
    elif data:
        lines += ["| key | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in data.items()]
    return [*lines, ""]


def _plot_metric(
    metric: str, aggregates: Mapping[str, Any], groups: Mapping[str, list[RunRecord]], path: Path
) -> Path:
    labels = [c for c in groups if metric in aggregates[c]]
    conf = round(100 * aggregates[labels[0]][metric]["confidence"]) if labels else 95
    fig, (ax,) = new_figure(1, 1, figsize=(max(6.0, 1.4 * len(labels) + 2), 4.0))
    for x, label in enumerate(labels):
        a = aggregates[label][metric]
        if not math.isnan(a["low"]):
            ax.errorbar(
                x,
                a["mean"],
                yerr=[[a["mean"] - a["low"]], [a["high"] - a["mean"]]],
                fmt="o",
                color="C0",
                capsize=6,
                markersize=8,
                label=f"mean, {conf}% CI" if x == 0 else None,
            )
        else:
            ax.plot(x, a["mean"], "o", color="C0", markersize=8)
        vals = [r.metrics[metric] for r in groups[label] if metric in r.metrics]
        ax.plot(
            np.full(len(vals), x + 0.12),
            vals,
            ".",
            color="grey",
            alpha=0.8,
            label="seeds" if x == 0 else None,
        )
    ax.set_xticks(range(len(labels)), labels, rotation=15 if len(labels) > 3 else 0)
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.set_xlabel("condition")
    ax.set_ylabel(metric)
    methods = sorted({aggregates[c][metric].get("method", BOOTSTRAP) for c in labels})
    ax.set_title(f"{metric}: mean over seeds with {conf}% CI ({', '.join(methods) or 'none'})")
    ax.grid(axis="y", alpha=0.3)
    if labels:
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def build_report(
    sweep_dir: str | Path,
    *,
    out_dir: str | Path | None = None,
    contamination: str | Path | None = None,
    metrics: Sequence[str] | None = None,
    metrics_path: str = "eval/metrics.json",
    seed_key: str = "seed",
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    bootstrap_seed: int = 0,
) -> Path:
    """Aggregate a multirun sweep over seeds and write ``report.md``, ``report.json`` and plots.

    Args:
        sweep_dir: the Hydra multirun directory (holding ``0/``, ``1/``, ...).
        out_dir: where to write; default ``sweep_dir``.
        contamination: optional path of a contamination JSON (object of set -> counts, or of
            key -> value, optionally under ``"summary"``) to include as a table.
        metrics: metric names to report (default: every metric any run reported, sorted).
        metrics_path: metrics file inside each run directory.
        seed_key: the override that names the seed; runs are paired on it.
        n_resamples, confidence, bootstrap_seed: interval settings (the resamples and their seed
            matter only from :data:`~moe_adapt.eval.stats.BOOTSTRAP_MIN_N` seeds on, where the
            interval is a percentile bootstrap; see :mod:`moe_adapt.eval.stats`).

    Returns:
        The path of ``report.md``.

    Raises:
        MoEAdaptError: if the sweep directory is missing, every run failed, a condition repeats a
            seed, or the contamination file is missing or unreadable.
    """
    sweep = load_sweep(sweep_dir, metrics_path=metrics_path, seed_key=seed_key)
    out = Path(out_dir) if out_dir is not None else sweep.root
    boot: dict[str, Any] = {"n_resamples": n_resamples, "confidence": confidence, "seed": bootstrap_seed}
    contam_md = contamination_lines(Path(contamination)) if contamination is not None else []
    if not sweep.runs:
        reasons = "; ".join(f"{f.name}: {f.reason}" for f in sweep.failed[:3])
        raise MoEAdaptError(f"every run in {str(sweep.root)!r} failed ({reasons})")
    swept, fixed, groups = _group(sweep, seed_key)
    names = list(metrics) if metrics else sorted({m for r in sweep.runs for m in r.metrics})

    aggregates: dict[str, dict[str, Any]] = {}
    for label, runs in groups.items():
        aggregates[label] = {}
        for m in names:
            vals = [r.metrics[m] for r in runs if m in r.metrics]
            if vals:
                aggregates[label][m] = seed_interval(vals, **boot).to_dict()
    comparisons: list[dict[str, Any]] = []
    for a, b in itertools.combinations(groups, 2):
        for m in names:
            sa = {r.seed: r.metrics[m] for r in groups[a] if r.seed is not None and m in r.metrics}
            sb = {r.seed: r.metrics[m] for r in groups[b] if r.seed is not None and m in r.metrics}
            if set(sa) & set(sb):
                diff = paired_difference(sa, sb, **boot).to_dict()
                comparisons.append({"a": a, "b": b, "metric": m, **diff})

    conf_pct = f"{100 * confidence:g}%"
    md = [f"# Sweep report: `{sweep.root}`", ""]
    md.append(
        f"{len(sweep.runs) + len(sweep.failed)} runs: {len(sweep.runs)} used, {len(sweep.failed)} failed."
    )
    md.append(
        f"Swept: {', '.join(f'`{k}`' for k in swept) or 'nothing but the seed'}; seeds: "
        f"{sorted({r.seed for r in sweep.runs if r.seed is not None}) or 'none set'}."
    )
    if fixed:
        md.append("Fixed overrides: " + ", ".join(f"`{k}={v}`" for k, v in fixed.items()) + ".")
    methods = {d["method"] for agg in aggregates.values() for d in agg.values()}
    methods |= {c["method"] for c in comparisons}
    md += ["", f"Intervals: {_methods_text(methods, n_resamples, bootstrap_seed)}", ""]
    md += [f"## Metrics by condition (mean [{conf_pct} CI])", ""]
    labels = list(groups)  # one column per condition, one row per metric: readable with many metrics
    md += [
        "| metric | " + " | ".join(f"{lab} ({len(groups[lab])} seeds)" for lab in labels) + " |",
        "|---" * (len(labels) + 1) + "|",
    ]
    for m in names:
        cells = [_ci_text(aggregates[lab][m]) if m in aggregates[lab] else "—" for lab in labels]
        md.append(f"| {m} | " + " | ".join(cells) + " |")
    md += ["", f"## Paired differences (A − B, paired by `{seed_key}`, mean [{conf_pct} CI])", ""]
    if comparisons:
        md += ["| comparison | metric | Δ | seeds | unpaired seeds |", "|---|---|---|---|---|"]
        for c in comparisons:
            md.append(
                f"| {c['a']} vs {c['b']} | {c['metric']} | Δ {c['metric']} {_ci_text(c, signed=True)} | "
                f"{c['n']} | {', '.join(map(str, c['unpaired_seeds'])) or '—'} |"
            )
    else:
        md.append("No pair of conditions shares a seed; nothing to compare.")
    md += [""]
    if sweep.failed:
        md += ["## Failed runs (left out)", "", "| run | reason |", "|---|---|"]
        md += [f"| {f.name} | {f.reason.replace('|', '/')} |" for f in sweep.failed] + [""]
    md += contam_md

    plot_paths = [_plot_metric(m, aggregates, groups, out / "plots" / f"{_safe(m)}.png") for m in names]
    md += (
        ["## Plots", ""] + [f"![{m}](plots/{p.name})" for m, p in zip(names, plot_paths, strict=True)] + [""]
    )
    report_json = {
        "sweep": str(sweep.root),
        "swept": swept,
        "fixed": fixed,
        "bootstrap": boot,
        "interval_methods": sorted(methods),
        "conditions": {
            label: {
                "runs": [r.name for r in runs],
                "seeds": [r.seed for r in runs],
                "metrics": aggregates[label],
            }
            for label, runs in groups.items()
        },
        "comparisons": comparisons,
        "failed": [{"run": f.name, "reason": f.reason} for f in sweep.failed],
    }
    atomic_write_text(out / "report.json", json.dumps(_no_nan(report_json), indent=1, allow_nan=False))
    return atomic_write_text(out / "report.md", "\n".join(md))


def _methods_text(methods: set[str], n_resamples: int, bootstrap_seed: int) -> str:
    """The sentence that names how the report's intervals were made."""
    parts = []
    if T_INTERVAL in methods:
        parts.append(
            f"Student t-interval over seeds (mean ± t(n−1) · s/√n; used below {BOOTSTRAP_MIN_N} seeds, "
            "where a percentile bootstrap is too narrow)"
        )
    if BOOTSTRAP in methods:
        parts.append(
            f"percentile bootstrap ({n_resamples} resamples, seed {bootstrap_seed}; "
            f"used from {BOOTSTRAP_MIN_N} seeds on)"
        )
    text = "; ".join(parts) or "none (no metric)"
    return text[0].upper() + text[1:] + "."


def _no_nan(obj: Any) -> Any:
    """Replace NaN (no interval) with None so the JSON is strict."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _no_nan(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_no_nan(v) for v in obj]
    return obj


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def write_report(rcfg: ReportConfig, out: Path, *, seed: int) -> dict[str, Any]:
    """Aggregate ``rcfg.sweep_dir`` into ``out`` (the ``report`` stage); returns the stage summary
    (relative paths). ``seed`` seeds the bootstrap (used from
    :data:`~moe_adapt.eval.stats.BOOTSTRAP_MIN_N` seeds on)."""
    if not rcfg.sweep_dir:
        raise MoEAdaptConfigError(
            "report.sweep_dir=None is invalid: stage report needs the multirun folder, "
            "e.g. report.sweep_dir=runs/tiny-multirun/2025-01-01_12-00-00"
        )
    sweep = Path(rcfg.sweep_dir)
    if not sweep.is_dir():
        raise MoEAdaptConfigError(f"report.sweep_dir={str(sweep)!r} is invalid: no such folder")
    build_report(
        sweep,
        out_dir=out,
        contamination=rcfg.contamination,
        metrics=list(rcfg.metrics) or None,
        metrics_path=rcfg.metrics_path,
        seed_key=rcfg.seed_key,
        n_resamples=rcfg.n_resamples,
        confidence=rcfg.confidence,
        bootstrap_seed=seed,
    )
    data = json.loads((out / "report.json").read_text(encoding="utf-8"))
    failed = data["failed"]
    for f in failed:
        log.warning("report: run %s skipped: %s", f["run"], f["reason"])
    used = sum(len(c["runs"]) for c in data["conditions"].values())
    log.info("report: %d runs used, %d failed -> %s", used, len(failed), out / "report.md")
    return {
        "report": "report.md",
        "json": "report.json",
        "plots": sorted(str(p.relative_to(out)) for p in (out / "plots").glob("*.png")),
        "runs": used,
        "failed": [f["run"] for f in failed],
        "conditions": list(data["conditions"]),
    }
