"""The ``[robust]`` section and the pipeline hook that installs a robust chain (plaintext only).

The same hook installs the simulation's omniscient adversary (``[attack]`` with alie, ipm, min-max,
min-sum or mimic) in front of whichever plaintext rule is configured, FedAvg included: both need each
client's update in the clear, so both are refused next to secure aggregation or encryption.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedguard.builders import PIPELINE_HOOKS, BuildContext, PipelineParts
from fedguard.config import option, register_section
from fedguard.core.pipeline import ConfigurationError

from .aggregators import RobustAggregator
from .defenses import (
    NNM,
    PRE_AGGREGATORS,
    RULES,
    Bucketing,
    Bulyan,
    CenteredClipping,
    Chain,
    Clip,
    GeometricMedian,
    Median,
    MultiKrum,
    NormBound,
    PreAggregator,
    Rule,
    TrimmedMean,
    check_chain,
)

#: rules and pre-aggregators that need the number f of Byzantine clients stated
NEEDS_F = ("trimmed-mean", "krum", "multi-krum", "bulyan", "nnm")


@dataclass
class RobustConfig:
    """[robust] Byzantine-robust aggregation of plaintext updates (cannot combine with secure.mode)."""

    rule: str = option(
        "none",
        "none: weighted FedAvg. median / trimmed-mean: coordinate-wise (Yin et al. 2018); krum / multi-krum "
        "(Blanchard et al. 2017); bulyan (El Mhamdi et al. 2018); geometric-median (RFA, Pillutla et al. 2022); "
        "centered-clipping (Karimireddy et al. 2021); fltrust (Cao et al. 2021, needs root_data); norm-bound "
        "(Sun et al. 2019, optional weak DP). Robust rules are unweighted and need each update in the clear.",
        choices=["none", *RULES],
    )
    pre: list[str] = option([], "Pre-aggregators applied in this order before the rule: nnm (Allouah et al. 2023), "
                                "bucketing (Karimireddy et al. 2022), clip (to norm_bound).")
    byzantine: int = option(-1, "f, the number of Byzantine clients per round the rule must tolerate; must be "
                                "stated (>= 0) for trimmed-mean, krum, multi-krum, bulyan and nnm.", min=-1)
    keep: int = option(0, "multi-krum: updates averaged (0: n - f).", min=0)
    bucket_size: int = option(2, "bucketing: updates averaged per bucket (the paper's s = 2).", min=1)
    tau: float = option(1.0, "centered-clipping: clipping radius around the previous aggregate (update norm units).",
                        min=0.0)
    cc_iters: int = option(1, "centered-clipping: clipping iterations per round (the paper's L = 1).", min=1)
    gm_max_iter: int = option(100, "geometric-median: at most this many smoothed Weiszfeld steps.", min=1)
    gm_nu: float = option(1e-6, "geometric-median: smoothing nu (distances below it count as nu).", min=0.0)
    norm_bound: float = option(1.0, "norm-bound / clip: largest update norm M kept (Sun et al. 2019).", min=0.0)
    noise_std: float = option(0.0, "norm-bound: standard deviation of the weak-DP Gaussian noise added to the "
                                   "aggregate, drawn from OS randomness (0: none).", min=0.0)
    root_data: str = option("", "fltrust: the server's root dataset (.npz or .safetensors with x and y; about 100 "
                                "clean examples held out of every client's data, never the test set).")


register_section("robust", RobustConfig)


def stated_f(r: RobustConfig, needed_by: str) -> int:
    """``robust.byzantine``, refused when a rule needs it and it was left unstated."""
    if r.byzantine < 0:
        raise ConfigurationError(
            f"{needed_by} needs robust.byzantine (the number f of Byzantine clients it must tolerate); state it, "
            "e.g. robust.byzantine=10 for 10 of 50 clients"
        )
    return r.byzantine


def build_rule(r: RobustConfig, ctx: BuildContext) -> Rule:
    """The configured rule."""
    name = r.rule
    if name == "median":
        return Median()
    if name == "trimmed-mean":
        return TrimmedMean(stated_f(r, name))
    if name in ("krum", "multi-krum"):
        return MultiKrum(stated_f(r, name), 1 if name == "krum" else r.keep, name=name)
    if name == "bulyan":
        return Bulyan(stated_f(r, name))
    if name == "geometric-median":
        return GeometricMedian(r.gm_nu, r.gm_max_iter)
    if name == "centered-clipping":
        if r.tau <= 0:
            raise ConfigurationError("centered-clipping needs robust.tau > 0 (the clipping radius)")
        return CenteredClipping(r.tau, r.cc_iters)
    if name == "fltrust":
        from .root import fltrust_rule

        return fltrust_rule(r, ctx)
    if r.norm_bound <= 0:
        raise ConfigurationError("norm-bound needs robust.norm_bound > 0 (the largest update norm kept)")
    return NormBound(r.norm_bound, r.noise_std)


def build_pre(r: RobustConfig) -> list[PreAggregator]:
    """The configured pre-aggregators, in order."""
    out: list[PreAggregator] = []
    for name in r.pre:
        if name not in PRE_AGGREGATORS:
            raise ConfigurationError(
                f"robust.pre: {name!r} is not a pre-aggregator; choose from {list(PRE_AGGREGATORS)}"
            )
        if name == "nnm":
            out.append(NNM(stated_f(r, "nnm")))
        elif name == "bucketing":
            out.append(Bucketing(r.bucket_size))
        else:
            if r.norm_bound <= 0:
                raise ConfigurationError("robust.pre=clip needs robust.norm_bound > 0")
            out.append(Clip(r.norm_bound))
    return out


def build_chain(ctx: BuildContext) -> Chain | None:
    """The configured chain (None for plain FedAvg), checked against the clients per round."""
    r = ctx.config.robust
    if r.rule == "none":
        if r.pre:
            raise ConfigurationError("robust.pre needs a rule after it: set robust.rule (e.g. trimmed-mean)")
        return None
    chain = Chain(build_rule(r, ctx), build_pre(r))
    per_round = ctx.sampler.per_round(ctx.sampler.population)
    try:
        check_chain(chain, per_round)
    except ValueError as exc:
        raise ConfigurationError(
            f"robust.rule={chain.name}: {exc}; lower robust.byzantine, sample more clients per round or choose a "
            "rule with a weaker condition (median, geometric-median, centered-clipping)"
        ) from exc
    return chain


def robust_aggregator(ctx: BuildContext) -> RobustAggregator | None:
    """The plaintext aggregator for ``[robust]`` and the simulated omniscient adversary of ``[attack]``
    (None when neither is configured: plain FedAvg)."""
    from fedguard.attacks.register import omniscient_adversary

    r = ctx.config.robust
    adversary = omniscient_adversary(ctx)
    if r.rule == "none" and not r.pre and adversary is None:
        return None
    return RobustAggregator(build_chain(ctx), ctx.config.server.weighting, adversary)


def _robust_hook(parts: PipelineParts, ctx: BuildContext) -> None:
    """Install :func:`robust_aggregator` in place of the plaintext aggregator."""
    aggregator = robust_aggregator(ctx)
    if aggregator is None:
        return
    # next to secure aggregation: refused once, by fedguard.builders.INCOMPATIBLE (and UpdatePipeline.validate)
    parts.aggregator = aggregator


PIPELINE_HOOKS.append(_robust_hook)
