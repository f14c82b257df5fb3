"""The one-run privacy audit's statistics: Steinke, Nasr, Jagielski 2023, "Privacy Auditing with One (1)
Training Run" (NeurIPS 2023, arXiv:2305.08846).

``m`` canaries are each included independently with probability 1/2; after one run the auditor
guesses "in" for its ``k+`` highest-scoring canaries and "out" for its ``k-`` lowest, abstaining on
the rest: ``r = k+ + k-`` guesses, ``v`` of them right. If the mechanism is (eps, delta)-DP for each
canary, the number of right guesses is (up to delta) stochastically dominated by
``Binomial(r, e^eps / (1 + e^eps))`` (their Theorem 5.2); with ``delta > 0`` the tail gains
``2 m delta alpha``, ``alpha = max_i P[v > Binomial(r, q) >= v - i] / i`` (their Appendix D, the
p-value of Algorithm 2). The empirical lower bound is the largest eps whose p-value is below
``1 - confidence``, found by bisection as in the paper's Appendix D code.

Choosing ``(k+, k-)`` after seeing the scores would void the confidence level; :func:`audit` tries a
small fixed grid and Bonferroni-corrects the level over it (conservative).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = ["p_value", "epsilon_lower_bound", "GuessResult", "audit"]


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[at least ``v`` of ``r`` guesses right] under the null hypothesis that the run is (eps, delta)-DP."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if eps < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need eps >= 0 and 0 <= delta <= 1, got {eps}, {delta}")
    q = 1.0 / (1.0 + math.exp(-eps))  # the accuracy of eps-DP randomized response
    tail = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if v == 0 or delta == 0:
        return min(tail, 1.0)
    i = np.arange(1, v + 1)
    below = np.cumsum(stats.binom.pmf(v - i, r, q))  # P[v > Binomial(r, q) >= v - i], i = 1..v
    alpha = float(np.max(below / i))
    return min(tail + alpha * delta * 2 * m, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest eps that the result ``(r, v)`` rejects at ``confidence`` (0 when none)."""
    level = 1.0 - confidence
    if not 0 < level < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    low, high = 0.0, 1.0  # keep p_value(low) < level <= p_value(high)
    if p_value(m, r, v, low, delta) >= level:
        return 0.0
    while p_value(m, r, v, high, delta) < level:
        high += 1.0
        if high > 100:
            return high
    for _ in range(30):
        mid = (low + high) / 2
        if p_value(m, r, v, mid, delta) < level:
            low = mid
        else:
            high = mid
    return low


@dataclass
class GuessResult:
    """The auditor's best guessing rule and the bound it gives."""

    epsilon_lower_bound: float
    k_plus: int
    k_minus: int
    guesses: int
    correct: int
    candidates: int
    confidence: float

    def row(self) -> dict[str, float | int]:
        """JSON-ready."""
        return {"epsilon_lower_bound": round(self.epsilon_lower_bound, 4), "k_plus": self.k_plus,
                "k_minus": self.k_minus, "guesses": self.guesses, "correct": self.correct,
                "canaries": self.candidates, "confidence": self.confidence}


def default_grid(m: int) -> list[tuple[int, int]]:
    """(k+, k-) pairs tried: guess a few percent up to half of the canaries, both sides or "in" only."""
    sizes = sorted({max(1, int(m * f)) for f in (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5)})
    return [(k, k) for k in sizes if 2 * k <= m] + [(k, 0) for k in sizes]


def audit(scores: np.ndarray, included: np.ndarray, delta: float, confidence: float = 0.95,
          grid: list[tuple[int, int]] | None = None) -> GuessResult:
    """Guess from the scores (higher: "in") with each rule of ``grid``; the best Bonferroni-corrected bound."""
    scores, included = np.asarray(scores, dtype=np.float64), np.asarray(included, dtype=bool)
    m = len(scores)
    grid = grid or default_grid(m)
    corrected = 1.0 - (1.0 - confidence) / len(grid)
    order = np.argsort(-scores, kind="mergesort")
    best = GuessResult(0.0, 0, 0, 0, 0, m, confidence)
    for k_plus, k_minus in grid:
        top, bottom = order[:k_plus], order[m - k_minus :] if k_minus else order[:0]
        correct = int(included[top].sum() + (~included[bottom]).sum())
        bound = epsilon_lower_bound(m, k_plus + k_minus, correct, delta, corrected)
        if bound > best.epsilon_lower_bound:
            best = GuessResult(bound, k_plus, k_minus, k_plus + k_minus, correct, m, confidence)
    return best
