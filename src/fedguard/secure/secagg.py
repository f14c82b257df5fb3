"""Secure aggregation: SecAgg (Bonawitz et al., CCS 2017) with the SecAgg+ neighbour graph
(Bell et al., CCS 2020), including the variant against an actively malicious server (signed keys
from a PKI and the consistency check), and hostile clients dropped rather than aborting a round.

Parties and messages
--------------------
Every party is an object that holds only its own secrets: :class:`SecAggClient` and
:class:`SecAggServer`. They interact only through the message dataclasses below, each of which
converts to ``(meta: dict[str, JSON], tensors: dict[str, np.ndarray])`` with ``to_arrays()`` and
back with ``from_arrays()`` (see :mod:`fedguard.secure.wire`). The public round parameters are a
:class:`SecAggConfig` that the server announces (it is a message too); every signature binds its
:attr:`SecAggConfig.digest`. With a PKI (an :class:`~fedguard.secure.identity.IdentityDirectory`
on every party and each client's :class:`~fedguard.secure.identity.IdentityKey`) the protocol is
the malicious-server one; without, the semi-honest one (stage 3 skipped).

Stages (client method -> message -> server method -> messages to clients):

0. AdvertiseKeys: ``client.advertise_keys() -> AdvertiseKeys``; each client makes two X25519
   key pairs, ``c`` (share encryption) and ``s`` (pairwise masks), and signs them (PKI).
   ``server.receive_keys(msgs) -> {id: KeysBroadcast}`` checks the signatures and relays to each
   client its neighbours' public keys and signatures.
1. ShareKeys: ``client.share_keys(KeysBroadcast) -> ShareKeys``; the client verifies each
   neighbour's signature (a swapped or invented key aborts it), draws a self-mask seed ``b_u``
   (32 bytes) and Shamir-shares ``b_u`` and its raw 32-byte ``s`` private key among its
   neighbours (threshold ``t``, share point = neighbour id + 1). Each pair of shares is encrypted
   for its recipient with ChaCha20-Poly1305 under ``HKDF(X25519(c_u, c_v))``, with the round seed,
   sender and recipient bound as associated data. ``server.receive_shares(msgs) ->
   {id: EncryptedShares}`` only routes the ciphertexts.
2. MaskedInputCollection: ``client.mask_input(EncryptedShares, vector) -> MaskedInput``; the
   client opens every share ciphertext and leaves out (and reports in ``rejected``) a neighbour
   whose ciphertext does not open to valid shares; it quantizes its vector
   (:mod:`fedguard.secure.quantize`) and adds, modulo ``2^b``, ``PRG(b_u)`` and ``+PRG(s_uv)`` for
   every kept neighbour ``v > u``, ``-PRG(s_uv)`` for ``v < u``, where
   ``s_uv = HKDF(X25519(s_u, s_v))`` and the PRG is the ChaCha20 key stream.
   ``server.add_masked_input`` keeps each masked vector until ``server.close_masking()``
   excludes the clients the complaints point at (:func:`exclusion_cover`) and sums the rest.
3. ConsistencyCheck (PKI): ``server.consistency_requests()`` sends the survivor list;
   ``client.sign_survivors`` signs it; ``server.receive_signatures`` needs ``t`` of them.
4. Unmasking: ``client.unmask(UnmaskRequest) -> UnmaskResponse``; the server tells each survivor
   which of its partners survived, dropped or were excluded (with a PKI also the signed survivor
   list and the signatures, of which the client needs ``t`` over the same list); the client checks
   the lists are disjoint and cover exactly its partners, then returns its shares of ``b_v`` for
   surviving and of ``s_v`` for the other partners (for excluded ones also the pairwise seed;
   never both kinds for one client, and it answers at most one request).
   ``server.finish(msgs) -> AggregateResult`` rebuilds each secret from ``t`` shares, removes the
   survivors' self-masks and the pairwise masks between dropped or excluded and surviving
   neighbours, and dequantizes the exact modular sum.

SecAgg+ graph: the clients are placed on a ring in a pseudo-random order derived from the round
seed and each is joined to its ``k/2`` predecessors and successors (a Harary graph on a random
permutation, as in Bell et al.). ``k = n - 1`` is classic SecAgg. Defaults:
``k = min(n - 1, 3 * ceil(log2 n))`` rounded up to even (22 for 100 clients) and
``t = floor(k / 2) + 1``; ``t > k / 2`` is enforced, so even without the consistency check a
server that sends inconsistent drop-out lists to different clients cannot collect ``t`` shares of
both ``b_u`` and ``s_u``. These defaults are heuristics, not the parameters derived in Bell et
al.'s analysis; choose ``k`` from that paper for a given corruption and drop-out rate.

Weighted FedAvg: build the config with ``weighted=True`` and call
``client.mask_input(msg, update, weight=num_examples)``; the client masks
``[weight * update..., weight]`` (the weight slot is an exact integer, not quantized; ``clip``
must bound ``|weight * update|``). ``AggregateResult.total`` is then the sum of
``weight * update`` and ``AggregateResult.weight_sum`` the sum of weights; ``.mean()`` is the
weighted average.

Aborts: any party that cannot continue (too few survivors, too few shares for a needed secret,
an inconsistent server message, a failed authentication) raises :class:`SecAggAbort` with the
counts involved.

:func:`simulate_round` / :func:`run_secagg_round` drive all parties in one process, passing
every message through its wire form, for tests and benchmarks.

"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .identity import SIGNATURE_BYTES, IdentityDirectory, IdentityKey, enrol
from .quantize import Quantizer, reduce_ring, ring_dtype
from .shamir import SHARE_BYTES, ShamirError, Share, reconstruct_secret, split_secret
from .wire import WireMessage

__all__ = [
    "SecAggAbort",
    "SecAggConfig",
    "AdvertiseKeys",
    "ConsistencyRequest",
    "ConsistencySignature",
    "KeysBroadcast",
    "ShareKeys",
    "EncryptedShares",
    "MaskedInput",
    "UnmaskRequest",
    "UnmaskResponse",
    "AggregateResult",
    "SecAggClientState",
    "SecAggClient",
    "SecAggServer",
    "RoundTrace",
    "default_neighbours",
    "neighbour_graph",
    "exclusion_cover",
    "keys_payload",
    "survivors_payload",
    "prg_ring",
    "encode_input",
    "add_ring_noise",
    "make_parties",
    "simulate_round",
    "run_secagg_round",
]

KEY_BYTES = 32
NONCE_BYTES = 12
SHARE_CT_BYTES = NONCE_BYTES + 2 * SHARE_BYTES + 16  # nonce | ChaCha20-Poly1305(b_y | s_y) | tag
_MASK_INFO = b"fedguard/secagg/v1/pairwise-mask"
_SHARE_INFO = b"fedguard/secagg/v1/share-key"
_GRAPH_INFO = b"fedguard/secagg/v1/graph"
_MAX_ID = 2**63 - 1


class SecAggAbort(RuntimeError):
    """The round cannot (or must not) continue; the message says why, with the counts."""


# ----------------------------------------------------------------------------- primitives


def _kdf(shared: bytes, salt: bytes, info: bytes) -> bytes:
    """HKDF-SHA256 to a 32-byte key."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=info).derive(shared)


def _exchange(sk: X25519PrivateKey, pk_bytes: bytes, what: str) -> bytes:
    """X25519 agreement; a malformed or low-order peer key aborts the round."""
    try:
        return sk.exchange(X25519PublicKey.from_public_bytes(pk_bytes))
    except ValueError as exc:
        raise SecAggAbort(f"invalid public key for {what}: {exc}") from exc


def prg_ring(seed: bytes, length: int, bits: int) -> np.ndarray:
    """Expand a 32-byte seed into ``length`` uniform elements of Z_{2^bits} (ChaCha20 stream)."""
    dtype = ring_dtype(bits)
    enc = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    stream = enc.update(bytes(length * dtype.itemsize))
    out = np.frombuffer(stream, dtype=dtype.newbyteorder("<")).astype(dtype)
    return reduce_ring(out, bits)


def _aad(round_seed: bytes, sender: int, recipient: int) -> bytes:
    """Associated data binding a share ciphertext to its round, sender and recipient."""
    return round_seed + sender.to_bytes(8, "big") + recipient.to_bytes(8, "big")


def keys_payload(config: SecAggConfig, client: int, c_pk: bytes, s_pk: bytes) -> bytes:
    """What a client signs for its round keys: bound to the round's whole config."""
    return b"fedguard/secagg/v2/keys" + config.digest + client.to_bytes(8, "big") + c_pk + s_pk


def survivors_payload(config: SecAggConfig, survivors: Sequence[int]) -> bytes:
    """What a survivor signs in the consistency check: the round and the sorted survivor list."""
    return b"fedguard/secagg/v2/survivors" + config.digest + b"".join(int(u).to_bytes(8, "big") for u in survivors)


def default_neighbours(n: int) -> int:
    """Default SecAgg+ degree: ``min(n - 1, 3 * ceil(log2 n))`` (made even below ``n - 1``)."""
    if n < 2:
        return 0
    return _even_degree(3 * math.ceil(math.log2(n)), n)


def _even_degree(k: int, n: int) -> int:
    """Clamp ``k`` to ``n - 1`` and round an odd degree below ``n - 1`` up to even."""
    k = min(k, n - 1)
    if k < n - 1 and k % 2 == 1:
        k = min(k + 1, n - 1)
    return k


def neighbour_graph(client_ids: Sequence[int], k: int, round_seed: bytes) -> dict[int, tuple[int, ...]]:
    """Harary graph H(n, k) over a seed-derived random order of ``client_ids``.

    ``k >= n - 1`` gives the complete graph (classic SecAgg); otherwise ``k`` must be even.
    """
    ids = sorted(client_ids)
    n = len(ids)
    if k >= n - 1:
        return {u: tuple(v for v in ids if v != u) for u in ids}
    if k % 2:
        raise ValueError(f"neighbour degree k={k} must be even when k < n - 1")

    def rank(i: int) -> bytes:
        return hashlib.sha256(_GRAPH_INFO + round_seed + i.to_bytes(8, "big")).digest()

    order = sorted(ids, key=rank)
    half = k // 2
    graph = {}
    for pos, u in enumerate(order):
        nbrs = {order[(pos + j) % n] for j in range(-half, half + 1) if j}
        graph[u] = tuple(sorted(nbrs))
    return graph


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True, eq=False)
class SecAggConfig(WireMessage):
    """Public parameters of one round, announced by the server. Build with :meth:`create`.

    Attributes:
        client_ids: the selected clients (distinct ints in 0..2^63-1).
        vector_length: length of each client's update vector (before the weight slot).
        round_seed: 32 public random bytes: graph order, KDF salt, AEAD associated data.
        neighbours: SecAgg+ degree ``k`` (``n - 1`` = classic SecAgg).
        threshold: Shamir threshold ``t`` per neighbourhood, ``k/2 < t <= k``.
        clip: quantization clipping bound (bounds ``|weight * update|`` when weighted).
        ring_bits: masks and sums live in Z_{2^ring_bits}.
        max_clients: the quantization scale is chosen so ``max_clients`` inputs cannot wrap.
        min_survivors: fewest masked inputs the server may aggregate.
        weighted: append an exact integer weight slot to each masked vector.
        noise_headroom_bits: top bits of the ring kept free for integer noise that clients add
            after quantization (see :class:`~fedguard.secure.quantize.Quantizer`).
    """

    client_ids: tuple[int, ...]
    vector_length: int
    round_seed: bytes
    neighbours: int
    threshold: int
    clip: float = 1.0
    ring_bits: int = 32
    max_clients: int = 0
    min_survivors: int = 2
    weighted: bool = False
    noise_headroom_bits: int = 0

    @classmethod
    def create(
        cls,
        client_ids: Iterable[int],
        vector_length: int,
        *,
        neighbours: int | None = None,
        threshold: int | None = None,
        clip: float = 1.0,
        ring_bits: int = 32,
        max_clients: int | None = None,
        min_survivors: int | None = None,
        weighted: bool = False,
        round_seed: bytes | None = None,
        noise_headroom_bits: int = 0,
    ) -> SecAggConfig:
        """Fill in defaults (degree, threshold, seed, ...) and validate."""
        ids = tuple(sorted(int(i) for i in client_ids))
        n = len(ids)
        k = default_neighbours(n) if neighbours is None else _even_degree(neighbours, n)
        t = k // 2 + 1 if threshold is None else threshold
        return cls(
            client_ids=ids,
            vector_length=vector_length,
            round_seed=secrets.token_bytes(32) if round_seed is None else round_seed,
            neighbours=k,
            threshold=t,
            clip=float(clip),
            ring_bits=ring_bits,
            max_clients=n if max_clients is None else max_clients,
            min_survivors=max(2, t) if min_survivors is None else min_survivors,
            weighted=weighted,
            noise_headroom_bits=noise_headroom_bits,
        )

    def __post_init__(self) -> None:
        n, k, t = len(self.client_ids), self.neighbours, self.threshold
        if n < 2 or len(set(self.client_ids)) != n:
            raise ValueError("need at least 2 distinct client ids")
        if any(not 0 <= i <= _MAX_ID for i in self.client_ids):
            raise ValueError("client ids must be integers in 0..2^63-1")
        if not 1 <= k <= n - 1 or (k < n - 1 and k % 2):
            raise ValueError(f"neighbours k={k} must be n-1={n - 1} or an even number below it")
        if not k / 2 < t <= k:
            raise ValueError(f"threshold t={t} must satisfy k/2 < t <= k (k={k})")
        if len(self.round_seed) != 32:
            raise ValueError("round_seed must be 32 bytes")
        if self.vector_length < 1:
            raise ValueError("vector_length must be >= 1")
        if self.max_clients < n:
            raise ValueError(f"max_clients={self.max_clients} is below the {n} selected clients")
        if not 1 <= self.min_survivors <= n:
            raise ValueError(f"min_survivors must lie in 1..{n}")
        self.quantizer  # noqa: B018  (validates clip, ring and headroom)

    @property
    def quantizer(self) -> Quantizer:
        """The fixed-point codec shared by all parties."""
        return Quantizer(self.clip, self.ring_bits, self.max_clients, self.noise_headroom_bits)

    @property
    def ring_length(self) -> int:
        """Length of the masked vector (update plus the weight slot if weighted)."""
        return self.vector_length + (1 if self.weighted else 0)

    @property
    def max_weight(self) -> int:
        """Largest per-client weight for which the weight sum cannot wrap."""
        return ((1 << self.ring_bits) - 1) // self.max_clients

    @cached_property
    def digest(self) -> bytes:
        """SHA-256 of every public parameter of the round (what signatures bind to)."""
        meta, arrays = self.to_arrays()
        body = json.dumps(meta, sort_keys=True).encode() + arrays["round_seed"].tobytes()
        return hashlib.sha256(b"fedguard/secagg/v2/config" + body).digest()

    @cached_property
    def graph(self) -> dict[int, tuple[int, ...]]:
        """The public neighbour graph of this round."""
        return neighbour_graph(self.client_ids, self.neighbours, self.round_seed)


def encode_input(
    config: SecAggConfig,
    vector: np.ndarray,
    weight: int | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Quantize a client's vector into the ring, as ``[weight * vector..., weight]`` if weighted."""
    vec = np.asarray(vector, dtype=np.float64).ravel()
    if vec.shape[0] != config.vector_length:
        raise ValueError(f"vector has {vec.shape[0]} values, config says {config.vector_length}")
    if not config.weighted:
        if weight is not None:
            raise ValueError("weight given but the config is not weighted")
        return config.quantizer.quantize(vec, rng)
    if weight is None or int(weight) != weight or not 0 <= weight <= config.max_weight:
        raise ValueError(f"weighted config: weight must be an integer in 0..{config.max_weight}")
    q = config.quantizer.quantize(vec * weight, rng)
    return np.concatenate([q, np.array([weight], dtype=q.dtype)])


def add_ring_noise(y: np.ndarray, noise: np.ndarray, bits: int) -> np.ndarray:
    """``y + noise`` modulo ``2^bits`` on the first ``len(noise)`` coordinates (``noise`` int64)."""
    z = np.asarray(noise)
    if z.ndim != 1 or z.dtype != np.int64 or z.shape[0] > y.shape[0]:
        raise ValueError(f"ring noise must be 1-D int64 of at most {y.shape[0]} values, got {z.dtype} {z.shape}")
    out = y.copy()
    out[: z.shape[0]] += z.astype(y.dtype)  # two's complement: a negative value wraps as it should
    return reduce_ring(out, bits)


# ----------------------------------------------------------------------------- messages


@dataclass(eq=False)
class AdvertiseKeys(WireMessage):
    """Stage 0, client -> server: the client's two X25519 public keys (32 bytes each), signed
    with its long-term Ed25519 identity over the round's config digest (empty without a PKI)."""

    sender: int
    c_pk: bytes
    s_pk: bytes
    signature: bytes = b""


@dataclass(eq=False)
class KeysBroadcast(WireMessage):
    """Stage 0, server -> client: public keys of the recipient's neighbours that advertised.

    ``ids`` int64 (m,), ``c_pks`` and ``s_pks`` uint8 (m, 32), ``signatures`` uint8 (m, 64) or
    (m, 0) without a PKI.
    """

    recipient: int
    ids: np.ndarray
    c_pks: np.ndarray
    s_pks: np.ndarray
    signatures: np.ndarray


@dataclass(eq=False)
class ShareKeys(WireMessage):
    """Stage 1, client -> server: one encrypted share pair per neighbour.

    ``recipients`` int64 (m,), ``ciphertexts`` uint8 (m, SHARE_CT_BYTES).
    """

    sender: int
    recipients: np.ndarray
    ciphertexts: np.ndarray


@dataclass(eq=False)
class EncryptedShares(WireMessage):
    """Stage 1, server -> client: ciphertexts addressed to the recipient, by sender."""

    recipient: int
    senders: np.ndarray
    ciphertexts: np.ndarray


@dataclass(eq=False)
class MaskedInput(WireMessage):
    """Stage 2, client -> server: the masked, quantized vector (ring dtype, ring_length), and the
    neighbours whose share ciphertexts failed authentication or decoding (``rejected``, int64):
    the client did not mask with them."""

    sender: int
    masked: np.ndarray
    rejected: np.ndarray


@dataclass(eq=False)
class ConsistencyRequest(WireMessage):
    """Stage 3 (with a PKI), server -> client: the clients whose masked inputs are in the sum."""

    recipient: int
    survivors: np.ndarray


@dataclass(eq=False)
class ConsistencySignature(WireMessage):
    """Stage 3, client -> server: the client's signature of (config digest, survivors)."""

    sender: int
    signature: bytes


@dataclass(eq=False)
class UnmaskRequest(WireMessage):
    """Stage 4, server -> client: which of the recipient's partners survived (their masked
    input is in the sum), dropped, or were excluded (complained about), and the total number
    of survivors. With a PKI also the survivor list and the survivors' signatures of it
    (``signers`` int64 (m,), ``signatures`` uint8 (m, 64))."""

    recipient: int
    survived: np.ndarray
    dropped: np.ndarray
    excluded: np.ndarray
    num_survivors: int
    survivors: np.ndarray
    signers: np.ndarray
    signatures: np.ndarray


@dataclass(eq=False)
class UnmaskResponse(WireMessage):
    """Stage 4, client -> server: shares of ``b_v`` for surviving and of ``s_v`` for dropped or
    excluded partners ``v`` (``*_owners`` int64 (m,), ``*_shares`` uint8 (m, 66)), and for the
    excluded also the pairwise mask seed itself (``x_seeds`` uint8 (m, 32), in ``s``-owner order)."""

    sender: int
    b_owners: np.ndarray
    b_shares: np.ndarray
    s_owners: np.ndarray
    s_shares: np.ndarray
    x_owners: np.ndarray
    x_seeds: np.ndarray


@dataclass(eq=False)
class AggregateResult:
    """Outcome of a round.

    Attributes:
        total: float64 sum of the survivors' vectors (``weight * update`` when weighted).
        ring_sum: the exact modular sum of the survivors' quantized inputs (ring dtype).
        survivors: clients whose masked input is in the sum.
        dropped: clients that shared keys but sent no masked input.
        weight_sum: sum of weights (weighted configs), else ``None``.
    """

    total: np.ndarray
    ring_sum: np.ndarray
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    weight_sum: int | None = None

    def mean(self) -> np.ndarray:
        """Weighted mean (weighted configs) or plain mean over survivors."""
        denom = self.weight_sum if self.weight_sum is not None else len(self.survivors)
        if not denom:
            raise ZeroDivisionError("no weight to average over")
        return self.total / denom


@dataclass(eq=False)
class SecAggClientState(WireMessage):
    """A client's private SecAgg state between stages (stays on the client, never sent).

    Attributes:
        client_id: the client.
        stage: how many stages it has completed (0..4).
        c_sk, s_sk: raw X25519 private keys (share encryption, pairwise masks).
        b_seed: the self-mask seed (empty before stage 1).
        peers: int64 (m,) neighbours whose keys it received.
        peer_s_pks: uint8 (m, 32) their mask public keys.
        peer_aead_keys: uint8 (m, 32) the derived share-encryption keys with them.
        partners: int64 (p,) neighbours it masked with: their share ciphertexts were valid (stage 2 on).
        has_inbox: bool scalar: whether ``inbox`` is still held (cleared after unmasking).
        inbox: uint8 (p, SHARE_CT_BYTES) the share ciphertexts it received, by partner.
    """

    client_id: int
    stage: int
    c_sk: bytes
    s_sk: bytes
    b_seed: bytes
    peers: np.ndarray
    peer_s_pks: np.ndarray
    peer_aead_keys: np.ndarray
    partners: np.ndarray
    has_inbox: np.ndarray
    inbox: np.ndarray


def _ct_rows(rows: list[bytes]) -> np.ndarray:
    """Stack share ciphertexts into a (m, SHARE_CT_BYTES) uint8 matrix."""
    out = np.empty((len(rows), SHARE_CT_BYTES), dtype=np.uint8)
    for i, r in enumerate(rows):
        out[i] = np.frombuffer(r, dtype=np.uint8)
    return out


def _id_list(arr: np.ndarray, what: str) -> list[int]:
    """Validate a 1-D integer id array without duplicates; return it as a list."""
    a = np.asarray(arr)
    if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
        raise SecAggAbort(f"{what}: expected a 1-D integer id array")
    ids = [int(i) for i in a]
    if len(set(ids)) != len(ids):
        raise SecAggAbort(f"{what}: duplicate client ids")
    return ids


def _byte_rows(arr: np.ndarray, rows: int, width: int, what: str) -> np.ndarray:
    """Validate a (rows, width) uint8 matrix."""
    a = np.asarray(arr)
    if a.dtype != np.uint8 or a.shape != (rows, width):
        raise SecAggAbort(f"{what}: expected uint8 ({rows}, {width}), got {a.dtype} {a.shape}")
    return a


def _ids_array(ids: Iterable[int]) -> np.ndarray:
    """Sorted int64 id array."""
    return np.array(sorted(ids), dtype=np.int64)


# ----------------------------------------------------------------------------- client


class SecAggClient:
    """One client of a SecAgg(+) round; holds only its own keys, seed and received shares.

    With ``identity`` and ``directory`` (a PKI) it runs the malicious-server variant of Bonawitz
    et al.: it signs its round keys, verifies its neighbours' signatures, and before revealing
    any share it signs the survivor list and checks at least ``t`` survivors signed the same one.
    """

    def __init__(
        self,
        client_id: int,
        config: SecAggConfig,
        identity: IdentityKey | None = None,
        directory: IdentityDirectory | None = None,
    ) -> None:
        """Join the round announced in ``config`` as ``client_id``."""
        if client_id not in config.client_ids:
            raise ValueError(f"client {client_id} is not selected for this round")
        if (identity is None) != (directory is None):
            raise ValueError("a signing identity and the directory go together")
        if directory is not None:
            strangers = [c for c in config.client_ids if c not in directory]
            if strangers:
                raise SecAggAbort(
                    f"client {client_id}: the round names clients {strangers[:5]} that are not in the identity "
                    "directory: refusing (a server inventing clients)"
                )
        self.client_id = client_id
        self.config = config
        self._identity, self._directory = identity, directory
        self._neighbours = frozenset(config.graph[client_id])
        self._stage = 0
        self._c_sk = X25519PrivateKey.generate()
        self._s_sk = X25519PrivateKey.generate()
        self._b_seed = b""
        self._s_pks: dict[int, bytes] = {}
        self._aead_keys: dict[int, bytes] = {}
        self._aead: dict[int, ChaCha20Poly1305] = {}
        self._inbox: dict[int, bytes] = {}
        self._partners: tuple[int, ...] = ()

    @property
    def signed(self) -> bool:
        """Whether this client runs the malicious-server variant (signatures, consistency check)."""
        return self._directory is not None

    def export_state(self) -> SecAggClientState:
        """This client's secrets and progress, to keep on the client between stages.

        A client that answers each stage in a fresh process (or after a restart) stores this in
        its own state and rebuilds itself with :meth:`restore`. It holds private keys: it must
        never leave the client.
        """
        peers = sorted(self._s_pks)
        partners = list(self._partners)
        inbox = [self._inbox[v] for v in partners] if self._inbox else []
        return SecAggClientState(
            self.client_id,
            self._stage,
            self._c_sk.private_bytes_raw(),
            self._s_sk.private_bytes_raw(),
            self._b_seed,
            np.array(peers, dtype=np.int64),
            _key_rows(self._s_pks, peers),
            _key_rows(self._aead_keys, peers),
            np.array(partners, dtype=np.int64),
            np.array(bool(inbox)),
            _ct_rows(inbox),
        )

    @classmethod
    def restore(
        cls,
        config: SecAggConfig,
        state: SecAggClientState,
        identity: IdentityKey | None = None,
        directory: IdentityDirectory | None = None,
    ) -> SecAggClient:
        """Rebuild the client that :meth:`export_state` saved, for the same round ``config``."""
        client = cls(state.client_id, config, identity, directory)
        if not 0 <= state.stage <= 5:
            raise SecAggAbort(f"client {state.client_id}: saved stage {state.stage} is not a SecAgg stage")
        client._stage = int(state.stage)
        client._c_sk = X25519PrivateKey.from_private_bytes(state.c_sk)
        client._s_sk = X25519PrivateKey.from_private_bytes(state.s_sk)
        client._b_seed = state.b_seed
        peers = _id_list(state.peers, "saved peers")
        s_pks = _byte_rows(state.peer_s_pks, len(peers), KEY_BYTES, "saved mask keys")
        aead_keys = _byte_rows(state.peer_aead_keys, len(peers), KEY_BYTES, "saved share keys")
        for v, s_pk, key in zip(peers, s_pks, aead_keys, strict=True):
            client._s_pks[v] = s_pk.tobytes()
            client._aead_keys[v] = key.tobytes()
            client._aead[v] = ChaCha20Poly1305(key.tobytes())
        client._partners = tuple(_id_list(state.partners, "saved partners"))
        if bool(state.has_inbox):
            rows = _byte_rows(state.inbox, len(client._partners), SHARE_CT_BYTES, "saved shares")
            client._inbox = {v: r.tobytes() for v, r in zip(client._partners, rows, strict=True)}
        return client

    @property
    def neighbours(self) -> frozenset[int]:
        """This client's neighbours in the public graph."""
        return self._neighbours

    def _enter(self, stage: int, name: str) -> None:
        """Enforce the stage order; each stage runs once."""
        if self._stage != stage:
            raise SecAggAbort(f"client {self.client_id}: {name} called out of order")
        self._stage = stage + 1

    def _check_recipient(self, recipient: int) -> None:
        if recipient != self.client_id:
            raise SecAggAbort(f"client {self.client_id}: got a message for client {recipient}")

    def _need(self, have: int, what: str) -> None:
        """Abort when fewer than ``t`` neighbours take part."""
        if have < self.config.threshold:
            raise SecAggAbort(
                f"client {self.client_id}: only {have} of its {len(self._neighbours)} "
                f"neighbours {what}; threshold is {self.config.threshold}"
            )

    def advertise_keys(self) -> AdvertiseKeys:
        """Stage 0: publish the share-encryption and mask public keys (signed with a PKI)."""
        self._enter(0, "advertise_keys")
        c_pk = self._c_sk.public_key().public_bytes_raw()
        s_pk = self._s_sk.public_key().public_bytes_raw()
        signature = b""
        if self._identity is not None:
            signature = self._identity.sign(keys_payload(self.config, self.client_id, c_pk, s_pk))
        return AdvertiseKeys(self.client_id, c_pk, s_pk, signature)

    def share_keys(self, msg: KeysBroadcast) -> ShareKeys:
        """Stage 1: Shamir-share ``b_u`` and ``s_u`` among neighbours, encrypted per recipient.

        With a PKI every neighbour's keys must carry that neighbour's signature for this round:
        keys the server swapped or invented abort the round for this client.
        """
        self._enter(1, "share_keys")
        self._check_recipient(msg.recipient)
        ids = _id_list(msg.ids, "key broadcast")
        c_pks = _byte_rows(msg.c_pks, len(ids), KEY_BYTES, "c keys")
        s_pks = _byte_rows(msg.s_pks, len(ids), KEY_BYTES, "s keys")
        if not set(ids) <= self._neighbours:
            raise SecAggAbort(f"client {self.client_id}: key broadcast lists non-neighbours")
        if self._directory is not None:
            sigs = _byte_rows(msg.signatures, len(ids), SIGNATURE_BYTES, "key signatures")
            for v, c_pk, s_pk, sig in zip(ids, c_pks, s_pks, sigs, strict=True):
                payload = keys_payload(self.config, v, c_pk.tobytes(), s_pk.tobytes())
                if not self._directory.verify(v, payload, sig.tobytes()):
                    raise SecAggAbort(
                        f"client {self.client_id}: the keys relayed for client {v} do not carry its signature: "
                        "the server altered or invented them; refusing to share"
                    )
        self._need(len(ids), "advertised keys")
        own = [self._c_sk.public_key().public_bytes_raw(), self._s_sk.public_key().public_bytes_raw()]
        keys = own + [r.tobytes() for r in c_pks] + [r.tobytes() for r in s_pks]
        if len(set(keys)) != len(keys):
            raise SecAggAbort(f"client {self.client_id}: public keys are not all distinct")
        seed = self.config.round_seed
        for v, c_pk, s_pk in zip(ids, c_pks, s_pks, strict=True):
            shared = _exchange(self._c_sk, c_pk.tobytes(), f"client {v}")
            self._aead_keys[v] = _kdf(shared, seed, _SHARE_INFO)
            self._aead[v] = ChaCha20Poly1305(self._aead_keys[v])
            self._s_pks[v] = s_pk.tobytes()
        self._b_seed = secrets.token_bytes(KEY_BYTES)
        xs = [v + 1 for v in ids]
        b_shares = split_secret(self._b_seed, self.config.threshold, xs)
        s_shares = split_secret(self._s_sk.private_bytes_raw(), self.config.threshold, xs)
        cts = np.empty((len(ids), SHARE_CT_BYTES), dtype=np.uint8)
        for row, (v, bs, ss) in enumerate(zip(ids, b_shares, s_shares, strict=True)):
            nonce = secrets.token_bytes(NONCE_BYTES)
            body = self._aead[v].encrypt(nonce, bs.y_bytes() + ss.y_bytes(), _aad(seed, self.client_id, v))
            cts[row] = np.frombuffer(nonce + body, dtype=np.uint8)
        return ShareKeys(self.client_id, np.array(ids, dtype=np.int64), cts)

    def mask_input(
        self,
        msg: EncryptedShares,
        vector: np.ndarray,
        weight: int | None = None,
        rng: np.random.Generator | None = None,
        noise: np.ndarray | None = None,
    ) -> MaskedInput:
        """Stage 2: quantize ``vector`` (see :func:`encode_input`) and add all masks mod 2^b.

        Every received share ciphertext is opened first: a neighbour whose ciphertext fails
        authentication or holds no valid shares is left out of the masks and reported in
        ``rejected`` (the server excludes it from the round), instead of aborting the round later.
        ``noise`` (int64, at most as long as the vector) is added, in quantization levels, to the
        first coordinates after quantization and before masking (distributed discrete DP noise);
        it wraps modulo ``2^b`` like every ring element.
        """
        y = encode_input(self.config, vector, weight, rng)  # a bad vector fails before the stage
        if noise is not None:
            y = add_ring_noise(y, noise, self.config.ring_bits)
        self._enter(2, "mask_input")
        self._check_recipient(msg.recipient)
        senders = _id_list(msg.senders, "encrypted shares")
        cts = _byte_rows(msg.ciphertexts, len(senders), SHARE_CT_BYTES, "share ciphertexts")
        if not set(senders) <= set(self._s_pks):
            raise SecAggAbort(f"client {self.client_id}: shares from clients without keys")
        inbox = {v: row.tobytes() for v, row in zip(senders, cts, strict=True)}
        rejected = [v for v in senders if not self._valid_shares(v, inbox[v])]
        self._partners = tuple(sorted(v for v in senders if v not in rejected))
        self._need(len(self._partners), "sent valid shares")
        self._inbox = {v: inbox[v] for v in self._partners}
        bits = self.config.ring_bits
        y += prg_ring(self._b_seed, y.shape[0], bits)
        for v in self._partners:
            mask = prg_ring(self._pair_seed(v), y.shape[0], bits)
            if self.client_id < v:
                y += mask
            else:
                y -= mask
        return MaskedInput(self.client_id, reduce_ring(y, bits), np.array(sorted(rejected), dtype=np.int64))

    def _pair_seed(self, v: int) -> bytes:
        """The pairwise mask seed ``s_uv`` with neighbour ``v``."""
        shared = _exchange(self._s_sk, self._s_pks[v], f"client {v}")
        return _kdf(shared, self.config.round_seed, _MASK_INFO)

    def _valid_shares(self, v: int, ct: bytes) -> bool:
        """Whether ``v``'s ciphertext opens to two well-formed shares."""
        try:
            plain = self._aead[v].decrypt(ct[:NONCE_BYTES], ct[NONCE_BYTES:], _aad(self.config.round_seed, v,
                                                                                   self.client_id))
            Share.from_y_bytes(self.client_id + 1, plain[:SHARE_BYTES])
            Share.from_y_bytes(self.client_id + 1, plain[SHARE_BYTES:])
        except (InvalidTag, ShamirError, ValueError):
            return False
        return True

    def sign_survivors(self, msg: ConsistencyRequest) -> ConsistencySignature:
        """Stage 3 (with a PKI): sign the survivor list, after checking it is plausible."""
        self._enter(3, "sign_survivors")
        self._check_recipient(msg.recipient)
        if self._identity is None:
            raise SecAggAbort(f"client {self.client_id}: no identity to sign the survivors with")
        survivors = _id_list(msg.survivors, "survivor list")
        self._check_survivors(survivors)
        return ConsistencySignature(self.client_id, self._identity.sign(survivors_payload(self.config, survivors)))

    def _check_survivors(self, survivors: list[int]) -> None:
        need = max(self.config.threshold, self.config.min_survivors)
        if self.client_id not in survivors or not set(survivors) <= set(self.config.client_ids):
            raise SecAggAbort(f"client {self.client_id}: the survivor list is not one of this round's")
        if len(survivors) < need or survivors != sorted(survivors):
            raise SecAggAbort(f"client {self.client_id}: {len(survivors)} survivors listed, at least {need} needed")

    def unmask(self, msg: UnmaskRequest) -> UnmaskResponse:
        """Stage 4: check the server's survivor/dropout lists, then reveal the matching shares.

        With a PKI, at least ``t`` survivors must have signed this same survivor list (so every
        honest client answers the same view), and the lists must follow from it. Then: shares of
        ``b_v`` for surviving partners, of ``s_v`` for the others, and for excluded partners also
        the pairwise seed; never a ``b`` share and ``s`` information for one client.
        """
        self._enter(4 if self.signed else 3, "unmask")
        self._stage = 5
        self._check_recipient(msg.recipient)
        survived = set(_id_list(msg.survived, "survivor list"))
        dropped = set(_id_list(msg.dropped, "dropout list"))
        excluded = set(_id_list(msg.excluded, "exclusion list"))
        if survived & (dropped | excluded) or dropped & excluded:
            raise SecAggAbort(
                f"client {self.client_id}: server lists {sorted(survived & (dropped | excluded))} as both survived "
                "and dropped"
            )
        if survived | dropped | excluded != set(self._partners):
            raise SecAggAbort(
                f"client {self.client_id}: survivor/dropout lists do not match the "
                f"{len(self._partners)} neighbours that shared keys with it"
            )
        if msg.num_survivors < self.config.min_survivors or msg.num_survivors <= len(survived):
            raise SecAggAbort(
                f"client {self.client_id}: {msg.num_survivors} survivors claimed, "
                f"at least {self.config.min_survivors} needed"
            )
        if self.signed:
            self._check_signed_view(msg, survived)
        b_owners, s_owners, x_owners = sorted(survived), sorted(dropped | excluded), sorted(excluded)
        b_rows = [self._open(v)[:SHARE_BYTES] for v in b_owners]
        s_rows = [self._open(v)[SHARE_BYTES:] for v in s_owners]
        seeds = np.empty((len(x_owners), KEY_BYTES), dtype=np.uint8)
        for i, v in enumerate(x_owners):
            seeds[i] = np.frombuffer(self._pair_seed(v), dtype=np.uint8)
        self._inbox = {}
        return UnmaskResponse(
            self.client_id,
            np.array(b_owners, dtype=np.int64),
            _rows(b_rows),
            np.array(s_owners, dtype=np.int64),
            _rows(s_rows),
            np.array(x_owners, dtype=np.int64),
            seeds,
        )

    def _check_signed_view(self, msg: UnmaskRequest, survived: set[int]) -> None:
        """At least t distinct survivors signed this survivor list, and the partner lists follow from it."""
        assert self._directory is not None
        survivors = _id_list(msg.survivors, "signed survivor list")
        self._check_survivors(survivors)
        if survived != set(self._partners) & set(survivors) or msg.num_survivors != len(survivors):
            raise SecAggAbort(f"client {self.client_id}: the unmasking request contradicts the signed survivor list")
        signers = _id_list(msg.signers, "signers")
        sigs = _byte_rows(msg.signatures, len(signers), SIGNATURE_BYTES, "consistency signatures")
        payload = survivors_payload(self.config, survivors)
        valid = {v for v, sig in zip(signers, sigs, strict=True)
                 if v in survivors and self._directory.verify(v, payload, sig.tobytes())}
        if len(valid) < self.config.threshold or len(valid) != len(signers):
            raise SecAggAbort(
                f"client {self.client_id}: {len(valid)} of {len(signers)} survivors' signatures of the survivor list "
                f"verify, {self.config.threshold} needed and every one must: inconsistent views, refusing to unmask"
            )

    def _open(self, v: int) -> bytes:
        """Decrypt the share pair that neighbour ``v`` encrypted for this client."""
        ct = self._inbox[v]
        try:
            return self._aead[v].decrypt(
                ct[:NONCE_BYTES], ct[NONCE_BYTES:], _aad(self.config.round_seed, v, self.client_id)
            )
        except InvalidTag as exc:
            raise SecAggAbort(
                f"client {self.client_id}: share ciphertext from client {v} failed authentication"
            ) from exc


def _rows(rows: list[bytes]) -> np.ndarray:
    """Stack 66-byte share encodings into a (m, 66) uint8 matrix."""
    out = np.empty((len(rows), SHARE_BYTES), dtype=np.uint8)
    for i, r in enumerate(rows):
        out[i] = np.frombuffer(r, dtype=np.uint8)
    return out


# ----------------------------------------------------------------------------- server


class SecAggServer:
    """The aggregator: routes messages, sums masked inputs, removes masks, dequantizes.

    A client whose message is malformed, whose key signature does not verify (with a PKI), or
    whom a neighbour's complaint excludes is left out of the round (as a dropout, listed in
    :attr:`refused`); only too few clients left, or a secret with too few shares, aborts it.
    """

    def __init__(self, config: SecAggConfig, directory: IdentityDirectory | None = None) -> None:
        """Serve the round described by ``config`` (``directory``: verify signatures, run the consistency check)."""
        self.config = config
        self.directory = directory
        self._graph = config.graph
        self._stage = 0
        self._c_pks: dict[int, bytes] = {}
        self._s_pks: dict[int, bytes] = {}
        self._key_sigs: dict[int, bytes] = {}
        self._sent_to: dict[int, list[int]] = {}
        self._partners: dict[int, tuple[int, ...]] = {}
        self._pending: dict[int, np.ndarray] = {}
        self._rejected: dict[int, set[int]] = {}
        self._excluded: set[int] = set()
        self._u3: set[int] = set()
        self._signatures: dict[int, bytes] = {}
        self._requests: dict[int, UnmaskRequest] = {}
        self._sum = np.zeros(config.ring_length, dtype=ring_dtype(config.ring_bits))
        #: clients left out of the round by the server's checks, with the reason
        self.refused: dict[int, str] = {}

    @property
    def signed(self) -> bool:
        return self.directory is not None

    @property
    def excluded(self) -> frozenset[int]:
        """Clients excluded after their neighbours' complaints about their shares."""
        return frozenset(self._excluded)

    def setup_message(self) -> SecAggConfig:
        """The round announcement every selected client needs (public)."""
        return self.config

    def _enter(self, stage: int, name: str) -> None:
        if self._stage != stage:
            raise SecAggAbort(f"server: {name} called out of order")
        self._stage = stage + 1

    def _enough(self, have: int, what: str) -> None:
        """Abort when fewer than ``min_survivors`` clients are left."""
        if have < self.config.min_survivors:
            raise SecAggAbort(
                f"only {have} of {len(self.config.client_ids)} clients {what}; "
                f"at least {self.config.min_survivors} needed"
            )

    def _refuse(self, client: int, reason: str) -> None:
        self.refused.setdefault(client, reason)

    def receive_keys(self, msgs: Iterable[AdvertiseKeys]) -> dict[int, KeysBroadcast]:
        """Stage 0: collect public keys (signed, with a PKI); send each client its live neighbours' keys."""
        self._enter(0, "receive_keys")
        for m in msgs:
            if m.sender not in self._graph or m.sender in self._c_pks:
                self._refuse(m.sender, "unexpected or repeated keys")
            elif len(m.c_pk) != KEY_BYTES or len(m.s_pk) != KEY_BYTES:
                self._refuse(m.sender, "malformed public keys")
            elif self.directory is not None and not self.directory.verify(
                m.sender, keys_payload(self.config, m.sender, m.c_pk, m.s_pk), m.signature
            ):
                self._refuse(m.sender, "its key signature does not verify against the identity directory")
            else:
                self._c_pks[m.sender], self._s_pks[m.sender] = m.c_pk, m.s_pk
                self._key_sigs[m.sender] = m.signature
        self._enough(len(self._c_pks), "advertised keys")
        width = SIGNATURE_BYTES if self.signed else 0
        out = {}
        for u in self._c_pks:
            nbrs = [v for v in self._graph[u] if v in self._c_pks]
            self._sent_to[u] = nbrs
            sigs = np.zeros((len(nbrs), width), dtype=np.uint8)
            for i, v in enumerate(nbrs):
                if width:
                    sigs[i] = np.frombuffer(self._key_sigs[v], dtype=np.uint8)
            out[u] = KeysBroadcast(
                u,
                np.array(nbrs, dtype=np.int64),
                _key_rows(self._c_pks, nbrs),
                _key_rows(self._s_pks, nbrs),
                sigs,
            )
        return out

    def receive_shares(self, msgs: Iterable[ShareKeys]) -> dict[int, EncryptedShares]:
        """Stage 1: route encrypted shares to their (still live) recipients."""
        self._enter(1, "receive_shares")
        got: dict[int, ShareKeys] = {}
        for m in msgs:
            try:
                if m.sender not in self._sent_to or m.sender in got:
                    raise SecAggAbort("unexpected or repeated shares")
                recipients = _id_list(m.recipients, f"shares of {m.sender}")
                if sorted(recipients) != sorted(self._sent_to[m.sender]):
                    raise SecAggAbort("did not share with its neighbours")
                _byte_rows(m.ciphertexts, len(recipients), SHARE_CT_BYTES, f"shares of {m.sender}")
            except SecAggAbort as exc:
                self._refuse(m.sender, f"shares: {exc}")
                continue
            got[m.sender] = m
        self._enough(len(got), "shared keys")
        inbox: dict[int, list[tuple[int, np.ndarray]]] = {v: [] for v in got}
        for u, m in got.items():
            for v, row in zip(m.recipients.tolist(), m.ciphertexts, strict=True):
                if v in inbox:
                    inbox[v].append((u, row))
        out = {}
        for v, items in inbox.items():
            items.sort(key=lambda it: it[0])
            self._partners[v] = tuple(u for u, _ in items)
            cts = np.stack([row for _, row in items]) if items else np.empty((0, SHARE_CT_BYTES), np.uint8)
            out[v] = EncryptedShares(v, np.array(self._partners[v], dtype=np.int64), cts)
        return out

    def add_masked_input(self, msg: MaskedInput) -> None:
        """Stage 2: keep one masked vector (masked: it reveals nothing) and its sender's complaints."""
        if self._stage != 2:
            raise SecAggAbort("server: masked input outside the masking stage")
        if msg.sender not in self._partners or msg.sender in self._pending:
            raise SecAggAbort(f"server: unexpected or repeated masked input from {msg.sender}")
        y = np.asarray(msg.masked)
        if y.dtype != self._sum.dtype or y.shape != self._sum.shape:
            raise SecAggAbort(
                f"server: masked input of {msg.sender} is {y.dtype} {y.shape}, "
                f"expected {self._sum.dtype} {self._sum.shape}"
            )
        rejected = set(_id_list(msg.rejected, f"complaints of {msg.sender}"))
        if not rejected <= set(self._partners[msg.sender]):
            raise SecAggAbort(f"server: client {msg.sender} complains about clients that sent it nothing")
        self._pending[msg.sender] = y
        self._rejected[msg.sender] = rejected

    def close_masking(self) -> list[int]:
        """Stage 2 -> 3: exclude the complained-about clients, sum the rest, check every needed
        secret is recoverable; the survivors (whose masked inputs are in the sum)."""
        self._enter(2, "close_masking")
        self._excluded = exclusion_cover({u: r for u, r in self._rejected.items() if r})
        for u in sorted(self._excluded):
            self._refuse(u, "excluded: a neighbour could not open its shares (or it complained without cause)")
        self._u3 = {u for u in self._pending if u not in self._excluded}
        for u in sorted(self._u3):
            self._sum += self._pending[u]
        self._pending = {}
        self._enough(len(self._u3), "sent masked inputs")
        t = self.config.threshold
        for u in sorted(self._u3):
            holders = self.holders(u)
            if len(holders) < t:
                raise SecAggAbort(
                    f"cannot rebuild the self-mask seed of client {u}: only {len(holders)} of its neighbours "
                    f"sent masked inputs, {t} needed ({len(self._u3)} clients survived overall)"
                )
        for d in sorted(set(self._partners) - self._u3):
            holders = self.holders(d)
            if holders and len(holders) < t and d not in self._excluded:
                raise SecAggAbort(
                    f"cannot rebuild the mask key of client {d}: only {len(holders)} of its neighbours "
                    f"sent masked inputs, {t} needed ({len(self._u3)} clients survived overall)"
                )
        return sorted(self._u3)

    def holders(self, owner: int) -> list[int]:
        """Survivors that accepted ``owner``'s shares (so masked with it and hold its valid shares)."""
        return [w for w in sorted(self._u3) if owner in self._partners.get(w, ()) and owner not in self._rejected[w]]

    def accepted(self, client: int) -> tuple[int, ...]:
        return tuple(v for v in self._partners[client] if v not in self._rejected.get(client, set()))

    def consistency_requests(self) -> dict[int, ConsistencyRequest]:
        """Stage 3 (with a PKI): ask every survivor to sign the survivor list."""
        if self._stage != 3 or not self.signed:
            raise SecAggAbort("server: consistency check out of order or without a PKI")
        survivors = _ids_array(self._u3)
        return {u: ConsistencyRequest(u, survivors) for u in sorted(self._u3)}

    def receive_signatures(self, msgs: Iterable[ConsistencySignature]) -> None:
        """Stage 3: keep the survivors' valid signatures of the survivor list; at least t are needed."""
        assert self.directory is not None
        payload = survivors_payload(self.config, sorted(self._u3))
        for m in msgs:
            if m.sender in self._u3 and m.sender not in self._signatures and self.directory.verify(
                m.sender, payload, m.signature
            ):
                self._signatures[m.sender] = m.signature
            else:
                self._refuse(m.sender, "its signature of the survivor list does not verify")
        if len(self._signatures) < self.config.threshold:
            raise SecAggAbort(
                f"only {len(self._signatures)} survivors signed the survivor list, {self.config.threshold} needed"
            )

    def unmask_requests(self) -> dict[int, UnmaskRequest]:
        """Stage 3 -> 4: ask each survivor (each signer, with a PKI) for the shares it may reveal."""
        if self._stage == 2:
            self.close_masking()
        if self.signed and not self._signatures:
            raise SecAggAbort("server: with a PKI the survivors sign the survivor list before unmasking")
        self._enter(3, "unmask_requests")
        survivors = _ids_array(self._u3)
        targets = sorted(self._signatures) if self.signed else sorted(self._u3)
        signers = targets[: self.config.threshold] if self.signed else []  # t signatures are the evidence
        sigs = np.zeros((len(signers), SIGNATURE_BYTES if self.signed else 0), dtype=np.uint8)
        for i, v in enumerate(signers):
            sigs[i] = np.frombuffer(self._signatures[v], dtype=np.uint8)
        for u in targets:
            partners = self.accepted(u)
            self._requests[u] = UnmaskRequest(
                u,
                _ids_array(v for v in partners if v in self._u3),
                _ids_array(v for v in partners if v not in self._u3 and v not in self._excluded),
                _ids_array(v for v in partners if v in self._excluded),
                len(self._u3),
                survivors if self.signed else np.zeros(0, np.int64),
                np.array(signers, dtype=np.int64),
                sigs,
            )
        return dict(self._requests)

    def receive_masked_inputs(self, msgs: Iterable[MaskedInput]) -> dict[int, UnmaskRequest]:
        """Stage 2 without a PKI: add all masked inputs, then build the unmasking requests."""
        for m in msgs:
            self.add_masked_input(m)
        return self.unmask_requests()

    def finish(self, msgs: Iterable[UnmaskResponse]) -> AggregateResult:
        """Stage 4: rebuild secrets from the shares, remove the masks, dequantize.

        A malformed response is ignored (its sender counts as not having answered).
        """
        self._enter(4, "finish")
        b_shares, s_shares, seeds = self._collect_shares(msgs)
        bits, n_len = self.config.ring_bits, self.config.ring_length
        total = self._sum
        for u in sorted(self._u3):
            total -= prg_ring(self._rebuild(b_shares, u, "self-mask seed"), n_len, bits)
        dropped = sorted(set(self._partners) - self._u3)
        for v in dropped:
            live = self.holders(v)
            if live:
                self._remove_pairwise(total, v, live, s_shares, seeds.get(v, {}))
        ring_sum = reduce_ring(total, bits)
        return self._result(ring_sum, tuple(sorted(self._u3)), tuple(dropped))

    def _collect_shares(
        self, msgs: Iterable[UnmaskResponse]
    ) -> tuple[dict[int, list[Share]], dict[int, list[Share]], dict[int, dict[int, bytes]]]:
        """Validate responses against the requests and group the shares by owner."""
        b_shares: dict[int, list[Share]] = {}
        s_shares: dict[int, list[Share]] = {}
        seeds: dict[int, dict[int, bytes]] = {}
        seen: set[int] = set()
        for m in msgs:
            try:
                req = self._requests.get(m.sender)
                if req is None or m.sender in seen:
                    raise SecAggAbort("unexpected or repeated unmasking")
                seen.add(m.sender)
                got = self._parse_response(m, req)
            except SecAggAbort as exc:
                self._refuse(m.sender, f"unmasking response ignored: {exc}")
                continue
            for owner, share in got[0]:
                b_shares.setdefault(owner, []).append(share)
            for owner, share in got[1]:
                s_shares.setdefault(owner, []).append(share)
            for owner, seed in got[2]:
                seeds.setdefault(owner, {})[m.sender] = seed
        return b_shares, s_shares, seeds

    def _parse_response(self, m: UnmaskResponse, req: UnmaskRequest) -> tuple[list, list, list]:
        out: list[list] = [[], [], []]
        asked = (req.survived.tolist(), sorted([*req.dropped.tolist(), *req.excluded.tolist()]))
        for i, (owners, rows) in enumerate(((m.b_owners, m.b_shares), (m.s_owners, m.s_shares))):
            ids = _id_list(owners, f"unmasking of {m.sender}")
            if ids != asked[i]:
                raise SecAggAbort(f"client {m.sender} answered a different request")
            rows = _byte_rows(rows, len(ids), SHARE_BYTES, f"shares of {m.sender}")
            out[i] = [(owner, _share(m.sender + 1, row.tobytes(), m.sender)) for owner, row in zip(ids, rows,
                                                                                                    strict=True)]
        x_ids = _id_list(m.x_owners, f"seeds of {m.sender}")
        if x_ids != req.excluded.tolist():
            raise SecAggAbort(f"client {m.sender} answered a different request")
        x_rows = _byte_rows(m.x_seeds, len(x_ids), KEY_BYTES, f"seeds of {m.sender}")
        out[2] = [(owner, row.tobytes()) for owner, row in zip(x_ids, x_rows, strict=True)]
        return out[0], out[1], out[2]

    def _rebuild(self, shares: dict[int, list[Share]], owner: int, what: str) -> bytes:
        """Reconstruct one 32-byte secret, or abort with the share counts."""
        have = shares.get(owner, [])
        t = self.config.threshold
        if len(have) < t:
            raise SecAggAbort(
                f"cannot rebuild the {what} of client {owner}: {len(have)} shares received, "
                f"{t} needed ({len(self._u3)} clients survived)"
            )
        try:
            return reconstruct_secret(have, t, KEY_BYTES)
        except ShamirError as exc:
            raise SecAggAbort(f"shares of the {what} of client {owner} are inconsistent") from exc

    def _remove_pairwise(
        self, total: np.ndarray, v: int, live: list[int], s_shares: dict[int, list[Share]], seeds: dict[int, bytes]
    ) -> None:
        """Cancel the masks that surviving neighbours ``live`` shared with dropped or excluded client ``v``:
        from ``v``'s mask key rebuilt from shares (checked against its public key) or, for an excluded
        client whose shares are too few, from the seeds the survivors revealed."""
        bits = self.config.ring_bits
        if len(s_shares.get(v, [])) >= self.config.threshold or v not in self._excluded:
            s_raw = self._rebuild(s_shares, v, "mask key")
            sk = X25519PrivateKey.from_private_bytes(s_raw)
            if sk.public_key().public_bytes_raw() != self._s_pks[v]:
                raise SecAggAbort(f"rebuilt mask key of client {v} does not match its public key")
            pair = {u: _kdf(_exchange(sk, self._s_pks[u], f"client {u}"), self.config.round_seed, _MASK_INFO)
                    for u in live}
        else:
            missing = [u for u in live if u not in seeds]
            if missing:
                raise SecAggAbort(
                    f"cannot remove the masks of excluded client {v}: survivors {missing[:5]} did not reveal "
                    f"their seeds and only {len(s_shares.get(v, []))} shares of its key arrived"
                )
            pair = {u: seeds[u] for u in live}
        for u in live:
            mask = prg_ring(pair[u], total.shape[0], bits)
            if u < v:
                total -= mask
            else:
                total += mask

    def _result(self, ring_sum: np.ndarray, survivors: tuple[int, ...], dropped: tuple[int, ...]) -> AggregateResult:
        """Dequantize the ring sum (and split off the weight slot)."""
        q, n = self.config.quantizer, len(survivors)
        if self.config.weighted:
            total = q.dequantize_sum(ring_sum[:-1], n)
            return AggregateResult(total, ring_sum, survivors, dropped, int(ring_sum[-1]))
        return AggregateResult(q.dequantize_sum(ring_sum, n), ring_sum, survivors, dropped)


def exclusion_cover(complaints: Mapping[int, Iterable[int]]) -> set[int]:
    """Clients to exclude so that no complaint (``v`` could not open ``u``'s shares) is left.

    The server cannot tell which of the two lies, so it removes the client involved in the most
    complaints first (a client whose shares several neighbours reject, or one that complains about
    several); an isolated complaint removes both. One hostile client thus costs the round itself
    and at most one honest client, never an abort by itself.
    """
    edges = {frozenset((v, u)) for v, us in complaints.items() for u in us if u != v}
    excluded: set[int] = set()
    while edges:
        degree: dict[int, int] = {}
        for edge in edges:
            for x in edge:
                degree[x] = degree.get(x, 0) + 1
        top = max(degree.values())
        if top >= 2:
            excluded.add(min(x for x, d in degree.items() if d == top))
        else:
            excluded.update(x for edge in edges for x in edge)
        edges = {e for e in edges if not e & excluded}
    return excluded


def _key_rows(keys: Mapping[int, bytes], ids: Sequence[int]) -> np.ndarray:
    """Stack 32-byte public keys into a (m, 32) uint8 matrix."""
    out = np.empty((len(ids), KEY_BYTES), dtype=np.uint8)
    for i, v in enumerate(ids):
        out[i] = np.frombuffer(keys[v], dtype=np.uint8)
    return out


def _share(x: int, data: bytes, sender: int) -> Share:
    """Decode a share from a response, aborting on a malformed encoding."""
    try:
        return Share.from_y_bytes(x, data)
    except ShamirError as exc:
        raise SecAggAbort(f"server: malformed share from client {sender}") from exc


# ----------------------------------------------------------------------------- driver


@dataclass
class RoundTrace:
    """What :func:`simulate_round` observed.

    Attributes:
        result: the server's :class:`AggregateResult`.
        bytes_sent: per client, the wire size of all messages it sent.
        bytes_received: per client, the wire size of all messages addressed to it.
        client_seconds: per client, CPU time spent inside its stage methods.
        server_seconds: time spent inside the server's stage methods.
        aborted: clients that raised :class:`SecAggAbort` (treated as dropped), with the reason.
    """

    result: AggregateResult
    bytes_sent: dict[int, int] = field(default_factory=dict)
    bytes_received: dict[int, int] = field(default_factory=dict)
    client_seconds: dict[int, float] = field(default_factory=dict)
    server_seconds: float = 0.0
    aborted: dict[int, str] = field(default_factory=dict)


def make_parties(config: SecAggConfig, signed: bool = True) -> tuple[dict[int, SecAggClient], SecAggServer]:
    """One :class:`SecAggClient` per selected id, and the server, for ``config``.

    ``signed``: enrol every client with a fresh Ed25519 identity and give the server and the
    clients the directory (the malicious-server variant); otherwise the semi-honest protocol.
    """
    if not signed:
        return {u: SecAggClient(u, config) for u in config.client_ids}, SecAggServer(config)
    enrolment = enrol(config.client_ids)
    clients = {u: SecAggClient(u, config, enrolment.key(u), enrolment.directory) for u in config.client_ids}
    return clients, SecAggServer(config, enrolment.directory)


class _Transport:
    """In-process transport: serializes every message (JSON header + raw arrays) on its way,
    delivers it only to its addressee, and records bytes and time per party."""

    def __init__(self, parties: Mapping[int, SecAggClient], server: SecAggServer) -> None:
        self.parties = parties
        self.server = server
        self.alive = set(parties)
        self.bytes_sent: dict[int, int] = dict.fromkeys(parties, 0)
        self.bytes_received: dict[int, int] = dict.fromkeys(parties, 0)
        self.client_seconds: dict[int, float] = dict.fromkeys(parties, 0.0)
        self.server_seconds = 0.0
        self.aborted: dict[int, str] = {}

    @staticmethod
    def _wire(msg: WireMessage) -> tuple[WireMessage, int]:
        """Round-trip ``msg`` through its wire form; return the copy and its size in bytes."""
        meta, tensors = msg.to_arrays()
        header = json.dumps(meta)
        size = len(header) + sum(int(t.nbytes) for t in tensors.values())
        copy = type(msg).from_arrays(json.loads(header), {k: v.copy() for k, v in tensors.items()})
        return copy, size

    def clients(
        self,
        stage: str,
        inbox: Mapping[int, WireMessage],
        gone: Iterable[int],
        call: Callable[[SecAggClient, Any], WireMessage],
    ) -> list[WireMessage]:
        """Deliver ``inbox`` to the live clients (minus ``gone``) and collect their replies."""
        self.alive.difference_update(gone)
        replies = []
        for u in sorted(self.alive & set(inbox)):
            msg, size = self._wire(inbox[u])
            self.bytes_received[u] += size
            start = time.perf_counter()
            try:
                reply = call(self.parties[u], msg)
            except SecAggAbort as exc:  # an aborting client simply drops out
                self.aborted[u] = f"{stage}: {exc}"
                self.alive.discard(u)
                continue
            finally:
                self.client_seconds[u] += time.perf_counter() - start
            reply, size = self._wire(reply)
            self.bytes_sent[u] += size
            replies.append(reply)
        return replies

    def serve(self, call: Callable[[list[Any]], Any], msgs: list[WireMessage]) -> Any:
        """Run one server stage on the collected messages, timing it."""
        start = time.perf_counter()
        try:
            return call(msgs)
        finally:
            self.server_seconds += time.perf_counter() - start


def simulate_round(
    clients: Mapping[int, SecAggClient] | Iterable[SecAggClient],
    server: SecAggServer,
    inputs: Mapping[int, np.ndarray],
    drop_after_masking: Iterable[int] = (),
    drop_before_masking: Iterable[int] = (),
    drop_before_sharing: Iterable[int] = (),
    weights: Mapping[int, int] | None = None,
    rng: np.random.Generator | None = None,
) -> RoundTrace:
    """Run one round, passing each message through its wire form to its addressee only.

    Drop-outs: ``drop_before_sharing`` clients advertise keys and then vanish;
    ``drop_before_masking`` clients also share keys but send no masked input (they are NOT in the
    sum); ``drop_after_masking`` clients send their masked input (they ARE in the sum) and then
    vanish before unmasking. A client that aborts is treated as dropped. ``weights`` are passed
    to :meth:`SecAggClient.mask_input` (weighted configs); ``rng`` switches on stochastic
    rounding. Server aborts propagate as :class:`SecAggAbort`.
    """
    parties = dict(clients) if isinstance(clients, Mapping) else {c.client_id: c for c in clients}
    net = _Transport(parties, server)
    w = weights or {}
    setup = {u: server.setup_message() for u in parties}
    adv = net.clients("advertise", setup, (), lambda c, _m: c.advertise_keys())
    bcast = net.serve(server.receive_keys, adv)
    shares = net.clients("share", bcast, drop_before_sharing, lambda c, m: c.share_keys(m))
    routed = net.serve(server.receive_shares, shares)
    masked = net.clients(
        "mask",
        routed,
        drop_before_masking,
        lambda c, m: c.mask_input(m, inputs[c.client_id], w.get(c.client_id), rng),
    )
    for m in masked:
        try:
            net.serve(lambda msgs, m=m: server.add_masked_input(m), [])
        except SecAggAbort as exc:  # a malformed masked input leaves that client out
            server.refused.setdefault(m.sender, str(exc))
    net.serve(lambda _msgs: server.close_masking(), [])
    if server.signed:
        asks = net.serve(lambda _msgs: server.consistency_requests(), [])
        signatures = net.clients("consistency", asks, drop_after_masking, lambda c, m: c.sign_survivors(m))
        net.serve(server.receive_signatures, signatures)
    requests = net.serve(lambda _msgs: server.unmask_requests(), [])
    answers = net.clients("unmask", requests, drop_after_masking, lambda c, m: c.unmask(m))
    result = net.serve(server.finish, answers)
    return RoundTrace(
        result,
        net.bytes_sent,
        net.bytes_received,
        net.client_seconds,
        net.server_seconds,
        net.aborted,
    )


def run_secagg_round(
    clients: Mapping[int, SecAggClient] | Iterable[SecAggClient],
    server: SecAggServer,
    inputs: Mapping[int, np.ndarray],
    drop_after_masking: Iterable[int] = (),
    drop_before_masking: Iterable[int] = (),
) -> np.ndarray:
    """Run one round (see :func:`simulate_round`) and return the dequantized sum of survivors."""
    return simulate_round(clients, server, inputs, drop_after_masking, drop_before_masking).result.total
