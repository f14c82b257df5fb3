"""CKKS homomorphic encryption as an engine aggregator: the server adds ciphertexts it cannot read.

Key management (single key holder, as TenSEAL offers no threshold CKKS): one designated client,
the *key holder* (``secure.key_holder``), makes a fresh CKKS key pair every round and keeps the
secret key in its own state; it decrypts once per key (the noise flooding of
:mod:`fedguard.secure.ckks` is sized for that many ciphertexts) and never releases a raw
decryption. Per round:

============================  ========================================  ===========================
server -> client              client does                               client -> server
============================  ========================================  ===========================
``ckks/keygen`` (key holder;  makes a fresh key pair for the round      ``ckks/public_key`` (public
CKKS parameters, budget)                                                context, no secret key)
``ckks/context`` (every       stores the round's public context         ``ckks/context_ok``
sampled client)
``fit`` (global model + key   trains, runs the client steps, encrypts   ``fit_result`` carrying only
fingerprint)                  ``[w/M * update, w/M]`` clipped to +-clip ciphertexts
``ckks/decrypt`` (key holder; checks the check slots count the clients,  ``ckks/plaintext`` (the
the summed ciphertexts and    decrypts, floods, rounds                  flooded aggregate and check)
the projection check)
============================  ========================================  ===========================

The server checks each client's ciphertexts (key fingerprint, digest, count, slots, scale,
primes) and drops a client whose ciphertexts are malformed, then sums, adds a secret random
projection of the sum (:func:`~fedguard.secure.ckks.projection_check`) and verifies the key
holder's plaintext against it: a forged aggregate aborts the round with the model unchanged. The
mean divides by the survivors' registered weights (what the server knows), never by the
decrypted weight slot, and every coordinate is range-checked against ``n * clip``. What each
party learns is in ``docs/secure.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedguard.messages import Message
from fedguard.pipeline.base import AggregateResult, Aggregator, ClientContext, ServerContext
from fedguard.runtime.base import Communicator
from fedguard.types import Params, num_params

from .protocol import (
    bytes_tensor,
    client_weight,
    flatten_sorted,
    from_message,
    tensor_bytes,
    to_message,
    unflatten_sorted,
)
from .wire import WireError

KEYGEN, PUBLIC_KEY = "ckks/keygen", "ckks/public_key"
CONTEXT, CONTEXT_OK = "ckks/context", "ckks/context_ok"
DECRYPT, PLAINTEXT = "ckks/decrypt", "ckks/plaintext"
FIT_RESULT = "fit_result"
PREFIX = "ckks/"
_SECRET, _PUBLIC, _FINGERPRINT = "ckks/secret_context", "ckks/public_context", "ckks/fingerprint"
_KEY_STATE = "ckks/key"
#: a returned check further than this many standard deviations from the aggregate's projection is a forgery
FORGERY_SIGMAS = 9.0


class CKKSRoundAbort(RuntimeError):
    """The round cannot finish (no key, the key holder is gone, a forged aggregate)."""


@dataclass(frozen=True)
class CKKSSettings:
    """The ``[secure]`` values the CKKS aggregator uses.

    ``min_clients`` is the key holder's own rule: it refuses to decrypt a sum of fewer clients.
    ``registered`` are the clients' registered dataset sizes (what the server knows), by id.
    """

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 60, 60)
    global_scale_bits: int = 56
    key_holder: int = 0
    max_weight: int = 1
    weighting: str = "examples"
    min_clients: int = 2
    clip: float = 1.0
    statistical_security: int = 40
    registered: tuple[int, ...] = field(default=(), repr=False)

    def params(self) -> dict[str, Any]:
        """The CKKS parameters as sent to the key holder."""
        return {
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "global_scale_bits": self.global_scale_bits,
            "statistical_security": self.statistical_security,
        }

    def ciphertexts(self, length: int) -> int:
        """Ciphertexts per client for ``length`` values (plus the weight slot)."""
        return -(-(length + 1) // (self.poly_modulus_degree // 2 - 1))

    def weight(self, client: int) -> int:
        """The FedAvg weight the server allows client ``client``: its registered size (or 1)."""
        if self.weighting == "uniform":
            return 1
        if not 0 <= client < len(self.registered):
            raise CKKSRoundAbort(f"client {client} has no registered dataset size")
        return int(self.registered[client])

    def value_sigma(self, clients: int, length: int) -> float:
        """The flooding's standard deviation per released value for an honest sum (expected error)."""
        flooding = _ckks().NoiseFlooding(self.statistical_security)
        bound = flooding.error_bound(self.poly_modulus_degree, clients)
        return flooding.value_sigma(self.poly_modulus_degree, bound, self.ciphertexts(length) + 1,
                                    2.0**self.global_scale_bits)


class CKKSAggregator(Aggregator):
    """Weighted FedAvg over CKKS ciphertexts; only the key holder can decrypt, only sums, only flooded."""

    name = "ckks"
    hides_individual_updates = True

    def __init__(self, settings: CKKSSettings) -> None:
        self.settings = settings
        self._encryptor: Any = None
        self._public: bytes | None = None
        self._replies: dict[int, Message] = {}

    @property
    def fingerprint(self) -> str | None:
        """The key fingerprint in use (None before the key holder answered)."""
        return None if self._encryptor is None else self._encryptor.fingerprint

    # -- server ---------------------------------------------------------------------------
    def aggregate(
        self, comm: Communicator, round: int, fit_messages: dict[int, Message], like: Params, ctx: ServerContext
    ) -> AggregateResult:
        """Key, contexts, encrypted fit, homomorphic sum and check, flooded decryption, verification."""
        failed: dict[int, str] = {}
        self._replies = {}
        length = num_params(like) + 1
        try:
            self._new_key(comm, round, length)
            targets = self._deliver_context(comm, round, sorted(fit_messages), failed)
            encrypted = self._collect(comm, round, fit_messages, targets, length, failed, ctx)
            total, summed = self._sum(encrypted, length, failed, ctx, round)
            check, r, rho = _ckks().projection_check(self._encryptor.context, total.ciphertexts)
            release = self._decrypt(comm, round, total, check)
            z = _ckks().verify_projection(release.values, release.check, r, rho, release.sigmas, release.check_sigma)
            if not z <= FORGERY_SIGMAS:
                raise CKKSRoundAbort(
                    f"the key holder's plaintext is not the aggregate: the projection check is off by {z:.3g} "
                    f"standard deviations (at most {FORGERY_SIGMAS:g} for an honest release); forged or corrupted"
                )
        except (CKKSRoundAbort, _ckks().CKKSError) as exc:
            return AggregateResult(None, [], failed, aborted=f"CKKS aggregation aborted: {exc}")
        return self._result(release, like, summed, failed)

    def _result(self, release: Any, like: Params, summed: list[int], failed: dict[int, str]) -> AggregateResult:
        """Range-check the released sum and divide it by the registered weights."""
        s, n = self.settings, num_params(like)
        plain = release.vector(n + 1)
        weights = [s.weight(c) for c in summed]
        total_weight = float(sum(weights))
        limit = len(summed) * s.clip + 10 * float(release.sigmas.max())
        outside = int(np.count_nonzero(np.abs(plain[:n]) > limit))
        values = np.clip(plain[:n], -limit, limit)
        delta = unflatten_sorted(torch.from_numpy(values * (s.max_weight / total_weight)), like)
        metrics = {
            "ckks_clients": float(len(summed)),
            "ckks_ciphertexts": float(release.values.shape[0]),
            "ckks_out_of_range": float(outside),
            "ckks_weight_mismatch": float(abs(plain[n] * s.max_weight - total_weight) > 0.5),
            "ckks_flooding_sigma": float(release.sigmas.max()),
            "ckks_noise_bits": float(release.noise_bits),
        }
        replies = [self._replies[c] for c in summed]  # ciphertexts + the client steps' metadata
        return AggregateResult(delta, summed, failed, total_weight, metrics, replies)

    def _new_key(self, comm: Communicator, round: int, length: int) -> None:
        """The key holder makes this round's key pair; its decryption budget is one aggregate and its check."""
        holder = self.settings.key_holder
        budget = self.settings.ciphertexts(length - 1) + 1
        request = Message(KEYGEN, round, holder, {"ckks": self.settings.params(), "budget": budget})
        ex = comm.exchange({holder: request})
        reply = ex.replies.get(holder)
        if reply is None or reply.kind != PUBLIC_KEY or "ckks/context" not in reply.tensors:
            reason = ex.failed.get(holder, "no public key in the reply")
            raise CKKSRoundAbort(f"key holder client {holder} gave no public key ({reason})")
        public = tensor_bytes(reply.tensors["ckks/context"])
        encryptor = _ckks().CKKSEncryptor(public)
        if encryptor.fingerprint != reply.meta.get("fingerprint"):
            raise CKKSRoundAbort("the public context does not match the fingerprint the key holder sent")
        if _ckks().context_slots(encryptor.context) != self.settings.poly_modulus_degree // 2:
            raise CKKSRoundAbort("the key holder's context has other parameters than the configured ones")
        if encryptor.context.is_private():
            raise CKKSRoundAbort("the key holder sent its secret key: refused (the server must not hold it)")
        self._public, self._encryptor = public, encryptor

    def _deliver_context(self, comm: Communicator, round: int, ids: list[int], failed: dict[int, str]) -> list[int]:
        """Send the round's public context to the sampled clients; the ones ready to encrypt."""
        assert self._public is not None
        payload = {"ckks/context": bytes_tensor(self._public)}
        meta = {"fingerprint": self.fingerprint}
        ex = comm.exchange({c: Message(CONTEXT, round, c, meta, payload) for c in ids})
        for cid, reason in ex.failed.items():
            failed[cid] = f"context: {reason}"
        ready = []
        for cid in ids:
            msg = ex.replies.get(cid)
            if msg is None:
                continue
            if msg.kind == CONTEXT_OK and msg.meta.get("fingerprint") == self.fingerprint:
                ready.append(cid)
            else:
                failed[cid] = "context: the client did not confirm the public key"
        return ready

    def _collect(
        self,
        comm: Communicator,
        round: int,
        fit_messages: dict[int, Message],
        targets: list[int],
        length: int,
        failed: dict[int, str],
        ctx: ServerContext,
    ) -> dict[int, Any]:
        """Send the fit instructions and keep the well-formed encrypted updates."""
        spec = {"fingerprint": self.fingerprint, "weighting": self.settings.weighting,
                "max_weight": self.settings.max_weight, "clip": self.settings.clip}
        messages = {
            c: Message(fit_messages[c].kind, round, c, {**fit_messages[c].meta, "ckks": spec}, fit_messages[c].tensors)
            for c in targets
        }
        ex = comm.exchange(messages)
        for cid, reason in ex.failed.items():
            failed[cid] = f"fit: {reason}"
        out = {}
        for cid in sorted(ex.replies):
            try:
                enc = from_message(_ckks().EncryptedVector, ex.replies[cid], PREFIX, FIT_RESULT)
                enc.verify(self.fingerprint, length)
                if enc.num_clients != 1:
                    raise WireError(f"claims to hold {enc.num_clients} clients' updates")
                self.settings.weight(cid)
            except (WireError, ValueError, CKKSRoundAbort, _ckks().CKKSError) as exc:
                self._reject(cid, f"fit: encrypted update rejected: {exc}", failed, ctx, round)
                continue
            out[cid] = enc
            self._replies[cid] = ex.replies[cid]
        return out

    def _sum(
        self, encrypted: dict[int, Any], length: int, failed: dict[int, str], ctx: ServerContext, round: int
    ) -> tuple[Any, list[int]]:
        """Add the clients' ciphertexts one client at a time; a client whose ciphertexts are
        malformed (another scale, other primes, unloadable) is dropped, not allowed to abort the round."""
        ckks = _ckks()
        context, count = self._encryptor.context, self.settings.ciphertexts(length - 1)
        acc: list[Any] | None = None
        summed: list[int] = []
        for cid, enc in encrypted.items():
            try:
                if len(enc.ciphertexts) != count:
                    raise ckks.CKKSError(f"{len(enc.ciphertexts)} ciphertexts, expected {count}")
                blocks = [ckks._load(context, b, f"ciphertext {j}") for j, b in enumerate(enc.ciphertexts)]
                for j, block in enumerate(blocks):
                    ckks._check_block(context, block, f"ciphertext {j}")
                acc = blocks if acc is None else _add_all(acc, blocks)
            except ckks.CKKSError as exc:
                self._reject(cid, f"fit: encrypted update rejected: {exc}", failed, ctx, round)
                continue
            summed.append(cid)
        if acc is None or len(summed) < self.settings.min_clients:
            raise CKKSRoundAbort(f"only {len(summed)} usable encrypted updates, {self.settings.min_clients} needed")
        cts = [v.serialize() for v in acc]
        total = ckks.EncryptedVector(length, len(summed), self.fingerprint, ckks.EncryptedVector.compute_digest(cts),
                                     cts)
        return total, summed

    def _reject(self, cid: int, reason: str, failed: dict[int, str], ctx: ServerContext, round: int) -> None:
        failed[cid] = reason
        self._replies.pop(cid, None)
        ctx.log(f"round {round}: client {cid}: {reason}")

    def _decrypt(self, comm: Communicator, round: int, total: Any, check: bytes) -> Any:
        """The key holder releases the flooded sum and check; the server gets nothing else."""
        holder = self.settings.key_holder
        request = to_message(DECRYPT, round, holder, total, PREFIX)
        request.tensors["ckks/check"] = bytes_tensor(check)
        ex = comm.exchange({holder: request})
        reply = ex.replies.get(holder)
        if reply is None or reply.kind != PLAINTEXT or not {"ckks/sum", "ckks/sigmas", "ckks/check"} <= set(
            reply.tensors
        ):
            reason = ex.failed.get(holder, reply.meta.get("error") if reply else "no reply")
            raise CKKSRoundAbort(f"key holder client {holder} did not decrypt the aggregate ({reason})")
        blocks, slots = len(total.ciphertexts), self.settings.poly_modulus_degree // 2
        values = reply.tensors["ckks/sum"].double().numpy()
        sigmas = reply.tensors["ckks/sigmas"].double().numpy()
        check_values = reply.tensors["ckks/check"].double().numpy()
        check_sigma = reply.meta.get("check_sigma")
        shapes_ok = values.shape == (blocks, slots) and sigmas.shape == (blocks,) and check_values.shape == (slots,)
        if not shapes_ok or not isinstance(check_sigma, float) or not all(
            np.all(np.isfinite(a)) for a in (values, sigmas, check_values)
        ) or not np.all(sigmas > 0) or not check_sigma > 0:
            raise CKKSRoundAbort("the key holder's plaintext has the wrong size or non-finite values")
        return _ckks().Release(values, sigmas, check_values, check_sigma, float(reply.meta.get("noise_bits", 0.0)))

    # -- client ---------------------------------------------------------------------------
    def client_handlers(self) -> dict[str, Any]:
        """Key holder: keygen and decrypt; every client: store the public context."""
        return {KEYGEN: self._on_keygen, CONTEXT: _on_context, DECRYPT: self._on_decrypt}

    def client_finalize(self, update: Params, ctx: ClientContext) -> tuple[Params, dict[str, Any]]:
        """Encrypt ``[w/M * update, w/M]`` (clipped to ``+-clip``) under the key the fit instruction names."""
        spec = ctx.instructions.get("ckks")
        if not isinstance(spec, dict):
            raise CKKSRoundAbort(f"client {ctx.client_id}: the fit instruction carries no CKKS key fingerprint")
        public = ctx.state.get(_PUBLIC)
        if public is None or ctx.state.get(_FINGERPRINT) != spec["fingerprint"]:
            raise _ckks().CKKSError(
                f"client {ctx.client_id} holds no public context for key {str(spec['fingerprint'])[:12]}"
            )
        max_weight, clip = int(spec["max_weight"]), float(spec["clip"])
        scale = client_weight(ctx, str(spec["weighting"]), max_weight) / max_weight
        vector = np.append(np.clip(flatten_sorted(update).double().numpy() * scale, -clip, clip), scale)
        enc = _ckks().CKKSEncryptor(tensor_bytes(public)).encrypt(vector)
        msg = to_message(FIT_RESULT, ctx.round, ctx.client_id, enc, PREFIX)
        return msg.tensors, {**msg.meta, "num_examples": None, "metrics": {}}

    def _on_keygen(self, msg: Message, ctx: ClientContext) -> Message:
        """Key holder: a fresh key pair for this round (the previous one is forgotten); the public context only."""
        params, budget = msg.meta.get("ckks"), msg.meta.get("budget")
        if not isinstance(budget, int) or budget < 1:
            raise WireError("keygen request without a decryption budget")
        holder = _ckks().CKKSKeyHolder(_context_config(params), _flooding(params), budget)
        ctx.state[_SECRET] = bytes_tensor(holder.secret_context_bytes())
        ctx.state[_KEY_STATE] = {"params": params, "round": msg.round, "budget": budget, "decrypted": 0}
        return Message(PUBLIC_KEY, msg.round, ctx.client_id, {"fingerprint": holder.fingerprint},
                       {"ckks/context": bytes_tensor(holder.public_context_bytes())})

    def _on_decrypt(self, msg: Message, ctx: ClientContext) -> Message:
        """Key holder: release a sum of at least ``min_clients`` updates and its check, flooded, once per key."""
        key, secret = ctx.state.get(_KEY_STATE), ctx.state.get(_SECRET)
        if not isinstance(key, dict) or secret is None or key.get("round") != msg.round:
            raise _ckks().CKKSError(f"client {ctx.client_id} holds no CKKS secret key for round {msg.round}")
        enc = from_message(_ckks().EncryptedVector, msg, PREFIX, DECRYPT)
        if enc.num_clients < self.settings.min_clients:
            raise _ckks().CKKSError(
                f"refusing to decrypt a sum of {enc.num_clients} clients: at least {self.settings.min_clients} needed"
            )
        check = msg.tensors.get("ckks/check")
        if check is None:
            raise _ckks().CKKSError("decryption request without the projection check")
        holder = _ckks().CKKSKeyHolder.from_secret_bytes(
            tensor_bytes(secret), _context_config(key["params"]), _flooding(key["params"]), key["budget"],
            key["decrypted"],
        )
        try:
            release = holder.release(enc, check=tensor_bytes(check))
        finally:
            ctx.state[_KEY_STATE] = {**key, "decrypted": holder.decrypted}
        meta = {"check_sigma": float(release.check_sigma), "noise_bits": float(release.noise_bits)}
        tensors = {"ckks/sum": torch.from_numpy(release.values), "ckks/sigmas": torch.from_numpy(release.sigmas),
                   "ckks/check": torch.from_numpy(release.check)}
        return Message(PLAINTEXT, msg.round, ctx.client_id, meta, tensors)


def _add_all(acc: list[Any], blocks: list[Any]) -> list[Any]:
    """Add ``blocks`` into ``acc``; if one addition fails, undo the ones made and raise CKKSError."""
    for j, block in enumerate(blocks):
        try:
            acc[j].add_(block)
        except Exception as exc:
            for k in range(j):
                acc[k].sub_(blocks[k])
            raise _ckks().CKKSError(f"ciphertext {j}: cannot add ({exc})") from exc
    return acc


def _context_config(params: Any) -> Any:
    """CKKSContextConfig from the parameters sent by the server."""
    if not isinstance(params, dict):
        raise WireError("keygen request without CKKS parameters")
    return _ckks().CKKSContextConfig(
        int(params["poly_modulus_degree"]),
        tuple(int(b) for b in params["coeff_mod_bit_sizes"]),
        int(params["global_scale_bits"]),
    )


def _flooding(params: Any) -> Any:
    """The key holder's flooding, with the statistical security the run asks for (at least 30)."""
    bits = int(params.get("statistical_security", 40)) if isinstance(params, dict) else 40
    return _ckks().NoiseFlooding(max(bits, 30))


def _on_context(msg: Message, ctx: ClientContext) -> Message:
    """Store the key holder's public context (checked against its fingerprint)."""
    public = tensor_bytes(msg.tensors["ckks/context"])
    encryptor = _ckks().CKKSEncryptor(public)
    if encryptor.fingerprint != msg.meta.get("fingerprint"):
        raise _ckks().CKKSError("public context does not match its fingerprint")
    if encryptor.context.is_private():
        raise _ckks().CKKSError("the context holds a secret key: refused")
    ctx.state[_PUBLIC] = msg.tensors["ckks/context"]
    ctx.state[_FINGERPRINT] = encryptor.fingerprint
    return Message(CONTEXT_OK, msg.round, ctx.client_id, {"fingerprint": encryptor.fingerprint})


def _ckks() -> Any:
    """The CKKS module (imports TenSEAL on first use, so SecAgg works without it)."""
    from . import ckks

    return ckks
