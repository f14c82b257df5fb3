"""The documentation stays true: the config reference is generated, the README example runs."""

import runpy
from pathlib import Path

from fedguard.config import reference_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_configuration_reference_is_up_to_date():
    import fedguard.experiment  # noqa: F401  (registers every section)

    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert reference_markdown().strip() in doc, (
        "docs/configuration.md is stale: regenerate it with "
        "`python scripts/make_config_doc.py`"
    )


def test_readme_names_install_run_and_test_commands():
    readme = (ROOT / "README.md").read_text()
    for needle in ["pip install", "fedguard run", "python -m pytest"]:
        assert needle in readme


def test_own_model_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = runpy.run_path(str(ROOT / "examples" / "own_model.py"))
    assert namespace["result"].final["test_accuracy"] > 0.8
