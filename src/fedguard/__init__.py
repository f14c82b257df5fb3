"""fedguard: privacy-preserving federated learning of vision and generative models."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ArrayDataset": "fedguard.data.arrays",
    "ClassificationTask": "fedguard.tasks.classification",
    "Config": "fedguard.config",
    "ConfigurationError": "fedguard.core.pipeline",
    "Experiment": "fedguard.experiment",
    "RunResult": "fedguard.experiment",
    "Task": "fedguard.tasks.base",
    "run_config": "fedguard.experiment",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fedguard' has no attribute {name!r}")
