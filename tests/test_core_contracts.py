"""The contracts in fedguard.core import nothing above them, and the old import paths still work."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import fedguard.core

CORE = Path(fedguard.core.__file__).parent


def fedguard_imports(path: Path) -> set[str]:
    """The fedguard modules a file imports (at any level, TYPE_CHECKING blocks included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n == "fedguard" or n.startswith("fedguard.")}


def test_core_imports_only_core():
    for path in sorted(CORE.glob("*.py")):
        above = sorted(n for n in fedguard_imports(path) if not n.startswith("fedguard.core"))
        assert not above, f"{path.name} imports {above}: a contract must not depend on what implements it"


def test_importing_core_loads_no_runtime_task_or_family():
    code = (
        "import sys, importlib, pkgutil, fedguard.core as c\n"
        "for m in pkgutil.iter_modules(c.__path__): importlib.import_module('fedguard.core.' + m.name)\n"
        "loaded = [m for m in sys.modules if m.startswith('fedguard.') and not m.startswith('fedguard.core')]\n"
        "print(' '.join(sorted(loaded)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [], f"importing fedguard.core loaded {out}"


def test_old_import_paths_are_the_same_objects():
    from fedguard.core import communicator, messages, pipeline, state, types
    from fedguard.messages import Message
    from fedguard.pipeline.base import Aggregator, ConfigurationError, UpdatePipeline
    from fedguard.runtime.base import Communicator, FaultModel, client_generator, encode_state
    from fedguard.runtime.state_store import StateStore
    from fedguard.types import Params, flatten

    assert Message is messages.Message and Params is types.Params and flatten is types.flatten
    assert Aggregator is pipeline.Aggregator and UpdatePipeline is pipeline.UpdatePipeline
    assert ConfigurationError is pipeline.ConfigurationError
    assert Communicator is communicator.Communicator and FaultModel is communicator.FaultModel
    assert client_generator is communicator.client_generator and encode_state is state.encode_state
    assert StateStore is state.StateStore
