"""``curves.png``: a training stage's metrics drawn against the optimizer step.

:func:`plot_training_curves` reads the stage's ``metrics.jsonl`` (and the cpt stage's
``heldout.jsonl``) and draws one panel per group of metrics the stream holds:

* **loss**: ``loss`` at every step (faint) and its exponential moving average, with ``lm_loss`` and
  ``kd_loss`` smoothed the same way where they differ from ``loss``;
* **held-out loss** per language (``loss_<lang>`` of ``heldout.jsonl``): forgetting shows here;
* **held-out bits/byte** per language (``bpb_<lang>``, when written): the unit that compares languages;
* **data mix**: each source's share of the sequences so far (from ``data/<source>``, each batch's
  share; with equal batches their running mean);
* **learning rate**, **gradient norm** (log scale);
* **router health**: the coefficient of variation of the expert load and the busiest expert's load
  relative to an even share (``moe/load_cv``, ``moe/max_load``).

Where the curriculum's phase (``phase``) moves to the next one, every panel gets a dotted vertical
line. Panels without data are left out; a stream without any step draws nothing.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moe_adapt.errors import MoEAdaptError
from moe_adapt.plots import new_figure, save_figure

log = logging.getLogger(__name__)

SMOOTHING_SPAN = 50
"""The moving averages' time constant is the run's length over this many steps (at least one step):
smooth enough on long runs, without lagging behind the first steps of short ones."""


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (``"nan"``/``"inf"`` strings read as floats by the caller)."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as err:
            raise MoEAdaptError(f"{path}:{number} is not a JSON line: {err}") from None
    return rows


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of ``key`` over the rows that have it (non-finite values kept as NaN)."""
    steps, values = [], []
    for row in rows:
        if key in row and "step" in row:
            steps.append(int(row["step"]))
            values.append(float(row[key]))
    return steps, values


def ema(values: Sequence[float], smoothing: float) -> list[float]:
    """Bias-corrected exponential moving average with weight ``smoothing`` on the past; NaN and
    infinite values are skipped (the average carries over them)."""
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        if math.isfinite(v):
            avg = smoothing * avg + (1 - smoothing) * v
            weight = smoothing * weight + (1 - smoothing)
        out.append(avg / weight if weight else math.nan)
    return out


def running_mean(values: Sequence[float]) -> list[float]:
    """The mean of the values up to each one."""
    total, out = 0.0, []
    for i, v in enumerate(values, 1):
        total += v
        out.append(total / i)
    return out


def phase_starts(rows: Sequence[Mapping[str, Any]]) -> list[tuple[int, int]]:
    """``(step, phase)`` for every step whose batch reaches a phase later than the step before's."""
    starts, last = [], None
    for step, phase in zip(*_series(rows, "phase"), strict=True):
        current = math.ceil(phase)  # a batch that crosses a boundary belongs to the new phase
        if last is not None and current > last:
            starts.append((step, current))
        last = current if last is None else max(last, current)
    return starts


def plot_training_curves(
    metrics: Path, path: Path, *, heldout: Path | None = None, title: str = ""
) -> Path | None:
    """Draw ``metrics`` (and ``heldout``, when given and present) into the PNG ``path``.

    Returns ``path``, or None when the stream has no step to draw (nothing is written then).
    """
    rows = read_jsonl(metrics)
    held = read_jsonl(heldout) if heldout is not None and heldout.is_file() else []
    if not any("step" in row for row in rows):
        return None
    keys = {k for row in rows for k in row}
    # (title, metric keys and labels, style, source rows, log scale); styles: "loss" (each step faint
    # and the EMA), "ema", "mean" (running), "raw", "points" (held-out evaluations)
    panels: list[tuple[str, list[tuple[str, str]], str, Sequence[Mapping[str, Any]], bool]] = []
    losses = [("loss", "loss")]
    losses += [(k, k) for k in ("lm_loss", "kd_loss") if k in keys and _differs(rows, k, "loss")]
    panels.append(("training loss (each step, EMA)", losses, "loss", rows, False))
    languages = sorted({k for row in held for k in row if k.startswith("loss_")})
    panels.append(("held-out loss", [(k, k.removeprefix("loss_")) for k in languages], "points", held, False))
    per_byte = sorted({k for row in held for k in row if k.startswith("bpb_")})
    panels.append(
        ("held-out bits/byte", [(k, k.removeprefix("bpb_")) for k in per_byte], "points", held, False)
    )
    sources = sorted(k for k in keys if k.startswith("data/"))
    panels.append(("data mix: share of sequences so far", [(k, k[5:]) for k in sources], "mean", rows, False))
    panels.append(("learning rate", [("lr", "lr")], "raw", rows, False))
    panels.append(("gradient norm (EMA)", [("grad_norm", "grad_norm")], "ema", rows, True))
    router = [(k, k) for k in ("moe/load_cv", "moe/max_load")]
    panels.append(("router: expert load", router, "raw", rows, False))
    panels = [
        (name, [(k, label) for k, label in lines if any(k in r for r in src)], style, src, log_scale)
        for name, lines, style, src, log_scale in panels
    ]
    panels = [panel for panel in panels if panel[1]]

    ncols = 2 if len(panels) <= 4 else 3
    nrows = -(-len(panels) // ncols)
    fig, axes = new_figure(nrows, ncols, figsize=(5.0 * ncols, 3.2 * nrows))
    starts = phase_starts(rows)
    steps_run = max((int(row["step"]) for row in rows if "step" in row), default=1)
    smoothing = 1.0 - 1.0 / max(1.0, steps_run / SMOOTHING_SPAN)
    for ax, (name, lines, style, src, log_scale) in zip(axes, panels, strict=False):
        for i, (key, label) in enumerate(lines):
            steps, values = _series(src, key)
            color = f"C{i}"
            if style == "points":
                ax.plot(steps, values, "o-", color=color, label=label, markersize=4)
            elif style == "loss":
                ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(steps, ema(values, smoothing), color=color, label=label)
            else:
                shown = {"ema": lambda v: ema(v, smoothing), "mean": running_mean}.get(style, list)(values)
                ax.plot(steps, shown, color=color, label=label)
        for step, phase in starts:
            ax.axvline(step, color="grey", linestyle=":", linewidth=1)
            ax.annotate(f"phase {phase}", (step, 1.0), xycoords=("data", "axes fraction"),
                        xytext=(2, -10), textcoords="offset points", fontsize=7, color="grey")  # fmt: skip
        if log_scale:
            ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=7)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def write_training_curves(
    metrics: Path, path: Path, *, heldout: Path | None = None, title: str = ""
) -> Path | None:
    """:func:`plot_training_curves` at the end of a training stage: a failure is logged as a
    warning, never allowed to lose the trained model; a missing ``metrics`` draws nothing."""
    if not metrics.is_file():
        return None
    try:
        return plot_training_curves(metrics, path, heldout=heldout, title=title)
    except Exception as err:  # a plot is a view on metrics.jsonl, which stays
        log.warning("%s: could not draw %s (%s: %s)", title or "training", path.name, type(err).__name__, err)
        return None


def _differs(rows: Sequence[Mapping[str, Any]], key: str, other: str) -> bool:
    """Whether ``key`` is not just a copy of ``other`` in the rows that have both."""
    return any(key in r and other in r and r[key] != r[other] for r in rows)
