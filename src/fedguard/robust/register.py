"""The ``[robust]`` section and the pipeline hook that installs a robust rule (plaintext only)."""

from __future__ import annotations

from dataclasses import dataclass

from fedguard.builders import PIPELINE_HOOKS, BuildContext, PipelineParts
from fedguard.config import option, register_section
from fedguard.secure.register import refusal

from .aggregators import RobustAggregator


@dataclass
class RobustConfig:
    """[robust] Byzantine-robust aggregation of plaintext updates (cannot combine with secure.mode)."""

    rule: str = option(
        "none",
        "none: weighted FedAvg; median / trimmed-mean: coordinate-wise (Yin et al. 2018); krum / multi-krum "
        "(Blanchard et al. 2017). Robust rules are unweighted and need each update in the clear.",
        choices=["none", "median", "trimmed-mean", "krum", "multi-krum"],
    )
    trim_fraction: float = option(0.1, "trimmed-mean: share of updates dropped at each end per coordinate.",
                                  min=0.0, max=0.49)
    byzantine: int = option(1, "krum / multi-krum: number f of Byzantine clients tolerated (needs n > f + 2).", min=0)
    keep: int = option(0, "multi-krum: updates averaged (0: n - f).", min=0)


register_section("robust", RobustConfig)


def _robust_hook(parts: PipelineParts, ctx: BuildContext) -> None:
    """Install the configured robust rule; refuse it next to secure aggregation or encryption."""
    r = ctx.config.robust
    if r.rule == "none":
        return
    mode = getattr(getattr(ctx.config, "secure", None), "mode", "none")
    if mode != "none" or parts.aggregator.hides_individual_updates:
        raise refusal(mode, r.rule)
    parts.aggregator = RobustAggregator(r.rule, r.trim_fraction, r.byzantine, r.keep)


PIPELINE_HOOKS.append(_robust_hook)
