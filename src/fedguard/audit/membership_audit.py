"""``fedguard audit membership``: membership inference against the released model and one client's update.

The evaluation follows Carlini et al. 2022: the configured training set is split at random
(seeded) into two halves; the run trains on the first (the members; partitioned among the
clients as configured) and the second are the non-members. The attacker's own data, for its
shadow models, is the test set: each shadow model is the same federated run (same configuration,
DP included) on a random subset of it of the members' size, so no shadow model ever trained on a
target. Reported per attack: AUC with a 95% bootstrap interval, TPR at 0.1% and 1% FPR, the ROC.

The update attack: after training, client 0 computes one more round's update from the released
model (the real client code, DP included); the server scores client 0's examples against as many
non-members by how much the update lowered their loss.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedguard.config import Config
from fedguard.data.arrays import ArrayDataset
from fedguard.experiment import Experiment
from fedguard.types import Params

from .knowledge import observe_update
from .membership import lira_offline_scores, loss_threshold_scores, per_example, update_scores
from .roc import RocSummary, roc_curve, summarize

__all__ = ["MembershipResult", "train_released", "membership_run"]


@dataclass
class MembershipResult:
    """Every attack's figures and ROC curve on one configured run."""

    label: str
    summaries: dict[str, RocSummary]
    curves: dict[str, tuple[np.ndarray, np.ndarray]]
    epsilon: float | None
    target_accuracy: float | None
    train_accuracy: float | None
    shadows: int
    wall_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures."""
        return {"attacks": {k: v.row() for k, v in self.summaries.items()}, "epsilon": self.epsilon,
                "test_accuracy": self.target_accuracy, "train_accuracy": self.train_accuracy,
                "shadow_models": self.shadows, "wall_s": round(self.wall_s, 1), **self.extra}


def _plain(config: Config) -> Config:
    config = copy.deepcopy(config)
    config.data.max_train_examples = 0
    config.run.progress = False
    config.run.report = False
    config.run.eval_every = 0
    return config


def train_released(config: Config, train: ArrayDataset, test: ArrayDataset, run_dir: Path) -> tuple[Params, dict]:
    """The global model a federated run on ``train`` releases (and its summary figures)."""
    result = Experiment(_plain(config), train=train, test=test, quiet=True).run(run_dir=run_dir)
    return {k: v.detach().clone() for k, v in result.params.items()}, result.final


def _accuracy(model: Any, params: Params, data: ArrayDataset) -> float:
    import torch
    from torch.func import functional_call

    with torch.no_grad():
        logits = functional_call(model, params, (data.x,))
    return float((logits.argmax(1) == data.y).float().mean())


def membership_run(config: Config, out_dir: Path, shadows: int = 4, label: str = "",
                   resamples: int = 1000) -> MembershipResult:
    """Train the target and ``shadows`` shadow runs, attack, and summarise (see the module docstring)."""
    t0 = time.perf_counter()
    seed = config.run.seed
    train, test = Experiment(copy.deepcopy(config)).load_data()
    rng = np.random.default_rng(seed + 17)
    order = rng.permutation(len(train))
    half = len(train) // 2
    members, nonmembers = train.subset(order[:half], "members"), train.subset(order[half : 2 * half], "nonmembers")
    params, final = train_released(config, members, test, out_dir / "target")
    setup = Experiment(_plain(config), train=members, test=test, quiet=True).assemble()
    model = setup.model
    target_loss_in, phi_in = per_example(model, params, members)
    target_loss_out, phi_out = per_example(model, params, nonmembers)
    shadow_in, shadow_out = [], []
    for k in range(shadows):
        idx = rng.choice(len(test), size=min(half, len(test)), replace=False)
        shadow_params, _ = train_released(config, test.subset(idx, f"shadow-{k}"), test, out_dir / f"shadow-{k}")
        shadow_in.append(per_example(model, shadow_params, members)[1])
        shadow_out.append(per_example(model, shadow_params, nonmembers)[1])
    scores = {
        "loss_threshold": (loss_threshold_scores(target_loss_in), loss_threshold_scores(target_loss_out)),
    }
    if shadows:
        lira = lira_offline_scores(np.concatenate([phi_in, phi_out]), np.concatenate([shadow_in, shadow_out], 1))
        scores["lira_offline"] = (lira[:half], lira[half:])
    victim = setup.client_data(0)
    update = observe_update(setup, victim, params, client_id=0, round=config.run.rounds + 1)
    outsiders = nonmembers.subset(np.arange(min(len(victim), len(nonmembers))), "outsiders")
    scores["client_update"] = (update_scores(model, params, update, victim), update_scores(model, params, update,
                                                                                        outsiders))
    summaries = {k: summarize(m, n, resamples, seed) for k, (m, n) in scores.items()}
    curves = {k: roc_curve(m, n) for k, (m, n) in scores.items()}
    epsilon = final.get("epsilon")
    return MembershipResult(
        label, summaries, curves, float(epsilon) if epsilon is not None else None,
        final.get("test_accuracy"), _accuracy(model, params, members), shadows, time.perf_counter() - t0,
        {"members": half, "nonmembers": half, "client_examples": len(victim),
         "delta": final.get("delta"), "noise_multiplier": final.get("dp_noise_multiplier")},
    )
