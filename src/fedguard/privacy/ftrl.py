"""DP-FTRL with tree aggregation (Kairouz, McMahan, Song, Thakkar, Thakurta, Xu, ICML 2021).

Client-level DP without any secret sampling: the clients of each round need not be random, only
**each client takes part at most once per tree**. The population is split into epochs of
``R = ceil(N / m)`` rounds of ``m`` clients (a fresh permutation per epoch; the order is not
secret and amplification is never claimed); one binary tree per epoch (the "restart" variant).

Each round the server clips nothing itself: the clients clip their updates to ``S``
(:class:`~fedguard.privacy.dpfedavg.ClipUpdate`), the server forms their sum ``g_t`` and releases
the noisy prefix sum of the epoch, ``P_t = (g_1 + ... + g_t + T(t)) / m``, where ``T(t)`` is the
sum of the Gaussian node noises ``N(0, (z S)^2)`` of the dyadic intervals that make up ``[1, t]``
(at most ``log2(t) + 1`` of them; each node's noise is drawn once and reused). The model moves by
``P_t - P_{t-1}``: the server optimiser sees a post-processing of the released prefix sums (with
plain FedAvg steps this is FTRL on linear losses, the paper's DP-FTRL; momentum is post-processing
as well).

Accounting: dp-accounting's ``SingleEpochTreeAggregationDpEvent(z, R)`` per full epoch,
``SelfComposedDpEvent`` over epochs, plus one for the epoch in progress, with the library's RDP
accountant (the event's supported one). The server adds the noise and sees each clipped update:
``epsilon_server`` is infinite (it is trusted), ``epsilon_model`` the tree figure.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from fedguard.core.pipeline import PrivacyLedger, ServerContext, ServerStep
from fedguard.messages import Message
from fedguard.privacy.dpsgd import gaussian_like
from fedguard.privacy.noise import NOT_A_GUARANTEE, Randomness, SecureRandom
from fedguard.types import Params


def dyadic_nodes(t: int) -> list[tuple[int, int]]:
    """The tree nodes ``(level, index)`` whose intervals partition ``[1, t]`` (one per set bit of ``t``)."""
    nodes, start = [], 0
    for level in range(t.bit_length() - 1, -1, -1):
        if t & (1 << level):
            nodes.append((level, start >> level))
            start += 1 << level
    return nodes


def epoch_order(population: int, per_round: int, epoch: int, seed: int) -> list[list[int]]:
    """The rounds of one epoch: a permutation of the clients cut into blocks of ``per_round`` (public)."""
    perm = np.random.default_rng([seed, epoch, 0x46545]).permutation(population)
    return [sorted(perm[i:i + per_round].tolist()) for i in range(0, population, per_round)]


class EpochSampler:
    """Round -> clients such that every client is in at most one round of each epoch (a tree)."""

    def __init__(self, population: int, per_round: int, seed: int) -> None:
        self.population, self.per_round, self.seed = population, per_round, seed
        self.rounds_per_epoch = math.ceil(population / per_round)

    def position(self, round: int) -> tuple[int, int]:
        """(epoch, 1-based step within the epoch) of ``round``."""
        return (round - 1) // self.rounds_per_epoch, (round - 1) % self.rounds_per_epoch + 1

    def __call__(self, round: int) -> list[int]:
        epoch, step = self.position(round)
        return epoch_order(self.population, self.per_round, epoch, self.seed)[step - 1]


class TreeNoise(ServerStep):
    """The server's DP-FTRL step: the change of the noisy prefix sum of the epoch's clipped updates."""

    name = "dp-ftrl"

    def __init__(self, clip_step: Any, noise_multiplier: float, per_round: int, epochs: EpochSampler,
                 source: Randomness | None = None) -> None:
        self.clip_step, self.noise_multiplier = clip_step, noise_multiplier
        self.per_round, self.epochs = per_round, epochs
        self.source: Randomness = source or SecureRandom()
        self.epoch = -1
        self.total: Params = {}
        self.nodes: dict[tuple[int, int], Params] = {}
        self.released: Params = {}

    def _node(self, node: tuple[int, int], like: Params, ctx: ServerContext) -> Params:
        if node not in self.nodes:
            std = self.noise_multiplier * self.clip_step.clip_of_round(ctx.round)
            self.nodes[node] = gaussian_like(like, std, ctx.generator, self.source)
        return self.nodes[node]

    def apply(self, delta: Params, ctx: ServerContext) -> Params:
        """``P_t - P_{t-1}`` with ``P_t = (sum of this epoch's clipped updates + T(t)) / m``."""
        epoch, step = self.epochs.position(ctx.round)
        if epoch != self.epoch:  # a new tree
            self.epoch, self.nodes = epoch, {}
            self.total = {k: torch.zeros_like(v) for k, v in delta.items()}
            self.released = {k: torch.zeros_like(v) for k, v in delta.items()}
        completed = len(ctx.completed)
        for k, v in delta.items():
            self.total[k] = self.total[k] + v * completed
        prefix = {k: self.total[k].clone() for k in delta}
        for node in dyadic_nodes(step):
            noise = self._node(node, delta, ctx)
            for k in prefix:
                prefix[k] = prefix[k] + noise[k]
        released = {k: v / self.per_round for k, v in prefix.items()}
        out = {k: released[k] - self.released[k] for k in delta}
        self.released = released
        return out


class TreeLedger(PrivacyLedger):
    """DP-FTRL's ledger: one tree-aggregation event per epoch, composed (dp-accounting, RDP)."""

    name = "dp"

    def __init__(self, delta: float, noise_multiplier: float, epochs: EpochSampler, budget: float = 0.0) -> None:
        self.delta, self.noise_multiplier, self.epochs, self.budget = delta, noise_multiplier, epochs, budget
        self.rounds = 0
        self.noise_source = "secure"

    def epsilon_after(self, rounds: int) -> float:
        """Epsilon (RDP accountant of dp-accounting) after ``rounds`` tree steps."""
        import dp_accounting
        from dp_accounting.rdp import RdpAccountant

        if rounds <= 0:
            return 0.0
        per_epoch = self.epochs.rounds_per_epoch
        full, rest = divmod(rounds, per_epoch)
        events = []
        if full:
            events.append(dp_accounting.SelfComposedDpEvent(
                dp_accounting.SingleEpochTreeAggregationDpEvent(self.noise_multiplier, per_epoch), full))
        if rest:
            events.append(dp_accounting.SingleEpochTreeAggregationDpEvent(self.noise_multiplier, rest))
        # the paper's relation for tree aggregation: one record's contribution replaced by a special one
        accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
        accountant.compose(dp_accounting.ComposedDpEvent(events))
        return float(accountant.get_epsilon(self.delta))

    def record_round(self, ctx: ServerContext, replies: list[Message]) -> None:
        """One more tree step."""
        self.rounds += 1

    def report(self) -> dict[str, Any]:
        """epsilon (= epsilon_model), epsilon_server (inf: the server adds the noise), and the tree's figures."""
        value = self.epsilon_after(self.rounds)
        out: dict[str, Any] = {
            "epsilon": value,
            "epsilon_model": value,
            "epsilon_server": math.inf,
            "epsilon_server_note": "the server is trusted: it sees each clipped update before adding noise",
            "delta": self.delta,
            "dp_mechanism": "client-level (DP-FTRL, tree aggregation)",
            "dp_accountant": "rdp",
            "dp_noise_source": self.noise_source,
            "dp_noise_multiplier": self.noise_multiplier,
            "dp_steps": self.rounds,
            "dp_rounds_per_tree": self.epochs.rounds_per_epoch,
        }
        if self.noise_source != "secure":
            out["epsilon_note"] = NOT_A_GUARANTEE
        return out

    def would_exceed_budget(self, next_round: int) -> bool:
        """True when one more tree step would end above the budget."""
        return self.budget > 0 and self.epsilon_after(self.rounds + 1) > self.budget * (1 + 1e-9)

    def state_dict(self) -> dict[str, Any]:
        """The number of tree steps so far."""
        return {"rounds": self.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.rounds = int(state.get("rounds", 0))
