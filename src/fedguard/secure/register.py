"""Registers the ``[secure]`` section and the pipeline hook that installs a secure aggregator.

``secure.mode = secagg`` or ``ckks`` replaces the plaintext FedAvg aggregator. Rules that need
each client's update in the clear (Krum, median, trimmed mean) cannot run on a sum: that
combination is refused here, at configuration time, with the reason and what to use instead.
"""

from __future__ import annotations

import math

import torch

from fedguard.algorithms.fedavg import FedAvg
from fedguard.builders import PIPELINE_HOOKS, BuildContext, PipelineParts
from fedguard.config import register_section
from fedguard.pipeline.base import Aggregator, ConfigurationError

from .ckks_aggregator import CKKSAggregator, CKKSSettings
from .config import SecureConfig
from .identity import Enrolment, IdentityError, enrol, load_identities
from .secagg_aggregator import SecAggAggregator, SecAggSettings, build_ring_noise

PROJECTION_BITS = 16  # fedguard.secure.ckks.PROJECTION_BITS, without importing TenSEAL here

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
            ring_noise=build_ring_noise(ctx),
            registered=tuple(int(n) for n in ctx.client_sizes),
            enrolment=_enrolment(ctx),
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
        s.clip,
        s.ckks_statistical_security,
        tuple(int(n) for n in ctx.client_sizes),
    )
    _check_ckks(settings_ckks, ctx)
    return CKKSAggregator(settings_ckks)


def _enrolment(ctx: BuildContext) -> Enrolment:
    """The clients' long-term identities: the ``secure.identities`` folder (a deployment), or a fresh
    enrolment of every client (a simulation: the experiment is the enrolment authority)."""
    folder = ctx.config.secure.identities
    if folder:
        try:
            enrolment = load_identities(folder)
        except IdentityError as exc:
            raise ConfigurationError(f"secure.identities: {exc}") from exc
        missing = [c for c in range(ctx.sampler.population) if c not in enrolment.directory]
        if missing:
            raise ConfigurationError(f"secure.identities: clients {missing[:5]} are not in {folder}/directory.json")
        return enrolment
    if getattr(ctx.config.run, "runtime", "simulation") == "ray":
        raise ConfigurationError(
            "secure.mode=secagg with run.runtime=ray needs secure.identities: every Ray worker builds its own "
            "pipeline, so a fresh in-process enrolment would differ between them. Make a folder every node can "
            "read with `python -m fedguard.secure.identity --out DIR --clients N` and set secure.identities=DIR"
        )
    return enrol(range(ctx.sampler.population))


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


def _check_ckks(settings: CKKSSettings, ctx: BuildContext) -> None:
    """CKKS parameters TenSEAL would refuse, or with no room for the sum and its check, refused early."""
    bits, scale = settings.coeff_mod_bit_sizes, settings.global_scale_bits
    if len(bits) < 3:
        raise ConfigurationError(
            "secure.ckks_coeff_bits needs two data primes and the special prime (e.g. [60, 60, 60]): the server's "
            "check against a forged aggregate multiplies by a secret random vector, which doubles the scale"
        )
    clients = max(2, ctx.sampler.per_round(ctx.sampler.population))
    length = _model_size(ctx)
    folded = settings.ciphertexts(length)
    need = 2 * scale - PROJECTION_BITS + math.log2(folded * clients * settings.clip) + 2
    if need > sum(bits[:-1]) or bits[0] <= scale:
        raise ConfigurationError(
            f"secure.ckks_scale_bits={scale} leaves no room in {sum(bits[:-1])} bits of data modulus for the check "
            f"of {clients} clients x {folded} ciphertexts at clip {settings.clip:g} (needs {need:.0f} bits, and a "
            "first prime above the scale): lower the scale or the clip, or add a data prime"
        )
    try:  # one thread: no TenSEAL thread pool may exist when the simulation forks its workers
        import tenseal as ts

        ts.context(ts.SCHEME_TYPE.CKKS, settings.poly_modulus_degree, -1, list(bits), n_threads=1)
    except Exception as exc:  # TenSEAL refuses insecure or malformed parameters
        raise ConfigurationError(f"[secure] CKKS parameters refused: {exc}") from exc
    sigma = settings.value_sigma(clients, length)
    ctx.log(
        f"secure aggregation: CKKS, decryptions flooded for {settings.statistical_security}-bit statistical security: "
        f"noise of {sigma:.2g} per summed value (at most about {6 * sigma:.2g} over a model; the mean divides it "
        "by the clients' share of the largest weight)"
    )


def _model_size(ctx: BuildContext) -> int:
    """Parameters of the task's model (built without touching the global random state)."""
    with torch.random.fork_rng(devices=[]):
        return sum(p.numel() for p in ctx.task.build_model().parameters())


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
