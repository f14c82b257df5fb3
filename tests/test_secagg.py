"""Tests for fedguard.secure.secagg (SecAgg / SecAgg+)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedguard.secure.secagg import (
    AdvertiseKeys,
    EncryptedShares,
    KeysBroadcast,
    MaskedInput,
    SecAggAbort,
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    UnmaskRequest,
    UnmaskResponse,
    default_neighbours,
    encode_input,
    make_parties,
    neighbour_graph,
    prg_ring,
    run_secagg_round,
    simulate_round,
)

SEED = bytes(range(32))


def _inputs(cfg: SecAggConfig, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {u: rng.uniform(-1, 1, cfg.vector_length) for u in cfg.client_ids}


def _quantized_sum(cfg: SecAggConfig, inputs: dict[int, np.ndarray], ids) -> np.ndarray:
    total = sum(cfg.quantizer.quantize(inputs[u]).astype(np.uint64) for u in ids)
    return (total % 2**cfg.ring_bits).astype(cfg.quantizer.dtype)


def _check_exact(cfg, inputs, trace, survivors) -> None:
    res = trace.result
    assert res.survivors == tuple(sorted(survivors))
    np.testing.assert_array_equal(res.ring_sum, _quantized_sum(cfg, inputs, survivors))
    true = sum(inputs[u] for u in survivors)
    assert np.abs(res.total - true).max() <= cfg.quantizer.error_bound(len(survivors), False)


def test_prg_deterministic_and_ring_bits() -> None:
    a, b = prg_ring(SEED, 1000, 32), prg_ring(SEED, 1000, 32)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.uint32 and not np.array_equal(a, prg_ring(bytes(32), 1000, 32))
    small = prg_ring(SEED, 1000, 12)
    assert small.max() < 2**12
    np.testing.assert_array_equal(small, a & 0xFFF)
    assert prg_ring(SEED, 10, 64).dtype == np.uint64


def test_neighbour_graph_regular_symmetric_deterministic() -> None:
    ids = list(range(3, 103))
    g = neighbour_graph(ids, 8, SEED)
    assert g == neighbour_graph(ids, 8, SEED)
    assert g != neighbour_graph(ids, 8, bytes(32))
    for u, nbrs in g.items():
        assert len(nbrs) == 8 and u not in nbrs
        assert all(u in g[v] for v in nbrs)
    full = neighbour_graph(ids[:5], 4, SEED)
    assert all(len(v) == 4 for v in full.values())
    assert default_neighbours(100) == 22 and default_neighbours(10) == 9


def test_config_defaults_validation_and_wire() -> None:
    cfg = SecAggConfig.create(range(100), 7, round_seed=SEED)
    assert (cfg.neighbours, cfg.threshold, cfg.min_survivors) == (22, 12, 12)
    assert SecAggConfig.create(range(10), 7).neighbours == 9  # classic SecAgg
    assert SecAggConfig.create(range(20), 7, neighbours=5).neighbours == 6  # made even
    with pytest.raises(ValueError, match="threshold"):
        SecAggConfig.create(range(20), 7, neighbours=6, threshold=3)
    with pytest.raises(ValueError):
        SecAggConfig.create([1, 1], 7)
    meta, tensors = cfg.to_arrays()
    back = SecAggConfig.from_arrays(meta, tensors)
    assert dataclasses.astuple(back) == dataclasses.astuple(cfg)


def test_masks_cancel_without_dropouts() -> None:
    cfg = SecAggConfig.create(range(20), 500, neighbours=6, round_seed=SEED)
    clients, server = make_parties(cfg)
    inputs = _inputs(cfg)
    trace = simulate_round(clients, server, inputs)
    _check_exact(cfg, inputs, trace, cfg.client_ids)
    assert not trace.aborted and trace.result.dropped == ()


def test_100_clients_10pct_drop_after_masking() -> None:
    cfg = SecAggConfig.create(range(100), 1000)
    clients, server = make_parties(cfg)
    inputs = _inputs(cfg, 1)
    gone = set(range(0, 100, 10))
    trace = simulate_round(clients, server, inputs, drop_after_masking=gone)
    # they sent masked inputs, so they are in the sum; their self-masks come from neighbours
    _check_exact(cfg, inputs, trace, cfg.client_ids)
    assert set(trace.bytes_sent) == set(cfg.client_ids)


def test_100_clients_10pct_drop_before_masking() -> None:
    cfg = SecAggConfig.create(range(100), 1000)
    clients, server = make_parties(cfg)
    inputs = _inputs(cfg, 2)
    gone = set(range(5, 100, 10))
    out = run_secagg_round(clients, server, inputs, drop_before_masking=gone)
    survivors = [u for u in cfg.client_ids if u not in gone]
    np.testing.assert_array_equal(server._sum, _quantized_sum(cfg, inputs, survivors))
    assert np.abs(out - sum(inputs[u] for u in survivors)).max() < 1e-5


def test_classic_secagg_mixed_dropouts_and_odd_ids() -> None:
    ids = [7, 11, 19, 40, 41, 1000, 2**40, 5, 6, 12]
    cfg = SecAggConfig.create(ids, 64, round_seed=SEED)
    assert cfg.neighbours == 9
    clients, server = make_parties(cfg)
    inputs = _inputs(cfg, 3)
    trace = simulate_round(
        clients,
        server,
        inputs,
        drop_after_masking={7},
        drop_before_masking={40},
        drop_before_sharing={1000},
    )
    _check_exact(cfg, inputs, trace, [u for u in ids if u not in (40, 1000)])
    assert trace.result.dropped == (40,)


def test_below_global_threshold_aborts() -> None:
    cfg = SecAggConfig.create(range(10), 32)
    clients, server = make_parties(cfg)
    with pytest.raises(SecAggAbort, match="only 4 of 10 clients sent masked inputs.*5 needed"):
        run_secagg_round(clients, server, _inputs(cfg), drop_before_masking=set(range(6)))


def _neighbourhood_case() -> tuple[SecAggConfig, int, list[int]]:
    cfg = SecAggConfig.create(range(20), 16, neighbours=4, round_seed=SEED)
    u = 0
    return cfg, u, list(cfg.graph[u])


def test_too_few_shares_for_a_secret_aborts() -> None:
    cfg, u, nbrs = _neighbourhood_case()  # t = 3 of 4 neighbours
    clients, server = make_parties(cfg)
    with pytest.raises(SecAggAbort, match=f"client {u}: 2 shares received, 3 needed"):
        simulate_round(clients, server, _inputs(cfg), drop_after_masking=set(nbrs[:2]))
    clients, server = make_parties(cfg)
    with pytest.raises(SecAggAbort, match=f"of client {u}: only 2 of its neighbours"):
        simulate_round(clients, server, _inputs(cfg), drop_before_masking=set(nbrs[:2]))


def _run_to_masking(cfg: SecAggConfig, inputs, signed: bool = True):
    clients, server = make_parties(cfg, signed)
    keys = server.receive_keys([c.advertise_keys() for c in clients.values()])
    routed = server.receive_shares([clients[u].share_keys(m) for u, m in keys.items()])
    masked = {u: clients[u].mask_input(m, inputs[u]) for u, m in routed.items()}
    return clients, server, routed, masked


def test_server_sees_only_uniform_masked_vectors() -> None:
    cfg = SecAggConfig.create(range(6), 8192, round_seed=SEED)
    inputs = {u: np.zeros(8192) for u in cfg.client_ids}  # worst case: constant input
    _, server, _, masked = _run_to_masking(cfg, inputs)
    q = cfg.quantizer.quantize(inputs[0])
    for m in masked.values():
        y = m.masked
        assert np.mean(y == q) < 0.01
        hist = np.bincount((y >> 28).astype(np.int64), minlength=16)
        assert np.abs(hist - 512).max() < 6 * np.sqrt(512)  # ~uniform over Z_2^32
    for m in masked.values():
        server.add_masked_input(m)
    arrays = [v for v in vars(server).values() if isinstance(v, np.ndarray)]
    assert len(arrays) == 1  # only the running sum is kept, never an individual vector


def _unmask_request(req: UnmaskRequest, **changes) -> UnmaskRequest:
    fields = {k: getattr(req, k) for k in ("recipient", "survived", "dropped", "excluded", "num_survivors",
                                            "survivors", "signers", "signatures")}
    return UnmaskRequest(**{**fields, **changes})


def _run_to_unmask(cfg: SecAggConfig, signed: bool):
    clients, server, _, masked = _run_to_masking(cfg, _inputs(cfg), signed)
    for m in masked.values():
        server.add_masked_input(m)
    server.close_masking()
    if signed:
        server.receive_signatures([clients[u].sign_survivors(m) for u, m in server.consistency_requests().items()])
    return clients, server, server.unmask_requests()


def test_client_refuses_inconsistent_unmask_requests() -> None:
    cfg = SecAggConfig.create(range(8), 16, round_seed=SEED)
    clients, server, reqs = _run_to_unmask(cfg, signed=False)
    req = reqs[0]
    with pytest.raises(SecAggAbort, match="both survived and dropped"):
        clients[0].unmask(_unmask_request(req, dropped=req.survived[:1]))
    # a client answers only one request, so it can never reveal both shares of a client
    with pytest.raises(SecAggAbort, match="out of order"):
        clients[0].unmask(req)
    with pytest.raises(SecAggAbort, match="do not match"):
        clients[1].unmask(_unmask_request(reqs[1], survived=reqs[1].survived[1:]))
    with pytest.raises(SecAggAbort, match="survivors claimed"):
        clients[2].unmask(_unmask_request(reqs[2], survived=reqs[2].survived[:1], dropped=reqs[2].survived[1:],
                                          num_survivors=2))
    resp = clients[3].unmask(reqs[3])
    assert isinstance(resp, UnmaskResponse) and len(resp.b_owners) == 7 and len(resp.s_owners) == 0


def test_signed_client_refuses_views_without_t_matching_signatures() -> None:
    """Adversary: a server that shows clients different survivor lists (to collect both shares of
    one client) or forges the consistency signatures. With the PKI each client needs t survivors'
    signatures of the very list the request follows from."""
    cfg = SecAggConfig.create(range(8), 16, round_seed=SEED)
    clients, server, reqs = _run_to_unmask(cfg, signed=True)
    req = reqs[0]
    # claim client 5 dropped: the lists no longer follow from the signed survivor list
    gone = req.survived[req.survived != 5]
    with pytest.raises(SecAggAbort, match="contradicts the signed survivor list"):
        clients[0].unmask(_unmask_request(req, survived=gone, dropped=np.array([5])))
    # a survivor list without client 5, with signatures over the real one
    lie = req.survivors[req.survivors != 5]
    with pytest.raises(SecAggAbort, match="contradicts|verify"):
        clients[1].unmask(_unmask_request(reqs[1], survivors=lie, survived=reqs[1].survived[reqs[1].survived != 5],
                                          dropped=np.array([5]), num_survivors=7))
    # too few signatures, or one forged
    with pytest.raises(SecAggAbort, match="verify"):
        clients[2].unmask(_unmask_request(reqs[2], signers=reqs[2].signers[:3], signatures=reqs[2].signatures[:3]))
    forged = reqs[3].signatures.copy()
    forged[0, 0] ^= 1
    with pytest.raises(SecAggAbort, match="verify"):
        clients[3].unmask(_unmask_request(reqs[3], signatures=forged))
    resp = clients[4].unmask(reqs[4])
    assert len(resp.b_owners) == 7


def test_garbage_share_ciphertext_excludes_its_sender_not_the_round() -> None:
    """Adversary: client 0 sends its neighbours share ciphertexts that do not open. Each recipient
    rejects them and leaves client 0 out of its masks; the server excludes client 0 and the round
    sums the others exactly (it used to abort every round at unmasking)."""
    cfg = SecAggConfig.create(range(6), 16, round_seed=SEED)
    for signed in (False, True):
        clients, server = make_parties(cfg, signed)
        keys = server.receive_keys([c.advertise_keys() for c in clients.values()])
        shares = [clients[u].share_keys(m) for u, m in keys.items()]
        shares[0].ciphertexts[:, 20:] ^= 0x5A  # garbage under every recipient's key
        routed = server.receive_shares(shares)
        inputs = _inputs(cfg)
        masked = {u: clients[u].mask_input(routed[u], inputs[u]) for u in routed}
        assert all(m.rejected.tolist() == [0] for u, m in masked.items() if u != 0)
        for m in masked.values():
            server.add_masked_input(m)
        assert server.close_masking() == [1, 2, 3, 4, 5] and server.excluded == {0}
        if signed:
            server.receive_signatures([clients[u].sign_survivors(m) for u, m in server.consistency_requests().items()])
        reqs = server.unmask_requests()
        result = server.finish([clients[u].unmask(m) for u, m in reqs.items()])
        np.testing.assert_array_equal(result.ring_sum, _quantized_sum(cfg, inputs, [1, 2, 3, 4, 5]))
        assert "excluded" in server.refused[0]


def test_exclusion_cover_blames_the_client_with_most_complaints() -> None:
    from fedguard.secure.secagg import exclusion_cover

    assert exclusion_cover({1: {0}, 2: {0}, 3: {0}}) == {0}  # 0's shares fail at three neighbours
    assert exclusion_cover({0: {1, 2, 3}}) == {0}  # 0 complains about three neighbours
    assert exclusion_cover({1: {0}}) == {0, 1}  # one complaint: cannot tell who lies
    assert exclusion_cover({}) == set()


def test_one_malicious_complainer_costs_at_most_one_honest_client() -> None:
    """Adversary: client 0 claims every neighbour's shares failed (it can't prove or disprove
    that): the cover excludes client 0 only, and the others' sum is exact."""
    cfg = SecAggConfig.create(range(6), 16, round_seed=SEED)
    clients, server, routed, masked = _run_to_masking(cfg, _inputs(cfg, 1))
    masked[0] = MaskedInput(0, masked[0].masked, routed[0].senders.copy())
    for m in masked.values():
        server.add_masked_input(m)
    assert server.close_masking() == [1, 2, 3, 4, 5]
    server.receive_signatures([clients[u].sign_survivors(m) for u, m in server.consistency_requests().items()])
    reqs = server.unmask_requests()
    result = server.finish([clients[u].unmask(m) for u, m in reqs.items()])
    np.testing.assert_array_equal(result.ring_sum, _quantized_sum(cfg, _inputs(cfg, 1), [1, 2, 3, 4, 5]))


def test_client_rejects_bad_key_broadcast() -> None:
    cfg = SecAggConfig.create(range(20), 8, neighbours=4, round_seed=SEED)
    clients, server = make_parties(cfg, signed=False)
    keys = server.receive_keys([c.advertise_keys() for c in clients.values()])
    k0 = keys[0]
    dup = KeysBroadcast(0, k0.ids, k0.c_pks, np.repeat(k0.s_pks[:1], len(k0.ids), axis=0), k0.signatures)
    with pytest.raises(SecAggAbort, match="not all distinct"):
        clients[0].share_keys(dup)
    few = KeysBroadcast(1, keys[1].ids[:2], keys[1].c_pks[:2], keys[1].s_pks[:2], keys[1].signatures[:2])
    with pytest.raises(SecAggAbort, match="only 2 of its 4 neighbours advertised keys"):
        clients[1].share_keys(few)
    stranger = next(v for v in range(20) if v not in cfg.graph[2] and v != 2)
    fake = KeysBroadcast(2, np.array([stranger, *keys[2].ids[1:]]), keys[2].c_pks, keys[2].s_pks, keys[2].signatures)
    with pytest.raises(SecAggAbort, match="non-neighbours"):
        clients[2].share_keys(fake)


def test_server_leaves_out_malformed_messages() -> None:
    cfg = SecAggConfig.create(range(4), 8, round_seed=SEED)
    clients, server = make_parties(cfg)
    adv = [c.advertise_keys() for c in clients.values()]
    SecAggServer(cfg).receive_keys(adv + adv[:1])  # a repeat is left out, not an abort
    bad_sig = AdvertiseKeys(3, adv[3].c_pk, adv[3].s_pk, bytes(64))
    keys = server.receive_keys([*adv[:3], bad_sig])
    assert set(keys) == {0, 1, 2} and "signature" in server.refused[3]
    routed = server.receive_shares([clients[u].share_keys(m) for u, m in keys.items()])
    server.add_masked_input(clients[0].mask_input(routed[0], np.zeros(8)))
    with pytest.raises(SecAggAbort, match="expected uint32"):
        server.add_masked_input(MaskedInput(1, np.zeros(9, np.uint32), np.zeros(0, np.int64)))
    with pytest.raises(SecAggAbort, match="unexpected or repeated"):
        server.add_masked_input(MaskedInput(99, np.zeros(9, np.uint32), np.zeros(0, np.int64)))
    with pytest.raises(SecAggAbort, match="sent it nothing"):
        server.add_masked_input(MaskedInput(1, np.zeros(8, np.uint32), np.array([3])))


def test_weighted_fedavg() -> None:
    cfg = SecAggConfig.create(range(12), 100, clip=600.0, weighted=True, round_seed=SEED)
    clients, server = make_parties(cfg)
    inputs = _inputs(cfg, 4)
    weights = {u: 50 * (u + 1) for u in cfg.client_ids}
    trace = simulate_round(clients, server, inputs, drop_before_masking={3}, weights=weights)
    live = [u for u in cfg.client_ids if u != 3]
    res = trace.result
    assert res.weight_sum == sum(weights[u] for u in live)
    expected = sum(weights[u] * inputs[u] for u in live) / res.weight_sum
    assert np.abs(res.mean() - expected).max() < 1e-5
    with pytest.raises(ValueError, match="weight"):
        encode_input(cfg, inputs[0])


def test_stochastic_rounding_and_16_bit_ring() -> None:
    cfg = SecAggConfig.create(range(10), 200, ring_bits=16, round_seed=SEED)
    clients, server = make_parties(cfg)
    inputs = _inputs(cfg, 5)
    trace = simulate_round(clients, server, inputs, drop_after_masking={2}, rng=np.random.default_rng(0))
    err = np.abs(trace.result.total - sum(inputs.values())).max()
    assert err < cfg.quantizer.error_bound(10, stochastic=True)


def test_messages_roundtrip_and_byte_accounting() -> None:
    cfg = SecAggConfig.create(range(30), 1000, round_seed=SEED)
    clients, server = make_parties(cfg)
    trace = simulate_round(clients, server, _inputs(cfg), drop_before_masking={4})
    sent = trace.bytes_sent[0]
    assert 4000 < sent < 4000 + 22 * 400  # masked vector dominates; shares ~160 B each
    m = AdvertiseKeys(3, b"a" * 32, b"b" * 32, b"s" * 64)
    back = AdvertiseKeys.from_arrays(*m.to_arrays())
    assert (back.sender, back.c_pk, back.s_pk) == (3, m.c_pk, m.s_pk)
    with pytest.raises(ValueError):
        MaskedInput.from_arrays(*m.to_arrays())


def test_client_not_selected_and_stage_order() -> None:
    cfg = SecAggConfig.create(range(4), 8, round_seed=SEED)
    with pytest.raises(ValueError):
        SecAggClient(9, cfg)
    c = SecAggClient(0, cfg)
    with pytest.raises(SecAggAbort, match="out of order"):
        c.mask_input(EncryptedShares(0, np.zeros(0, np.int64), np.zeros((0, 160), np.uint8)), np.zeros(8))


def test_messages_fit_the_engine_message_format() -> None:
    torch = pytest.importorskip("torch")
    messages = pytest.importorskip("fedguard.messages")
    cfg = SecAggConfig.create(range(4), 8, round_seed=SEED)
    clients, server = make_parties(cfg)
    keys = server.receive_keys([c.advertise_keys() for c in clients.values()])
    routed = server.receive_shares([clients[u].share_keys(m) for u, m in keys.items()])
    masked = clients[0].mask_input(routed[0], np.linspace(-1, 1, 8))
    for msg in (cfg, keys[0], routed[0], masked):
        meta, tensors = msg.to_arrays()
        wire = messages.Message("secagg", 1, 0, meta, {k: torch.from_numpy(v) for k, v in tensors.items()})
        back = messages.Message.from_bytes(wire.to_bytes())
        again = type(msg).from_arrays(back.meta, {k: v.numpy() for k, v in back.tensors.items()})
        assert again.to_arrays()[0] == meta
    np.testing.assert_array_equal(again.masked, masked.masked)
