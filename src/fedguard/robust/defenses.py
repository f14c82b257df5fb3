"""Defenses as small objects over stacked updates: pre-aggregators ``(n, d) -> (n', d)`` and one rule
``(n, d) -> (d,)``, chained as ``rule(pre_k(...pre_1(stack)))`` (ByzFL's composition).

Each object wraps one function of :mod:`fedguard.robust.rules`, holds its parameters (``f`` stated by the
caller) and whatever state the paper keeps between rounds (centered clipping's centre). :func:`chain_name`
gives the configuration name of a chain, e.g. ``nnm+trimmed-mean``; :func:`check_chain` refuses, before
any training, a chain whose rule cannot work for the number of rows it will receive.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import rules
from .randomness import secure_generator

RULES = ("median", "trimmed-mean", "krum", "multi-krum", "bulyan", "geometric-median", "centered-clipping",
         "fltrust", "norm-bound")
PRE_AGGREGATORS = ("nnm", "bucketing", "clip")


class PreAggregator:
    """A map from ``n`` rows to ``n'`` rows applied before the rule."""

    name = "pre"

    def __call__(self, stack: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rows_after(self, n: int) -> int:
        """How many rows come out of ``n``."""
        return n


@dataclass
class NNM(PreAggregator):
    """Nearest-neighbour mixing (Allouah et al. 2023): each row becomes the mean of its ``n - f`` nearest."""

    f: int
    name: str = "nnm"

    def __call__(self, stack: torch.Tensor) -> torch.Tensor:
        return rules.nearest_neighbor_mixing(stack, self.f)


@dataclass
class Bucketing(PreAggregator):
    """Bucketing (Karimireddy et al. 2022): rows shuffled with OS randomness and averaged in buckets of
    ``bucket_size`` (the paper's s = 2 by default)."""

    bucket_size: int = 2
    name: str = "bucketing"

    def __call__(self, stack: torch.Tensor) -> torch.Tensor:
        return rules.bucketing(stack, self.bucket_size, secure_generator())

    def rows_after(self, n: int) -> int:
        return rules.buckets_after(n, self.bucket_size)


@dataclass
class Clip(PreAggregator):
    """Static norm clipping of every row to ``bound`` (the pre-aggregation step of Sun et al. 2019)."""

    bound: float
    name: str = "clip"

    def __call__(self, stack: torch.Tensor) -> torch.Tensor:
        return rules.clip_rows(stack, self.bound)


class Rule:
    """The aggregation rule at the end of a chain."""

    name = "rule"
    #: the smallest number of rows the rule works on (given its ``f``), and the paper's condition
    def minimum_rows(self) -> tuple[int, str]:
        return 1, "n >= 1"

    def __call__(self, stack: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The aggregate and a few figures for the round's metrics."""
        raise NotImplementedError

    def begin_round(self, params: dict[str, torch.Tensor], order: list[str]) -> None:
        """Called before aggregating with the global parameters and the name order the rows flatten in."""

    def observe(self, aggregate: torch.Tensor) -> None:
        """Called with the round's final aggregate (for rules that keep state)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


@dataclass
class Median(Rule):
    """Coordinate-wise median (Yin et al. 2018)."""

    name: str = "median"

    def __call__(self, stack: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        return rules.coordinate_median(stack), {}


@dataclass
class TrimmedMean(Rule):
    """Coordinate-wise trimmed mean (Yin et al. 2018), trimming ``f`` values at each end."""

    f: int
    name: str = "trimmed-mean"

    def minimum_rows(self) -> tuple[int, str]:
        return 2 * self.f + 1, "n > 2f"

    def __call__(self, stack: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        return rules.trimmed_mean(stack, self.f), {}


@dataclass
class MultiKrum(Rule):
    """Krum (``m = 1``) and multi-Krum (Blanchard et al. 2017); ``m = 0`` means ``n - f``."""

    f: int
    m: int = 1
    name: str = "krum"

    def minimum_rows(self) -> tuple[int, str]:
        return 2 * self.f + 3, "n > 2f + 2"

    def __call__(self, stack: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        m = self.m or stack.shape[0] - self.f
        vec, kept = rules.multi_krum(stack, self.f, m)
        return vec, {"robust_kept": float(len(kept))}


@dataclass
class Bulyan(Rule):
    """Bulyan over Krum (El Mhamdi et al. 2018)."""

    f: int
    name: str = "bulyan"

    def minimum_rows(self) -> tuple[int, str]:
        return 4 * self.f + 3, "n >= 4f + 3"

    def __call__(self, stack: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        vec, kept = rules.bulyan(stack, self.f)
        return vec, {"robust_kept": float(len(kept))}


@dataclass
class GeometricMedian(Rule):
    """Geometric median by smoothed Weiszfeld (RFA, Pillutla et al. 2022)."""

    nu: float = 1e-6
    max_iter: int = 100
    tol: float = 1e-10
    name: str = "geometric-median"

    def __call__(self, stack: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        vec, steps = rules.geometric_median(stack, None, self.nu, self.max_iter, self.tol)
        return vec, {"weiszfeld_steps": float(steps)}


@dataclass
class CenteredClipping(Rule):
    """Centered clipping (Karimireddy et al. 2021) around the previous round's aggregate."""

    tau: float
    iters: int = 1
    center: torch.Tensor | None = None
    name: str = "centered-clipping"

    def __call__(self, stack: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        center = self.center if self.center is not None and self.center.shape == stack.shape[1:] else None
        start = torch.zeros(stack.shape[1], dtype=stack.dtype) if center is None else center.to(stack.dtype)
        clipped = ((stack - start).norm(dim=1) > self.tau).float().mean()
        return rules.centered_clipping(stack, start, self.tau, self.iters), {"clipped_share": float(clipped)}

    def observe(self, aggregate: torch.Tensor) -> None:
        self.center = aggregate.detach().clone()

    def state_dict(self) -> dict[str, Any]:
        return {} if self.center is None else {"center": self.center}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.center = state.get("center")


@dataclass
class FLTrust(Rule):
    """FLTrust (Cao et al. 2021). ``server_update(params)`` returns the server's own update (a parameter
    dict) trained from the global ``params`` on its small root dataset (held-out data, never the test set);
    :meth:`begin_round` computes it each round, flattened in the rows' order."""

    server_update: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    name: str = "fltrust"
    _g0: torch.Tensor | None = field(default=None, repr=False)

    def begin_round(self, params: dict[str, torch.Tensor], order: list[str]) -> None:
        if self.server_update is None:
            raise ValueError("FLTrust needs the server's root-data update; none was set up")
        g0 = self.server_update(params)
        self._g0 = torch.cat([g0[k].reshape(-1).float() for k in order])

    def __call__(self, stack: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        if self._g0 is None:
            raise ValueError("FLTrust: begin_round was not called with the global parameters")
        vec, scores = rules.fltrust(stack, self._g0.to(stack.dtype))
        return vec, {"trusted": float((scores > 0).sum()), "server_update_norm": float(self._g0.norm())}


@dataclass
class NormBound(Rule):
    """Norm bounding, optionally with weak DP noise on the aggregate (Sun et al. 2019)."""

    bound: float
    noise_std: float = 0.0
    name: str = "norm-bound"

    def __call__(self, stack: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        clipped = (stack.norm(dim=1) > self.bound).float().mean()
        vec = rules.norm_bound(stack, self.bound, self.noise_std, secure_generator() if self.noise_std else None)
        return vec, {"clipped_share": float(clipped)}


@dataclass
class Chain:
    """Pre-aggregators in order, then one rule."""

    rule: Rule
    pre: list[PreAggregator] = field(default_factory=list)

    @property
    def name(self) -> str:
        return chain_name([p.name for p in self.pre], self.rule.name)

    def rows_reaching_rule(self, n: int) -> int:
        for p in self.pre:
            n = p.rows_after(n)
        return n

    def __call__(self, stack: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        for p in self.pre:
            stack = p(stack)
        return self.rule(stack)


def chain_name(pre: list[str], rule: str) -> str:
    """``nnm+bucketing+trimmed-mean`` style name of a chain."""
    return "+".join([*pre, rule])


def parse_chain_name(name: str) -> tuple[list[str], str]:
    """Inverse of :func:`chain_name`; refuses unknown parts, naming the allowed ones."""
    parts = [p.strip() for p in name.split("+") if p.strip()]
    if not parts:
        raise ValueError("empty defense name")
    *pre, rule = parts
    if rule not in (*RULES, "fedavg"):
        raise ValueError(f"unknown rule {rule!r}; choose one of {['fedavg', *RULES]}")
    unknown = [p for p in pre if p not in PRE_AGGREGATORS]
    if unknown:
        raise ValueError(f"unknown pre-aggregator {unknown[0]!r}; choose from {list(PRE_AGGREGATORS)}")
    return pre, rule


def check_chain(chain: Chain, rows: int) -> None:
    """Refuse a chain whose rule cannot work on the rows it will receive from ``rows`` updates."""
    reaching = chain.rows_reaching_rule(rows)
    need, condition = chain.rule.minimum_rows()
    if reaching < need:
        via = f" ({rows} updates, {reaching} after {'+'.join(p.name for p in chain.pre)})" if chain.pre else ""
        raise ValueError(f"{chain.rule.name} needs {condition}, but a round has n={reaching}{via}")
