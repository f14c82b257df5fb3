"""The ``[secure]`` configuration section: secure aggregation and homomorphic encryption."""

from __future__ import annotations

from dataclasses import dataclass

from fedguard.config import option


@dataclass
class SecureConfig:
    """[secure] secure aggregation (SecAgg+) or CKKS encryption: the server sees only the aggregate."""

    mode: str = option(
        "none",
        "none: plaintext FedAvg; secagg: SecAgg+ masking (Bonawitz et al. 2017, Bell et al. 2020); "
        "ckks: CKKS encryption under one key holder's key.",
        choices=["none", "secagg", "ckks"],
    )
    neighbours: int = option(0, "SecAgg+ neighbours per client k (0: min(n-1, 3*ceil(log2 n)), made even).", min=0)
    threshold: int = option(0, "Shamir threshold t, k/2 < t <= k (0: floor(k/2)+1).", min=0)
    min_survivors: int = option(
        0, "Fewest clients whose masked updates must survive, else the round aborts (0: max(t, server.min_clients)).",
        min=0,
    )
    clip: float = option(
        1.0,
        "SecAgg quantization range: each coordinate of weight/max_weight * update is clipped to +-clip "
        "before fixed-point encoding.",
        above=0.0,
    )
    ring_bits: int = option(32, "SecAgg ring Z_{2^bits}: masks and sums are mod 2^bits (32 or 64 bits per value).",
                            min=8, max=64)
    max_weight: int = option(
        0,
        "Largest FedAvg weight a client may send (its number of examples); the encodings are scaled for it. "
        "0: the largest client's dataset size (known in simulation); 1 with server.weighting=uniform.",
        min=0,
    )
    identities: str = option(
        "",
        "SecAgg: folder of the clients' long-term Ed25519 identities (directory.json, and client-K.ed25519 on "
        "client K only; python -m fedguard.secure.identity --out DIR --clients N). Empty: each simulation "
        "enrols its clients afresh; over the network every party needs the same folder.",
    )
    key_holder: int = option(0, "CKKS: id of the client that generates the keys and decrypts the aggregate.", min=0)
    ckks_poly_degree: int = option(8192, "CKKS ring degree N (N/2 - 1 values per ciphertext).",
                                   choices=[4096, 8192, 16384, 32768])
    ckks_coeff_bits: list[int] = option(
        [60, 60, 60],
        "CKKS coefficient-modulus prime sizes in bits (last: special prime); the forged-aggregate check needs two "
        "data primes.",
    )
    ckks_scale_bits: int = option(
        56, "CKKS encoding scale 2^bits (the noise flooding at decryption needs about 2^52 or more).", min=20, max=60
    )
    ckks_statistical_security: int = option(
        40,
        "CKKS: statistical security s of the noise flooding at decryption (Li et al. 2022): an attacker recovering "
        "the key from released values succeeds with probability at most 2^-s.",
        min=30,
        max=80,
    )
