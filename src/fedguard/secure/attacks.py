"""Attack scenarios against secure aggregation, CKKS and FedAvg's weights (issue 14, crypto half).

Each scenario plays one adversary against the real protocol code and reports ``refused`` (the
attack is detected and stopped), ``contained`` (it runs, but its effect is bounded to what the
docs state) or ``succeeded``. They run in-process on a small simulation (the embedded MNIST
subset, 6 clients) in seconds; :data:`SCENARIOS` maps their names to them, for the attack harness.

==============================  ================================  ================================
scenario                        adversary                         expected now
==============================  ================================  ================================
``ckks-key-recovery``           curious server                    refused (no key from flooded values)
``ckks-forged-aggregate``       key holder                        refused (round aborts, model kept)
``ckks-malformed-ciphertext``   hostile client                    contained (that client dropped)
``ckks-weight-slot``            hostile client                    contained (registered weights)
``secagg-key-swap``             malicious server                  refused (victim sees bad signatures)
``secagg-garbage-shares``       hostile client                    contained (that client excluded)
``secagg-weight-amplification`` hostile client                    contained (registered weights)
``secagg-weight-zero``          hostile client                    contained (round completes)
``fedavg-num-examples``         hostile client                    refused (claim above registration)
==============================  ================================  ================================
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedguard.messages import Message
from fedguard.runtime.base import Exchange

from .secagg import (
    _MASK_INFO,
    _SHARE_INFO,
    EncryptedShares,
    KeysBroadcast,
    SecAggAbort,
    SecAggClient,
    SecAggConfig,
    _aad,
    _exchange,
    _kdf,
    make_parties,
    prg_ring,
)
from .shamir import SHARE_BYTES, Share, reconstruct_secret

__all__ = ["ScenarioResult", "SCENARIOS", "run_scenario"]

SMALL = [
    "run.progress=false",
    "run.report=false",
    "data.max_train_examples=1200",
    "data.num_clients=6",
    "train.batch_size=32",
]


@dataclass
class ScenarioResult:
    """What one attack scenario did and how it ended."""

    name: str
    adversary: str
    outcome: str  # "refused" | "contained" | "succeeded"
    detail: str
    hostile_messages: int = 1
    figures: dict[str, float] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        return {"scenario": self.name, "adversary": self.adversary, "outcome": self.outcome, "detail": self.detail,
                "hostile_messages": self.hostile_messages, **self.figures}


class Wiretap:
    """The server's communicator with an adversary on it: it sees every request and reply and may
    rewrite requests (an active server) or replies (hostile clients, a lying key holder)."""

    def __init__(self, inner: Any, request: Callable | None = None, reply: Callable | None = None) -> None:
        self.inner, self.request, self.reply = inner, request, reply
        self.traffic = inner.traffic
        self.requests: list[Message] = []
        self.replies: list[Message] = []

    def exchange(self, messages: dict[int, Message]) -> Exchange:
        if self.request is not None:
            messages = {cid: self.request(msg) for cid, msg in messages.items()}
        self.requests.extend(messages.values())
        ex = self.inner.exchange(messages)
        if self.reply is not None:
            ex.replies = {cid: self.reply(msg) for cid, msg in ex.replies.items()}
        self.replies.extend(ex.replies.values())
        return ex

    def close(self) -> None:
        self.inner.close()


def _server(
    overrides: list[str], request: Callable | None = None, reply: Callable | None = None
) -> tuple[Any, Any, Any]:
    """An engine server over in-process clients, with the adversary on its communicator."""
    from fedguard import Experiment
    from fedguard.engine import Server
    from fedguard.runtime.simulation import SerialCommunicator
    from fedguard.runtime.state_store import MemoryStateStore

    setup = Experiment(overrides=[*SMALL, *overrides], log=lambda s: None).assemble()
    store = MemoryStateStore()
    comm = Wiretap(SerialCommunicator(lambda cid: setup.make_client(cid, store)), request, reply)
    server = Server(setup.task, setup.model, setup.pipeline, setup.sampler, comm, setup.test, 0, 1, lambda s: None)
    return server, comm, store


def _unchanged(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(before[k], after[k]) for k in before)


# ----------------------------------------------------------------------------------- CKKS


def ckks_key_recovery() -> ScenarioResult:
    """The curious server solves for the secret key from the aggregate's ciphertexts and the key
    holder's release (Li-Micciancio) and decrypts client 3's own update."""
    import tenseal as ts

    from .ckks import EncryptedVector
    from .ckks_attack import recover_secret_key
    from .protocol import from_message, tensor_bytes

    server, comm, store = _server(["secure.mode=ckks"])
    record = server.run_round(1, False)
    if record.aborted:
        return ScenarioResult("ckks-key-recovery", "curious server", "refused", f"round aborted: {record.aborted}")
    request = [m for m in comm.requests if m.kind == "ckks/decrypt"][-1]
    reply = [m for m in comm.replies if m.kind == "ckks/plaintext"][-1]
    public = tensor_bytes([m for m in comm.replies if m.kind == "ckks/public_key"][-1].tensors["ckks/context"])
    total = from_message(EncryptedVector, request, "ckks/")
    victim = from_message(EncryptedVector, [m for m in comm.replies if m.kind == "fit_result" and m.client_id == 3][-1],
                          "ckks/")
    released = reply.tensors["ckks/sum"].double().numpy()
    attempt = recover_secret_key(public, total.ciphertexts[:2], list(released[:2]))
    secret = ts.context_from(tensor_bytes(store.load(0)["ckks/secret_context"]))  # ground truth, for scoring only
    truth = np.array(ts.ckks_vector_from(secret, victim.ciphertexts[0]).decrypt())
    error = float(np.abs(attempt.decrypt(victim.ciphertexts[0]) - truth).max())
    outcome = "succeeded" if attempt.is_ternary or error < 1e-3 else "refused"
    detail = f"recovered key ternary: {attempt.is_ternary}; client 3's update decrypted to within {error:.3g}"
    return ScenarioResult("ckks-key-recovery", "curious server", outcome, detail, 2, {"victim_error": error})


def ckks_forged_aggregate() -> ScenarioResult:
    """The key holder returns the aggregate scaled by 1.5 instead of the aggregate."""

    def forge(msg: Message) -> Message:
        if msg.kind == "ckks/plaintext":
            msg.tensors = {**msg.tensors, "ckks/sum": msg.tensors["ckks/sum"] * 1.5}
        return msg

    server, _, _ = _server(["secure.mode=ckks"], reply=forge)
    before = {k: v.clone() for k, v in server.params.items()}
    record = server.run_round(1, False)
    kept = _unchanged(before, server.params)
    outcome = "refused" if record.aborted and kept else "succeeded"
    return ScenarioResult("ckks-forged-aggregate", "key holder", outcome, str(record.aborted))


def _hostile_ckks(client: int, vector: Callable[[int], np.ndarray], scale_bits: int | None = None) -> Callable:
    from .ckks import CKKSEncryptor, EncryptedVector
    from .protocol import from_message, tensor_bytes, to_message

    state: dict[str, bytes] = {}

    def tamper(msg: Message) -> Message:
        if msg.kind == "ckks/public_key":
            state["public"] = tensor_bytes(msg.tensors["ckks/context"])
        if msg.kind == "fit_result" and msg.client_id == client:
            honest = from_message(EncryptedVector, msg, "ckks/")
            enc = CKKSEncryptor(state["public"])
            if scale_bits is not None:
                enc.context.global_scale = 2.0**scale_bits
            forged = enc.encrypt(vector(honest.length))
            out = to_message("fit_result", msg.round, client, forged, "ckks/")
            return Message(out.kind, out.round, out.client_id, {**msg.meta, **out.meta}, out.tensors)
        return msg

    return tamper


def ckks_malformed_ciphertext() -> ScenarioResult:
    """Client 3 encrypts at scale 2^50 instead of the round's: its ciphertexts cannot be added."""
    server, _, _ = _server(["secure.mode=ckks"], reply=_hostile_ckks(3, np.zeros, scale_bits=50))
    record = server.run_round(1, False)
    ok = record.aborted is None and record.completed == 5 and 3 in record.failed
    return ScenarioResult("ckks-malformed-ciphertext", "hostile client", "contained" if ok else "succeeded",
                          record.aborted or record.failed.get(3, ""))


def ckks_weight_slot() -> ScenarioResult:
    """Client 3 encrypts a zero update with a weight slot 600 times its share."""
    server, _, _ = _server(["secure.mode=ckks"], reply=_hostile_ckks(3, lambda n: np.append(np.zeros(n - 1), 600.0)))
    total = sum(server.pipeline.aggregator.settings.registered)
    record = server.run_round(1, False)
    ok = record.aborted is None and record.metrics.get("client_ckks_weight_mismatch") == 1.0
    weight = server.pipeline.aggregator.settings.registered
    return ScenarioResult("ckks-weight-slot", "hostile client", "contained" if ok else "succeeded",
                          f"mean divided by the registered weights ({total} examples of {len(weight)} clients)")


# ----------------------------------------------------------------------------------- SecAgg+


def secagg_key_swap(signed: bool = True, clients: int = 8, victim: int = 0) -> ScenarioResult:
    """The malicious server gives the victim its own keys in place of the victim's neighbours',
    so every share the victim makes is encrypted to the server; it then routes the victim shares
    from the fake neighbours, collects the victim's masked input and unmasks it alone.

    Against the semi-honest protocol (no PKI) this recovers the victim's update exactly (up to
    quantization); with signed keys the victim refuses to share.
    """
    import secrets

    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    config = SecAggConfig.create(range(clients), 64, round_seed=secrets.token_bytes(32))
    parties, server = make_parties(config, signed)
    x = np.random.default_rng(0).uniform(-1, 1, 64)
    keys = server.receive_keys([c.advertise_keys() for c in parties.values()])
    honest = keys[victim]
    fake_c = {int(v): X25519PrivateKey.generate() for v in honest.ids}
    fake_s = {int(v): X25519PrivateKey.generate() for v in honest.ids}
    swapped = KeysBroadcast(
        victim,
        honest.ids,
        np.stack([np.frombuffer(fake_c[int(v)].public_key().public_bytes_raw(), np.uint8) for v in honest.ids]),
        np.stack([np.frombuffer(fake_s[int(v)].public_key().public_bytes_raw(), np.uint8) for v in honest.ids]),
        honest.signatures,
    )
    target: SecAggClient = parties[victim]
    try:
        shares = target.share_keys(swapped)
    except SecAggAbort as exc:
        return ScenarioResult("secagg-key-swap", "malicious server", "refused", str(exc), len(honest.ids))
    seed = config.round_seed
    victim_c = target._c_sk.public_key().public_bytes_raw()
    aead = {v: ChaCha20Poly1305(_kdf(_exchange(fake_c[v], victim_c, "victim"), seed, _SHARE_INFO)) for v in fake_c}
    b_shares, s_shares = [], []
    for v, ct in zip(shares.recipients.tolist(), shares.ciphertexts, strict=True):
        raw = ct.tobytes()
        plain = aead[v].decrypt(raw[:12], raw[12:], _aad(seed, victim, v))
        b_shares.append(Share.from_y_bytes(v + 1, plain[:SHARE_BYTES]))
        s_shares.append(Share.from_y_bytes(v + 1, plain[SHARE_BYTES:]))
    b_seed = reconstruct_secret(b_shares, config.threshold, 32)
    s_key = X25519PrivateKey.from_private_bytes(reconstruct_secret(s_shares, config.threshold, 32))
    # route the victim well-formed shares "from" the fake neighbours, so that it masks with them
    rows = []
    for v in fake_c:
        nonce = secrets.token_bytes(12)
        rows.append(np.frombuffer(nonce + aead[v].encrypt(nonce, bytes(2 * SHARE_BYTES), _aad(seed, v, victim)),
                                  np.uint8))
    routed = EncryptedShares(victim, np.array(sorted(fake_c), dtype=np.int64), np.stack(rows))
    masked = target.mask_input(routed, x).masked.copy()
    y = masked - prg_ring(b_seed, masked.shape[0], config.ring_bits)
    for v, sk in fake_s.items():
        pair = _kdf(_exchange(s_key, sk.public_key().public_bytes_raw(), "fake"), seed, _MASK_INFO)
        mask = prg_ring(pair, y.shape[0], config.ring_bits)
        y = y - mask if victim < v else y + mask
    recovered = config.quantizer.dequantize_sum(y, 1)
    error = float(np.abs(recovered - x).max())
    outcome = "succeeded" if error <= config.quantizer.step else "refused"
    return ScenarioResult("secagg-key-swap", "malicious server", outcome,
                          f"victim's update recovered to within {error:.3g}", 2 * len(honest.ids),
                          {"victim_error": error})


@contextlib.contextmanager
def _hostile_masking(client: int, extra: Callable[[SecAggClient, int], np.ndarray]) -> Iterator[None]:
    """Client ``client`` adds ``extra(client, weight)`` (int64, ring units) to its encoded vector before masking."""
    original = SecAggClient.mask_input

    def hostile(self, msg, vector, weight=None, rng=None, noise=None):  # type: ignore[no-untyped-def]
        if self.client_id != client:
            return original(self, msg, vector, weight, rng, noise)
        return original(self, msg, vector, weight, rng, extra(self, int(weight or 0)))

    SecAggClient.mask_input = hostile  # type: ignore[method-assign]
    try:
        yield
    finally:
        SecAggClient.mask_input = original  # type: ignore[method-assign]


def _weight_slot(target: Callable[[int, int], int]) -> Callable[[SecAggClient, int], np.ndarray]:
    def extra(client: SecAggClient, weight: int) -> np.ndarray:
        out = np.zeros(client.config.ring_length, dtype=np.int64)
        out[-1] = target(weight, client.config.ring_bits) - weight
        return out

    return extra


def secagg_weight_amplification() -> ScenarioResult:
    """Client 3 sets its weight slot so the unmasked weight sum is 1: a mean divided by the slot
    would amplify the sum 1,200 times."""
    server, _, _ = _server(["secure.mode=secagg"])
    others = sum(server.pipeline.aggregator.settings.registered) - server.pipeline.aggregator.settings.registered[3]
    with _hostile_masking(3, _weight_slot(lambda w, bits: 1 - others)):
        record = server.run_round(1, False)
    step = max(float(v.abs().max()) for v in server.params.values())
    ok = record.aborted is None and record.metrics.get("client_secagg_weight_mismatch") == 1.0 and math.isfinite(step)
    return ScenarioResult("secagg-weight-amplification", "hostile client", "contained" if ok else "succeeded",
                          "the mean divides by the registered weights; the slot is only compared")


def secagg_weight_zero() -> ScenarioResult:
    """Client 3 sets its weight slot so the unmasked weight sum is 0 (the round used to abort)."""
    server, _, _ = _server(["secure.mode=secagg"])
    others = sum(server.pipeline.aggregator.settings.registered) - server.pipeline.aggregator.settings.registered[3]
    with _hostile_masking(3, _weight_slot(lambda w, bits: -others)):
        record = server.run_round(1, False)
    ok = record.aborted is None and record.completed == 6
    return ScenarioResult("secagg-weight-zero", "hostile client", "contained" if ok else "succeeded",
                          str(record.aborted or "round completed with registered weights"))


def secagg_garbage_shares() -> ScenarioResult:
    """Client 3 sends share ciphertexts that do not open (it used to abort every round)."""
    original = SecAggClient.share_keys

    def garbage(self, msg):  # type: ignore[no-untyped-def]
        out = original(self, msg)
        if self.client_id == 3:
            out.ciphertexts[:, 12:] ^= 0x5A
        return out

    server, _, _ = _server(["secure.mode=secagg"])
    SecAggClient.share_keys = garbage  # type: ignore[method-assign]
    try:
        record = server.run_round(1, False)
    finally:
        SecAggClient.share_keys = original  # type: ignore[method-assign]
    ok = record.aborted is None and record.completed == 5 and "excluded" in record.failed.get(3, "")
    return ScenarioResult("secagg-garbage-shares", "hostile client", "contained" if ok else "succeeded",
                          record.aborted or record.failed.get(3, ""), 5)


# ----------------------------------------------------------------------------------- FedAvg


def fedavg_num_examples() -> ScenarioResult:
    """Client 2 claims num_examples = 1e300 with its (small) update: plaintext FedAvg used to
    give it all the weight."""

    def lie(msg: Message) -> Message:
        if msg.kind == "fit_result" and msg.client_id == 2:
            msg.meta = {**msg.meta, "num_examples": 1e300}
        return msg

    server, _, _ = _server([], reply=lie)
    record = server.run_round(1, False)
    refused = record.aborted is None and 2 in record.failed and "registered" in record.failed[2]
    return ScenarioResult("fedavg-num-examples", "hostile client", "refused" if refused else "succeeded",
                          record.failed.get(2, "accepted"))


SCENARIOS: dict[str, Callable[[], ScenarioResult]] = {
    "ckks-key-recovery": ckks_key_recovery,
    "ckks-forged-aggregate": ckks_forged_aggregate,
    "ckks-malformed-ciphertext": ckks_malformed_ciphertext,
    "ckks-weight-slot": ckks_weight_slot,
    "secagg-key-swap": secagg_key_swap,
    "secagg-garbage-shares": secagg_garbage_shares,
    "secagg-weight-amplification": secagg_weight_amplification,
    "secagg-weight-zero": secagg_weight_zero,
    "fedavg-num-examples": fedavg_num_examples,
}


def run_scenario(name: str) -> ScenarioResult:
    """Run one scenario by name."""
    if name not in SCENARIOS:
        raise KeyError(f"unknown scenario {name!r}; choose one of {sorted(SCENARIOS)}")
    return SCENARIOS[name]()
