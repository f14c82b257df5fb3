"""Secure aggregation and CKKS inside the engine: short federated runs on the embedded MNIST subset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedguard import ConfigurationError, Experiment
from fedguard.builders import PipelineParts
from fedguard.engine import Server
from fedguard.messages import Message
from fedguard.pipeline.base import Aggregator, ClientContext, ServerContext
from fedguard.runtime.base import FaultModel
from fedguard.runtime.simulation import SerialCommunicator
from fedguard.runtime.state_store import MemoryStateStore
from fedguard.secure import CKKSError, CKKSKeyHolder, MaskedInput, WireError
from fedguard.secure.attacks import Wiretap
from fedguard.secure.ckks_aggregator import CKKSAggregator, CKKSSettings
from fedguard.secure.protocol import bytes_tensor, from_json, from_message, to_json, to_message
from fedguard.secure.register import _secure_hook
from fedguard.secure.secagg import EncryptedShares

SMALL = [
    "run.progress=false",
    "run.report=false",
    "data.max_train_examples=1200",
    "data.num_clients=6",
    "train.batch_size=32",
]


class RoundFaults(FaultModel):
    """Drops every client except ``keep`` at ``stage`` in round ``round`` only."""

    def __init__(self, stage: str, round: int, keep: set[int]) -> None:
        super().__init__(1.0, 0, (stage,))
        self.round, self.keep = round, keep

    def drops(self, msg: Message) -> bool:
        return msg.kind in self.stages and msg.round == self.round and msg.client_id not in self.keep


def make_server(*overrides: str, faults: FaultModel | None = None, tamper=None):
    """An engine server over in-process clients (one shared state store), and its recorder."""
    setup = Experiment(overrides=[*SMALL, *overrides], log=lambda s: None).assemble()
    store = MemoryStateStore()
    comm = Wiretap(SerialCommunicator(lambda cid: setup.make_client(cid, store), faults), reply=tamper)
    server = Server(setup.task, setup.model, setup.pipeline, setup.sampler, comm, setup.test, 0, 1, lambda s: None)
    return server, comm, store


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def aggregate_once(server: Server, round: int = 1):
    """One round's aggregation as the engine runs it, returning the aggregator's result."""
    sampled = server.sampler.sample(round)
    ctx = ServerContext(round, sampled, [], server.sampler.population, torch.Generator(), lambda s: None)
    fits = server.broadcast(round, sampled)
    return server.pipeline.aggregator.aggregate(server.comm, round, fits, server.params, ctx)


@pytest.fixture(scope="module")
def plain_round():
    """The start parameters, the exact (float64) FedAvg mean of round 1, and the plaintext parameters after it."""
    server, _, _ = make_server()
    start = {k: v.clone() for k, v in server.params.items()}
    ctx = ServerContext(1, list(range(6)), [], 6, torch.Generator(), lambda s: None)
    _, updates, weights, _, _ = server.pipeline.aggregator.collect(server.comm, 1, server.broadcast(1, list(range(6))),
                                                                   server.params, ctx)
    total = sum(weights)
    exact = {k: sum(u[k].double() * w for u, w in zip(updates, weights, strict=True)) / total for k in start}
    assert total == 1200
    server.run_round(1, False)
    return start, exact, server.params


def within(delta: dict[str, torch.Tensor], exact: dict[str, torch.Tensor], bound: float) -> float:
    """Largest |delta - exact| beyond the stated bound plus float32 rounding of the result (<= 0 is within)."""
    return max(float(((delta[k].double() - exact[k]).abs() - bound - exact[k].abs() * 2**-23).max()) for k in exact)


def test_secagg_round_equals_plaintext_fedavg_within_bound(plain_round) -> None:
    start, exact, plain = plain_round
    server, comm, store = make_server("secure.mode=secagg")
    result = aggregate_once(server)
    assert result.aborted is None and result.completed == list(range(6)) and result.weight == 1200
    bound = server.pipeline.aggregator.settings.mean_error_bound(6, 1200)  # weights sum to the 1,200 examples
    assert 0 < bound < 1e-8
    assert within(result.delta, exact, bound) <= 0
    assert max(float(exact[k].abs().max()) for k in exact) > 1e-3  # the update is not trivially small
    assert result.metrics["secagg_saturated"] == 0.0
    # every client forgot its round secrets after unmasking
    assert all(not any(k.startswith("secagg/") for k in store.load(c)) for c in range(6))
    # and through the engine: the same model as plaintext FedAvg up to float32 rounding
    engine = make_server("secure.mode=secagg")[0]
    assert engine.run_round(1, False).aborted is None
    assert max_diff(engine.params, plain) < 1e-7


def test_aggregator_only_receives_masked_payloads() -> None:
    server, comm, _ = make_server("secure.mode=secagg")
    server.run_round(1, False)
    names = set(server.params)
    kinds = {m.kind for m in comm.replies}
    assert kinds == {"secagg/keys", "secagg/shares", "fit_result", "secagg/signature", "secagg/unmask_result"}
    for msg in comm.replies:
        assert not names & set(msg.tensors), "a parameter-named tensor reached the server"
        assert all(not t.is_floating_point() for t in msg.tensors.values()), msg.kind
        assert msg.meta.get("num_examples") is None and not msg.meta.get("metrics")
    fits = [m for m in comm.replies if m.kind == "fit_result"]
    assert len(fits) == 6
    for msg in fits:
        assert set(msg.tensors) == {"secagg/masked", "secagg/rejected"}  # the ring vector and its complaints
        assert msg.tensors["secagg/masked"].dtype == torch.int32 and msg.tensors["secagg/rejected"].numel() == 0
        assert msg.meta["unsigned"] == ["masked"]  # the uint32 ring vector, sent bit for bit as int32


def test_plaintext_reply_is_refused_and_round_recovers() -> None:
    def leak(msg: Message) -> Message:
        if msg.kind == "fit_result" and msg.client_id == 2:
            msg.tensors = {**msg.tensors, "head.weight": torch.zeros(10, 1568)}
        return msg

    server, comm, _ = make_server("secure.mode=secagg", tamper=leak)
    record = server.run_round(1, False)
    assert record.aborted is None and record.completed == 5
    assert "refused" in record.failed[2]
    with pytest.raises(WireError, match="unexpected tensors"):
        from_message(MaskedInput, Message("fit_result", 1, 2, {"wire": {}}, {"w": torch.zeros(2)}), "secagg/")


def test_dropout_after_masking_recovers_the_exact_sum() -> None:
    full, _, _ = make_server("secure.mode=secagg")
    full.run_round(1, False)
    gone = RoundFaults("secagg/unmask", 1, keep={0, 1, 3, 5})  # clients 2 and 4 vanish after masking
    server, comm, _ = make_server("secure.mode=secagg", faults=gone)
    record = server.run_round(1, False)
    assert record.aborted is None and record.completed == 6
    assert record.metrics["client_secagg_unmask_answers"] == 4.0
    assert all(torch.equal(server.params[k], full.params[k]) for k in full.params)  # bit for bit


def test_dropout_before_masking_sums_the_survivors() -> None:
    faults = FaultModel(0.34, 3, ("fit",))
    plain, _, _ = make_server(faults=faults)
    plain.run_round(1, False)
    server, _, _ = make_server("secure.mode=secagg", faults=faults)
    record = server.run_round(1, False)
    dropped = sorted(record.failed)
    assert record.aborted is None and 1 <= len(dropped) <= 2 and record.completed == 6 - len(dropped)
    assert max_diff(server.params, plain.params) < 1e-5


def test_abort_below_threshold_leaves_model_unchanged_then_next_round_runs() -> None:
    faults = RoundFaults("secagg/unmask", 1, keep={0, 1})  # 2 answers < t = 3
    server, _, _ = make_server("secure.mode=secagg", faults=faults)
    before = {k: v.clone() for k, v in server.params.items()}
    first = server.run_round(1, False)
    assert first.aborted is not None and "secure aggregation aborted" in first.aborted
    assert "only 2 of 6 surviving clients answered the unmasking request" in first.aborted
    assert "t=3" in first.aborted
    assert all(torch.equal(server.params[k], before[k]) for k in before)
    second = server.run_round(2, False)
    assert second.aborted is None and second.completed == 6
    assert max_diff(server.params, before) > 1e-3


def test_sparse_secagg_plus_graph_in_the_engine() -> None:
    server, _, _ = make_server("data.num_clients=12", "secure.mode=secagg", "secure.neighbours=4")
    record = server.run_round(1, False)
    agg = server.pipeline.aggregator
    config = agg.settings.round_config(1, list(range(12)), 10)
    assert config.neighbours == 4 and config.threshold == 3
    assert record.aborted is None and record.completed == 12


def test_uniform_weighting_and_multiprocess_run(tmp_path) -> None:
    base = [*SMALL, "run.rounds=2", "server.weighting=uniform", "run.workers=2"]
    plain = Experiment(overrides=base).run(run_dir=tmp_path / "plain")
    secure = Experiment(overrides=[*base, "secure.mode=secagg"]).run(run_dir=tmp_path / "secure")
    assert max_diff(secure.params, plain.params) < 1e-5
    assert secure.final["test_accuracy"] == pytest.approx(plain.final["test_accuracy"], abs=0.002)
    assert all(r["aborted"] is None for r in secure.rows)


def test_ckks_round_matches_plaintext_and_sees_only_ciphertexts(plain_round) -> None:
    _, exact, _ = plain_round
    server, comm, _ = make_server("secure.mode=ckks")
    result = aggregate_once(server)
    assert result.aborted is None and result.completed == list(range(6)) and result.weight == pytest.approx(1200)
    # the key holder floods its release: each summed value carries noise of the stated deviation
    sigma = result.metrics["ckks_flooding_sigma"]
    share = server.pipeline.aggregator.settings.max_weight / 1200
    assert 0 < sigma * share < 1e-5
    assert within(result.delta, exact, 7 * sigma * share) <= 0
    names = set(server.params)
    for msg in comm.replies:
        assert not names & set(msg.tensors)
        if msg.kind == "fit_result":
            assert set(msg.tensors) == {"ckks/ciphertexts", "ckks/ciphertexts.lengths"}
            assert msg.tensors["ckks/ciphertexts"].dtype == torch.uint8
        elif msg.kind == "ckks/plaintext":  # the key holder's decryption: the aggregate only
            blocks = -(-sum(v.numel() for v in names_of(server)) // 4095)  # the aggregate's ciphertexts, every slot
            assert msg.client_id == 0 and msg.tensors["ckks/sum"].shape == (blocks, 4096)
        else:
            assert all(not t.is_floating_point() for t in msg.tensors.values()), msg.kind
    assert sum(m.kind == "ckks/plaintext" for m in comm.replies) == 1


def names_of(server: Server) -> list[torch.Tensor]:
    """The parameters plus the weight slot (what the decrypted aggregate holds)."""
    return [*server.params.values(), torch.zeros(1)]


def test_ckks_tampered_ciphertext_is_rejected_with_a_clear_reason() -> None:
    def flip(msg: Message) -> Message:
        if msg.kind == "fit_result" and msg.client_id == 3:
            blob = msg.tensors["ckks/ciphertexts"].clone()
            blob[blob.numel() // 2] ^= 1
            msg.tensors = {**msg.tensors, "ckks/ciphertexts": blob}
        return msg

    server, _, _ = make_server("secure.mode=ckks", tamper=flip)
    record = server.run_round(1, False)
    assert record.aborted is None and record.completed == 5
    assert "digest mismatch" in record.failed[3]


def test_ckks_wrong_key_aborts_and_keeps_the_model() -> None:
    def swap_key(msg: Message) -> Message:
        # after sending this round's public key, the key holder loses its secret and makes another
        if msg.kind == "ckks/public_key":
            state = store.load(0)
            state["ckks/secret_context"] = bytes_tensor(CKKSKeyHolder().secret_context_bytes())
            store.save(0, state)
        return msg

    server, _, store = make_server("secure.mode=ckks", tamper=swap_key)
    before = {k: v.clone() for k, v in server.params.items()}
    record = server.run_round(1, False)
    assert record.aborted is not None and "did not decrypt" in record.aborted and "expected" in record.aborted
    assert all(torch.equal(server.params[k], before[k]) for k in before)


def test_ckks_client_refuses_unknown_key_and_key_holder_refuses_single_update() -> None:
    agg = CKKSAggregator(CKKSSettings(max_weight=10))
    ctx = ClientContext(1, 1, 5, torch.Generator(), {"ckks": {"fingerprint": "ab" * 32, "weighting": "examples",
                                                              "max_weight": 10, "clip": 1.0}}, {})
    with pytest.raises(CKKSError, match="holds no public context"):
        agg.client_finalize({"w": torch.ones(3)}, ctx)
    holder_ctx = ClientContext(0, 1, 5, torch.Generator(), {}, {})
    keygen = Message("ckks/keygen", 1, 0, {"ckks": CKKSSettings().params(), "budget": 2})
    public = agg.client_handlers()["ckks/keygen"](keygen, holder_ctx).tensors["ckks/context"]
    from fedguard.secure import CKKSEncryptor

    single = CKKSEncryptor(public.numpy().tobytes()).encrypt(np.ones(4))
    request = to_message("ckks/decrypt", 1, 0, single, "ckks/")
    with pytest.raises(CKKSError, match="refusing to decrypt a sum of 1 clients"):
        agg.client_handlers()["ckks/decrypt"](request, holder_ctx)


def test_protocol_json_roundtrip_and_bad_dtype() -> None:
    shares = EncryptedShares(3, np.array([1, 2], dtype=np.int64), np.arange(320, dtype=np.uint8).reshape(2, 160))
    back = from_json(EncryptedShares, to_json(shares))
    assert back.recipient == 3 and np.array_equal(back.ciphertexts, shares.ciphertexts)
    bad = to_json(shares)
    bad["arrays"]["senders"]["dtype"] = "object"
    with pytest.raises(WireError, match="not a protocol dtype"):
        from_json(EncryptedShares, bad)


class NeedsUpdates(Aggregator):
    name = "median"
    needs_individual_updates = True

    def aggregate(self, comm, round, fit_messages, like, ctx):  # pragma: no cover - never runs
        raise AssertionError


def test_robust_rule_with_secure_mode_is_refused() -> None:
    exp = Experiment(overrides=[*SMALL, "secure.mode=secagg"], log=lambda s: None)
    setup = exp.assemble()
    from fedguard.builders import BuildContext

    bctx = BuildContext(exp.config, setup.train, [200] * 6, setup.sampler, setup.task, lambda s: None)
    with pytest.raises(ConfigurationError, match="needs each client's update in the clear.*secure.mode=secagg"):
        _secure_hook(PipelineParts(aggregator=NeedsUpdates()), bctx)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("secure.key_holder=9", "not a client of this run"),
        ("secure.ckks_coeff_bits=60,60", "needs two data primes"),
        ("secure.ckks_coeff_bits=50,50,60", "leaves no room"),
    ],
)
def test_ckks_configuration_errors(override: str, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        Experiment(overrides=[*SMALL, "secure.mode=ckks", override]).assemble()


def test_secagg_ring_too_small_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="raise secure.ring_bits"):
        Experiment(overrides=[*SMALL, "secure.mode=secagg", "secure.ring_bits=8"]).assemble()


def test_clipping_and_distributed_dp_noise_combine_with_secagg(tmp_path) -> None:
    """DP-FedAvg's clip runs before masking and each client's share of the noise is discrete
    Gaussian, added in the ring (issue 13; the float share step is not used under SecAgg+); the
    ledger charges the sum. Changed by dp (issue 13): no plaintext equality, the noise is secret."""
    from fedguard.privacy.distributed import DiscreteGaussianRingNoise

    dp = ["dp.mode=client", "server.weighting=uniform", "dp.noise_placement=distributed", "dp.clip=0.5",
          "dp.noise_multiplier=0.5", "run.rounds=1"]
    setup = Experiment(overrides=[*SMALL, *dp, "secure.mode=secagg"]).assemble()
    assert isinstance(setup.pipeline.aggregator.settings.ring_noise, DiscreteGaussianRingNoise)
    assert [s.name for s in setup.pipeline.client_steps] == ["dp-clip"]
    # in-process clients: a forked worker of this test died without a traceback twice in full-suite runs
    # (2026-12-03; never when run alone or with its file); see the issue 13 note
    secure = Experiment(overrides=[*SMALL, *dp, "secure.mode=secagg", "run.workers=1"]).run(run_dir=tmp_path / "secure")
    assert secure.rows[0]["client_secagg_saturated"] == 0.0 and secure.rows[0]["client_secagg_out_of_range"] == 0.0
    assert secure.final["epsilon"] > 0


def test_too_small_clip_is_reported_as_saturation() -> None:
    server, _, _ = make_server("secure.mode=secagg", "secure.clip=1e-5")
    record = server.run_round(1, False)
    assert record.aborted is None and record.metrics["client_secagg_saturated"] > 0.5


def test_secagg_identities_folder_and_its_errors(tmp_path) -> None:
    """A deployment's PKI: a folder from write_identities is loaded; a missing client or a Ray run
    without a shared folder is refused before training."""
    from fedguard.secure.identity import write_identities

    write_identities(tmp_path / "ids", range(6))
    setup = Experiment(overrides=[*SMALL, "secure.mode=secagg", f"secure.identities={tmp_path / 'ids'}"]).assemble()
    assert setup.pipeline.aggregator.settings.enrolment.folder == tmp_path / "ids"
    write_identities(tmp_path / "few", range(4))
    with pytest.raises(ConfigurationError, match=r"clients \[4, 5\] are not in"):
        Experiment(overrides=[*SMALL, "secure.mode=secagg", f"secure.identities={tmp_path / 'few'}"]).assemble()
    with pytest.raises(ConfigurationError, match="needs secure.identities"):
        Experiment(overrides=[*SMALL, "secure.mode=secagg", "run.runtime=ray"]).assemble()
    assert oct((tmp_path / "ids" / "client-0.ed25519").stat().st_mode & 0o777) == "0o600"
