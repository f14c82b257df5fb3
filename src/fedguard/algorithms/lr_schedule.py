"""The clients' learning rate over rounds, sent by the server with each fit instruction.

The server computes a factor for the round (Flower's ``on_fit_config_fn`` plays this part
there) and puts it in the fit message as ``lr_scale``; every client multiplies its local
learning rate by it, whatever its optimiser (the engine's SGD, a task's Adam). The factor
depends only on the round and the configuration, so a resumed run continues the schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

SCHEDULES = ["constant", "cosine"]

#: the server's per-round fit instructions (Flower's on_fit_config_fn)
FitConfig = Callable[[int], dict[str, Any]]


def lr_scale(schedule: str, round: int, rounds: int) -> float:
    """The factor on the local learning rate in ``round`` (1-based) of ``rounds``.

    ``cosine`` (Loshchilov and Hutter 2017, without restarts) is 1 in round 1 and falls along
    half a cosine towards 0, reaching ``0.5 * (1 + cos(pi * (rounds - 1) / rounds))`` in the
    last round.
    """
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * (round - 1) / max(rounds, 1)))
    raise ValueError(f"train.lr_schedule must be one of {SCHEDULES}, got {schedule!r}")


def schedule_fit_config(schedule: str, rounds: int) -> FitConfig | None:
    """The fit instructions of a schedule (None for a constant learning rate: nothing to send)."""
    if schedule == "constant":
        return None
    lr_scale(schedule, 1, rounds)  # refuse an unknown name now, not in round 1

    def fit_config(round: int) -> dict[str, Any]:
        return {"lr_scale": lr_scale(schedule, round, rounds)}

    return fit_config


def read_lr_scale(instructions: dict[str, Any]) -> float:
    """The ``lr_scale`` of a fit message (1 when absent), refused unless finite and positive."""
    value = instructions.get("lr_scale", 1.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"fit instruction lr_scale must be a finite positive number, got {value!r}")
    return float(value)


def scaled_trainer(trainer: Any, instructions: dict[str, Any]) -> Any:
    """``trainer`` at the learning-rate factor of a fit message (the trainer itself at factor 1)."""
    scale = read_lr_scale(instructions)
    if scale == 1.0:
        return trainer
    if not hasattr(trainer, "scaled"):
        raise ValueError(f"train.lr_schedule: the trainer {type(trainer).__name__} has no scaled(lr_scale); "
                         "give it one or use lr_schedule = 'constant'")
    return trainer.scaled(scale)
