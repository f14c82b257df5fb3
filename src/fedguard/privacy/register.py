"""Registers the ``[dp]`` section and the hooks that install a DP mechanism and its ledger.

* ``dp.mode = sample``: the trainer hook swaps LocalSGD's batch sampler and gradient for
  DP-SGD's (after refusing models with example-mixing layers and checking the per-example
  engine against the exact one); the pipeline hook adds the reporting client step and the
  per-client ledger.
* ``dp.mode = client``: clip (fixed or adaptive) on the clients, Gaussian noise centrally or
  split among clients, Poisson client sampling, and the population ledger.
* ``dp.mode = local``: clip and noise on each client, and the per-client ledger.

Target-epsilon mode computes the noise multiplier here, before training, for ``run.rounds``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from functools import lru_cache

import torch

from fedguard.algorithms.local_sgd import LocalSGD
from fedguard.algorithms.update_rules import SGDRule
from fedguard.builders import PIPELINE_HOOKS, TRAINER_HOOKS, BuildContext, PipelineParts, seeded_model
from fedguard.config import register_section
from fedguard.pipeline.base import ClientStep, ConfigurationError
from fedguard.privacy.accountant import GaussianStep, calibrate_noise, default_delta, epsilon, history_of
from fedguard.privacy.config import DPConfig
from fedguard.privacy.distributed import (
    DiscreteGaussianRingNoise,
    DPSGDRingNoise,
    check_tau,
    headroom_bits,
    rounding_excess,
)
from fedguard.privacy.dpfedavg import (
    AdaptiveClip,
    ClipUpdate,
    DistributedNoise,
    DPFedAvgNoise,
    SelfSample,
    update_noise_multiplier,
)
from fedguard.privacy.dpsgd import DPSGD, DPSGDPlan, DPSGDReport
from fedguard.privacy.ftrl import EpochSampler, TreeLedger, TreeNoise
from fedguard.privacy.ledger import ClientLevelLedger, DPLedger, LocalLedger, SampleLevelLedger
from fedguard.privacy.local_dp import LocalGaussian, PublicReply
from fedguard.privacy.noise import NOT_A_GUARANTEE, Randomness, randomness, secure_uniform
from fedguard.privacy.per_example import VmapClippedSum, build_clipped_sum, loop_clipped_sum, relative_difference
from fedguard.privacy.validator import validate_for_dpsgd
from fedguard.secure.secagg_aggregator import RING_NOISE_HOOKS
from fedguard.tasks.base import Task

register_section("dp", DPConfig)


# -- shared planning ----------------------------------------------------------------------------


def resolve_delta(ctx: BuildContext) -> float:
    """dp.delta, or the automatic rule delta < 1/N; warns when a set delta breaks the rule."""
    dp = ctx.config.dp
    records = sum(ctx.client_sizes) if dp.mode == "sample" else ctx.sampler.population
    unit = "training records" if dp.mode == "sample" else "clients"
    if dp.delta == 0:
        return default_delta(records)
    if dp.delta >= 1.0 / records:
        raise ConfigurationError(
            f"dp.delta={dp.delta:g} is not below 1/N = {1.0 / records:.3g} (N = {records} {unit}): a mechanism that "
            "publishes one random record in full meets such a delta, so the epsilon would mean nothing. Set "
            f"dp.delta below {1.0 / records:.3g}, or dp.delta=0 for the automatic value."
        )
    return dp.delta


def noise_source(ctx: BuildContext) -> Randomness:
    """The configured DP randomness (logging that seeded noise is no guarantee)."""
    dp = ctx.config.dp
    if dp.noise_source != "secure":
        ctx.log(f"warning: dp.noise_source=seeded: every epsilon of this run is {NOT_A_GUARANTEE}")
    return randomness(dp.noise_source, dp.float_noise_draws)


def check_settings(ctx: BuildContext) -> None:
    """Refuse, before training, DP settings whose epsilon would not hold (key, reason, fix)."""
    dp = ctx.config.dp
    if dp.noise_source == "secure":  # the server samples clients with its own secret coins, not run.seed
        ctx.sampler.coins = secure_uniform
    secure = getattr(getattr(ctx.config, "secure", None), "mode", "none")
    if dp.noise_multiplier <= 0 and dp.target_epsilon <= 0:
        raise ConfigurationError(
            f"dp.noise_multiplier={dp.noise_multiplier:g} with dp.mode={dp.mode}: without noise no epsilon holds "
            "(it is infinite). Set dp.noise_multiplier > 0 or dp.target_epsilon > 0."
        )
    if dp.noise_placement == "distributed" and secure != "secagg":
        raise ConfigurationError(
            f"dp.noise_placement=distributed with secure.mode={secure}: each client adds only a share of the noise, "
            "so whoever sees an individual update (or decrypts the sum, under CKKS) sees it almost un-noised. "
            "Set secure.mode=secagg, or dp.noise_placement=central (client) / local (sample)."
        )
    if dp.client_sampling == "self" and (dp.mode != "client" or dp.noise_placement != "distributed"):
        raise ConfigurationError(
            "dp.client_sampling=self needs dp.mode=client with dp.noise_placement=distributed (and "
            "secure.mode=secagg): otherwise the server sees which clients sent a zero update, i.e. the sample. Set "
            "dp.client_sampling=server, or use distributed noise under SecAgg+."
        )
    if dp.mode in ("client", "ftrl") and dp.noise_placement in ("auto", "central") and secure == "ckks":
        raise ConfigurationError(
            "dp.mode=client with central noise and secure.mode=ckks: the key holder decrypts the sum before the "
            "server adds noise, so it sees the un-noised sum. Use secure.mode=secagg with "
            "dp.noise_placement=distributed, or secure.mode=none."
        )


def participations(ctx: BuildContext) -> Counter[int]:
    """How many of the planned rounds each client is sampled in (sampling is seeded, so known)."""
    counts: Counter[int] = Counter()
    for r in range(1, ctx.config.run.rounds + 1):
        counts.update(ctx.sampler.sample(r))
    return counts


def base_sample_plan(ctx: BuildContext, trainer: LocalSGD | None = None) -> DPSGDPlan:
    """DP-SGD settings from the configuration (noise multiplier as configured)."""
    dp, t = ctx.config.dp, ctx.config.train
    limit = trainer.steps_limit if trainer is not None else (t.max_steps or None)
    shares = sample_noise_shares(ctx)
    return DPSGDPlan(dp.noise_multiplier, dp.clip, dp.sample_rate, t.batch_size, dp.local_steps, t.epochs, limit,
                     shares, in_ring=ring_noise_applies(ctx))


def sample_plan(ctx: BuildContext, trainer: LocalSGD | None = None) -> DPSGDPlan:
    """The DP-SGD plan, with sigma calibrated when dp.target_epsilon is set."""
    plan = base_sample_plan(ctx, trainer)
    dp = ctx.config.dp
    if dp.target_epsilon <= 0:
        return plan
    counts = participations(ctx)
    groups = tuple(sorted({(plan.rate(ctx.client_sizes[c]), plan.local_steps(ctx.client_sizes[c]) * k)
                           for c, k in counts.items()}))
    sigma = _calibrate_groups(groups, dp.target_epsilon, resolve_delta(ctx), dp.accountant)
    ctx.log(f"DP-SGD: noise multiplier {sigma:.4f} so that every client spends at most epsilon "
            f"{dp.target_epsilon:g} over {ctx.config.run.rounds} rounds")
    return replace(plan, noise_multiplier=sigma)


@lru_cache(maxsize=32)
def _calibrate_groups(groups: tuple[tuple[float, int], ...], target: float, delta: float, kind: str) -> float:
    """Sigma for the worst (rate, total steps) group; checked against the next-worst ones."""

    def make(group: tuple[float, int]):
        return lambda s: history_of([(GaussianStep(s, group[0]), group[1])])

    ranked = sorted(groups, key=lambda g: epsilon(make(g)(1.0), delta, "rdp"), reverse=True)
    sigma = 0.0
    for group in ranked[:3]:
        if sigma == 0.0 or epsilon(make(group)(sigma), delta, kind) > target:
            sigma = max(sigma, calibrate_noise(make(group), target, delta, kind))
    return sigma


def client_sampling_rate(ctx: BuildContext) -> float:
    """Turn on Poisson client sampling when not every client takes part; return the rate."""
    sampler = ctx.sampler
    if sampler.per_round(sampler.population) < sampler.population and not sampler.poisson:
        sampler.poisson = True
        ctx.log(f"DP: clients are Poisson-sampled, each with probability {sampler.sampling_rate:.4g} per round, "
                "as the accountant assumes")
    return sampler.sampling_rate


def client_rate(ctx: BuildContext) -> float:
    """Client-level sampling rate q; with self-sampling, the server then asks every client each round."""
    if ctx.config.dp.client_sampling != "self":
        return client_sampling_rate(ctx)
    sampler, server = ctx.sampler, ctx.config.server
    rate = min(1.0, server.clients_per_round / sampler.population) if server.clients_per_round else server.fraction
    sampler.count, sampler.fraction, sampler.poisson = 0, 1.0, False
    return rate


def noise_contributors(ctx: BuildContext) -> int:
    """How many clients add a share of the distributed noise in a round (expected)."""
    if ctx.config.dp.client_sampling == "self":
        return ctx.sampler.population
    return max(1, round(client_rate(ctx) * ctx.sampler.population))


def client_noise(ctx: BuildContext) -> float:
    """The (total) noise multiplier for client-level or local DP, calibrated if targeted."""
    dp = ctx.config.dp
    if dp.target_epsilon <= 0:
        return dp.noise_multiplier
    rounds, delta = ctx.config.run.rounds, resolve_delta(ctx)
    if dp.mode == "client":
        q = client_rate(ctx)
        plan = lambda s: history_of([(GaussianStep(s, q), rounds)])  # noqa: E731
        z = calibrate_noise(plan, dp.target_epsilon, delta, dp.accountant)
    else:  # local: the most-sampled client's rounds, at multiplier sigma / 2
        most = max(participations(ctx).values(), default=rounds)
        z = 2.0 * calibrate_noise(lambda s: history_of([(GaussianStep(s, 1.0), most)]), dp.target_epsilon, delta,
                                  dp.accountant)
    ctx.log(f"DP ({dp.mode}): noise multiplier {z:.4f} for epsilon {dp.target_epsilon:g} over {rounds} rounds")
    return z


# -- sample-level -------------------------------------------------------------------------------


def _sample_trainer_hook(trainer: LocalSGD, ctx: BuildContext) -> LocalSGD:
    """Install DP-SGD's Poisson sampler and clipped, noised gradients in the local trainer."""
    if ctx.config.dp.mode != "sample":
        return trainer
    task = ctx.task
    if type(task).local_train is not Task.local_train:
        raise ConfigurationError(
            f"dp.mode=sample: task {task.name!r} trains with its own loop, so DP-SGD cannot be applied to it; "
            "use dp.mode=client (clip and noise whole updates) instead"
        )
    check_settings(ctx)
    model = seeded_model(task, ctx.config.run.seed)
    validate_for_dpsgd(model)
    engine = build_clipped_sum(model, task.loss, ctx.config.dp.per_example, ctx.log)
    _check_engine(engine, model, task, ctx)
    dp = ctx.config.dp
    plan = sample_plan(ctx, trainer)
    if plan.in_ring:
        _check_ring_trainer(trainer, ctx)
    dpsgd = DPSGD(plan, engine, randomness(dp.noise_source, dp.float_noise_draws))
    trainer.sampler, trainer.gradient = dpsgd.sample, dpsgd.gradient
    return trainer


def _check_ring_trainer(trainer: LocalSGD, ctx: BuildContext) -> None:
    """Refuse local training whose update is not ``-lr * (clipped sum / (q n) + data-free terms)``.

    The ring noise is sized for that linear step (:class:`~fedguard.privacy.distributed.DPSGDRingNoise`);
    an adaptive rule (Adam) rescales the gradient, and SCAFFOLD, FedDyn and Ditto keep or send state
    computed from the un-noised step.
    """
    algorithm = getattr(getattr(ctx.config, "algorithm", None), "name", "fedavg")
    if not isinstance(trainer.rule or SGDRule(), SGDRule) or trainer.lr != ctx.config.train.lr:
        problem = "the local optimiser is not SGD at train.lr (e.g. a task's Adam)"
    elif algorithm not in ("fedavg", "fedprox"):
        problem = f"algorithm.name={algorithm} keeps or sends state computed from the un-noised local step"
    else:
        return
    raise ConfigurationError(
        f"dp.mode=sample with dp.noise_placement=distributed under secure.mode=secagg adds each DP-SGD step's "
        f"noise to the update inside the ring, sized for one plain SGD step, but {problem}. Use algorithm.name="
        "fedavg or fedprox with the engine's SGD, or dp.noise_placement=local."
    )


def _check_engine(engine: object, model: torch.nn.Module, task: Task, ctx: BuildContext) -> None:
    """Refuse a fast engine that disagrees with exact per-example gradients (e.g. a loss that is no mean)."""
    if isinstance(engine, VmapClippedSum) or len(ctx.train) == 0:
        return
    batch = (ctx.train.x[:4], ctx.train.y[:4])
    params = {k: v.detach() for k, v in model.named_parameters()}
    fast = engine(params, batch, 0.1)  # type: ignore[operator]
    exact = loop_clipped_sum(model, task.loss, params, batch, 0.1)
    if relative_difference(fast.grads, exact.grads) > 1e-3:
        raise ConfigurationError(
            "dp.per_example: the fast per-example gradients disagree with exact ones for this task. The task's loss "
            "must be the mean of independent per-example losses; otherwise set dp.per_example=vmap."
        )


def _sample_pipeline(parts: PipelineParts, ctx: BuildContext) -> None:
    noise_source(ctx)
    plan = sample_plan(ctx)
    sizes, dp = ctx.client_sizes, ctx.config.dp

    def planner(client: int) -> list[tuple[GaussianStep, int]]:
        n = sizes[client]
        return [(GaussianStep(plan.noise_multiplier, plan.rate(n)), plan.local_steps(n))]

    distributed = dp.noise_placement == "distributed"
    scale = _charged_scale(ctx, plan.noise_shares) if distributed else (lambda completed: 1.0)
    parts.client_steps[0:0] = [DPSGDReport(plan), PublicReply("registered")]
    parts.ledger = SampleLevelLedger(resolve_delta(ctx), dp.accountant, budget=dp.budget_epsilon,
                                     sampler=ctx.sampler, planner=planner, noise_scale=scale)
    if distributed:
        _plan_at_fewest(parts.ledger, ctx)


def sample_noise_shares(ctx: BuildContext) -> float:
    """1, or the number of shares of distributed DP-SGD noise (refusing settings it cannot serve)."""
    dp = ctx.config.dp
    if dp.noise_placement in ("auto", "local"):
        return 1.0
    if dp.noise_placement != "distributed":
        raise ConfigurationError("dp.mode=sample: dp.noise_placement must be local or distributed")
    problems = []
    if dp.local_steps != 1:
        problems.append(f"dp.local_steps=1, not {dp.local_steps or 'train.epochs passes'} (one step per round: the "
                        "sum of the clients' updates is then one DP-SGD step on the union of their data, and the "
                        "noise added once to each update in the SecAgg+ ring covers exactly that step; the sum of "
                        "several local steps taken from private points is not one Gaussian release)")
    if dp.sample_rate <= 0:
        problems.append("a fixed dp.sample_rate (the same for every client, so every example's noise is equal)")
    if ctx.config.server.weighting != "examples":
        problems.append("server.weighting=examples (the aggregate is then the sum over all examples / (q N))")
    if problems:
        raise ConfigurationError("dp.noise_placement=distributed with dp.mode=sample needs " + "; ".join(problems)
                                 + ". Set those, or use dp.noise_placement=local (each client adds all of each "
                                 "step's noise, any number of steps).")
    return float(distributed_shares(ctx, ctx.sampler.per_round(ctx.sampler.population)))


def fewest_survivors(ctx: BuildContext, clients: int) -> int:
    """The fewest of ``clients`` sampled clients whose masked updates SecAgg+ unmasks (its min_survivors)."""
    s = ctx.config.secure
    return _fewest(clients, s.neighbours, s.threshold, s.min_survivors, ctx.config.server.min_clients, s.ring_bits)


@lru_cache(maxsize=256)
def _fewest(clients: int, neighbours: int, threshold: int, min_survivors: int, min_clients: int, bits: int) -> int:
    if clients < 2:
        return clients
    from fedguard.secure.secagg_aggregator import SecAggSettings

    settings = SecAggSettings(ring_bits=bits, neighbours=neighbours or None, threshold=threshold or None,
                              min_survivors=min_survivors or None, min_clients=min_clients)
    return min(clients, settings.round_config(0, list(range(clients)), 1, seed=bytes(32)).min_survivors)


def distributed_shares(ctx: BuildContext, clients: int) -> int:
    """How many shares make the full noise: the fewest survivors of ``clients``, less the colluders.

    Each client adds ``1 / shares`` of the noise variance; a round that SecAgg+ completes has at
    least ``fewest`` survivors, of which at most ``dp.colluding_clients`` know their own share, so
    the others' noise alone carries the full variance (Kairouz, Liu, Steinke 2021, Section 5).
    """
    dp = ctx.config.dp
    if dp.noise_shares:
        return int(dp.noise_shares)
    fewest = fewest_survivors(ctx, clients)
    shares = fewest - dp.colluding_clients
    if shares < 1:
        raise ConfigurationError(
            f"dp.colluding_clients={dp.colluding_clients}: a round of {clients} clients may release the sum of only "
            f"{fewest} (secure.min_survivors), which leaves no honest share of the noise. Raise "
            "secure.min_survivors or server.clients_per_round, or lower dp.colluding_clients."
        )
    return shares


def _charged_scale(ctx: BuildContext, shares: float) -> Callable[[int], float]:
    """completed clients -> the factor on the noise multiplier their honest shares give: every completed
    client's share but the colluders' (the protected client's own share always counts)."""
    colluding = ctx.config.dp.colluding_clients
    return lambda completed: math.sqrt(max(completed - colluding, min(completed, 1)) / shares)


def _plan_at_fewest(ledger: DPLedger, ctx: BuildContext) -> None:
    """Make the ledger's budget check plan every round at the fewest clients SecAgg+ lets complete it."""
    sampler = ctx.sampler
    ledger.fewest = lambda round: fewest_survivors(ctx, len(sampler.sample(round)))


# -- client-level and local ----------------------------------------------------------------------


def _check_client_level(parts: PipelineParts, ctx: BuildContext) -> None:
    """Refuse what DP-FedAvg's sensitivity argument cannot cover."""
    dp, server = ctx.config.dp, ctx.config.server
    if server.weighting != "uniform":
        raise ConfigurationError(
            "dp.mode=client bounds each client's influence by the clip norm, which needs the uniform mean of "
            "updates: set server.weighting=uniform"
        )
    rule = getattr(getattr(ctx.config, "robust", None), "rule", "none")
    if parts.aggregator.needs_individual_updates or rule != "none":
        raise ConfigurationError(
            f"dp.mode=client adds noise to the sum of clipped updates, but robust.rule={rule} is not a sum. "
            "Clipping already bounds each client's influence: use robust.rule=none with dp.mode=client."
        )
    if dp.noise_placement == "local":
        raise ConfigurationError("dp.mode=client: dp.noise_placement must be central or distributed")
    if dp.adaptive_clip and dp.noise_placement == "distributed":
        raise ConfigurationError(
            "dp.adaptive_clip needs each client's clipping indicator, which would reach the server outside "
            "secure aggregation; use dp.noise_placement=central with adaptive clipping"
        )


def _adaptive_clip(ctx: BuildContext, z: float, expected: float) -> tuple[AdaptiveClip | None, float]:
    """Andrew et al.'s quantile tracking (or None), and the update noise multiplier it leaves."""
    dp = ctx.config.dp
    if not dp.adaptive_clip:
        return None, z
    sigma_b = dp.quantile_noise or expected / 20.0
    z_update = update_noise_multiplier(z, sigma_b)
    ctx.log(f"DP adaptive clipping: count noise {sigma_b:.3g}, update noise multiplier {z_update:.4f} (total {z:.4f})")
    return AdaptiveClip(dp.target_quantile, dp.clip_lr, sigma_b), z_update


def _client_pipeline(parts: PipelineParts, ctx: BuildContext) -> None:
    _check_client_level(parts, ctx)
    dp = ctx.config.dp
    q = client_rate(ctx)
    expected = q * ctx.sampler.population
    z = client_noise(ctx)
    adaptive, z_update = _adaptive_clip(ctx, z, expected)
    source = noise_source(ctx)
    clip = ClipUpdate(dp.clip, expected, adaptive, source)
    clip.client_noise = dp.noise_placement == "distributed"
    steps: list[ClientStep] = [clip]
    noise_of_round = lambda completed: z  # noqa: E731
    if dp.noise_placement == "distributed":
        shares = distributed_shares(ctx, noise_contributors(ctx))
        if not ring_noise_applies(ctx):  # under SecAgg+ the noise is discrete, added in the ring
            steps.append(DistributedNoise(z, shares, dp.clip, source))
        scale = _charged_scale(ctx, shares)
        noise_of_round = lambda completed: z * scale(completed)  # noqa: E731
        z_update = 0.0
    if dp.client_sampling == "self":
        steps.insert(0, SelfSample(q, source))
    parts.client_steps[0:0] = steps
    parts.server_steps.insert(0, DPFedAvgNoise(clip, z_update, expected, source))
    parts.ledger = ClientLevelLedger(resolve_delta(ctx), dp.accountant, q, noise_of_round, z,
                                     distributed=dp.noise_placement == "distributed",
                                     self_sampled=dp.client_sampling == "self",
                                     budget=dp.budget_epsilon, sampler=ctx.sampler)
    if dp.noise_placement == "distributed":
        _plan_at_fewest(parts.ledger, ctx)


def _local_pipeline(parts: PipelineParts, ctx: BuildContext) -> None:
    dp = ctx.config.dp
    sigma = client_noise(ctx)
    step = LocalGaussian(dp.clip, sigma, noise_source(ctx))
    parts.client_steps[0:0] = [step, PublicReply("one")]
    parts.ledger = LocalLedger(resolve_delta(ctx), dp.accountant, step.ledger_noise_multiplier,
                               budget=dp.budget_epsilon, sampler=ctx.sampler)


def ring_noise_applies(ctx: BuildContext) -> bool:
    """Client- or sample-level distributed noise under SecAgg+: discrete Gaussian shares inside the ring."""
    dp = ctx.config.dp
    secure = getattr(getattr(ctx.config, "secure", None), "mode", "none")
    return dp.mode in ("client", "sample") and dp.noise_placement == "distributed" and secure == "secagg"


def _ring_noise_hook(ctx: BuildContext) -> DiscreteGaussianRingNoise | None:
    """The discrete Gaussian ring noise of distributed DP (Kairouz, Liu, Steinke 2021)."""
    if not ring_noise_applies(ctx):
        return None
    check_settings(ctx)
    if ctx.config.dp.mode == "sample":
        return _sample_ring_noise(ctx)
    dp, secure = ctx.config.dp, ctx.config.secure
    expected = noise_contributors(ctx)
    shares, z = distributed_shares(ctx, expected), client_noise(ctx)
    dimension = sum(p.numel() for p in seeded_model(ctx.task, ctx.config.run.seed).parameters())
    bits = headroom_bits(z * max(1.0, dp.clip / secure.clip), shares)
    if bits >= secure.ring_bits - 8:
        raise ConfigurationError(
            f"distributed discrete Gaussian: the noise sum needs {bits} free bits of the {secure.ring_bits}-bit ring; "
            "raise secure.ring_bits (e.g. 64) or secure.clip"
        )
    noise = DiscreteGaussianRingNoise(z, dp.clip, shares, bits, secure.clip, dimension)
    levels = ((1 << (secure.ring_bits - bits)) - 1) // max(expected, 1)
    sigma = noise.sigma(2.0 * secure.clip / max(levels, 1), 1.0, dimension)
    check_tau(sigma, expected, dimension, z)
    ctx.log(f"DP: distributed discrete Gaussian in the SecAgg ring, {shares} shares, about {sigma:.4g} levels each "
            f"({bits} ring bits of headroom)")
    return noise


#: refuse a ring whose rounding term adds more than this to a DP-SGD step's sensitivity (module doc of distributed)
MAX_ROUNDING_EXCESS = 0.1


def _sample_ring_noise(ctx: BuildContext) -> DPSGDRingNoise:
    """One DP-SGD step's discrete Gaussian shares in the ring, sized like the client-level shares."""
    from fedguard.secure.register import max_weight

    dp, secure, lr = ctx.config.dp, ctx.config.secure, ctx.config.train.lr
    plan = sample_plan(replace(ctx, log=lambda line: None))  # the trainer hook logged the calibration
    expected = max(1, ctx.sampler.per_round(ctx.sampler.population))
    z, shares, weight = plan.noise_multiplier, int(plan.noise_shares), max_weight(ctx)
    sensitivity = lr * dp.clip / (dp.sample_rate * weight)  # one example, in units of w/M * update
    bits = headroom_bits(z * max(1.0, sensitivity / secure.clip), shares)
    if bits >= secure.ring_bits - 8:
        raise ConfigurationError(
            f"distributed discrete Gaussian: the noise sum needs {bits} free bits of the {secure.ring_bits}-bit ring; "
            "raise secure.ring_bits (e.g. 64) or secure.clip"
        )
    dimension = sum(p.numel() for p in seeded_model(ctx.task, ctx.config.run.seed).parameters())
    noise = DPSGDRingNoise(z, dp.clip, shares, bits, secure.clip, dimension, sample_rate=dp.sample_rate, lr=lr,
                           max_weight=weight)
    step = 2.0 * secure.clip / max(((1 << (secure.ring_bits - bits)) - 1) // expected, 1)
    excess = rounding_excess(sensitivity, step, dimension)
    if excess > MAX_ROUNDING_EXCESS:
        raise ConfigurationError(
            f"distributed DP-SGD in the SecAgg ring: rounding to levels of {step:.3g} adds {excess:.0%} to one "
            f"example's sensitivity (train.lr * dp.clip / (dp.sample_rate * secure.max_weight) = {sensitivity:.3g} "
            f"over {dimension} coordinates), so each share would be that much larger than the float shares. Raise "
            f"secure.ring_bits (e.g. 64) or lower secure.clip (the ring's range per coordinate)."
        )
    sigma = noise.sigma(step, noise.max_ratio(), dimension)
    check_tau(sigma, expected, dimension, z)
    ctx.log(f"DP-SGD: distributed discrete Gaussian in the SecAgg ring, {shares} shares of about {sigma:.4g} levels "
            f"each (rounding adds {excess:.2%} to the sensitivity; {bits} ring bits of headroom)")
    return noise


def _ftrl_pipeline(parts: PipelineParts, ctx: BuildContext) -> None:
    """DP-FTRL (Kairouz et al. 2021): clip on the clients, tree-aggregated noise on the server."""
    _check_client_level(parts, ctx)
    dp, sampler = ctx.config.dp, ctx.sampler
    if dp.target_epsilon > 0 or dp.adaptive_clip or dp.noise_placement == "distributed":
        raise ConfigurationError(
            "dp.mode=ftrl adds the tree's noise on the server with a fixed clip: dp.target_epsilon, dp.adaptive_clip "
            "and dp.noise_placement=distributed are not available with it; set dp.noise_multiplier (and "
            "dp.budget_epsilon) instead"
        )
    if sampler.join or sampler.leave:
        raise ConfigurationError("dp.mode=ftrl takes every client once per epoch: faults.join/leave are not supported")
    per_round = sampler.per_round(sampler.population)
    epochs = EpochSampler(sampler.population, per_round, ctx.config.run.seed)
    sampler.chooser = epochs
    source = noise_source(ctx)
    clip = ClipUpdate(dp.clip, per_round, None, source)
    parts.client_steps.insert(0, clip)
    parts.server_steps.insert(0, TreeNoise(clip, dp.noise_multiplier, per_round, epochs, source))
    parts.ledger = TreeLedger(resolve_delta(ctx), dp.noise_multiplier, epochs, dp.budget_epsilon)
    ctx.log(f"DP-FTRL: {epochs.rounds_per_epoch} rounds of {per_round} clients per tree, node noise "
            f"{dp.noise_multiplier:g} x clip")


def _pipeline_hook(parts: PipelineParts, ctx: BuildContext) -> None:
    """Add the configured mechanism's steps and its ledger."""
    mode = ctx.config.dp.mode
    if mode != "none":
        check_settings(ctx)
    if mode == "sample":
        _sample_pipeline(parts, ctx)
    elif mode == "client":
        _client_pipeline(parts, ctx)
    elif mode == "local":
        _local_pipeline(parts, ctx)
    elif mode == "ftrl":
        _ftrl_pipeline(parts, ctx)
    if mode != "none" and hasattr(parts.ledger, "noise_source"):
        parts.ledger.noise_source = ctx.config.dp.noise_source


TRAINER_HOOKS.append(_sample_trainer_hook)
PIPELINE_HOOKS.append(_pipeline_hook)
RING_NOISE_HOOKS.append(_ring_noise_hook)
