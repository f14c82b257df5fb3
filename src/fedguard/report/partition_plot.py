"""Pictures and tables of how a partition spreads labels over clients.

Plots are drawn with matplotlib's Agg canvas directly (no pyplot, no global backend change),
so they work headless and in worker processes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedguard.data.partition import describe_partition, label_matrix

__all__ = ["describe_partition", "plot_label_heatmap", "plot_partition", "select_clients"]

MAX_CLIENTS_SHOWN = 100


def select_clients(num_clients: int, max_clients: int = MAX_CLIENTS_SHOWN) -> np.ndarray:
    """Indices of at most ``max_clients`` clients, evenly spaced, first and last included."""
    if num_clients <= max_clients:
        return np.arange(num_clients)
    return np.unique(np.linspace(0, num_clients - 1, max_clients).round().astype(np.int64))


def plot_label_heatmap(
    matrix: np.ndarray,
    path: str | Path,
    title: str = "Label counts per client",
    max_clients: int = MAX_CLIENTS_SHOWN,
) -> Path:
    """Save a PNG heatmap of a (clients x classes) count matrix; return the path.

    Clients run along the x axis and classes along the y axis. With more than
    ``max_clients`` clients, an evenly spaced subset is drawn and the title says so.
    """
    counts = np.asarray(matrix)
    if counts.ndim != 2 or counts.shape[0] == 0 or counts.shape[1] == 0:
        raise ValueError(f"matrix must be a non-empty (clients, classes) array, got {counts.shape}")
    shown = select_clients(counts.shape[0], max(1, max_clients))
    if shown.size < counts.shape[0]:
        title = f"{title}\n({shown.size} of {counts.shape[0]} clients shown, evenly spaced)"
    data = counts[shown].T
    fig = Figure(figsize=(min(4 + 0.12 * shown.size, 16), min(2 + 0.25 * data.shape[0], 12)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="viridis", origin="lower")
    ax.set_xlabel("client")
    ax.set_ylabel("class")
    ax.set_title(title)
    _set_ticks(ax.set_xticks, ax.set_xticklabels, shown, max_labels=25)
    _set_ticks(ax.set_yticks, ax.set_yticklabels, np.arange(data.shape[0]), max_labels=25)
    fig.colorbar(image, ax=ax, label="examples")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


def _set_ticks(set_ticks: Callable[..., Any], set_labels: Callable[..., Any], ids: np.ndarray, max_labels: int) -> None:
    step = max(1, int(np.ceil(ids.size / max_labels)))
    positions = np.arange(0, ids.size, step)
    set_ticks(positions)
    set_labels([str(int(ids[p])) for p in positions])


def plot_partition(
    labels: np.ndarray | Sequence[int],
    parts: Sequence[np.ndarray],
    path: str | Path,
    num_classes: int | None = None,
    title: str = "Label counts per client",
) -> Path:
    """Heatmap of a partition straight from labels and parts (see :func:`plot_label_heatmap`)."""
    return plot_label_heatmap(label_matrix(labels, parts, num_classes), path, title)
