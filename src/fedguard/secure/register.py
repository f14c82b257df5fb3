"""Registers the ``[secure]`` section and the pipeline hook that installs a secure aggregator.

``secure.mode = secagg`` or ``ckks`` replaces the plaintext FedAvg aggregator. Rules that need
each client's update in the clear (Krum, median, trimmed mean) cannot run on a sum: that
combination is refused here, at configuration time, with the reason and what to use instead.
"""

from __future__ import annotations

from fedguard.algorithms.fedavg import FedAvg
from fedguard.builders import PIPELINE_HOOKS, BuildContext, PipelineParts
from fedguard.config import register_section
from fedguard.pipeline.base import Aggregator, ConfigurationError

from .ckks_aggregator import CKKSAggregator, CKKSSettings
from .config import SecureConfig
from .secagg_aggregator import SecAggAggregator, SecAggSettings, build_ring_noise

register_section("secure", SecureConfig)


def refusal(mode: str, rule: str) -> ConfigurationError:
    """The error for a robust rule combined with a secure mode (shared with the robust family)."""
    return ConfigurationError(
        f"robust.rule={rule} needs each client's update in the clear, but secure.mode={mode} hides individual "
        "updates from the server (it only learns their sum). Use robust.rule=none (weighted FedAvg of the "
        "secure sum) with client-side clipping and distributed DP noise to bound each client's influence, "
        "or set secure.mode=none to run the robust rule on plaintext updates."
    )


def max_weight(ctx: BuildContext) -> int:
    """``secure.max_weight``, or what it defaults to: 1 (uniform) or the largest client's size."""
    s = ctx.config.secure
    if s.max_weight:
        return int(s.max_weight)
    if ctx.config.server.weighting == "uniform":
        return 1
    return max(ctx.client_sizes) if ctx.client_sizes else 1


def build_secure_aggregator(ctx: BuildContext) -> Aggregator:
    """The SecAgg+ or CKKS aggregator for the ``[secure]`` section."""
    s, server = ctx.config.secure, ctx.config.server
    if s.mode == "secagg":
        settings = SecAggSettings(
            clip=s.clip,
            ring_bits=s.ring_bits,
            max_weight=max_weight(ctx),
            weighting=server.weighting,
            neighbours=s.neighbours or None,
            threshold=s.threshold or None,
            min_survivors=s.min_survivors or None,
            min_clients=server.min_clients,
            seed=ctx.config.run.seed,
            ring_noise=build_ring_noise(ctx),
        )
        _check_secagg(settings, ctx)
        return SecAggAggregator(settings)
    clients = ctx.config.data.num_clients
    if not 0 <= s.key_holder < clients:
        raise ConfigurationError(f"secure.key_holder={s.key_holder} is not a client of this run (0..{clients - 1})")
    settings_ckks = CKKSSettings(
        s.ckks_poly_degree,
        tuple(s.ckks_coeff_bits),
        s.ckks_scale_bits,
        s.key_holder,
        max_weight(ctx),
        server.weighting,
        max(2, server.min_clients),
    )
    _check_ckks(settings_ckks)
    return CKKSAggregator(settings_ckks)


def _check_secagg(settings: SecAggSettings, ctx: BuildContext) -> None:
    """Parameters that cannot work for this run's largest round, refused before training."""
    n = max(2, ctx.sampler.per_round(ctx.sampler.population))
    try:
        settings.round_config(0, list(range(n)), 1)
    except ValueError as exc:
        raise ConfigurationError(f"[secure] SecAgg parameters for {n} clients per round: {exc}") from exc
    ctx.log(
        f"secure aggregation: SecAgg+ over Z_2^{settings.ring_bits}, mean error at most "
        f"{settings.mean_error_bound(n):.3g} per coordinate (clip {settings.clip:g}, max weight {settings.max_weight})"
    )


def _check_ckks(settings: CKKSSettings) -> None:
    """CKKS parameters TenSEAL would refuse, and scales with no room above them, refused early."""
    bits = settings.coeff_mod_bit_sizes
    if len(bits) < 2:
        raise ConfigurationError("secure.ckks_coeff_bits needs at least two primes (data prime and special prime)")
    if bits[0] <= settings.global_scale_bits + 1:
        raise ConfigurationError(
            f"secure.ckks_coeff_bits[0]={bits[0]} leaves no room above the scale 2^{settings.global_scale_bits}; "
            "the first prime must exceed the scale bits by the bits of the largest sum"
        )
    try:  # one thread: no TenSEAL thread pool may exist when the simulation forks its workers
        import tenseal as ts

        ts.context(ts.SCHEME_TYPE.CKKS, settings.poly_modulus_degree, -1, list(bits), n_threads=1)
    except Exception as exc:  # TenSEAL refuses insecure or malformed parameters
        raise ConfigurationError(f"[secure] CKKS parameters refused: {exc}") from exc


def _secure_hook(parts: PipelineParts, ctx: BuildContext) -> None:
    """Install the secure aggregator in place of plaintext FedAvg (and refuse what cannot combine)."""
    mode = ctx.config.secure.mode
    if mode == "none":
        return
    current = parts.aggregator
    if current.needs_individual_updates:
        rule = getattr(getattr(ctx.config, "robust", None), "rule", current.name)
        raise refusal(mode, rule)
    if type(current) is not FedAvg:
        raise ConfigurationError(
            f"secure.mode={mode} replaces the aggregator, but {current.name!r} is configured; "
            "secure aggregation computes a (weighted) FedAvg sum only"
        )
    parts.aggregator = build_secure_aggregator(ctx)


PIPELINE_HOOKS.append(_secure_hook)
