"""SecAgg+ as an engine aggregator: the server learns the weighted sum of updates, nothing else.

One round is five exchanges through the communicator (each message kind can fail on its own,
as with :class:`~fedguard.runtime.base.FaultModel`):

==========================  ==================================  ==================================
server -> client            client does                         client -> server
==========================  ==================================  ==================================
``secagg/setup``            builds its SecAgg client from the    ``secagg/keys`` (X25519 publics,
(the round's SecAggConfig,  config it received; new key pairs,   Ed25519-signed)
directory fingerprint)      signed with its identity
``secagg/share_keys``       verifies the neighbours' signatures; ``secagg/shares`` (encrypted
(neighbours' public keys)   Shamir-shares its mask seed and      share pairs, one per neighbour)
                            mask key among its neighbours
``fit`` (global model +     opens its shares (rejects bad ones), ``fit_result`` carrying only the
its routed shares)          trains, runs the client steps,       masked ring vector and rejections
                            masks [w/M * update, saturation, w]
``secagg/consistency``      signs the survivor list              ``secagg/signature``
(survivor list)
``secagg/unmask``           checks t signatures of one list and  ``secagg/unmask_result``
(lists + signatures)        its own lists, reveals the shares
==========================  ==================================  ==================================

The client's round secrets (private keys, self-mask seed, received shares) live only in that
client's own state (``ctx.state``), never in the server process or a shared object; its long-term
identity key comes from its own key file (``secure.identities``), or, in a simulation, from the
experiment that enrolled every client. The server keeps the masked vectors until the masking
stage closes, then only their sum; the unmasked result is the sum over the clients whose masked
vectors arrived (less the excluded), even when some of them vanish before unmasking.

Encoding: each client sends ``w/M * update`` (``w`` its number of examples, ``M`` =
``secure.max_weight``), clipped to ``+-clip`` and quantized into ``Z_{2^ring_bits}``, plus a
saturation slot (the fraction of its coordinates that hit the clip) and its exact integer weight
``w``. The server divides the unmasked sum by the survivors' *registered* weights (the masked weight
slot is only compared with them) after clamping every coordinate to what ``n`` honest clients can
produce: weighted FedAvg that no client's weight claim can amplify.

Ring-domain client steps (distributed discrete DP): a :class:`RingNoise` in the settings runs in
:meth:`SecAggAggregator.client_finalize` after quantization and before masking, in this order::

    update -> clip to +-clip, quantize to levels 0..L -> + RingNoise.sample (int64) -> mask -> send

Families install one through :data:`RING_NOISE_HOOKS` (called when the aggregator is built, on
the server and on every client alike). The round's config keeps the top ``headroom_bits`` of the
ring free (``L = floor((2^(b-h) - 1) / n)``); the server reads the unmasked sum as the integer
nearest the middle of ``[0, n * L]``, so the sum of the clients' noise decodes exactly while
``|noise sum| < 2^(b-1) - n * L / 2``, and beyond that wraps modulo ``2^b`` (modular clipping:
choose ``ring_bits`` and ``headroom_bits`` so that this is negligible, as Kairouz et al. 2021 do).
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from fedguard.messages import Message
from fedguard.pipeline.base import AggregateResult, Aggregator, ClientContext, ServerContext
from fedguard.runtime.base import Communicator
from fedguard.types import Params, num_params

from .identity import Enrolment, IdentityError
from .protocol import (
    clear_state,
    client_weight,
    flatten_sorted,
    from_json,
    from_message,
    load_state,
    save_state,
    to_json,
    to_message,
    unflatten_sorted,
)
from .secagg import (
    AdvertiseKeys,
    ConsistencyRequest,
    ConsistencySignature,
    EncryptedShares,
    KeysBroadcast,
    MaskedInput,
    SecAggAbort,
    SecAggClient,
    SecAggClientState,
    SecAggConfig,
    SecAggServer,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from .wire import WireError

if TYPE_CHECKING:
    from fedguard.builders import BuildContext

SETUP, KEYS = "secagg/setup", "secagg/keys"
SHARE, SHARES = "secagg/share_keys", "secagg/shares"
CONSISTENCY, SIGNATURE = "secagg/consistency", "secagg/signature"
UNMASK, UNMASKED = "secagg/unmask", "secagg/unmask_result"
FIT_RESULT = "fit_result"
#: prefix of the protocol tensors in engine messages, and of the client's saved state
PREFIX = "secagg/"
_STATE_CONFIG, _STATE_CLIENT = "secagg/config/", "secagg/client/"


@dataclass(frozen=True)
class RingNoiseContext:
    """What a :class:`RingNoise` may read when a client samples its noise.

    Attributes:
        client: the client's context (id, round, state); not a source of randomness: noise that
            protects anything must come from a CSPRNG (``secrets``, ``os.urandom``).
        config: the round's public SecAgg config (ring bits, clip, clients, headroom).
        step: one quantization level in units of ``w/M * update`` (``2 * clip / L``).
        levels: ``L``, the largest quantized value one client contributes.
        weight: the client's FedAvg weight ``w``; ``max_weight`` is ``M``.
        length: how many coordinates the noise covers (the update's, not the saturation or weight slot).
    """

    client: ClientContext
    config: SecAggConfig
    step: float
    levels: int
    weight: int
    max_weight: int
    length: int


class RingNoise(Protocol):
    """Integer noise each client adds to its quantized update inside the SecAgg ring.

    The hook for distributed discrete DP (the discrete Gaussian or Skellam mechanisms of
    Kairouz et al. 2021 and Agarwal et al. 2021): the server unmasks only the sum of the
    clients' noisy vectors.
    """

    name: str
    #: top bits of the ring kept free for the sum of the noise (``0 <= h < ring_bits``)
    headroom_bits: int

    def bound(self, clients: int, levels: int) -> int:
        """Bound (in levels) on ``|sum of clients' noise|`` per coordinate that the server's range
        check allows; it must stay below ``2^(b-1) - clients * levels / 2``."""
        ...

    def sample(self, ctx: RingNoiseContext) -> np.ndarray:
        """This client's noise: ``ctx.length`` int64 values, in quantization levels."""
        ...


#: builders of the ring noise from the run's configuration (None: no noise); the first that
#: returns one wins. A family appends to it when its config section is registered.
RING_NOISE_HOOKS: list[Callable[[BuildContext], RingNoise | None]] = []


def build_ring_noise(ctx: BuildContext) -> RingNoise | None:
    """The ring noise the configuration asks for, or None."""
    for hook in RING_NOISE_HOOKS:
        noise = hook(ctx)
        if noise is not None:
            return noise
    return None


@dataclass(frozen=True)
class SecAggSettings:
    """What the server needs to announce a round (from the ``[secure]`` section).

    ``neighbours``/``threshold``/``min_survivors`` of ``None`` take the SecAgg+ defaults.
    ``ring_noise`` adds integer noise after quantization and before masking (see the module doc).
    ``registered`` are the clients' registered dataset sizes by id (what the server knows: the
    weights it divides by); ``enrolment`` the clients' long-term identities (the PKI): with it,
    keys are signed and the consistency check runs (the malicious-server variant).
    """

    clip: float = 1.0
    ring_bits: int = 32
    max_weight: int = 1
    weighting: str = "examples"
    neighbours: int | None = None
    threshold: int | None = None
    min_survivors: int | None = None
    min_clients: int = 1
    ring_noise: RingNoise | None = None
    registered: tuple[int, ...] = dataclasses.field(default=(), repr=False)
    enrolment: Enrolment | None = dataclasses.field(default=None, repr=False)

    def weight(self, client: int) -> int:
        """The FedAvg weight the server allows ``client``: its registered size (1 for uniform)."""
        if self.weighting == "uniform":
            return 1
        if not 0 <= client < len(self.registered):
            raise SecAggAbort(f"client {client} has no registered dataset size")
        return int(self.registered[client])

    def round_config(
        self, round: int, client_ids: list[int], vector_length: int, seed: bytes | None = None
    ) -> SecAggConfig:
        """The public SecAggConfig of one round (update + saturation slot, weighted).

        The round seed (which orders the neighbour graph) is fresh from the OS CSPRNG unless given:
        nobody can predict the graph before the round, and ``run.seed`` plays no part in it.
        """
        seed = secrets.token_bytes(32) if seed is None else seed
        config = SecAggConfig.create(
            client_ids,
            vector_length + 1,
            neighbours=self.neighbours,
            threshold=self.threshold,
            clip=self.clip,
            ring_bits=self.ring_bits,
            min_survivors=self.min_survivors,
            weighted=True,
            round_seed=seed,
            noise_headroom_bits=self.ring_noise.headroom_bits if self.ring_noise is not None else 0,
        )
        if self.min_survivors is None and self.min_clients > config.min_survivors:
            config = dataclasses.replace(config, min_survivors=min(self.min_clients, len(client_ids)))
        if self.max_weight > config.max_weight:
            raise ValueError(
                f"secure.max_weight={self.max_weight} does not fit a {self.ring_bits}-bit ring summed over "
                f"{len(client_ids)} clients (at most {config.max_weight}); raise secure.ring_bits"
            )
        return config

    def mean_error_bound(self, clients: int, weight_sum: float | None = None) -> float:
        """Bound on |SecAgg mean - exact weighted mean| per coordinate (no coordinate clipped).

        Each client rounds ``w/M * u`` to the nearest multiple of ``step = 2 * clip / L`` (``L``
        levels per client), so the sum of ``n`` is off by at most ``n * step / 2``; the mean
        multiplies it by ``M / W`` (``W`` the weight sum, at least ``n``): at most
        ``M * n * step / (2 * W)``, and ``M * step / 2`` whatever the weights.
        """
        config = self.round_config(0, list(range(max(clients, 2))), 1)
        total = float(clients if weight_sum is None else weight_sum)
        return self.max_weight * clients * config.quantizer.step / (2 * total)


class _Round:
    """The server side of one SecAgg+ round: the exchanges and what has failed so far."""

    def __init__(
        self, comm: Communicator, round: int, config: SecAggConfig, ctx: ServerContext, settings: SecAggSettings
    ) -> None:
        self.comm, self.round, self.config, self.ctx = comm, round, config, ctx
        directory = settings.enrolment.directory if settings.enrolment is not None else None
        self.server = SecAggServer(config, directory)
        self.failed: dict[int, str] = {}
        #: the accepted replies of the last exchange (the fit replies carry the client steps' metadata)
        self.last: dict[int, Message] = {}

    def exchange(self, messages: dict[int, Message], reply_kind: str, cls: type, stage: str) -> dict[int, Any]:
        """Send, collect, parse: each client's reply as a protocol message (bad ones count as failed)."""
        ex = self.comm.exchange(messages)
        for cid, reason in ex.failed.items():
            self.failed[cid] = f"{stage}: {reason}"
        parsed: dict[int, Any] = {}
        self.last = {}
        for cid in sorted(ex.replies):
            msg = ex.replies[cid]
            try:
                wire = from_message(cls, msg, PREFIX, reply_kind)
                if getattr(wire, "sender", cid) != cid or msg.round != self.round:
                    raise WireError("sender or round does not match the request")
            except (WireError, ValueError) as exc:
                self.failed[cid] = f"{stage}: reply rejected: {exc}"
                self.ctx.log(f"round {self.round}: secagg {stage} reply of client {cid} rejected: {exc}")
                continue
            parsed[cid] = wire
            self.last[cid] = msg
        return parsed

    def message(self, kind: str, cid: int, wire: Any, meta: dict[str, Any] | None = None) -> Message:
        return to_message(kind, self.round, cid, wire, PREFIX, meta)

    def left_out(self) -> None:
        """Record the clients the protocol's checks left out of the round, with the reason."""
        for cid, reason in self.server.refused.items():
            self.failed.setdefault(cid, f"secagg: {reason}")
            self.ctx.log(f"round {self.round}: secagg left client {cid} out: {reason}")


class SecAggAggregator(Aggregator):
    """Weighted FedAvg through SecAgg+: the server only ever holds masked vectors and their sum."""

    name = "secagg+"
    hides_individual_updates = True

    def __init__(self, settings: SecAggSettings) -> None:
        self.settings = settings

    # -- server ---------------------------------------------------------------------------
    def aggregate(
        self, comm: Communicator, round: int, fit_messages: dict[int, Message], like: Params, ctx: ServerContext
    ) -> AggregateResult:
        """Run the four stages; an abort leaves ``delta`` None with the reason."""
        ids = sorted(fit_messages)
        try:
            config = self.settings.round_config(round, ids, num_params(like))
        except ValueError as exc:
            return AggregateResult(None, [], {}, aborted=f"secure aggregation cannot start: {exc}")
        state = _Round(comm, round, config, ctx, self.settings)
        try:
            return self._run(state, fit_messages, like)
        except SecAggAbort as exc:
            return AggregateResult(None, [], state.failed, aborted=f"secure aggregation aborted: {exc}")

    def _run(self, st: _Round, fit_messages: dict[int, Message], like: Params) -> AggregateResult:
        enrolment = self.settings.enrolment
        meta = {"directory": enrolment.directory.fingerprint} if enrolment is not None else {}
        adverts = st.exchange({c: st.message(SETUP, c, st.config, meta) for c in fit_messages}, KEYS, AdvertiseKeys,
                              "setup")
        bcast = st.server.receive_keys(adverts.values())
        shares = st.exchange({c: st.message(SHARE, c, m) for c, m in bcast.items()}, SHARES, ShareKeys, "share")
        routed = st.server.receive_shares(shares.values())
        masked = st.exchange(self._fit_messages(fit_messages, routed), FIT_RESULT, MaskedInput, "fit")
        fit_replies = st.last
        for cid, m in masked.items():
            try:
                st.server.add_masked_input(m)
            except SecAggAbort as exc:
                st.failed[cid] = f"fit: masked input rejected: {exc}"
        st.server.close_masking()
        if st.server.signed:
            asks = st.server.consistency_requests()
            signatures = st.exchange({c: st.message(CONSISTENCY, c, m) for c, m in asks.items()}, SIGNATURE,
                                     ConsistencySignature, "consistency")
            st.server.receive_signatures(signatures.values())
        requests = st.server.unmask_requests()
        answers = st.exchange({c: st.message(UNMASK, c, m) for c, m in requests.items()}, UNMASKED,
                              UnmaskResponse, "unmask")
        if len(answers) < st.config.threshold:
            raise SecAggAbort(
                f"only {len(answers)} of {len(requests)} surviving clients answered the unmasking request; "
                f"the masks cannot be removed with fewer than t={st.config.threshold}"
            )
        result = st.server.finish(answers.values())
        st.left_out()
        return self._result(st, result, like, len(answers), [fit_replies[c] for c in result.survivors])

    def _fit_messages(self, fit_messages: dict[int, Message], routed: dict[int, EncryptedShares]) -> dict[int, Message]:
        """Each live client's fit instruction, with its routed shares and the encoding it must use."""
        out = {}
        for cid, shares in routed.items():
            fit = fit_messages[cid]
            spec = {"shares": to_json(shares), "weighting": self.settings.weighting,
                    "max_weight": self.settings.max_weight}
            out[cid] = Message(fit.kind, fit.round, cid, {**fit.meta, "secagg": spec}, fit.tensors)
        return out

    def _result(
        self, st: _Round, result: Any, like: Params, answered: int, replies: list[Message]
    ) -> AggregateResult:
        """The weighted mean update, and round figures, from the unmasked sum.

        ``replies`` are the survivors' masked fit replies: their metadata (what client steps
        report, e.g. DP accounting) goes on to the client steps and the ledger.
        """
        n_params, n = num_params(like), len(result.survivors)
        for cid in result.survivors:
            st.failed.pop(cid, None)  # in the sum: the round counts them, even if gone before unmasking
        weight = float(sum(self.settings.weight(c) for c in result.survivors))
        total, outside = self._range_checked(st.config, result.ring_sum[:n_params], n)
        mean = total * (self.settings.max_weight / weight)
        delta = unflatten_sorted(torch.from_numpy(mean), like)
        saturated = st.config.quantizer.dequantize_sum(result.ring_sum[n_params : n_params + 1], n)[0]
        metrics = {
            "secagg_survivors": float(n),
            "secagg_unmask_answers": float(answered),
            "secagg_excluded": float(len(st.server.excluded)),
            # the masked weight slot against the registered weights the mean divides by
            "secagg_weight_mismatch": float(int(result.ring_sum[-1]) != int(weight)),
            "secagg_out_of_range": float(outside),
            # mean share of coordinates clipped; rounded: the slot carries quantization noise of ~1e-9
            "secagg_saturated": round(min(1.0, max(0.0, float(saturated / (n * st.config.clip)))), 6),
        }
        return AggregateResult(delta, list(result.survivors), st.failed, weight, metrics, replies)

    def _range_checked(self, config: SecAggConfig, ring_sum: np.ndarray, n: int) -> tuple[np.ndarray, int]:
        """The unmasked sum of ``w/M * update``, every coordinate clamped to what ``n`` honest
        clients can produce (``[0, n*L]`` levels, widened by the ring noise's bound); and how many
        coordinates were outside (a hostile client)."""
        q = config.quantizer
        levels = q.centred(ring_sum, n)
        slack = self.settings.ring_noise.bound(n, q.levels) if self.settings.ring_noise is not None else 0
        low, high = -slack, n * q.levels + slack
        outside = int(np.count_nonzero((levels < low) | (levels > high)))
        return np.clip(levels, low, high).astype(np.float64) * q.step - n * q.clip, outside

    # -- client ---------------------------------------------------------------------------
    def client_handlers(self) -> dict[str, Any]:
        """The SecAgg stages a client answers besides ``fit``."""
        return {SETUP: self._on_setup, SHARE: self._on_share_keys, CONSISTENCY: self._on_consistency,
                UNMASK: self._on_unmask}

    def client_finalize(self, update: Params, ctx: ClientContext) -> tuple[Params, dict[str, Any]]:
        """Mask ``[w/M * update, saturation, w]`` with the shares routed in the fit instruction."""
        spec = ctx.instructions.get("secagg")
        if not isinstance(spec, dict):
            raise SecAggAbort(f"client {ctx.client_id}: the fit instruction carries no secagg shares")
        config, client = self._restore(ctx, 2)
        shares = from_json(EncryptedShares, spec["shares"])
        max_weight = int(spec["max_weight"])
        weight = client_weight(ctx, str(spec["weighting"]), max_weight)
        flat = flatten_sorted(update)
        vector = _encode(flat, weight, max_weight, config)
        noise = self._ring_noise(ctx, config, weight, max_weight, flat.numel())
        masked = client.mask_input(shares, vector, weight, noise=noise)
        save_state(ctx.state, _STATE_CLIENT, client.export_state())
        msg = to_message(FIT_RESULT, ctx.round, ctx.client_id, masked, PREFIX)
        # the weight and training metrics would reveal per-client values: they travel masked or not at all
        return msg.tensors, {**msg.meta, "num_examples": None, "metrics": {}}


    def _ring_noise(
        self, ctx: ClientContext, config: SecAggConfig, weight: int, max_weight: int, length: int
    ) -> np.ndarray | None:
        """This client's ring noise for the update coordinates, or None without a RingNoise."""
        noise = self.settings.ring_noise
        if noise is None:
            return None
        if config.noise_headroom_bits < noise.headroom_bits:
            raise SecAggAbort(
                f"client {ctx.client_id}: the round keeps {config.noise_headroom_bits} ring bits free, "
                f"{noise.name} needs {noise.headroom_bits}: refusing to add noise that could wrap"
            )
        q = config.quantizer
        sample = noise.sample(RingNoiseContext(ctx, config, q.step, q.levels, weight, max_weight, length))
        sample = np.asarray(sample)
        if sample.shape != (length,) or sample.dtype != np.int64:
            raise ValueError(f"{noise.name} returned {sample.dtype} {sample.shape}, expected int64 ({length},)")
        return sample


    def _identity(self, ctx: ClientContext) -> tuple[Any, Any]:
        """This client's signing key and the directory (None, None without a PKI)."""
        enrolment = self.settings.enrolment
        if enrolment is None:
            return None, None
        try:
            return enrolment.key(ctx.client_id), enrolment.directory
        except IdentityError as exc:
            raise SecAggAbort(str(exc)) from exc

    def _restore(self, ctx: ClientContext, stage: int) -> tuple[SecAggConfig, SecAggClient]:
        """This client's SecAgg config and client, as saved after the previous stage of this round."""
        if ctx.state.get("secagg/round") != ctx.round:
            raise SecAggAbort(f"client {ctx.client_id}: no SecAgg state for round {ctx.round} (missed the setup?)")
        config = load_state(ctx.state, _STATE_CONFIG, SecAggConfig)
        saved = load_state(ctx.state, _STATE_CLIENT, SecAggClientState)
        if config is None or saved is None or saved.stage != stage:
            raise SecAggAbort(f"client {ctx.client_id}: SecAgg state is not at stage {stage} of round {ctx.round}")
        return config, SecAggClient.restore(config, saved, *self._identity(ctx))

    def _on_setup(self, msg: Message, ctx: ClientContext) -> Message:
        """Stage 0: join the announced round with fresh key pairs; reply with the (signed) public keys."""
        config = from_message(SecAggConfig, msg, PREFIX, SETUP)
        enrolment = self.settings.enrolment
        if enrolment is not None and msg.meta.get("directory") != enrolment.directory.fingerprint:
            raise SecAggAbort(
                f"client {ctx.client_id}: the server's identity directory is not this client's "
                f"({str(msg.meta.get('directory'))[:16]} vs {enrolment.directory.fingerprint[:16]}): over the network, "
                "give every party the same secure.identities folder (python -m fedguard.secure.identity)"
            )
        client = SecAggClient(ctx.client_id, config, *self._identity(ctx))
        advert = client.advertise_keys()
        clear_state(ctx.state, PREFIX)
        ctx.state["secagg/round"] = msg.round
        save_state(ctx.state, _STATE_CONFIG, config)
        save_state(ctx.state, _STATE_CLIENT, client.export_state())
        return to_message(KEYS, msg.round, ctx.client_id, advert, PREFIX)

    def _on_share_keys(self, msg: Message, ctx: ClientContext) -> Message:
        """Stage 1: check the neighbours' key signatures; share the self-mask seed and mask key among them."""
        _, client = self._restore(ctx, 1)
        shares = client.share_keys(from_message(KeysBroadcast, msg, PREFIX, SHARE))
        save_state(ctx.state, _STATE_CLIENT, client.export_state())
        return to_message(SHARES, msg.round, ctx.client_id, shares, PREFIX)

    def _on_consistency(self, msg: Message, ctx: ClientContext) -> Message:
        """Stage 3: sign the survivor list (the consistency check of Bonawitz et al.)."""
        _, client = self._restore(ctx, 3)
        signature = client.sign_survivors(from_message(ConsistencyRequest, msg, PREFIX, CONSISTENCY))
        save_state(ctx.state, _STATE_CLIENT, client.export_state())
        return to_message(SIGNATURE, msg.round, ctx.client_id, signature, PREFIX)

    def _on_unmask(self, msg: Message, ctx: ClientContext) -> Message:
        """Stage 4: reveal the shares the server may have, then forget this round's secrets."""
        _, client = self._restore(ctx, 4 if self.settings.enrolment is not None else 3)
        response = client.unmask(from_message(UnmaskRequest, msg, PREFIX, UNMASK))
        clear_state(ctx.state, PREFIX)
        return to_message(UNMASKED, msg.round, ctx.client_id, response, PREFIX)


def _encode(update: torch.Tensor, weight: int, max_weight: int, config: SecAggConfig) -> np.ndarray:
    """``[M/w * (w/M * u), saturation * clip / w]``: after the client's ``* w`` this is ``[w/M u, sat*clip]``.

    ``mask_input`` multiplies the vector by the integer weight ``w`` before quantizing; dividing by
    ``M`` first keeps ``w/M * u`` within the clipping range whatever the dataset sizes.
    """
    scaled = update.double().numpy() / max_weight
    saturated = float(np.mean(np.abs(scaled * weight) > config.clip)) if scaled.size else 0.0
    return np.append(scaled, saturated * config.clip / weight)
