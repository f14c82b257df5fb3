"""What a user of the ``fedguard`` command sees: refusals before anything runs, runs that fail
loudly and keep what they trained, output with and without a terminal, units, --version.

Written from the outside: exit codes, stdout/stderr (of worker processes too: ``capfd``) and
the files a run leaves.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, get_args, get_type_hints

import pytest
import torch
from safetensors.torch import load_file

import fedguard.experiment  # noqa: F401  (registers every section)
from fedguard import __version__
from fedguard.checkpoint import load_state
from fedguard.cli import main as cli_main
from fedguard.config import SECTIONS, Config
from fedguard.engine import Server
from fedguard.experiment import Experiment
from fedguard.health import RunFailed
from fedguard.pipeline.base import ConfigurationError

TINY = ["data.max_train_examples=600", "data.num_clients=3", "run.rounds=2", "train.batch_size=50"]


def _strict_json(text: str) -> Any:
    """json.loads that refuses NaN and infinities, as every other JSON reader does."""
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def _cli(args: list[str], capfd: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = cli_main(args)
    out, err = capfd.readouterr()
    return rc, out, err


def _sets(*overrides: str) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def _float_keys() -> list[str]:
    keys = []
    for section, cls in SECTIONS.items():
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if hint is float or (getattr(hint, "__origin__", None) is list and get_args(hint) == (float,)):
                keys.append(f"{section}.{f.name}")
    return keys


@pytest.mark.parametrize("key", _float_keys())
def test_every_float_option_refuses_nan_and_infinities(key: str) -> None:
    for bad in ("nan", "inf", "-inf", "NaN"):
        with pytest.raises(ConfigurationError, match=rf"{key}: .*not a finite number"):
            Config().set(key, bad)


def test_validate_checks_values_set_in_python_before_any_file(tmp_path: Path) -> None:
    config = Config()
    config.server.lr = float("nan")
    with pytest.raises(ConfigurationError, match="server.lr"):
        Experiment(config).run(run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    config = Config()
    config.train.lr = "0.5"  # a string where a float belongs is parsed, as from TOML
    assert config.validate().train.lr == 0.5
    config.data.dataset = "nope"
    with pytest.raises(ConfigurationError, match=r"data.dataset: unknown dataset 'nope'; known names: mnist-5k"):
        config.validate()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data.dataset=foo"], r"data\.dataset: unknown dataset 'foo'; known names: mnist-5k, mnist, "),
        (["server.lr=nan"], r"server\.lr: nan is not a finite number"),
        (["train.lr=inf"], r"train\.lr: inf is not a finite number"),
        (["train.momentum=nan"], r"train\.momentum: nan is not a finite number"),
        (["dp.mode=sample", "dp.target_epsilon=nan"], r"dp\.target_epsilon: nan is not a finite number"),
        (["dp.mode=client", "dp.noise_multiplier=nan"], r"dp\.noise_multiplier: nan is not a finite number"),
        (["dp.clip=nan"], r"dp\.clip: nan is not a finite number"),
        (["task.model=resnet"], r"task\.model: 'resnet' is not allowed; choose one of \['cnn-s', 'cnn-m', 'mlp'\]"),
        (["task.name=diffusion"], r"task\.name: 'diffusion' is not allowed; choose one of"),
        (["data.partition=zipf"], r"data\.partition: 'zipf' is not allowed"),
    ],
)
def test_cli_refuses_a_bad_value_in_one_line_with_exit_2_and_no_run_folder(
    overrides: list[str], expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    rc, out, err = _cli(["run", *_sets(*TINY, *overrides)], capfd)
    assert rc == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedguard: error: "), err
    assert __import__("re").search(expected, lines[0]), lines[0]
    assert list(tmp_path.iterdir()) == []


def test_diverging_run_stops_names_round_and_cause_keeps_valid_json_and_exits_1(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """train.lr=1e9: every client's update is NaN or huge in round 1. No worker traceback reaches
    the user; the run stops at once with exit code 1; every file is valid JSON."""
    run_dir = tmp_path / "run"
    rc, out, err = _cli(["run", *_sets(*TINY, "train.lr=1e9", "run.rounds=4", "run.workers=2"), "--out",
                         str(run_dir)], capfd)
    assert rc == 1
    assert "Traceback" not in err and "Traceback" not in out
    assert "fedguard: run failed: training diverged in round 1" in err
    assert "train.lr=1e+09" in err and "lower it" in err
    assert f"run folder: {run_dir}" in out
    summary = _strict_json((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 0 and "diverged" in summary["stopped"]
    rows = [_strict_json(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1] and rows[0]["aborted"].startswith("diverged")
    assert all(torch.isfinite(t).all() for t in load_file(str(run_dir / "model.safetensors")).values())


def test_a_model_that_turns_nan_keeps_the_last_finite_round_and_its_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """The global model becomes NaN in round 3 (a server step gone wrong): model.safetensors and the
    checkpoint hold round 2, metrics.jsonl ends with the failed round in valid JSON."""
    real = Server.run_round

    def run_round(self: Server, round: int, evaluate: bool) -> Any:
        record = real(self, round, evaluate)
        if round == 3:
            self.params = {k: torch.full_like(v, float("nan")) for k, v in self.params.items()}
        return record

    monkeypatch.setattr(Server, "run_round", run_round)
    run_dir = tmp_path / "run"
    rc, _, err = _cli(["run", *_sets(*TINY, "run.rounds=5", "run.checkpoint_every=1", "run.workers=1"),
                       "--out", str(run_dir)], capfd)
    assert rc == 1 and "training diverged in round 3: the global model holds NaN" in err
    assert "round 2's model" in err
    checkpoint = load_state(run_dir)
    assert checkpoint["round"] == 2
    model = load_file(str(run_dir / "model.safetensors"))
    for name, tensor in model.items():
        assert torch.isfinite(tensor).all()
        assert torch.equal(tensor, checkpoint["params"][name])
    rows = [_strict_json(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[2]["aborted"].startswith("diverged: the global model holds NaN")
    summary = _strict_json((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2 and math.isfinite(summary["test_loss"])


def test_a_run_in_which_no_round_updates_the_model_fails(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _cli(["run", *_sets(*TINY, "faults.dropout_rate=1.0", "run.workers=1"), "--out",
                         str(tmp_path / "run")], capfd)
    assert rc == 1
    assert "no round updated the model: all 2 rounds were aborted" in err
    assert "run finished" not in out + err


def test_the_python_api_raises_with_the_result_attached(tmp_path: Path) -> None:
    with pytest.raises(RunFailed, match="diverged in round 1") as info:
        Experiment(overrides=[*TINY, "train.lr=1e9", "run.workers=1"], quiet=True).run(run_dir=tmp_path / "run")
    assert info.value.result.run_dir == tmp_path / "run" and info.value.result.final["rounds"] == 0


def test_output_without_a_terminal_progress_off_and_quiet(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Not on a terminal: one plain line per round, then the summary with units and the folder.
    run.progress=false drops the round lines only; --quiet prints nothing."""
    rc, out, err = _cli(["run", *_sets(*TINY, "run.workers=1"), "--out", str(tmp_path / "a")], capfd)
    assert rc == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith("round 1/2  clients 3/3  loss ") and " test accuracy " in lines[0]
    assert lines[0].endswith(" s") and lines[1].startswith("round 2/2")
    assert "fedguard run summary" in out and f"run folder: {tmp_path / 'a'}" in out
    assert " MB (" in out or " kB (" in out  # bytes with a unit, the exact count beside
    assert "final_metrics_s" in out and "task's final metrics" in out
    log = (tmp_path / "a" / "log.txt").read_text()
    assert "round 1/2  clients 3/3" in log and "round 2/2" in log

    quick = [*TINY, "run.workers=1", "run.rounds=1", "run.report=false"]
    rc, out, _ = _cli(["run", *_sets(*quick, "run.progress=false"), "--out", str(tmp_path / "b")], capfd)
    assert rc == 0 and "round 1/1" not in out
    assert "fedguard run summary" in out and f"run folder: {tmp_path / 'b'}" in out

    rc, out, err = _cli(["run", "--quiet", *_sets(*quick), "--out", str(tmp_path / "c")], capfd)
    assert rc == 0 and out == "" and err == ""
    assert (tmp_path / "c" / "summary.json").exists()


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli_main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"fedguard {__version__}"


def test_plots_of_a_short_run_have_whole_round_ticks(tmp_path: Path) -> None:
    from fedguard.report.plots import curves_figure

    rows = [{"round": r, "epsilon": 0.3 * r} for r in (1, 2, 3)]
    fig = curves_figure(rows, ["epsilon"], "Privacy", "epsilon")
    ticks = [t for t in fig.axes[0].get_xticks() if 1 <= t <= 3]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks


@pytest.mark.timeout(120)
def test_a_network_server_without_clients_does_not_say_finished(tmp_path: Path) -> None:
    """`fedguard server` with nobody connecting aborts every round: exit 1 and why, no 'run finished'."""
    from fedguard.runtime.network.harness import LocalDeployment

    config = {"run": {"rounds": 2, "report": False}, "data": {"num_clients": 2, "max_train_examples": 200},
              "network": {"wait_timeout_s": 0.2, "round_deadline_s": 0.5, "min_clients": 1}}
    dep = LocalDeployment(tmp_path / "net", clients=2, config=config)
    try:
        server = dep.start_server(tmp_path / "run")
        rc = server.wait(90)
    finally:
        dep.stop_all()
    text = "\n".join(server.lines)
    assert rc == 1, text
    assert "no round updated the model: all 2 rounds were aborted" in text
    assert "run finished" not in text


def test_missing_data_message_tells_cli_users_the_option(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    rc, _, err = _cli(["run", *_sets("data.dataset=mnist", f"data.data_dir={tmp_path}")], capfd)
    assert rc == 2 and "fedguard run --set data.download=true" in err
    assert not (tmp_path / "runs").exists()


def test_every_result_file_the_docs_link_exists() -> None:
    """Each figure in README.md and docs/ links to the committed result line it comes from."""
    import re

    root = Path(__file__).resolve().parents[1]
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(((?:\.\./)?benchmarks/results/[^)]+)\)", doc.read_text()):
            assert (doc.parent / target).resolve().exists(), f"{doc.name} links {target}, which does not exist"


def test_config_load_knows_every_task_without_importing_the_experiment() -> None:
    """The registry check loads the families itself: a fresh Python that imports only Config."""
    import subprocess
    import sys

    code = "from fedguard import Config; print(Config.load(None, ['task.name=gan']).task.name)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "gan", done.stderr[-2000:]
