"""The audit's pictures: a reconstruction grid (true | reconstructed) and a log-scale ROC curve."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

__all__ = ["save_grid", "save_roc"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_grid(rows: dict[str, torch.Tensor], path: Path, captions: dict[str, list[str]] | None = None) -> Path:
    """One row of images per entry (``(N, C, H, W)`` in [0, 1]), labelled with its key; e.g. true, plain, dp."""
    plt = _pyplot()
    n = max(len(v) for v in rows.values())
    fig, axes = plt.subplots(len(rows), n, figsize=(1.1 * n, 1.25 * len(rows)), squeeze=False)
    for r, (name, images) in enumerate(rows.items()):
        for c in range(n):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(images):
                ax.axis("off")
                continue
            img = images[c].detach().float().clamp(0, 1)
            ax.imshow(img[0] if img.shape[0] == 1 else img.permute(1, 2, 0), cmap="gray", vmin=0, vmax=1)
            if captions and name in captions:
                ax.set_title(captions[name][c], fontsize=6)
        axes[r][0].set_ylabel(name, fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str = "") -> Path:
    """ROC curves on log-log axes, as in Carlini et al. 2022 (chance is the diagonal)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4, 4))
    for name, (fpr, tpr) in curves.items():
        ax.plot(np.maximum(fpr, 1e-5), np.maximum(tpr, 1e-5), label=name)
    ax.plot([1e-5, 1], [1e-5, 1], "k--", lw=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(1e-4, 1)
    ax.set_ylim(1e-4, 1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    if title:
        ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
