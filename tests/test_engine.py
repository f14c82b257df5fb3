"""End-to-end runs of the engine on the embedded MNIST subset (small and fast)."""

import json
import os

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedguard import ArrayDataset, Config, ConfigurationError, Experiment
from fedguard.cli import main as cli_main
from fedguard.messages import Message, MessageError

SMALL = [
    "run.progress=false",
    "run.report=false",
    "data.max_train_examples=1200",
    "data.num_clients=6",
    "run.rounds=3",
    "train.batch_size=32",
]


def run(tmp_path, *extra, name="run"):
    return Experiment(overrides=[*SMALL, *extra]).run(run_dir=tmp_path / name)


def test_multi_round_run_learns_and_writes_run_folder(tmp_path):
    result = run(tmp_path, "run.report=true", "run.rounds=4")
    rows = result.rows
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["test_accuracy"] > max(0.4, rows[0]["test_accuracy"] + 0.1)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    for r in rows:
        assert r["sampled_clients"] == r["completed_clients"] == 6
        assert r["bytes_sent"] > 6 * 4 * sum(p.numel() for p in result.params.values())
        assert r["bytes_received"] > 0 and r["seconds"] > 0
    folder = result.run_dir
    for name in ["config.toml", "metrics.jsonl", "model.safetensors", "report.md", "summary.json"]:
        assert (folder / name).exists(), name
    for png in ["partition.png", "metrics.png", "loss.png"]:
        assert (folder / "plots" / png).stat().st_size > 1000
    # the saved config reproduces the run
    again = Experiment(Config.load(folder / "config.toml")).run(run_dir=tmp_path / "again")
    assert again.rows[-1]["test_accuracy"] == rows[-1]["test_accuracy"]


def test_the_final_figures_reuse_the_last_rounds_evaluation(tmp_path, monkeypatch):
    """The last round evaluates the final model; the run's final figures do not read the test set again."""
    from fedguard.tasks.classification import ClassificationTask

    calls = []
    original = ClassificationTask.evaluate

    def counting(self, model, params, data):
        calls.append(len(data))
        return original(self, model, params, data)

    monkeypatch.setattr(ClassificationTask, "evaluate", counting)
    result = run(tmp_path, "run.rounds=2", "run.eval_every=0")
    assert len(calls) == 1
    assert result.final["test_accuracy"] == result.rows[-1]["test_accuracy"]
    calls.clear()
    with_validation = run(tmp_path, "run.rounds=1", "data.validation_fraction=0.2", name="val")
    assert len(calls) == 2  # the last round's validation, then the test set once
    assert with_validation.final["val_accuracy"] == with_validation.rows[-1]["val_accuracy"]


def test_a_run_leaves_the_callers_torch_threads_as_they_were(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run(tmp_path, "run.threads=1", "run.rounds=1")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_same_seed_same_numbers_across_worker_counts(tmp_path):
    a = run(tmp_path, "run.workers=2", name="a")
    b = run(tmp_path, "run.workers=1", name="b")
    c = run(tmp_path, "run.workers=2", "run.seed=1", name="c")
    strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith("_s") and k != "seconds"} for r in rows]
    assert strip(a.rows) == strip(b.rows)
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    assert strip(a.rows) != strip(c.rows)


def test_client_sampling_dropouts_and_join_leave(tmp_path):
    result = run(
        tmp_path,
        "server.clients_per_round=4",
        "faults.dropout_rate=0.3",
        "faults.join=4-5@2",
        "faults.leave=0-0@3",
        "run.rounds=4",
    )
    for r in result.rows:
        assert r["sampled_clients"] == 4
        assert r["completed_clients"] + len(r["failed_clients"]) == 4
        assert all(v == "simulated dropout" for v in r["failed_clients"].values())
    assert sum(len(r["failed_clients"]) for r in result.rows) > 0


def test_fedprox_and_server_optimizers_run(tmp_path):
    for opt in ["fedavgm", "fedadam", "fedyogi", "fedadagrad"]:
        lr = "1.0" if opt == "fedavgm" else "0.01"
        res = run(tmp_path, f"server.optimizer={opt}", f"server.lr={lr}", "train.prox_mu=0.1", name=opt)
        assert np.isfinite(res.rows[-1]["train_loss"])
        assert res.rows[-1]["test_accuracy"] > 0.2


def test_users_own_module_loss_and_dataset(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 5, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 2))
    seen = []

    def loss_fn(logits, target):
        seen.append(1)
        return nn.functional.cross_entropy(logits, target)

    exp = Experiment(
        overrides=[
            "run.progress=false",
            "run.rounds=10",
            "train.lr=0.1",
            "train.epochs=5",
            "data.num_clients=4",
            "data.partition=iid",
        ],
        model=model,
        loss_fn=loss_fn,
        train=TensorDataset(x[:300], y[:300]),
        test=ArrayDataset(x[300:], y[300:]),
    )
    result = exp.run(run_dir=tmp_path / "user")
    assert seen and result.final["test_accuracy"] > 0.85


def test_centralized_baseline_is_reported_side_by_side(tmp_path):
    result = run(tmp_path, "run.baseline=centralized", "run.report=true", "run.rounds=2",
                 "server.optimizer=fedavgm", "server.lr=0.5")
    assert result.baseline is not None
    comparison = json.loads((result.run_dir / "comparison.json").read_text())
    assert set(comparison) == {"federated", "centralized"}
    assert "Federated vs centralized" in (result.run_dir / "report.md").read_text()
    cfg = Config.load(result.baseline.run_dir / "config.toml")
    assert cfg.data.num_clients == 1 and cfg.run.rounds == 2
    # plain training on all the data: no server optimiser, the lone client computes as a federated one
    assert cfg.server.optimizer == "fedavg" and cfg.server.lr == 1.0 and cfg.run.client_threads == 1


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="a concurrent baseline needs two cores")
def test_concurrent_baseline_equals_the_sequential_one(tmp_path):
    args = ("run.baseline=centralized", "run.rounds=2", "run.workers=1")
    sequential = run(tmp_path, *args, name="sequential")
    concurrent = run(tmp_path, *args, "run.baseline_concurrent=true", name="concurrent")
    assert concurrent.baseline is not None and sequential.baseline is not None
    # the federated run is the same whichever process layout trained it
    assert all(torch.equal(sequential.params[k], concurrent.params[k]) for k in sequential.params)
    base_seq, base_con = sequential.baseline, concurrent.baseline
    assert base_con.run_dir == concurrent.run_dir / "centralized"
    assert [r["round"] for r in base_con.rows] == [1, 2]
    assert set(base_con.params) == set(base_seq.params)
    # one thread instead of all cores may reorder float sums, nothing more
    assert all(torch.allclose(base_seq.params[k], base_con.params[k], atol=1e-5) for k in base_seq.params)
    assert base_con.final["test_accuracy"] == pytest.approx(base_seq.final["test_accuracy"], abs=0.01)
    assert base_con.timings["total_s"] > 0
    comparison = json.loads((concurrent.run_dir / "comparison.json").read_text())
    assert set(comparison) == {"federated", "centralized"}


def test_concurrent_baseline_failure_is_reported_and_keeps_the_federated_run(tmp_path, monkeypatch):
    def broken(self, run_dir, cores=None, progress=True):
        raise ValueError("baseline exploded")

    monkeypatch.setattr(Experiment, "_run_centralized", broken)
    with pytest.raises(RuntimeError, match="centralized baseline failed.*baseline exploded"):
        run(tmp_path, "run.baseline=centralized", "run.baseline_concurrent=true", "run.rounds=1", name="broken")
    assert (tmp_path / "broken" / "model.safetensors").exists()
    assert (tmp_path / "broken" / "metrics.jsonl").read_text().strip()


def test_concurrent_baseline_needs_the_baseline():
    with pytest.raises(ConfigurationError, match="run.baseline = 'centralized'"):
        Experiment(overrides=[*SMALL, "run.baseline_concurrent=true"]).run()


def test_checkpoint_resume_matches_uninterrupted_run(tmp_path):
    full = run(tmp_path, "run.rounds=4", "run.workers=1", name="full")
    part = run(tmp_path, "run.rounds=2", "run.workers=1", "run.checkpoint_every=1", name="part")
    cfg = Config.load(part.run_dir / "config.toml", ["run.rounds=4"])
    resumed = Experiment(cfg).run(resume=part.run_dir)
    assert [r["round"] for r in resumed.rows] == [1, 2, 3, 4]
    assert all(torch.equal(full.params[k], resumed.params[k]) for k in full.params)


@pytest.mark.parametrize(
    "override,match",
    [
        ("data.partition=zipf", "data.partition.*choose one of"),
        ("run.rounds=0", "run.rounds.*minimum"),
        ("train.lr=fast", "train.lr"),
        ("server.optimiser=fedadam", "Did you mean 'optimizer'"),
        ("run.workers=many", "run.workers"),
    ],
)
def test_bad_config_is_refused_with_the_key(tmp_path, override, match):
    with pytest.raises(ConfigurationError, match=match):
        Experiment(overrides=[*SMALL, override]).run(run_dir=tmp_path / "bad")


def test_bad_data_gives_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="labels"):
        ArrayDataset(torch.zeros(3, 1, 2, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        ArrayDataset(torch.full((2, 1, 2, 2), float("nan")), torch.zeros(2, dtype=torch.long))
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        Experiment(overrides=[*SMALL, "data.dataset=mnist", f"data.data_dir={tmp_path}"]).run(run_dir=tmp_path / "x")
    with pytest.raises(ConfigurationError, match="num_clients"):
        Experiment(overrides=[*SMALL, "data.max_train_examples=20", "data.num_clients=30", "data.partition=iid"]).run()


def test_cli_run_partition_and_errors(tmp_path, capsys):
    cfg = tmp_path / "exp.toml"
    cfg.write_text("[run]\nrounds = 2\nprogress = false\n[data]\nmax_train_examples = 600\nnum_clients = 3\n")
    assert cli_main(["run", str(cfg), "--set", "run.report=false", "--out", str(tmp_path / "cli")]) == 0
    assert len((tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()) == 2
    assert cli_main(["partition", str(cfg), "--plot", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").exists()
    assert cli_main(["run", "--set", "data.alpha=-1"]) == 2
    assert "data.alpha" in capsys.readouterr().err


def test_messages_roundtrip_without_pickle_and_reject_garbage():
    msg = Message("fit", 3, 7, {"lr": 0.1, "ids": [1, 2]}, {"w": torch.randn(3, 4), "n": torch.arange(5)})
    back = Message.from_bytes(msg.to_bytes())
    assert (back.kind, back.round, back.client_id, back.meta) == ("fit", 3, 7, {"lr": 0.1, "ids": [1, 2]})
    assert torch.equal(back.tensors["w"], msg.tensors["w"])
    for garbage in [b"", b"\x00" * 7, b"garbage that is not a message", msg.to_bytes()[:-3]]:
        with pytest.raises(MessageError):
            Message.from_bytes(garbage)


def _safetensors_bytes(msg: Message) -> bytes:
    """What ``to_bytes`` wrote when safetensors encoded every message."""
    from safetensors.torch import save

    header = {"v": 1, "kind": msg.kind, "round": msg.round, "client_id": msg.client_id, "meta": msg.meta}
    return save({k: t.detach().contiguous() for k, t in msg.tensors.items()}, metadata={"fedguard": json.dumps(header)})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
                                   torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool])
def test_messages_are_byte_for_byte_what_safetensors_writes(dtype):
    """The direct encoder of one-dtype messages writes safetensors' own bytes (same traffic counts, same
    wire for the network runtime); mixed dtypes, non-ASCII names and no tensors go through safetensors."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    cases = [
        {k: v.to(dtype) for k, v in model.state_dict().items()},
        {"z": torch.ones((), dtype=dtype), "empty": torch.zeros(0, 3, dtype=dtype),
         "t": torch.ones(4, 5, dtype=dtype).t()},
        {"w": torch.ones(2, dtype=dtype), "n": torch.arange(3)},
        {"é": torch.ones(2, dtype=dtype)},
        {},
    ]
    for tensors in [*cases, dict(model.named_parameters())]:
        for meta in [{}, {"quote": "a\"b\\c", "snow": "é☃", "n": [1, 2.5, None]}]:
            msg = Message("fit_result", 2, 123456, meta, tensors)
            assert msg.to_bytes() == _safetensors_bytes(msg)
            back = Message.from_bytes(msg.to_bytes())
            assert back.meta == meta and all(torch.equal(back.tensors[k], t.detach()) for k, t in tensors.items())


def test_per_client_test_split_gives_federated_evaluation(tmp_path):
    result = run(tmp_path, "data.client_test_fraction=0.25", "run.rounds=2")
    last = result.rows[-1]
    assert 0.0 <= last["clients_test_accuracy"] <= 1.0 and last["clients_test_loss"] > 0
    # evaluation sends the model to every sampled client again: counted apart from training
    assert last["eval_bytes_sent"] >= last["sampled_clients"] * sum(
        v.numel() * 4 for v in result.params.values()
    )
    assert 0 < last["eval_bytes_received"] < last["eval_bytes_sent"]
    sizes = json.loads((result.run_dir / "partition.json").read_text())["sizes"]
    assert sum(sizes) == pytest.approx(1200 * 0.75, abs=6)
    quiet = run(tmp_path, "data.client_test_fraction=0.25", "run.rounds=1", "run.client_eval=false", name="quiet")
    assert "clients_test_accuracy" not in quiet.rows[-1] and "eval_bytes_sent" not in quiet.rows[-1]
    assert quiet.rows[-1]["test_accuracy"] > 0
