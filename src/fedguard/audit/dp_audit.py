"""``fedguard audit dp``: the configured DP mechanism audited in one run with gradient canaries.

Following Steinke, Nasr, Jagielski 2023 ("Privacy Auditing with One (1) Training Run"), ``m``
canaries are each included with probability 1/2 (the auditor's seeded coin), the mechanism runs
once, the auditor scores every canary and turns its right guesses into an epsilon lower bound at
95% confidence (:mod:`~fedguard.audit.canary`). The canaries are white-box gradient canaries in the
manner of Nasr et al. 2023 ("Tight Auditing of Differentially Private Machine Learning", USENIX
Security): Dirac gradients, each all on one parameter coordinate with a random sign, of norm
``magnitude``; the auditor scores a canary by the released change along its coordinate.

* ``sample`` (DP-SGD): the canaries are extra records of client 0, each Poisson-sampled at the
  client's rate in every local step (from a secret the auditor lacks) and clipped by the
  mechanism's per-example clipping; they enter the real ``DPSGD`` of the configured trainer through
  its clipped-sum engine, and the real client code produces the update the auditor reads.
* ``client`` (DP-FedAvg, central noise): the canaries are clients whose update is the Dirac
  vector, Poisson-sampled each round at the run's client rate; they pass the configured client
  clipping step and the server's noise step, over ``run.rounds`` rounds; the auditor reads each
  round's released aggregate.

Variants (broken on purpose, to show the audit catches them): ``no-clip`` (the clipping norm is
infinite while the noise stays calibrated to ``dp.clip``) and ``seeded-noise``
(``dp.noise_source = "seeded"``: the noise comes from ``run.seed``, which the auditor knows, so it
replays the run without canaries and subtracts). The claimed epsilon is the ledger accountant's
figure for what the canaries went through.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedguard.config import Config
from fedguard.core.communicator import client_generator
from fedguard.core.pipeline import ClientContext, ServerContext
from fedguard.experiment import Experiment
from fedguard.privacy.accountant import GaussianStep, history_of
from fedguard.privacy.dpfedavg import ClipUpdate, DPFedAvgNoise
from fedguard.privacy.per_example import ClippedSum
from fedguard.types import Params

from .canary import GuessResult, audit
from .knowledge import observe_update

__all__ = ["VARIANTS", "CanarySet", "DPAuditResult", "make_canaries", "audit_dp"]

VARIANTS = ("correct", "no-clip", "seeded-noise")
NO_CLIP = 1e12


@dataclass
class CanarySet:
    """Dirac gradient canaries: a coordinate, a sign and the auditor's inclusion coin each."""

    coords: np.ndarray
    signs: np.ndarray
    included: np.ndarray
    magnitude: float

    def __len__(self) -> int:
        return len(self.coords)


def make_canaries(num_params: int, m: int, magnitude: float, seed: int) -> CanarySet:
    """``m`` canaries on distinct coordinates, random signs, each included with probability 1/2."""
    if m > num_params:
        raise ValueError(f"{m} canaries need as many coordinates; the model has {num_params}")
    rng = np.random.default_rng([seed, 2023])
    coords = rng.choice(num_params, size=m, replace=False)
    return CanarySet(coords, rng.choice([-1.0, 1.0], size=m), rng.random(m) < 0.5, magnitude)


def _flat(params: Params) -> torch.Tensor:
    return torch.cat([v.reshape(-1).double() for v in params.values()])


def _secret_generator() -> torch.Generator:
    """The mechanism's own coins for the canaries' sampling (the auditor never sees them)."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))


class CanaryEngine:
    """DP-SGD's clipped-sum engine with the included canaries added as Poisson-sampled records."""

    def __init__(self, base: Any, canaries: CanarySet, rate: float, clip_override: float | None = None,
                 active: bool = True) -> None:
        self.base, self.canaries, self.rate, self.clip_override = base, canaries, rate, clip_override
        self.active = active
        self.generator = _secret_generator()

    def __call__(self, params: Params, batch: Any, clip: float) -> ClippedSum:
        """The data's clipped sum plus every canary sampled this step (each clipped like a record)."""
        clip = self.clip_override or clip
        result = self.base(params, batch, clip)
        c = self.canaries
        sampled = (torch.rand(len(c), generator=self.generator) < self.rate).numpy() & c.included
        if not self.active or not sampled.any():
            return result
        flat = torch.cat([g.reshape(-1) for g in result.grads]).clone()
        size = c.magnitude * min(1.0, clip / c.magnitude)
        idx = torch.as_tensor(c.coords[sampled])
        flat[idx] += torch.as_tensor(c.signs[sampled] * size, dtype=flat.dtype)
        grads, offset = [], 0
        for g in result.grads:
            grads.append(flat[offset : offset + g.numel()].reshape(g.shape))
            offset += g.numel()
        return ClippedSum(grads, result.norms, result.loss)


@dataclass
class DPAuditResult:
    """One audited mechanism: the claim, the bound and how it was found."""

    mode: str
    variant: str
    epsilon_claimed: float
    delta: float
    guess: GuessResult
    details: dict[str, Any]

    def row(self) -> dict[str, Any]:
        """The issue's keys first."""
        return {"mode": self.mode, "variant": self.variant, "epsilon_claimed": round(self.epsilon_claimed, 4),
                "epsilon_lower_bound": round(self.guess.epsilon_lower_bound, 4), "delta": self.delta,
                **{k: v for k, v in self.guess.row().items() if k != "epsilon_lower_bound"}, **self.details}


def _variant_config(config: Config, variant: str) -> Config:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    config = copy.deepcopy(config)
    config.dp.noise_source = "seeded" if variant == "seeded-noise" else "secure"
    config.run.progress = False
    config.run.report = False
    return config


def _sample_level(config: Config, variant: str, m: int, magnitude: float) -> tuple[np.ndarray, CanarySet, float,
                                                                                    float, dict[str, Any]]:
    setup = Experiment(config).assemble()
    dpsgd = getattr(setup.trainer.gradient, "__self__", None)
    if dpsgd is None or not hasattr(dpsgd, "engine"):
        raise ValueError("dp.mode=sample: the configured trainer has no DP-SGD engine to put canaries into")
    params = {k: v.detach().clone() for k, v in setup.model.state_dict().items()}
    canaries = make_canaries(int(_flat(params).numel()), m, magnitude, config.run.seed)
    data = setup.client_data(0)
    plan = dpsgd.plan
    rate, steps = plan.rate(len(data)), plan.local_steps(len(data))
    base = dpsgd.engine
    override = NO_CLIP if variant == "no-clip" else None
    try:
        dpsgd.engine = CanaryEngine(base, canaries, rate, override)
        released = _flat(observe_update(setup, data, params, client_id=0, round=1))
        if variant == "seeded-noise":  # the auditor knows run.seed: the same run without canaries, subtracted
            dpsgd.engine = CanaryEngine(base, canaries, rate, override, active=False)
            released = released - _flat(observe_update(setup, data, params, client_id=0, round=1))
    finally:
        dpsgd.engine = base
    scores = canaries.signs * (-released[torch.as_tensor(canaries.coords)].numpy())
    ledger = setup.pipeline.ledger
    claimed = ledger.epsilon_of_history(history_of([(GaussianStep(plan.noise_multiplier, rate), steps)]))
    details = {"noise_multiplier": plan.noise_multiplier, "sampling_rate": rate, "steps": steps,
               "client_examples": len(data)}
    return scores, canaries, claimed, ledger.delta, details


def _client_level(config: Config, variant: str, m: int, magnitude: float) -> tuple[np.ndarray, CanarySet, float,
                                                                                    float, dict[str, Any]]:
    setup = Experiment(config).assemble()
    pipeline = setup.pipeline
    clip_step = next((s for s in pipeline.client_steps if isinstance(s, ClipUpdate)), None)
    noise_step = next((s for s in pipeline.server_steps if isinstance(s, DPFedAvgNoise)), None)
    if clip_step is None or noise_step is None or noise_step.noise_multiplier <= 0:
        raise ValueError("dp.mode=client: the audit needs central noise (dp.noise_placement=central)")
    params = {k: v.detach().clone() for k, v in setup.model.state_dict().items()}
    shapes = {k: v.shape for k, v in params.items()}
    canaries = make_canaries(int(_flat(params).numel()), m, magnitude, config.run.seed)
    rate, rounds, seed = setup.sampler.sampling_rate, config.run.rounds, config.run.seed
    coins, scores = _secret_generator(), np.zeros(m)
    idx = torch.as_tensor(canaries.coords)
    for rnd in range(1, rounds + 1):
        instructions: dict[str, Any] = {}
        clip_step.configure(rnd, instructions)
        if variant == "no-clip":
            instructions["dp_clip"] = NO_CLIP
        sampled = np.flatnonzero((torch.rand(m, generator=coins) < rate).numpy() & canaries.included)
        total = torch.zeros(sum(math.prod(s) for s in shapes.values()), dtype=torch.float64)
        for i in sampled:
            vec = torch.zeros_like(total)
            vec[int(canaries.coords[i])] = canaries.signs[i] * canaries.magnitude
            update = _unflat(vec, shapes)
            ctx = ClientContext(int(i), rnd, 1, client_generator(seed, rnd, int(i), "fit"), instructions, {})
            total += _flat(clip_step.apply(update, ctx))
        mean = _unflat(total / max(len(sampled), 1), shapes)
        server = ServerContext(rnd, sampled.tolist(), sampled.tolist(), m, client_generator(seed, rnd, -1, "server"),
                               lambda _text: None)
        released = _flat(noise_step.apply(mean, server))
        if variant == "seeded-noise":  # regenerate the server's noise from the seed and subtract it
            blank = ServerContext(rnd, [], [], m, client_generator(seed, rnd, -1, "server"), lambda _text: None)
            released = released - _flat(noise_step.apply(_unflat(torch.zeros_like(total), shapes), blank))
        scores += canaries.signs * released[idx].numpy()
    ledger = pipeline.ledger
    claimed = ledger.epsilon_of_history(history_of([(GaussianStep(noise_step.noise_multiplier, rate), rounds)]))
    details = {"noise_multiplier": noise_step.noise_multiplier, "sampling_rate": rate, "rounds": rounds}
    return scores, canaries, claimed, ledger.delta, details


def _unflat(vec: torch.Tensor, shapes: dict[str, torch.Size]) -> Params:
    out, offset = {}, 0
    for k, s in shapes.items():
        n = math.prod(s)
        out[k] = vec[offset : offset + n].reshape(s).float()
        offset += n
    return out


def audit_dp(config: Config, variant: str = "correct", canaries: int = 1000, magnitude: float = 0.0,
             confidence: float = 0.95) -> DPAuditResult:
    """Audit the configured ``dp.mode`` (sample or client) once; ``magnitude`` 0 means 100 x ``dp.clip``."""
    config = _variant_config(config, variant)
    mode = config.dp.mode
    magnitude = magnitude or 100.0 * config.dp.clip
    if mode == "sample":
        scores, cans, claimed, delta, details = _sample_level(config, variant, canaries, magnitude)
    elif mode == "client":
        scores, cans, claimed, delta, details = _client_level(config, variant, canaries, magnitude)
    else:
        raise ValueError(f"dp.mode={mode!r}: the canary audit covers sample (DP-SGD) and client (DP-FedAvg)")
    guess = audit(scores, cans.included, delta, confidence)
    details.update({"canary_magnitude": magnitude, "included": int(cans.included.sum())})
    return DPAuditResult(mode, variant, claimed, delta, guess, details)
