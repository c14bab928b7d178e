"""ROC and DET plots of verification curves, written atomically as PNG.

matplotlib is imported lazily and used through its object API with the Agg canvas, so importing this
module (or calling it from a headless worker) never touches pyplot's global state or a GUI backend.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from facesphere.utils.files import atomic_path

logger = logging.getLogger(__name__)

__all__ = ["plot_det", "plot_roc", "save_figure"]

FAR_RANGE = (1e-6, 1.0)

Curves = Mapping[str, tuple[np.ndarray, np.ndarray]]


def _new_axes(figsize=(6.0, 5.0)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save as PNG through ``atomic_path``: readers never see half a file."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    logger.info("wrote %s", path)
    return path


def _positive(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop points whose x is 0: they have no place on a log axis."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"curve arrays must be 1-D of equal length, got {x.shape} and {y.shape}")
    keep = x > 0
    return x[keep], y[keep]


def plot_roc(curves: Curves, path: str | os.PathLike, title: str = "ROC") -> Path:
    """Plot TAR against log-scaled FAR (1e-6 .. 1) for each named ``(far, tar)`` curve; save a PNG at ``path``."""
    if not curves:
        raise ValueError("curves is empty: nothing to plot")
    fig, ax = _new_axes()
    for name, (far, tar) in curves.items():
        x, y = _positive(far, tar)
        ax.step(x, y, where="post", label=str(name), linewidth=1.5)
    ax.set_ylim(0.0, 1.0)
    _label_axes(ax, "False accept rate (FAR)", "True accept rate (TAR)", title, "lower right")
    return save_figure(fig, path)


def plot_det(curves: Curves, path: str | os.PathLike, title: str = "DET") -> Path:
    """Plot FNMR (= 1 - TAR) against FMR (= FAR), both log-scaled, for each named ``(far, tar)`` curve."""
    if not curves:
        raise ValueError("curves is empty: nothing to plot")
    fig, ax = _new_axes()
    lowest = 1.0
    for name, (far, tar) in curves.items():
        x, y = _positive(far, 1.0 - np.asarray(tar, dtype=np.float64))
        keep = y > 0
        x, y = x[keep], y[keep]
        if y.size:
            lowest = min(lowest, float(y.min()))
        ax.step(x, y, where="post", label=str(name), linewidth=1.5)
    ax.set_yscale("log")
    ax.set_ylim(max(lowest / 2.0, 1e-6), 1.0)
    _label_axes(ax, "False match rate (FMR)", "False non-match rate (FNMR)", title, "upper right")
    return save_figure(fig, path)


def _label_axes(ax, xlabel: str, ylabel: str, title: str, legend: str) -> None:
    """Log-scaled FAR axis over FAR_RANGE, labels, grid and legend (shared by ROC and DET)."""
    ax.set_xscale("log")
    ax.set_xlim(*FAR_RANGE)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc=legend)
