"""Client sampling: who is available in a round and who is picked, reproducibly."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fedguard.core.pipeline import ConfigurationError


def parse_schedule(items: list[str], population: int, what: str) -> dict[int, int]:
    """'FIRST-LAST@ROUND' strings to {client id: round}."""
    schedule: dict[int, int] = {}
    for item in items:
        try:
            ids, _, rnd = item.partition("@")
            first, _, last = ids.partition("-")
            lo, hi, r = int(first), int(last or first), int(rnd)
        except ValueError as exc:
            raise ConfigurationError(f"faults.{what}: {item!r} must look like 'FIRST-LAST@ROUND'") from exc
        if not (0 <= lo <= hi < population) or r < 1:
            raise ConfigurationError(
                f"faults.{what}: {item!r} names clients outside 0..{population - 1} or a round below 1"
            )
        schedule.update({cid: r for cid in range(lo, hi + 1)})
    return schedule


@dataclass
class ClientSampler:
    """Samples ``count`` clients (or ``fraction`` of the available ones) per round.

    Clients in ``join`` are available from their round on; clients in ``leave`` are gone
    from their round on. The choice depends only on (seed, round, availability).
    """

    population: int
    count: int = 0
    fraction: float = 1.0
    seed: int = 0
    join: dict[int, int] = field(default_factory=dict)
    leave: dict[int, int] = field(default_factory=dict)
    #: sample each available client independently with probability ``sampling_rate`` (a varying
    #: number per round) instead of a fixed number: what client-level DP accounting assumes
    poisson: bool = False
    #: the server's secret coins (count -> uniforms on (0, 1]) instead of the seed: each round is
    #: drawn once from them and remembered (set by dp.noise_source=secure; see fedguard.privacy.noise)
    coins: Callable[[int], np.ndarray] | None = field(default=None, repr=False)
    _drawn: dict[int, list[int]] = field(default_factory=dict, repr=False)
    #: a mechanism's own rule (round -> sorted ids), e.g. DP-FTRL's each-client-once-per-epoch order
    chooser: Callable[[int], list[int]] | None = field(default=None, repr=False)

    def available(self, round: int) -> list[int]:
        """Clients that can be sampled in ``round``."""
        return self.available_ids(round).tolist()

    def available_ids(self, round: int) -> np.ndarray:
        """Clients that can be sampled in ``round``, as one int64 array (no object per client)."""
        mask = np.ones(self.population, dtype=bool)
        for cid, first in self.join.items():
            if first > round:
                mask[cid] = False
        for cid, gone in self.leave.items():
            if gone <= round:
                mask[cid] = False
        return np.flatnonzero(mask) if (self.join or self.leave) else np.arange(self.population, dtype=np.int64)

    def per_round(self, available: int) -> int:
        """How many clients a round with ``available`` clients samples."""
        wanted = self.count if self.count else max(1, round(self.fraction * available))
        return min(wanted, available)

    def sample(self, round: int) -> list[int]:
        """Sorted ids of the clients sampled in ``round``."""
        if self.chooser is not None:
            return self.chooser(round)
        if self.coins is not None:
            if round not in self._drawn:
                self._drawn[round] = self._secret_sample(round, self.coins)
            return self._drawn[round]
        pool = self.available_ids(round)
        if self.poisson:
            keep = np.random.default_rng([self.seed, round]).random(pool.size) < self.sampling_rate
            return pool[keep].tolist()
        k = self.per_round(pool.size)
        if k == pool.size:
            return pool.tolist()
        rng = np.random.default_rng([self.seed, round])
        return np.sort(rng.choice(pool, size=k, replace=False)).tolist()

    def _secret_sample(self, round: int, coins: Callable[[int], np.ndarray]) -> list[int]:
        """The round's sample from secret uniforms: Poisson, or the k smallest of random keys."""
        pool = self.available_ids(round)
        u = coins(pool.size)
        if self.poisson:
            return pool[u < self.sampling_rate].tolist()
        k = self.per_round(pool.size)
        return np.sort(pool[np.argsort(u, kind="stable")[:k]]).tolist()

    @property
    def sampling_rate(self) -> float:
        """Probability that a given client is sampled in a round (for privacy accounting)."""
        if self.poisson:
            return min(1.0, self.count / self.population) if self.count else self.fraction
        return self.per_round(self.population) / self.population
