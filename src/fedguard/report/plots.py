"""PNG plots of a run's metrics (matplotlib's Agg canvas, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def curves_figure(rows: list[dict[str, Any]], keys: list[str], title: str, ylabel: str) -> Figure | None:
    """One line per metric key against the round (whole-number round ticks); None when no key has data."""
    curves = [(k, *_series(rows, k)) for k in keys]
    curves = [c for c in curves if c[1]]
    if not curves:
        return None
    fig = Figure(figsize=(6, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, xs, ys in curves:
        ax.plot(xs, ys, marker="o", markersize=3, label=key)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers, also in short runs
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_curves(
    rows: list[dict[str, Any]], keys: list[str], path: Path, title: str, ylabel: str
) -> Path | None:
    """Save :func:`curves_figure` as a PNG at ``path``; None when no key has data."""
    fig = curves_figure(rows, keys, title, ylabel)
    if fig is None:
        return None
    fig.savefig(path)
    return path
