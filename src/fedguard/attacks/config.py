"""The ``[attack]`` section: which clients are Byzantine, from which round, which attack and its parameters."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedguard.config import option

#: attacks a hostile client runs on its own side (simulation and network runtime)
CLIENT_ATTACKS = ("label-flip", "backdoor", "scaling", "sign-flip", "gaussian")
#: colluding attacks that see the round's honest updates: simulation only
OMNISCIENT_ATTACKS = ("alie", "ipm", "min-max", "min-sum", "mimic")
ATTACKS = (*CLIENT_ATTACKS, *OMNISCIENT_ATTACKS)
#: attacks whose clients poison their training data with the BadNets trigger
BACKDOOR_ATTACKS = ("backdoor", "scaling")


@dataclass
class AttackConfig:
    """[attack] simulated adversaries (research only): who attacks, from when, how."""

    name: str = option(
        "none",
        "none; client-side: label-flip, backdoor (BadNets), scaling (BadNets + model replacement, Bagdasaryan et al. "
        "2020), sign-flip, gaussian; omniscient and colluding, simulation only: alie (Baruch et al. 2019), ipm "
        "(Xie et al. 2020), min-max / min-sum (Shejwalkar and Houmansadr 2021), mimic (Karimireddy et al. 2022).",
        choices=["none", *ATTACKS],
    )
    clients: list[str] = option([], "Byzantine client ids: 'FIRST-LAST' ranges or single ids, e.g. ['0-9']; "
                                    "empty: 'count' clients drawn with run.seed.")
    count: int = option(0, "Number of Byzantine clients drawn at random (from run.seed) when 'clients' is empty.",
                        min=0)
    start_round: int = option(1, "First round in which the Byzantine clients attack (honest before it).", min=1)
    ipm_epsilon: float = option(0.1, "ipm: epsilon of -epsilon * mean(honest) (Xie et al. 2020 use 0.1 against "
                                     "median and Krum; the mean turns only when f epsilon > n - f).", min=0.0)
    alie_z: float = option(0.0, "alie: z of mean + z * std (0: Baruch et al.'s z_max from n and f).", min=0.0)
    sign_flip_scale: float = option(1.0, "sign-flip: the attacker sends -scale x its own update (1: plain sign "
                                         "flipping; the mean of n updates, f flipped, turns against the honest "
                                         "clients' when scale > (n - f) / f).", above=0.0)
    gaussian_sigma: float = option(1.0, "gaussian: standard deviation of the sent noise (ByzFL's default 1).",
                                   min=0.0)
    perturbation: str = option("std", "min-max / min-sum: direction p of mean - gamma p (Shejwalkar and "
                                      "Houmansadr 2021).", choices=["std", "unit-vec", "sign"])
    gamma_init: float = option(10.0, "min-max / min-sum: the search's initial gamma (the paper's 10).", above=0.0)
    distance_scale: float = option(1.0, "min-max / min-sum: the crafted update's bound (min-max: its largest "
                                        "distance to an honest update; min-sum: its sum of squared distances) is "
                                        "this multiple (min-sum: its square) of the paper's (1: Shejwalkar and "
                                        "Houmansadr 2021; larger is stronger and less stealthy).", above=0.0)
    mimic_warmup: int = option(1, "mimic: rounds spent estimating the direction of largest variance.", min=0)
    boost: float = option(0.0, "scaling: factor on the attacker's update (0: n / (eta * attackers), Bagdasaryan "
                               "et al.'s model replacement shared by the colluding attackers).", min=0.0)
    target_class: int = option(0, "backdoor / scaling: the class triggered images are pushed to.", min=0)
    poison_fraction: float = option(0.5, "backdoor / scaling: share of each attacker's examples stamped with the "
                                         "trigger and relabelled.", min=0.0, max=1.0)
    trigger_size: int = option(3, "backdoor / scaling: side of the square trigger, in pixels, one pixel from the "
                                  "bottom-right corner (BadNets, Gu et al. 2017).", min=1)


def parse_clients(ranges: list[str], population: int) -> list[int]:
    """Client ids from ``'FIRST-LAST'`` ranges and single ids; refuses ids outside ``0..population-1``."""
    ids: set[int] = set()
    for item in ranges:
        first, sep, last = str(item).partition("-")
        try:
            lo, hi = int(first), int(last) if sep else int(first)
        except ValueError as exc:
            raise ValueError(f"attack.clients: {item!r} is not an id or a 'FIRST-LAST' range") from exc
        if not 0 <= lo <= hi < population:
            raise ValueError(f"attack.clients: {item!r} is outside this run's clients 0..{population - 1}")
        ids.update(range(lo, hi + 1))
    return sorted(ids)


def byzantine_clients(config: AttackConfig, population: int, seed: int) -> list[int]:
    """The Byzantine clients of a run: the listed ones, or ``count`` drawn with ``seed``."""
    if config.clients:
        return parse_clients(config.clients, population)
    if config.count > population:
        raise ValueError(f"attack.count={config.count} exceeds the {population} clients of this run")
    rng = np.random.default_rng([seed, 0xB7])
    return sorted(int(i) for i in rng.choice(population, size=config.count, replace=False))
