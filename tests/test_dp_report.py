"""epsilon_server beside epsilon_model: in the per-round progress line, report.md and the summary (issue 13)."""

import math

from fedguard import Experiment
from fedguard.report.progress import round_line

TINY = ["run.workers=1", "data.max_train_examples=240", "data.num_clients=4", "run.rounds=2",
        "train.batch_size=20", "dp.accountant=rdp", "run.eval_every=0"]


def test_progress_line_shows_both_epsilons() -> None:
    row = {"completed_clients": 2, "sampled_clients": 2, "epsilon": 1.25, "epsilon_model": 1.25}
    assert round_line({**row, "epsilon_server": 3.5}, 2, "accuracy").endswith("eps model 1.25 server 3.5")
    assert "eps model 1.25 server inf" in round_line({**row, "epsilon_server": math.inf}, 2, "accuracy")
    assert "server inf" in round_line({**row, "epsilon_server": None}, 2, "accuracy")  # read back from JSON
    assert round_line({k: v for k, v in row.items() if k != "epsilon_model"}, 2, "accuracy").endswith("eps 1.25")


def test_a_client_level_run_reports_epsilon_server_beside_epsilon_model(tmp_path, capsys) -> None:
    """Central noise: the server is trusted, so epsilon_server is infinite (null in JSON, inf in the report)."""
    result = Experiment(overrides=[*TINY, "run.progress=true", "run.report=true", "dp.mode=client",
                                   "server.weighting=uniform"]).run(run_dir=tmp_path / "run")
    out = capsys.readouterr().out
    model = result.final["epsilon_model"]
    assert model > 0 and result.final["epsilon_server"] == math.inf
    assert f"eps model {model:.3g} server inf" in out  # the last round's progress line
    keys = list(result.final)
    assert keys.index("epsilon_server") == keys.index("epsilon_model") + 1  # side by side in the summary
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| epsilon_model |" in report and "| epsilon_server | inf |" in report
    header = next(line for line in report.splitlines() if line.startswith("| round |"))
    assert "| epsilon | epsilon_server |" in header
    last = [line for line in report.splitlines() if line.startswith("| 2 |")][-1]
    assert last.split(" | ")[header.split(" | ").index("epsilon_server")] == "inf"
