"""The client's privacy floor against a malicious server that weakens the client's noise (issue 13).

Each test plays the server: it assembles an honest run, then sends the client a Welcome whose
configuration it has tampered with (the model description stays the honest one, so only the DP
settings differ), and checks that a client with ``privacy_floor`` refuses before training.
"""

import pytest

import fedguard.plugins  # noqa: F401  (registers every section)
from fedguard.config import Config
from fedguard.core.pipeline import ConfigurationError
from fedguard.experiment import Experiment
from fedguard.runtime.network.client import ClientOptions, ClientSetupError, build_app
from fedguard.runtime.network.proto import fedguard_net_v1_pb2 as pb
from fedguard.runtime.network.server import RunInfo

TINY = ["run.progress=false", "run.report=false", "run.workers=1", "data.max_train_examples=240",
        "data.num_clients=4", "run.rounds=3", "train.batch_size=20", "dp.accountant=rdp", "run.eval_every=0"]
SAMPLE = [*TINY, "dp.mode=sample", "dp.noise_multiplier=1.5", "dp.local_steps=2", "dp.delta=1e-5"]
#: client-level distributed noise under SecAgg+: each of 2 shares carries half the variance of z = 12
DISTRIBUTED = [*TINY, "dp.mode=client", "server.weighting=uniform", "secure.mode=secagg",
               "dp.noise_placement=distributed", "dp.noise_multiplier=12", "dp.noise_shares=2", "dp.delta=1e-5"]


def welcome_from(honest: list[str], sent: list[str]) -> pb.Welcome:
    """What a server that assembled ``honest`` but sends the configuration ``sent`` tells a joining client."""
    info = RunInfo.from_setup(Experiment(overrides=honest).assemble())
    toml = Config.load(None, sent).to_toml()
    return pb.Welcome(config_toml=toml, model=info.model, input_shape=info.input_shape,
                      num_classes=info.num_classes, client_sizes=info.client_sizes)


def client(floor: float, trusted: int = 0) -> ClientOptions:
    return ClientOptions(server="127.0.0.1:1", key_file="unused", privacy_floor=floor, privacy_floor_trusted=trusted)


def test_honest_sample_level_config_passes_and_a_lowered_noise_multiplier_is_refused() -> None:
    app = build_app(client(8.0), 0, welcome_from(SAMPLE, SAMPLE))
    assert app.handlers["fit"].__name__ == "guarded"
    weakened = [*SAMPLE, "dp.noise_multiplier=0.4"]
    with pytest.raises(ClientSetupError, match=r"dp.noise_multiplier=0.4.*epsilon \d.*above the floor 8.*Fix"):
        build_app(client(8.0), 0, welcome_from(SAMPLE, weakened))
    build_app(client(0.0), 0, welcome_from(SAMPLE, weakened))  # no floor: the server's word is taken


def test_raised_noise_shares_are_refused_and_trusted_honest_shares_count() -> None:
    build_app(client(8.0), 1, welcome_from(DISTRIBUTED, DISTRIBUTED))
    weakened = [*DISTRIBUTED, "dp.noise_shares=400"]  # each share 1/400 of the variance: Sybils fill the rest
    with pytest.raises(ClientSetupError, match=r"split into 400 shares.*epsilon .* above the floor 8"):
        build_app(client(8.0), 1, welcome_from(DISTRIBUTED, weakened))
    # trusting 399 other honest clients whose shares reach every sum restores the full noise
    build_app(client(8.0, trusted=399), 1, welcome_from(DISTRIBUTED, weakened))


@pytest.mark.parametrize(("sent", "message"), [
    (["dp.mode=none"], "dp.mode=none"),
    (["dp.noise_placement=central", "secure.mode=none"], "the server adds the noise itself"),
])
def test_no_dp_and_server_added_noise_are_refused(sent, message) -> None:
    with pytest.raises(ClientSetupError, match=message):
        build_app(client(100.0), 0, welcome_from(DISTRIBUTED, [*DISTRIBUTED, *sent]))


def test_the_guard_answers_no_training_request_beyond_run_rounds() -> None:
    from types import SimpleNamespace

    from fedguard.privacy.floor import PrivacyFloor

    fit = PrivacyFloor(1.0).guard(2, lambda msg, ctx: "trained")
    ctx = SimpleNamespace(state={})  # the client's state: kept across restarts with --state-dir
    assert [fit(None, ctx), fit(None, ctx)] == ["trained", "trained"]
    with pytest.raises(ConfigurationError, match="already trained in run.rounds=2"):
        fit(None, ctx)
    with pytest.raises(ConfigurationError):  # a restarted client reading the saved count refuses too
        fit(None, SimpleNamespace(state=dict(ctx.state)))


def test_the_cli_passes_the_floor_to_the_client() -> None:
    from fedguard.cli import build_parser

    args = build_parser().parse_args(["client", "--server", "h:1", "--key", "k", "--privacy-floor", "3",
                                      "--privacy-floor-trusted", "2"])
    assert (args.privacy_floor, args.privacy_floor_trusted, args.privacy_floor_delta) == (3.0, 2, 0.0)


def test_a_widened_clip_instruction_cannot_shrink_the_noise_share() -> None:
    """The server broadcasts dp_clip = 1000 in the fit instruction: under distributed noise the client's share
    is sized for dp.clip = 1, so it still clips to 1 (a wider clip would leave the share far below the
    sensitivity)."""
    import torch

    from fedguard.pipeline.base import ClientContext
    from fedguard.privacy.dpfedavg import ClipUpdate

    steps = Experiment(overrides=DISTRIBUTED).assemble().pipeline.client_steps
    clip = next(s for s in steps if isinstance(s, ClipUpdate))
    ctx = ClientContext(0, 1, 60, torch.Generator(), {"dp_clip": 1000.0}, {})
    out = clip.apply({"w": torch.full((100,), 5.0)}, ctx)
    assert clip.client_noise and float(out["w"].norm()) <= 1.0 + 1e-6
