"""The ring-domain client step of SecAgg+: integer noise after quantization, before masking.

The hook that distributed discrete DP (issue 13) builds on: its placement (after quantization,
before masking), exact decoding of the noisy sum within the reserved headroom, and modular
clipping beyond it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from test_secure_pipeline import aggregate_once, make_server, plain_round  # noqa: F401  (fixture)

from fedguard.pipeline.base import ClientContext
from fedguard.secure.quantize import Quantizer
from fedguard.secure.secagg import SecAggAbort, SecAggConfig, make_parties, simulate_round
from fedguard.secure.secagg_aggregator import RING_NOISE_HOOKS, RingNoiseContext

SEED = bytes(range(32))


def test_headroom_keeps_top_bits_free_and_sums_below_zero_read_as_negative() -> None:
    q0, q2 = Quantizer(1.0, 32, 10), Quantizer(1.0, 32, 10, headroom_bits=2)
    assert q2.levels == ((1 << 30) - 1) // 10 and q0.levels == ((1 << 32) - 1) // 10
    n, mid = 10, 10 * q2.levels // 2
    sums = np.array([0, 5, n * q2.levels, 2**32 - 7, mid], dtype=np.uint64)
    np.testing.assert_array_equal(q2.centred(sums, n), [0, 5, n * q2.levels, -7, mid])
    assert q2.dequantize_sum(np.array([2**32 - 7], dtype=np.uint32), n)[0] == pytest.approx(-7 * q2.step - n)


def _noise(cfg: SecAggConfig, rng: np.random.Generator) -> dict[int, np.ndarray]:
    return {u: rng.integers(-(2**20), 2**20, cfg.ring_length, dtype=np.int64) for u in cfg.client_ids}


def test_noise_added_after_quantization_decodes_exactly_with_dropouts() -> None:
    cfg = SecAggConfig.create(range(12), 300, neighbours=6, round_seed=SEED, noise_headroom_bits=4)
    clients, server = make_parties(cfg)
    rng = np.random.default_rng(0)
    inputs = {u: rng.uniform(-1, 1, 300) for u in cfg.client_ids}
    noise = _noise(cfg, rng)
    gone_before, gone_after = {3}, {7}

    class Noisy:  # each client masks its quantized input plus its noise
        def __init__(self, c):
            self.c, self.client_id = c, c.client_id

        def __getattr__(self, name):
            return getattr(self.c, name)

        def mask_input(self, msg, vector, weight=None, rng=None):
            return self.c.mask_input(msg, vector, weight, rng, noise=noise[self.client_id][:300])

    trace = simulate_round({u: Noisy(c) for u, c in clients.items()}, server, inputs,
                           drop_after_masking=gone_after, drop_before_masking=gone_before)
    live = [u for u in cfg.client_ids if u not in gone_before]
    q = cfg.quantizer
    exact = sum(q.quantize(inputs[u]).astype(np.int64) + noise[u][:300] for u in live)
    np.testing.assert_array_equal(q.centred(trace.result.ring_sum, len(live)), exact)


def test_noise_beyond_the_headroom_wraps_modulo_the_ring() -> None:
    """Modular clipping: the noisy sum decodes exactly inside [n*L/2 - 2^(b-1), n*L/2 + 2^(b-1))
    (so always while |noise sum| < 2^(b-1) - n*L/2) and comes back shifted by 2^b outside it."""
    cfg = SecAggConfig.create(range(3), 4, round_seed=SEED, ring_bits=16, noise_headroom_bits=2)
    q = cfg.quantizer
    clients, server = make_parties(cfg, signed=False)
    inputs = {u: np.zeros(4) for u in cfg.client_ids}
    base = 3 * int(q.quantize(np.zeros(1))[0])
    low, high = 3 * q.levels // 2 - 2**15, 3 * q.levels // 2 + 2**15  # the decodable window
    assert 2**15 - 3 * q.levels // 2 > 2**14  # the guaranteed margin is a quarter of the ring or more
    totals = np.array([high - 1, high, low, low - 1], dtype=np.int64)
    noise = {0: totals - base, 1: np.zeros(4, np.int64), 2: np.zeros(4, np.int64)}
    keys = server.receive_keys([c.advertise_keys() for c in clients.values()])
    routed = server.receive_shares([clients[u].share_keys(m) for u, m in keys.items()])
    masked = [clients[u].mask_input(routed[u], inputs[u], noise=noise[u]) for u in cfg.client_ids]
    reqs = server.receive_masked_inputs(masked)
    result = server.finish([clients[u].unmask(reqs[u]) for u in reqs])
    np.testing.assert_array_equal(q.centred(result.ring_sum, 3), [high - 1, high - 2**16, low, low - 1 + 2**16])


@dataclass
class ConstantNoise:
    """Client c adds (c + 1) * per_client levels on every coordinate (visible, known sum)."""

    per_client: int
    headroom_bits: int = 3
    name: str = "constant-test-noise"

    def bound(self, clients: int, levels: int) -> int:
        return self.per_client * clients * (clients + 1) // 2

    def sample(self, ctx: RingNoiseContext) -> np.ndarray:
        assert ctx.length < ctx.config.ring_length and ctx.levels == ctx.config.quantizer.levels
        return np.full(ctx.length, (ctx.client.client_id + 1) * self.per_client, dtype=np.int64)


@pytest.fixture
def noise_hook():
    hooks = []

    def install(noise):
        def hook(ctx):
            return noise

        hooks.append(hook)
        RING_NOISE_HOOKS.append(hook)

    yield install
    for hook in hooks:
        RING_NOISE_HOOKS.remove(hook)


def test_engine_round_adds_the_noise_between_quantization_and_masking(plain_round, noise_hook) -> None:  # noqa: F811
    _, exact, _ = plain_round
    noise_hook(ConstantNoise(per_client=1000))
    server, comm, _ = make_server("secure.mode=secagg")
    settings = server.pipeline.aggregator.settings
    assert settings.ring_noise is not None
    result = aggregate_once(server)
    assert result.aborted is None and result.completed == list(range(6))
    config = settings.round_config(1, list(range(6)), sum(v.numel() for v in server.params.values()))
    assert config.noise_headroom_bits == 3
    # the mean moves by exactly sum(noise) * step * M / W, on top of the quantization error
    shift = 1000 * 21 * config.quantizer.step * settings.max_weight / 1200
    bound = settings.mean_error_bound(6, 1200)
    for k in exact:
        assert float((result.delta[k].double() - exact[k] - shift).abs().max()) <= bound + 1e-7
    for msg in comm.replies:  # noise or not, only ring elements reach the server
        assert all(not t.is_floating_point() for t in msg.tensors.values())


def test_client_refuses_a_round_without_the_headroom_its_noise_needs(noise_hook) -> None:
    noise_hook(ConstantNoise(per_client=1, headroom_bits=3))
    client_side = make_server("secure.mode=secagg")[0].pipeline.aggregator
    assert client_side.settings.ring_noise is not None
    # a server announcing a round with no headroom: the client refuses to add noise that could wrap
    config = dataclasses.replace(client_side.settings, ring_noise=None).round_config(1, list(range(6)), 10)
    ctx = ClientContext(0, 1, 200, torch.Generator(), {}, {})
    with pytest.raises(SecAggAbort, match="keeps 0 ring bits free"):
        client_side._ring_noise(ctx, config, 200, 200, 10)
