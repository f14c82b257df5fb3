"""SecAgg+ and FedAvg's weights under attack: a malicious server swapping keys, hostile clients
lying in the weight slot, sending garbage shares or claiming more examples than registered.

Each test plays the named adversary and fails against the code before the countermeasure (no
signatures, the masked weight slot or the claimed num_examples as the weight, garbage shares
aborting every round, a neighbour graph derived from run.seed).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_secure_pipeline import aggregate_once, make_server, max_diff

from fedguard.messages import Message
from fedguard.secure import attacks
from fedguard.secure.protocol import from_message, to_message
from fedguard.secure.secagg import KeysBroadcast, SecAggConfig


def test_key_swap_recovers_the_victims_update_without_signatures_and_fails_with_them() -> None:
    """Adversary: an active server that replaces a victim's neighbours' public keys with its own.
    Without a PKI every share of the victim is encrypted to the server, which unmasks the victim's
    update alone; with signed keys (Bonawitz et al.'s malicious-server variant) the victim refuses."""
    unsigned = attacks.secagg_key_swap(signed=False)
    assert unsigned.outcome == "succeeded" and unsigned.figures["victim_error"] < 1e-8
    signed = attacks.secagg_key_swap(signed=True)
    assert signed.outcome == "refused" and "do not carry its signature" in signed.detail


def test_engine_victim_refuses_swapped_keys_and_the_round_goes_on() -> None:
    """The same server, in the engine: it rewrites the key broadcast sent to client 2. Client 2
    refuses to share (its neighbours' signatures do not verify) and drops out; the others finish."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    def swap(msg: Message) -> Message:
        if msg.kind == "secagg/share_keys" and msg.client_id == 2:
            honest = from_message(KeysBroadcast, msg, "secagg/")
            fake = np.stack([np.frombuffer(X25519PrivateKey.generate().public_key().public_bytes_raw(), np.uint8)
                             for _ in honest.ids.tolist()])
            forged = KeysBroadcast(2, honest.ids, fake, fake[::-1].copy(), honest.signatures)
            return to_message(msg.kind, msg.round, 2, forged, "secagg/", {})
        return msg

    server, comm, _ = make_server("secure.mode=secagg")
    comm.request = swap
    record = server.run_round(1, False)
    assert record.aborted is None and record.completed == 5
    assert "do not carry its signature" in record.failed[2]


def test_neighbour_graph_is_not_predictable_from_run_seed() -> None:
    """Adversary: anyone who knows run.seed (it is in the run's config) and wants to know a
    round's SecAgg+ neighbourhoods in advance. The round seed now comes from the OS CSPRNG."""
    server, comm, _ = make_server("secure.mode=secagg", "data.num_clients=12", "secure.neighbours=4")
    settings = server.pipeline.aggregator.settings
    seeds = {settings.round_config(1, list(range(12)), 10).round_seed for _ in range(3)}
    assert len(seeds) == 3
    graphs = []
    for _ in range(2):
        server, comm, _ = make_server("secure.mode=secagg", "data.num_clients=12", "secure.neighbours=4")
        assert server.run_round(1, False).aborted is None
        setup = next(m for m in comm.requests if m.kind == "secagg/setup")
        graphs.append(from_message(SecAggConfig, setup, "secagg/").graph)
    assert graphs[0] != graphs[1]  # same run.seed, same round: different neighbourhoods


@pytest.mark.parametrize("name", ["secagg-weight-amplification", "secagg-weight-zero"])
def test_weight_slot_lies_are_contained_by_registered_weights(name: str) -> None:
    """Adversary: client 3 sets its masked weight slot so the unmasked weight sum is 1 (dividing
    by it amplified the sum 1,200 times) or 0 (the round aborted). The mean now divides by the
    survivors' registered weights and the slot is only compared."""
    result = attacks.run_scenario(name)
    assert result.outcome == "contained", result.detail


def test_weight_amplification_leaves_the_mean_as_the_honest_one() -> None:
    """With the slot lie, the aggregate is the honest secure aggregate (client 3's update itself is honest)."""
    clean_server, _, _ = make_server("secure.mode=secagg")
    clean = aggregate_once(clean_server)
    server, _, _ = make_server("secure.mode=secagg")
    settings = server.pipeline.aggregator.settings
    others = sum(settings.registered) - settings.registered[3]
    with attacks._hostile_masking(3, attacks._weight_slot(lambda w, bits: 1 - others)):
        hostile = aggregate_once(server)
    assert hostile.aborted is None and hostile.weight == clean.weight == 1200
    assert hostile.metrics["secagg_weight_mismatch"] == 1.0 and clean.metrics["secagg_weight_mismatch"] == 0.0
    assert max_diff(hostile.delta, clean.delta) == 0.0


def test_garbage_shares_from_one_client_exclude_it_not_the_round() -> None:
    """Adversary: client 3 sends share ciphertexts that do not open; the round used to abort at
    unmasking every time. Its neighbours reject them and the server excludes client 3."""
    result = attacks.secagg_garbage_shares()
    assert result.outcome == "contained", result.detail


def test_out_of_range_sum_is_clamped_to_what_honest_clients_can_produce() -> None:
    """Adversary: client 3 adds 2^31 levels to every coordinate (wrapping the ring). The server reads
    the sum centred on the honest range and clamps it there: each coordinate of the mean stays
    within n * clip * M / W, the most the honest population could move it (a single client can
    still use that whole range: bounding it to its own share needs per-client range proofs)."""
    server, _, _ = make_server("secure.mode=secagg")
    settings = server.pipeline.aggregator.settings

    def push(client, weight):
        out = np.zeros(client.config.ring_length, dtype=np.int64)
        out[:-2] = 2**31
        return out

    with attacks._hostile_masking(3, push):
        result = aggregate_once(server)
    assert result.aborted is None
    bound = 6 * settings.clip * settings.max_weight / 1200
    assert max(float(v.abs().max()) for v in result.delta.values()) <= bound * (1 + 1e-6)


def test_plaintext_fedavg_refuses_num_examples_above_the_registration() -> None:
    """Adversary: client 2 claims num_examples = 1e300 with its small update (one round took
    accuracy from 0.129 to 0.100). The server knows each client's registered size: the reply is
    refused, the other five are averaged."""
    result = attacks.fedavg_num_examples()
    assert result.outcome == "refused", result.detail
    plain, _, _ = make_server()
    honest = plain.run_round(1, False)
    assert honest.completed == 6 and not honest.failed


def test_robust_rules_check_the_registration_too() -> None:
    server, _, _ = make_server("robust.rule=median")
    assert server.pipeline.aggregator.registered is not None
    zeros = {k: torch.zeros_like(v) for k, v in server.params.items()}
    msg = Message("fit_result", 1, 0, {"num_examples": 10**9}, zeros)
    from fedguard.algorithms.fedavg import UpdateRejected, check_update

    with pytest.raises(UpdateRejected, match="registered dataset size"):
        check_update(msg, server.params, 1, max_examples=server.pipeline.aggregator.registered_size(0))


@pytest.mark.slow
def test_every_attack_scenario_is_refused_or_contained() -> None:
    """The scenario registry the attack harness runs: no attack succeeds."""
    results = {name: attacks.run_scenario(name) for name in attacks.SCENARIOS}
    assert {name: r.outcome for name, r in results.items() if r.outcome == "succeeded"} == {}
    assert all(r.outcome in ("refused", "contained") for r in results.values())
