"""The ``[dp]`` configuration section: which DP mechanism, its parameters and the ledger's."""

from __future__ import annotations

from dataclasses import dataclass

from fedguard.config import option


@dataclass
class DPConfig:
    """[dp] differential privacy: sample-level (DP-SGD), client-level (DP-FedAvg) or local."""

    mode: str = option(
        "none",
        "DP mechanism: none; sample (DP-SGD on each client: protects each example of a client's data); "
        "client (DP-FedAvg: protects each client's whole dataset); local (each client noises its own "
        "update: no trust in the server); ftrl (DP-FTRL with tree aggregation, Kairouz et al. 2021: client-level, "
        "no sampling, each client once per epoch of ceil(clients / clients_per_round) rounds).",
        choices=["none", "sample", "client", "local", "ftrl"],
    )
    noise_source: str = option(
        "secure",
        "Where DP randomness comes from: secure (each party's own OS CSPRNG through ChaCha20, never derived from "
        "run.seed; the default) or seeded (research simulations only: reproducible from run.seed, so anyone with "
        "the config can subtract the noise; refused by the network runtime, every epsilon marked 'not a guarantee').",
        choices=["secure", "seeded"],
    )
    float_noise_draws: int = option(
        4,
        "Secure float Gaussian noise (DP-SGD, central, local, sample-level shares): independent draws summed into "
        "each value, over sqrt(draws) (Holohan & Braghin 2021, as Opacus's secure_mode: 4). 1 is a single draw: "
        "about 2.5x cheaper, but open to the floating-point attack (Mironov 2012). Ignored by the ring's discrete "
        "noise and by seeded noise.",
        min=1,
    )
    noise_multiplier: float = option(
        1.0,
        "Noise standard deviation over the clip norm: sigma for sample and local, the total z for client "
        "(ignored when target_epsilon is set).",
        min=0.0,
    )
    clip: float = option(
        1.0,
        "Clip norm: of each example's gradient (sample) or of each client's update (client, local; the "
        "initial norm with adaptive_clip).",
        above=0.0,
    )
    delta: float = option(
        0.0,
        "Target delta (0: automatic, the largest power of ten below 1/N; N = training records for sample, "
        "clients for client and local).",
        min=0.0,
        max=1.0,
    )
    accountant: str = option(
        "pld",
        "Accountant of the dp-accounting library: pld (privacy loss distributions, tight) or rdp (Renyi "
        "DP, faster, looser).",
        choices=["pld", "rdp"],
    )
    target_epsilon: float = option(
        0.0,
        "Compute the noise multiplier before training so that run.rounds rounds spend at most this "
        "epsilon (0: off).",
        min=0.0,
    )
    budget_epsilon: float = option(
        0.0,
        "Stop cleanly (final model saved) before a round that would spend beyond this epsilon (0: no budget).",
        min=0.0,
    )
    sample_rate: float = option(
        0.0,
        "sample: Poisson sampling rate of each client's examples per step (0: train.batch_size / client examples).",
        min=0.0,
        max=1.0,
    )
    local_steps: int = option(
        0,
        "sample: DP-SGD steps per round (0: train.epochs passes, i.e. epochs / sample_rate steps).",
        min=0,
    )
    per_example: str = option(
        "auto",
        "sample: per-example gradient engine: fast (norms from activations, no per-example backward), vmap "
        "(exact torch.func reference), auto (fast when the model's layers allow).",
        choices=["auto", "fast", "vmap"],
    )
    noise_placement: str = option(
        "auto",
        "Who adds the noise. client: central (the server; the default) or distributed (each client adds its "
        "share; combine with secure aggregation). sample: local (each client's DP-SGD adds all of it; the "
        "default) or distributed (each client adds its share of each step's noise; needs dp.local_steps=1, "
        "a fixed dp.sample_rate and secure aggregation).",
        choices=["auto", "local", "central", "distributed"],
    )
    noise_shares: int = option(
        0,
        "distributed: number of shares that make the full noise; each client adds 1/noise_shares of its variance "
        "(0: the fewest surviving clients SecAgg lets a round release, secure.min_survivors or its default, less "
        "dp.colluding_clients). Rounds with fewer honest shares are charged at their lower noise; the budget "
        "check plans every round at the fewest survivors.",
        min=0,
    )
    colluding_clients: int = option(
        1,
        "distributed: participants assumed to collude with the server (at least 1: a client knows its own "
        "share). The shares are sized so that the other clients' noise alone gives the reported epsilon.",
        min=0,
    )
    client_sampling: str = option(
        "server",
        "client: who draws each round's Poisson sample. server (its secret coins: amplification holds against "
        "model users only) or self (every client is asked each round and flips its own secret coin with rate "
        "server.clients_per_round / clients or server.fraction, sending a zero update, noise share included, when "
        "not selected; needs distributed noise under secure.mode=secagg, so the server sees only the sum and "
        "amplification holds against it too; every client trains each round).",
        choices=["server", "self"],
    )
    adaptive_clip: bool = option(
        False,
        "client: adapt the clip norm to a quantile of the update norms (Andrew et al. 2021); central noise only.",
    )
    target_quantile: float = option(
        0.5, "client, adaptive: quantile of update norms the clip norm tracks.", min=0.0, max=1.0
    )
    clip_lr: float = option(0.2, "client, adaptive: learning rate of the geometric clip-norm update.", min=0.0)
    quantile_noise: float = option(
        0.0,
        "client, adaptive: noise std on the count of unclipped updates (0: expected clients per round / 20).",
        min=0.0,
    )
