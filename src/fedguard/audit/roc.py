"""ROC figures of a membership attack: AUC with a bootstrap interval, TPR at a fixed low FPR.

As Carlini et al. 2022 ("Membership Inference Attacks From First Principles", S&P) argue, an
attack is judged by its true-positive rate at low false-positive rates (0.1%, 1%), read off the
ROC on log axes, not by its accuracy or AUC alone. Scores are "higher means member".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["RocSummary", "roc_curve", "auc", "tpr_at_fpr", "bootstrap_auc", "summarize"]


def roc_curve(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every threshold, from (0, 0) to (1, 1); ties are broken together."""
    scores = np.concatenate([member_scores, nonmember_scores]).astype(np.float64)
    truth = np.concatenate([np.ones(len(member_scores)), np.zeros(len(nonmember_scores))])
    order = np.argsort(-scores, kind="mergesort")
    scores, truth = scores[order], truth[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tp = np.cumsum(truth)[last_of_tie]
    fp = np.cumsum(1 - truth)[last_of_tie]
    return np.r_[0.0, fp / max(len(nonmember_scores), 1)], np.r_[0.0, tp / max(len(member_scores), 1)]


def auc(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """Area under the ROC: the probability that a member outscores a non-member (ties count half)."""
    fpr, tpr = roc_curve(member_scores, nonmember_scores)
    return float(np.trapezoid(tpr, fpr))


def tpr_at_fpr(member_scores: np.ndarray, nonmember_scores: np.ndarray, fpr_target: float) -> float:
    """The highest TPR of a threshold whose FPR is at most ``fpr_target``."""
    fpr, tpr = roc_curve(member_scores, nonmember_scores)
    return float(tpr[fpr <= fpr_target + 1e-12].max())


def bootstrap_auc(member_scores: np.ndarray, nonmember_scores: np.ndarray, resamples: int = 1000,
                  level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUC (members and non-members resampled separately)."""
    rng = np.random.default_rng(seed)
    values = [
        auc(rng.choice(member_scores, len(member_scores)), rng.choice(nonmember_scores, len(nonmember_scores)))
        for _ in range(resamples)
    ]
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


@dataclass
class RocSummary:
    """The figures of one attack."""

    auc: float
    auc_ci: tuple[float, float]
    tpr_at_0_001: float
    tpr_at_0_01: float
    members: int
    nonmembers: int

    def row(self) -> dict[str, object]:
        """JSON-ready, with the issue's key names."""
        return {"auc": round(self.auc, 4), "auc_ci": [round(v, 4) for v in self.auc_ci],
                "tpr_at_0.001": round(self.tpr_at_0_001, 5), "tpr_at_0.01": round(self.tpr_at_0_01, 5),
                "members": self.members, "nonmembers": self.nonmembers}


def summarize(member_scores: np.ndarray, nonmember_scores: np.ndarray, resamples: int = 1000,
              seed: int = 0) -> RocSummary:
    """AUC with its 95% bootstrap interval and TPR at 0.1% and 1% FPR."""
    return RocSummary(
        auc(member_scores, nonmember_scores),
        bootstrap_auc(member_scores, nonmember_scores, resamples, seed=seed),
        tpr_at_fpr(member_scores, nonmember_scores, 0.001),
        tpr_at_fpr(member_scores, nonmember_scores, 0.01),
        len(member_scores), len(nonmember_scores),
    )
