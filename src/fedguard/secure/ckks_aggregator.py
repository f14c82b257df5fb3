"""CKKS homomorphic encryption as an engine aggregator: the server adds ciphertexts it cannot read.

Key management (single key holder, as TenSEAL offers no threshold CKKS): one designated client,
the *key holder* (``secure.key_holder``), generates the CKKS key pair on the first request and
keeps the secret key in its own state. Per round:

============================  ========================================  ===========================
server -> client              client does                               client -> server
============================  ========================================  ===========================
``ckks/keygen`` (key holder,  makes (or reloads) its key pair           ``ckks/public_key`` (public
once; CKKS parameters)                                                  context, no secret key)
``ckks/context`` (each client stores the public context                ``ckks/context_ok``
the first time it is sampled)
``fit`` (global model + key   trains, runs the client steps, encrypts   ``fit_result`` carrying only
fingerprint)                  ``[w/M * update, w/M]`` under the key     ciphertexts
``ckks/decrypt`` (key holder; decrypts the sum after checking the        ``ckks/plaintext`` (the
the summed ciphertexts)       check slots count the summed clients       aggregate only)
============================  ========================================  ===========================

The server sums the ciphertexts (it holds the public key only) and divides the decrypted sum by
the decrypted weight sum. What each party learns, and what a colluding server and key holder
learn (everything), is in ``docs/secure.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
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


class CKKSRoundAbort(RuntimeError):
    """The round cannot finish (no key, the key holder is gone, ciphertexts do not add up)."""


@dataclass(frozen=True)
class CKKSSettings:
    """The ``[secure]`` values the CKKS aggregator uses.

    ``min_clients`` is the key holder's own rule: it refuses to decrypt a sum of fewer clients.
    """

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 60)
    global_scale_bits: int = 40
    key_holder: int = 0
    max_weight: int = 1
    weighting: str = "examples"
    min_clients: int = 2

    def params(self) -> dict[str, Any]:
        """The CKKS parameters as sent to the key holder."""
        return {
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "global_scale_bits": self.global_scale_bits,
        }

    def value_limit(self, clients: int) -> float:
        """Largest |value| one of ``clients`` may encrypt so that the sum stays decodable.

        The first data prime leaves ``bits0 - scale_bits`` bits above the scale for the integer
        part of a slot, one of them the sign; each client gets an equal share of that range.
        """
        headroom = self.coeff_mod_bit_sizes[0] - self.global_scale_bits - 1
        return 2.0**headroom / max(clients, 1)


class CKKSAggregator(Aggregator):
    """Weighted FedAvg over CKKS ciphertexts; only the key holder can decrypt, and only sums."""

    name = "ckks"
    hides_individual_updates = True

    def __init__(self, settings: CKKSSettings) -> None:
        self.settings = settings
        self._public: bytes | None = None
        self._encryptor: Any = None
        self._has_context: set[int] = set()
        self._replies: dict[int, Message] = {}

    @property
    def fingerprint(self) -> str | None:
        """The key fingerprint in use (None before the key holder answered)."""
        return None if self._encryptor is None else self._encryptor.fingerprint

    # -- server ---------------------------------------------------------------------------
    def aggregate(
        self, comm: Communicator, round: int, fit_messages: dict[int, Message], like: Params, ctx: ServerContext
    ) -> AggregateResult:
        """Keys, contexts, encrypted fit, homomorphic sum, decryption by the key holder."""
        failed: dict[int, str] = {}
        self._replies = {}
        try:
            self._ensure_keys(comm, round)
            targets = self._deliver_context(comm, round, sorted(fit_messages), failed)
            encrypted = self._collect(comm, round, fit_messages, targets, num_params(like) + 1, failed, ctx)
            if not encrypted:
                raise CKKSRoundAbort("no client returned a usable encrypted update")
            total = self._encryptor.aggregate(list(encrypted.values()), num_params(like) + 1)
            plain = self._decrypt(comm, round, total)
        except (CKKSRoundAbort, _ckks().CKKSError) as exc:
            return AggregateResult(None, [], failed, aborted=f"CKKS aggregation aborted: {exc}")
        n = num_params(like)
        if not plain[n] > 0:
            reason = "CKKS aggregation aborted: the decrypted weight sum is not positive"
            return AggregateResult(None, [], failed, aborted=reason)
        delta = unflatten_sorted(torch.from_numpy(plain[:n] / plain[n]), like)
        weight = float(plain[n] * self.settings.max_weight)
        metrics = {"ckks_clients": float(len(encrypted)), "ckks_ciphertexts": float(len(total.ciphertexts))}
        replies = [self._replies[c] for c in sorted(encrypted)]  # ciphertexts + the client steps' metadata
        return AggregateResult(delta, sorted(encrypted), failed, weight, metrics, replies)

    def _ensure_keys(self, comm: Communicator, round: int) -> None:
        """Ask the key holder for the public context once (it keeps the same keys across rounds)."""
        if self._encryptor is not None:
            return
        holder = self.settings.key_holder
        ex = comm.exchange({holder: Message(KEYGEN, round, holder, {"ckks": self.settings.params()})})
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
        self._public, self._encryptor, self._has_context = public, encryptor, set()

    def _deliver_context(self, comm: Communicator, round: int, ids: list[int], failed: dict[int, str]) -> list[int]:
        """Send the public context to sampled clients that do not have it yet; the ones ready to encrypt."""
        assert self._public is not None
        todo = [c for c in ids if c not in self._has_context]
        if todo:
            payload = {"ckks/context": bytes_tensor(self._public)}
            meta = {"fingerprint": self.fingerprint}
            ex = comm.exchange({c: Message(CONTEXT, round, c, meta, payload) for c in todo})
            for cid, reason in ex.failed.items():
                failed[cid] = f"context: {reason}"
            for cid, msg in ex.replies.items():
                if msg.kind == CONTEXT_OK and msg.meta.get("fingerprint") == self.fingerprint:
                    self._has_context.add(cid)
                else:
                    failed[cid] = "context: the client did not confirm the public key"
        return [c for c in ids if c in self._has_context]

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
                "max_weight": self.settings.max_weight, "clients": len(targets)}
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
            except (WireError, ValueError, _ckks().CKKSError) as exc:
                failed[cid] = f"fit: encrypted update rejected: {exc}"
                ctx.log(f"round {round}: encrypted update of client {cid} rejected: {exc}")
                continue
            out[cid] = enc
            self._replies[cid] = ex.replies[cid]
        return out

    def _decrypt(self, comm: Communicator, round: int, total: Any) -> np.ndarray:
        """The key holder decrypts the sum; the server gets the aggregate only."""
        holder = self.settings.key_holder
        request = to_message(DECRYPT, round, holder, total, PREFIX)
        ex = comm.exchange({holder: request})
        reply = ex.replies.get(holder)
        if reply is None or reply.kind != PLAINTEXT or "ckks/sum" not in reply.tensors:
            reason = ex.failed.get(holder, reply.meta.get("error") if reply else "no reply")
            raise CKKSRoundAbort(f"key holder client {holder} did not decrypt the aggregate ({reason})")
        plain = reply.tensors["ckks/sum"].double().numpy()
        if plain.shape != (total.length,) or not np.all(np.isfinite(plain)):
            raise CKKSRoundAbort("the key holder's plaintext has the wrong size or non-finite values")
        return plain

    # -- client ---------------------------------------------------------------------------
    def client_handlers(self) -> dict[str, Any]:
        """Key holder: keygen and decrypt; every client: store the public context."""
        return {KEYGEN: self._on_keygen, CONTEXT: _on_context, DECRYPT: self._on_decrypt}

    def client_finalize(self, update: Params, ctx: ClientContext) -> tuple[Params, dict[str, Any]]:
        """Encrypt ``[w/M * update, w/M]`` under the key the fit instruction names."""
        spec = ctx.instructions.get("ckks")
        if not isinstance(spec, dict):
            raise CKKSRoundAbort(f"client {ctx.client_id}: the fit instruction carries no CKKS key fingerprint")
        public = ctx.state.get(_PUBLIC)
        if public is None or ctx.state.get(_FINGERPRINT) != spec["fingerprint"]:
            raise _ckks().CKKSError(
                f"client {ctx.client_id} holds no public context for key {str(spec['fingerprint'])[:12]}"
            )
        max_weight = int(spec["max_weight"])
        scale = client_weight(ctx, str(spec["weighting"]), max_weight) / max_weight
        vector = np.append(flatten_sorted(update).double().numpy() * scale, scale)
        limit = self.settings.value_limit(int(spec["clients"]))
        peak = float(np.abs(vector).max())
        if not peak < limit:
            raise _ckks().CKKSError(
                f"client {ctx.client_id}: update value {peak:.3g} exceeds {limit:.3g}, the most the CKKS "
                "parameters can sum for this many clients; clip updates or raise the first coefficient prime"
            )
        enc = _ckks().CKKSEncryptor(tensor_bytes(public)).encrypt(vector)
        msg = to_message(FIT_RESULT, ctx.round, ctx.client_id, enc, PREFIX)
        return msg.tensors, {**msg.meta, "num_examples": None, "metrics": {}}

    def _on_keygen(self, msg: Message, ctx: ClientContext) -> Message:
        """Key holder: make (first time) or reload the key pair; send the public context only."""
        holder = self._holder(ctx, msg.meta.get("ckks"))
        if holder is None:
            holder = _ckks().CKKSKeyHolder(self._context_config(msg.meta.get("ckks")))
            ctx.state[_SECRET] = bytes_tensor(holder.secret_context_bytes())
            ctx.state["ckks/params"] = msg.meta.get("ckks")
        public = holder.public_context_bytes()
        return Message(PUBLIC_KEY, msg.round, ctx.client_id, {"fingerprint": holder.fingerprint},
                       {"ckks/context": bytes_tensor(public)})

    def _on_decrypt(self, msg: Message, ctx: ClientContext) -> Message:
        """Key holder: decrypt a sum of at least ``min_clients`` updates (check slots verify the count)."""
        holder = self._holder(ctx, ctx.state.get("ckks/params"))
        if holder is None:
            raise _ckks().CKKSError(f"client {ctx.client_id} holds no CKKS secret key")
        enc = from_message(_ckks().EncryptedVector, msg, PREFIX, DECRYPT)
        if enc.num_clients < self.settings.min_clients:
            raise _ckks().CKKSError(
                f"refusing to decrypt a sum of {enc.num_clients} clients: at least {self.settings.min_clients} needed"
            )
        plain = holder.decrypt(enc)
        return Message(PLAINTEXT, msg.round, ctx.client_id, {}, {"ckks/sum": torch.from_numpy(plain)})

    def _holder(self, ctx: ClientContext, params: Any) -> Any:
        """The key holder saved in this client's state for ``params``, or None."""
        secret = ctx.state.get(_SECRET)
        if secret is None or ctx.state.get("ckks/params") != params:
            return None
        return _ckks().CKKSKeyHolder.from_secret_bytes(tensor_bytes(secret), self._context_config(params))

    @staticmethod
    def _context_config(params: Any) -> Any:
        """CKKSContextConfig from the parameters sent by the server."""
        if not isinstance(params, dict):
            raise WireError("keygen request without CKKS parameters")
        return _ckks().CKKSContextConfig(
            int(params["poly_modulus_degree"]),
            tuple(int(b) for b in params["coeff_mod_bit_sizes"]),
            int(params["global_scale_bits"]),
        )


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
