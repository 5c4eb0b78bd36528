"""Headless matplotlib figures, saved atomically (the eval reports and the training curves).

Figures are built with ``matplotlib.figure.Figure`` and the Agg canvas directly, never through
``pyplot``, so no global backend is switched and no window opens.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from moe_adapt.errors import MoEAdaptError

__all__ = ["new_figure", "save_figure"]


def new_figure(nrows: int, ncols: int, figsize: tuple[float, float]) -> tuple[Any, list[Any]]:
    """A headless figure with ``nrows × ncols`` axes, returned as ``(figure, flat list of axes)``."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise MoEAdaptError("plots need matplotlib: pip install matplotlib") from err
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def save_figure(fig: Any, path: Path, dpi: int = 120) -> Path:
    """Save ``fig`` as PNG at ``path`` atomically and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
