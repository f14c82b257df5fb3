"""Privacy accounting through Google's dp-accounting library (RDP or PLD): no privacy math here.

Every DP mechanism in fedguard releases the output of a Gaussian mechanism, possibly on a
Poisson sample (of a client's examples for DP-SGD, of the clients for DP-FedAvg). A party's
spending is therefore a multiset of :class:`GaussianStep` s, each with a count; this module
turns such a history into a ``dp_accounting`` event and asks the library for epsilon at a
given delta, or searches the noise multiplier that meets a target epsilon.

* ``pld``: privacy loss distributions (Meiser & Mohammadi 2018; Koskela et al. 2020), the
  library's ``PLDAccountant`` with its default discretisation (a pessimistic estimate, so
  an upper bound); tight.
* ``rdp``: Renyi DP (Mironov 2017; Mironov et al. 2019), the library's ``RdpAccountant``;
  fast, about 15% looser at typical settings.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import dp_accounting

# dp_accounting (with scipy) takes about a second to import, so it is imported on first use:
# runs without DP, and network clients, do not pay for it at start-up.

ACCOUNTANTS = ("pld", "rdp")


def _lib() -> ModuleType:
    """The dp_accounting module, imported on first use."""
    import dp_accounting

    return dp_accounting


@lru_cache(maxsize=1)
def integer_orders() -> tuple[float, ...]:
    """The integer orders among the library's default RDP orders: a quick bound, never below the
    library's default RDP figure (a subset of its orders), used to rank and skip parties cheaply."""
    from dp_accounting.rdp import rdp_privacy_accountant

    return tuple(o for o in rdp_privacy_accountant.DEFAULT_RDP_ORDERS if float(o).is_integer())


@dataclass(frozen=True, order=True)
class GaussianStep:
    """One release: Gaussian noise of ``noise_multiplier`` x sensitivity, on a Poisson sample.

    ``sampling_rate`` 1.0 means no sampling (every record takes part).
    """

    noise_multiplier: float
    sampling_rate: float = 1.0

    def event(self) -> dp_accounting.DpEvent:
        """The ``dp_accounting`` event of one such release."""
        lib = _lib()
        if self.noise_multiplier <= 0:
            return lib.NonPrivateDpEvent()
        gaussian = lib.GaussianDpEvent(self.noise_multiplier)
        if self.sampling_rate >= 1.0:
            return gaussian
        return lib.PoissonSampledDpEvent(self.sampling_rate, gaussian)


#: a party's spending: (step, count) pairs, merged and sorted so that equal histories hash equal
History = tuple[tuple[GaussianStep, int], ...]


def history_of(steps: Iterable[tuple[GaussianStep, int]]) -> History:
    """The canonical history of (step, count) pairs (composition does not depend on order)."""
    counts: Counter[GaussianStep] = Counter()
    for step, count in steps:
        if count < 0:
            raise ValueError(f"a step count cannot be negative, got {count}")
        if count:
            counts[step] += int(count)
    return tuple(sorted(counts.items()))


def history_event(history: History) -> dp_accounting.DpEvent:
    """The composed ``dp_accounting`` event of a history."""
    lib = _lib()
    return lib.ComposedDpEvent(
        [lib.SelfComposedDpEvent(step.event(), count) for step, count in history]
    )


def new_accountant(kind: str) -> dp_accounting.PrivacyAccountant:
    """A fresh accountant of the library: ``pld``, ``rdp``, or ``rdp-int`` (integer orders: quick bound)."""
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.rdp import RdpAccountant

    if kind == "pld":
        return PLDAccountant()
    if kind == "rdp":
        return RdpAccountant()
    if kind == "rdp-int":
        return RdpAccountant(list(integer_orders()))
    raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {kind!r}")


@lru_cache(maxsize=8192)
def epsilon(history: History, delta: float, kind: str = "pld") -> float:
    """Epsilon at ``delta`` of a history (0 for an empty one, inf when a step adds no noise)."""
    if not history:
        return 0.0
    if any(step.noise_multiplier <= 0 for step, _ in history):
        return math.inf
    accountant = new_accountant(kind)
    with _quiet_absl():
        accountant.compose(history_event(history))
        return float(accountant.get_epsilon(delta))


@contextmanager
def _quiet_absl() -> Iterator[None]:
    """Silence the library's per-order convergence warnings (it drops those orders, staying valid)."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def calibrate_noise(
    make_history: Callable[[float], History],
    target_epsilon: float,
    delta: float,
    kind: str = "pld",
) -> float:
    """The smallest noise multiplier whose history spends at most ``target_epsilon`` at ``delta``.

    ``make_history(noise_multiplier)`` gives the planned history for a candidate value; the
    search is the library's ``calibrate_dp_mechanism`` (bisection to 0.1% of the value).
    """
    if target_epsilon <= 0:
        raise ValueError(f"target epsilon must be positive, got {target_epsilon}")
    upper = 1.0
    while epsilon(make_history(upper), delta, kind) > target_epsilon:
        upper *= 2.0
        if upper > 1e4:
            raise ValueError(f"no noise multiplier up to 1e4 reaches epsilon {target_epsilon} at delta {delta}")
    lower = upper / 2.0
    while epsilon(make_history(lower), delta, kind) <= target_epsilon:
        upper, lower = lower, lower / 2.0
        if lower < 1e-3:
            raise ValueError(f"epsilon {target_epsilon} is met with almost no noise; check the plan")
    from dp_accounting.mechanism_calibration import ExplicitBracketInterval, calibrate_dp_mechanism

    with _quiet_absl():
        value = calibrate_dp_mechanism(
            lambda: new_accountant(kind),
            lambda sigma: history_event(make_history(sigma)),
            target_epsilon,
            delta,
            ExplicitBracketInterval(lower, upper),
            tol=max(1e-4, 1e-3 * upper),
        )
    return float(value)


def default_delta(records: int) -> float:
    """The largest power of ten strictly below ``1 / records`` (the rule delta < 1/N)."""
    if records < 1:
        raise ValueError(f"the number of records must be positive, got {records}")
    exponent = math.floor(math.log10(records)) + 1 if records > 1 else 1
    return 10.0 ** -exponent
