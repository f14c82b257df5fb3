"""The privacy ledger: what each party has spent, as epsilon at delta, after every round.

The ledger keeps, for every party whose data a guarantee protects, the history of Gaussian
releases it took part in (see :mod:`fedguard.privacy.accountant`), and reports epsilon from
the dp-accounting library:

* sample-level DP: one history per client (its own DP-SGD steps, over the rounds it took
  part in); ``epsilon`` is the largest over clients, ``epsilon_mean`` the mean;
* client-level DP: one history for the whole population (one release per round);
* local DP: one history per client (one release per round it took part in).

Each round's row also names the mechanism, the accountant, and the sampling rate, noise
multiplier and step count that produced the reported (worst) epsilon. Budget mode stops the
run before a round whose planned spending would exceed the budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from fedguard.algorithms.sampling import ClientSampler
from fedguard.messages import Message
from fedguard.pipeline.base import PrivacyLedger, ServerContext
from fedguard.privacy.accountant import GaussianStep, History, epsilon, history_of
from fedguard.privacy.noise import NOT_A_GUARANTEE

#: the step(s) a party would take in a round if it took part: party id -> [(step, count)]
Planner = Callable[[int], list[tuple[GaussianStep, int]]]


class DPLedger(PrivacyLedger):
    """Per-party histories, reported as epsilon at ``delta`` with one accountant."""

    name = "dp"

    def __init__(
        self,
        mechanism: str,
        delta: float,
        accountant: str = "pld",
        budget: float = 0.0,
        sampler: ClientSampler | None = None,
        planner: Planner | None = None,
    ) -> None:
        self.mechanism, self.delta, self.accountant = mechanism, delta, accountant
        self.budget, self.sampler, self.planner = budget, sampler, planner
        #: round -> the fewest completed clients whose updates that round can release (the worst case the
        #: budget check plans for; the sampled count when dropouts cannot lower the noise)
        self.fewest: Callable[[int], int] | None = None
        self.histories: dict[int, History] = {}
        self.rounds = 0
        #: True when each client has its own guarantee (sample-level, local)
        self.per_party = True
        #: dp.noise_source: "seeded" marks every reported epsilon as no guarantee
        self.noise_source = "secure"

    # -- recording ------------------------------------------------------------------------
    def spend(self, party: int, steps: list[tuple[GaussianStep, int]]) -> None:
        """Add ``steps`` to ``party``'s history."""
        self.histories[party] = history_of([*self.histories.get(party, ()), *steps])

    def epsilon_of(self, party: int) -> float:
        """Epsilon spent so far by one party."""
        return self.epsilon_of_history(self.histories.get(party, ()))

    def epsilon_of_history(self, history: History) -> float:
        """Epsilon of a history with this ledger's accountant (the library's figure)."""
        return epsilon(history, self.delta, self.accountant)

    def quick_bound(self, history: History) -> float:
        """A cheap upper bound on :meth:`epsilon_of_history` (RDP at integer orders).

        For ``rdp`` it can only be looser (fewer orders); for ``pld`` the PLD figure is below
        RDP in every regime fedguard runs, and the smaller of the two is reported if not.
        """
        return epsilon(history, self.delta, "rdp-int")

    # -- reporting ------------------------------------------------------------------------
    def worst(self) -> tuple[int | None, float]:
        """The party with the largest epsilon, and that epsilon (a bound valid for every party).

        Parties are ranked by a quick upper bound (RDP at integer orders); the accountant's
        figure is computed from the top until the next party's quick bound is no larger than the
        largest figure found. Every figure is an upper bound on the true epsilon, so the
        reported one bounds every party, at the cost of a few accountant calls per round.
        """
        if not self.histories:
            return None, 0.0
        bound = {p: self.quick_bound(h) for p, h in self.histories.items()}
        ranked = sorted(bound, key=lambda p: (-bound[p], p))
        best_party, best = ranked[0], -math.inf
        for party in ranked:
            if bound[party] <= best:
                break
            value = min(self.epsilon_of(party), bound[party])
            if value > best:
                best_party, best = party, value
        return best_party, best

    def report(self) -> dict[str, Any]:
        """epsilon (worst party), delta, the mechanism and the parameters behind the figure."""
        party, value = self.worst()
        # epsilon_model and epsilon_server side by side (rows, summary table, report.md)
        out: dict[str, Any] = {"epsilon": value if party is not None else 0.0}
        out["epsilon_model"] = out["epsilon"]
        out.update(self.server_report())
        out.update({
            "delta": self.delta,
            "dp_mechanism": self.mechanism,
            "dp_accountant": self.accountant,
            "dp_noise_source": self.noise_source,
        })
        if self.noise_source != "secure":
            out["epsilon_note"] = NOT_A_GUARANTEE
        if party is None:
            return out
        out.update(_describe(self.histories[party]))
        if self.per_party:
            out["dp_worst_client"] = party
            out["dp_clients_accounted"] = len(self.histories)
        return out

    def server_report(self) -> dict[str, Any]:
        """``epsilon_server``: against the server, who knows which clients took part in each round.

        Here the same as ``epsilon`` (each client's own secret coins and noise: DP-SGD's Poisson masks
        and local noise are drawn on the client, so amplification holds against the server too).
        """
        return {"epsilon_server": self.worst()[1]}

    # -- budget ---------------------------------------------------------------------------
    def would_exceed_budget(self, next_round: int) -> bool:
        """True when a party sampled in ``next_round`` would end it above the budget."""
        if self.budget <= 0 or self.planner is None:
            return False
        limit = self.budget * (1 + 1e-9)
        for party in self.parties_in(next_round):
            planned = history_of([*self.histories.get(party, ()), *self.planned(party, next_round)])
            bound = self.quick_bound(planned)
            if bound <= limit:
                continue  # the reported figure is at most the quick bound
            if min(self.epsilon_of_history(planned), bound) > limit:
                return True
        return False

    def planned(self, party: int, round: int) -> list[tuple[GaussianStep, int]]:
        """The steps ``party`` would take in ``round`` at the worst case the configuration allows."""
        assert self.planner is not None
        return self.planner(party)

    def fewest_completed(self, round: int) -> int:
        """The fewest completed clients ``round`` can release a result with."""
        if self.fewest is not None:
            return self.fewest(round)
        return len(self.sampler.sample(round)) if self.sampler is not None else 1

    def parties_in(self, round: int) -> list[int]:
        """The parties whose spending a round adds to (the sampled clients)."""
        return self.sampler.sample(round) if self.sampler is not None else list(self.histories)

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Histories as JSON-ready lists."""
        return {"rounds": self.rounds, "histories": _dump(self.histories)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.rounds = int(state.get("rounds", 0))
        self.histories = _load(state.get("histories", {}))


def _dump(histories: dict[int, History]) -> dict[str, list[list[float]]]:
    return {str(p): [[s.noise_multiplier, s.sampling_rate, c] for s, c in h] for p, h in histories.items()}


def _load(data: dict[str, Any]) -> dict[int, History]:
    return {int(p): history_of([(GaussianStep(float(z), float(q)), int(c)) for z, q, c in h]) for p, h in data.items()}


def _describe(history: History) -> dict[str, Any]:
    """The parameters behind a history, for the row (a single kind of step is the usual case)."""
    steps = sum(c for _, c in history)
    rates = sorted({s.sampling_rate for s, _ in history})
    sigmas = sorted({s.noise_multiplier for s, _ in history})
    return {
        "dp_sampling_rate": rates[0] if len(rates) == 1 else rates,
        "dp_noise_multiplier": sigmas[0] if len(sigmas) == 1 else [min(sigmas), max(sigmas)],
        "dp_steps": steps,
    }


class SampleLevelLedger(DPLedger):
    """DP-SGD: each completed client's own steps.

    A client's ``dp_sgd`` reply metadata gives its (q, sigma, steps); where replies are not
    readable (secure aggregation hides them) the planner's values for that client are used,
    which are the same settings the client's code runs with.
    """

    def __init__(
        self,
        delta: float,
        accountant: str = "pld",
        noise_scale: Callable[[int], float] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__("sample-level (DP-SGD)", delta, accountant, **kwargs)
        #: distributed noise: the factor on sigma when ``completed`` clients added their share
        self.noise_scale = noise_scale or (lambda completed: 1.0)

    def planned(self, party: int, round: int) -> list[tuple[GaussianStep, int]]:
        """The client's steps, at the noise left when the fewest clients complete the round."""
        scale = self.noise_scale(self.fewest_completed(round))
        steps = super().planned(party, round)
        return [(GaussianStep(s.noise_multiplier * scale, s.sampling_rate), c) for s, c in steps]

    def record_round(self, ctx: ServerContext, replies: list[Message]) -> None:
        """Charge every client whose update was aggregated this round."""
        self.rounds += 1
        scale = self.noise_scale(len(ctx.completed))
        reported = {m.client_id: m.meta["dp_sgd"] for m in replies if isinstance(m.meta.get("dp_sgd"), dict)}
        for client in ctx.completed:
            info = reported.get(client)
            if info is not None:
                step = GaussianStep(float(info["noise_multiplier"]), float(info["sample_rate"]))
                steps = [(step, int(info["steps"]))]
            elif self.planner is not None:
                steps = self.planner(client)
            else:
                raise ValueError(f"client {client} sent no DP-SGD report; its privacy cannot be accounted")
            self.spend(client, [(GaussianStep(s.noise_multiplier * scale, s.sampling_rate), c) for s, c in steps])


class ClientLevelLedger(DPLedger):
    """DP-FedAvg: the population's history, one sampled Gaussian release per round.

    ``noise_of_round(completed)`` gives the round's effective noise multiplier (the planned
    one for central noise; lower when too few clients added their share of distributed noise).
    """

    PARTY = 0

    def __init__(
        self,
        delta: float,
        accountant: str,
        sampling_rate: float,
        noise_of_round: Callable[[int], float],
        planned_noise: float,
        distributed: bool = False,
        self_sampled: bool = False,
        **kwargs: Any,
    ) -> None:
        planner = lambda _: [(GaussianStep(planned_noise, sampling_rate), 1)]  # noqa: E731
        super().__init__("client-level (DP-FedAvg)", delta, accountant, planner=planner, **kwargs)
        self.sampling_rate, self.noise_of_round = sampling_rate, noise_of_round
        self.per_party = False
        #: distributed noise under SecAgg+ (the server never sees an update without the others' noise)
        self.distributed = distributed
        #: client self-sampling under SecAgg+: the server does not know the sample, amplification holds against it
        self.self_sampled = self_sampled
        #: per client: the un-amplified releases it took part in (what the server, knowing the sample, sees)
        self.server_histories: dict[int, History] = {}

    def server_report(self) -> dict[str, Any]:
        """Against the server, who picks and sees the sample: no amplification by sampling.

        Central noise: the server sees every clipped update before it adds the noise, so nothing holds
        against it (``epsilon_server`` inf). Client self-sampling under SecAgg+: the server never learns
        the sample, so the amplified population figure holds against it too. Distributed noise under
        SecAgg+ with the server's sample: each client is charged, for every round it completed, one
        un-amplified Gaussian release at the round's honest noise.
        """
        if self.self_sampled and self.distributed:
            return {"epsilon_server": self.worst()[1]}
        if not self.distributed:
            return {"epsilon_server": math.inf,
                    "epsilon_server_note": "the server is trusted: it sees each clipped update before adding noise"}
        if not self.server_histories:
            return {"epsilon_server": 0.0}
        bound = {p: epsilon(h, self.delta, "rdp-int") for p, h in self.server_histories.items()}
        ranked = sorted(bound, key=lambda p: (-bound[p], p))
        best = -math.inf
        for party in ranked:
            if bound[party] <= best:
                break
            best = max(best, min(self.epsilon_of_history(self.server_histories[party]), bound[party]))
        return {"epsilon_server": best}

    def planned(self, party: int, round: int) -> list[tuple[GaussianStep, int]]:
        """One release at the noise left when the fewest clients complete the round."""
        return [(GaussianStep(self.noise_of_round(self.fewest_completed(round)), self.sampling_rate), 1)]
    def record_round(self, ctx: ServerContext, replies: list[Message]) -> None:
        """Charge the population for one release at this round's effective noise."""
        self.rounds += 1
        z = self.noise_of_round(len(ctx.completed))
        self.spend(self.PARTY, [(GaussianStep(z, self.sampling_rate), 1)])
        if self.distributed:
            for client in ctx.completed:
                self.server_histories[client] = history_of([*self.server_histories.get(client, ()),
                                                            (GaussianStep(z, 1.0), 1)])

    def parties_in(self, round: int) -> list[int]:
        """Every round adds to the one population-wide history."""
        return [self.PARTY]

    def state_dict(self) -> dict[str, Any]:
        """The population's history and, for distributed noise, each client's against the server."""
        return {**super().state_dict(), "server_histories": _dump(self.server_histories)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        super().load_state_dict(state)
        self.server_histories = _load(state.get("server_histories", {}))


class LocalLedger(DPLedger):
    """Local DP: each participating client releases one noised update per round.

    ``noise_multiplier`` is relative to the update's sensitivity: for updates clipped to
    norm ``S`` any two differ by at most ``2 S``, so noise ``sigma S`` gives ``sigma / 2``.
    """

    def __init__(self, delta: float, accountant: str, noise_multiplier: float, **kwargs: Any) -> None:
        step = GaussianStep(noise_multiplier, 1.0)
        super().__init__("local", delta, accountant, planner=lambda _: [(step, 1)], **kwargs)
        self.step = step

    def record_round(self, ctx: ServerContext, replies: list[Message]) -> None:
        """Charge every client whose noised update was aggregated this round."""
        self.rounds += 1
        for client in ctx.completed:
            self.spend(client, [(self.step, 1)])

