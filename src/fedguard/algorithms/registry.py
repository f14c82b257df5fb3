"""The federated algorithms by name (``[algorithm] name``), each built from the configuration.

Every algorithm lives in its own module under :mod:`fedguard.algorithms`; registering one is
one line here (its module and builder), imported when the run is assembled, so nothing
depends on which module was imported first.
"""

from __future__ import annotations

import importlib
from typing import Any

from fedguard.core.algorithm import Algorithm
from fedguard.core.pipeline import ConfigurationError

#: name -> "module:builder"; the builder takes the configuration and returns the algorithm
ALGORITHM_BUILDERS: dict[str, str] = {
    "fedavg": "fedguard.algorithms.fedprox:build",
    "fedprox": "fedguard.algorithms.fedprox:build",
    "scaffold": "fedguard.algorithms.scaffold:build",
    "feddyn": "fedguard.algorithms.feddyn:build",
    "ditto": "fedguard.algorithms.ditto:build",
    "fedper": "fedguard.algorithms.fedper:build",
}


def build_algorithm(config: Any) -> Algorithm:
    """The configured algorithm (``config.algorithm.name``)."""
    name = config.algorithm.name
    if name not in ALGORITHM_BUILDERS:
        known = sorted(ALGORITHM_BUILDERS)
        raise ConfigurationError(f"algorithm.name: {name!r} is not available; choose one of {known}")
    module, _, builder = ALGORITHM_BUILDERS[name].partition(":")
    return getattr(importlib.import_module(module), builder)(config)
