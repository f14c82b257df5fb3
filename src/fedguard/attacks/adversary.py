"""The adversaries themselves: what a hostile client does on its side, and the simulation-only colluding
adversary that crafts the Byzantine updates from the round's honest ones.

* :class:`HostileClient` is the client-side behaviour (label flipping, BadNets backdoor, scaling, sign
  flipping, Gaussian noise). A network client given the same ``[attack]`` section runs exactly this code.
  Attacks whose update does not depend on training (Gaussian, and every omniscient attack, whose update the
  simulated server fills in) skip local training: their clients send a zero placeholder.
* :class:`OmniscientAdversary` is the server-side hook of the simulation: before aggregation it replaces
  the Byzantine clients' rows with the crafted vector (the same for all of them), computed from the honest
  rows only. No real deployment has such an adversary; the network runtime refuses these attacks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from fedguard.core.communicator import client_generator
from fedguard.core.types import Params
from fedguard.data.arrays import ArrayDataset

from . import data as poison
from . import vectors
from .config import BACKDOOR_ATTACKS, OMNISCIENT_ATTACKS, AttackConfig


def trigger_of(config: AttackConfig) -> poison.Trigger:
    """The BadNets trigger the configuration describes."""
    return poison.Trigger(size=config.trigger_size)


@dataclass
class HostileClient:
    """The client-side behaviour of the Byzantine clients ``byzantine`` from ``config.start_round`` on.

    ``num_classes`` is the task's class count (label flipping); ``boost`` the scaling attack's factor
    (already resolved from ``config.boost``); ``seed`` makes the attackers' own choices (which examples
    to poison) reproducible: protecting nothing, they may come from ``run.seed``.
    """

    config: AttackConfig
    byzantine: frozenset[int]
    num_classes: int
    boost: float = 1.0
    seed: int = 0
    _poisoned: dict[int, ArrayDataset] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.config.name

    def active(self, client_id: int, round: int) -> bool:
        """Whether ``client_id`` attacks in ``round``."""
        return client_id in self.byzantine and round >= self.config.start_round

    def trains(self) -> bool:
        """Whether the attack needs the client's own trained update."""
        return self.name not in ("gaussian", *OMNISCIENT_ATTACKS)

    def local_data(self, client_id: int, data: ArrayDataset) -> ArrayDataset:
        """The data an attacking client trains on (poisoned once, then reused every round). An attacker whose
        update does not depend on training (:meth:`trains` is False: its update is noise or a zero placeholder
        the simulated server replaces) gets a single example: the client loop stays as it is and the local
        training it would discard costs one step (a fifth of a round's training with 10 of 50 Byzantine)."""
        if not self.trains():
            return data.subset([0], f"{data.name}-untrained") if len(data) else data
        if self.name not in ("label-flip", *BACKDOOR_ATTACKS):
            return data
        if client_id not in self._poisoned:
            if self.name == "label-flip":
                self._poisoned[client_id] = poison.flip_dataset(data, self.num_classes)
            else:
                gen = client_generator(self.seed, 0, client_id, "attack-poison")
                c = self.config
                self._poisoned[client_id] = poison.poison_backdoor(data, trigger_of(c), c.target_class,
                                                                   c.poison_fraction, gen)
        return self._poisoned[client_id]

    def update(self, update: Params, generator: torch.Generator) -> Params:
        """The update an attacking client sends in place of its honest ``update``."""
        if self.name == "sign-flip":
            return {k: vectors.sign_flip(v, self.config.sign_flip_scale) for k, v in update.items()}
        if self.name == "scaling":
            return {k: vectors.scale(v, self.boost) for k, v in update.items()}
        if self.name == "gaussian":
            sigma = self.config.gaussian_sigma
            return {k: vectors.gaussian(v, sigma, generator) for k, v in update.items()}
        if self.name in OMNISCIENT_ATTACKS:
            return {k: torch.zeros_like(v) for k, v in update.items()}  # the simulated server fills it in
        return update


@dataclass
class OmniscientAdversary:
    """Simulation-only colluding adversary: replaces the Byzantine rows of a round's stacked updates with
    one vector crafted from the honest rows (ALIE, IPM, min-max, min-sum, Mimic)."""

    config: AttackConfig
    byzantine: frozenset[int]
    population: int
    seed: int = 0
    mimic: vectors.Mimic = field(default_factory=vectors.Mimic)

    def __post_init__(self) -> None:
        self.mimic.warmup = self.config.mimic_warmup

    def craft(self, honest: torch.Tensor, honest_ids: list[int], f: int, round: int) -> torch.Tensor:
        """The vector every Byzantine client sends this round."""
        c = self.config
        if c.name == "alie":
            z = c.alie_z or vectors.alie_z(len(honest_ids) + f, f)
            return vectors.alie(honest, z)
        if c.name == "ipm":
            return vectors.ipm(honest, c.ipm_epsilon)
        if c.name == "min-max":
            return vectors.min_max(honest, c.perturbation, c.gamma_init, distance_scale=c.distance_scale)
        if c.name == "min-sum":
            return vectors.min_sum(honest, c.perturbation, c.gamma_init, distance_scale=c.distance_scale)
        if c.name == "mimic":
            return self.mimic(honest, honest_ids, client_generator(self.seed, round, -1, "attack-mimic"))
        raise ValueError(f"{c.name!r} is not an omniscient attack")

    def tamper(self, round: int, client_ids: list[int], stack: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """``stack`` (rows in ``client_ids`` order) with the attacking rows replaced."""
        bad = [i for i, cid in enumerate(client_ids) if cid in self.byzantine]
        if round < self.config.start_round or not bad:
            return stack, {}
        good = [i for i in range(len(client_ids)) if i not in set(bad)]
        if len(good) < 2:
            return stack, {"byzantine_updates": float(len(bad))}  # nothing honest to imitate: send placeholders
        crafted = self.craft(stack[good], [client_ids[i] for i in good], len(bad), round).to(stack.dtype)
        out = stack.clone()
        out[bad] = crafted
        return out, {"byzantine_updates": float(len(bad))}

    def state_dict(self) -> dict[str, Any]:
        m = self.mimic
        state: dict[str, Any] = {"mimic_rounds_seen": m.rounds_seen, "mimic_target": m.target}
        if m.z is not None:
            state["mimic_z"] = m.z
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mimic.rounds_seen = int(state.get("mimic_rounds_seen", 0))
        self.mimic.target = state.get("mimic_target")
        self.mimic.z = state.get("mimic_z")
