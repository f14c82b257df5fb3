"""Whether a run still makes sense after a round: a finite model, finite metrics, rounds that
update the model.

A learning rate far too large (``train.lr=1e9``) makes the clients' losses and updates NaN or
infinite; a server step can do the same to the global model. Such a run cannot recover, so it
stops at the first round where that happens, keeps what the last finite round left (model,
checkpoint, metrics) and fails with :class:`RunFailed`, naming the round and the likely cause.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fedguard.types import Params

#: the words in a client failure that say its reply held NaN or infinite values
NONFINITE_MARKERS = ("nan", "infinite", "non-finite", "beyond +-")
#: the metrics of a round that evaluate the global model (a NaN among them means it diverged)
EVALUATION_PREFIXES = ("test_", "val_", "clients_test_")


class RunFailed(RuntimeError):
    """A run that ended without a usable result: its training diverged, or no round updated the
    model. Everything up to the failure is in the run folder (``result.run_dir``)."""

    def __init__(self, message: str, result: Any = None) -> None:
        super().__init__(message)
        self.result = result


def nonfinite_tensors(params: Params) -> list[str]:
    """Names of the tensors that hold a NaN or an infinity."""
    return [k for k, v in params.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def nonfinite_metrics(row: dict[str, Any]) -> list[str]:
    """Keys of a metrics row whose value is a NaN or an infinity."""
    return [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]


def every_update_nonfinite(row: dict[str, Any]) -> bool:
    """Whether a round got no update at all because every client's update (or reply) was not finite."""
    failed = row.get("failed_clients") or {}
    if row.get("completed_clients", 0) or not failed:
        return False
    return all(any(m in str(reason).lower() for m in NONFINITE_MARKERS) for reason in failed.values())


def divergence(row: dict[str, Any], params: Params) -> str | None:
    """What became non-finite in this round (None: nothing did)."""
    bad_params = nonfinite_tensors(params)
    if bad_params:
        return f"the global model holds NaN or infinite values ({', '.join(bad_params[:3])})"
    if every_update_nonfinite(row):
        cid, reason = next(iter(row["failed_clients"].items()))
        return f"every client's update held NaN or infinite values (client {cid}: {reason})"
    # evaluation metrics only: a NaN train_loss also means "not reported" (e.g. under secure aggregation)
    bad_metrics = [k for k in nonfinite_metrics(row) if k.startswith(EVALUATION_PREFIXES)]
    if bad_metrics:
        shown = ", ".join(f"{k}={row[k]}" for k in bad_metrics[:3])
        return f"metrics are not finite ({shown})"
    return None


def likely_cause(config: Any) -> str:
    """The settings that usually make training diverge, with their values."""
    rates = [f"train.lr={config.train.lr:g}"]
    task = config.task.name
    section = config.sections.get(task)
    if section is not None and hasattr(section, "lr"):
        rates.append(f"{task}.lr={section.lr:g}")
    rates.append(f"server.lr={config.server.lr:g} ({config.server.optimizer})")
    return f"a learning rate too large for this model and data ({', '.join(rates)}); lower it"
