"""The validation split: a stratified share of the training data that the server keeps to
choose hyper-parameters on, so that the test set is read once, at the end.

With ``data.validation_fraction`` set, the examples are taken out of the training set before it
is partitioned among clients (no client trains on them), per-round metrics are validation
metrics (``val_*``), and the test set is evaluated once after the last round (``test_*`` in
summary.json). The test set is never split.
"""

from __future__ import annotations

import numpy as np

#: mixed into run.seed so that the split does not repeat the partitioner's random stream
_STREAM = 0x7A11D


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) indices: ``round(fraction * n_c)`` examples of each class ``c`` held out,
    chosen at random (seeded), both sorted. Each class keeps at least one training example."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, _STREAM])
    held: list[np.ndarray] = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        take = min(int(round(fraction * members.size)), members.size - 1)
        if take > 0:
            held.append(rng.choice(members, size=take, replace=False))
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    kept_idx = np.setdiff1d(np.arange(labels.size), held_idx)
    return kept_idx, held_idx
