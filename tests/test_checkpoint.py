"""Crash safety of checkpoints and the permissions of files that hold secrets.

The adversary here is bad luck: the server process dies (SIGKILL, power loss) at any point
of a checkpoint commit. Whatever is on disk afterwards must load as the old checkpoint or
the new one, never a mix of the two (issue 14: the two-rename commit left round-1 JSON beside
round-2 tensors and loaded it without error).
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import stat
import time
from pathlib import Path

import pytest
import torch

from fedguard import checkpoint
from fedguard.checkpoint import CheckpointError, load_state, save_state
from fedguard.runtime.network import auth
from fedguard.runtime.state_store import DirectoryStateStore


def _state(round: int) -> dict:
    """A state whose JSON part and tensor part both say which round it is."""
    return {"round": round, "params": {"w": torch.full((64, 64), float(round))}, "ledger": [{"steps": round}]}


def _assert_consistent(folder: Path, allowed: set[int]) -> int:
    state = load_state(folder)
    r = state["round"]
    assert r in allowed, f"loaded round {r}, expected one of {allowed}"
    assert torch.equal(state["params"]["w"], torch.full((64, 64), float(r))), "JSON and tensors of different rounds"
    assert state["ledger"] == [{"steps": r}]
    return r


class Crash(Exception):
    pass


def _crash_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Make the step-th file-system operation of a commit raise (the process dies there)."""
    calls = {"n": 0}

    def wrap(fn):
        def inner(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == step:
                raise Crash(f"crash at operation {step}")
            return fn(*args, **kwargs)

        return inner

    monkeypatch.setattr(checkpoint, "write_durably", wrap(checkpoint.write_durably))
    monkeypatch.setattr(checkpoint, "fsync_dir", wrap(checkpoint.fsync_dir))
    monkeypatch.setattr(checkpoint.os, "replace", wrap(os.replace))


@pytest.mark.parametrize("step", range(1, 7))
def test_a_crash_at_any_step_of_a_commit_leaves_the_old_or_the_new_checkpoint(tmp_path, monkeypatch, step) -> None:
    save_state(tmp_path, _state(1))
    _crash_at(monkeypatch, step)
    try:
        save_state(tmp_path, _state(2))
        crashed = False
    except Crash:
        crashed = True
    monkeypatch.undo()
    got = _assert_consistent(tmp_path, {1, 2})
    if crashed and step <= 5:  # up to the manifest's rename nothing of round 2 is visible
        assert got == 1
    save_state(tmp_path, _state(3))  # the next commit works and cleans up the leftovers
    assert _assert_consistent(tmp_path, {3}) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["checkpoint.json", next(p.name for p in tmp_path.glob("checkpoint-*.safetensors"))]
    )


def test_a_torn_or_swapped_tensor_file_is_refused_not_mixed(tmp_path: Path) -> None:
    save_state(tmp_path, _state(1))
    (tensors,) = tmp_path.glob("checkpoint-*.safetensors")
    good = tensors.read_bytes()
    tensors.write_bytes(good[: len(good) // 2])  # a write the disk lost half of
    with pytest.raises(CheckpointError, match="does not match the hash"):
        load_state(tmp_path)
    other = tmp_path / "other"
    save_state(other, _state(2))
    (theirs,) = other.glob("checkpoint-*.safetensors")
    tensors.write_bytes(theirs.read_bytes())  # round-2 tensors under round 1's name
    with pytest.raises(CheckpointError):
        load_state(tmp_path)


def test_checkpoints_of_the_earlier_two_file_format_still_load(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"/params/w": torch.ones(2)}, str(tmp_path / "checkpoint.safetensors"))
    (tmp_path / "checkpoint.json").write_text('{"round": 4, "params": {"w": {"__tensor__": "/params/w"}}}')
    state = load_state(tmp_path)
    assert state["round"] == 4 and torch.equal(state["params"]["w"], torch.ones(2))


def _save_forever(folder: str) -> None:
    r = 1
    while True:
        save_state(folder, _state(r))
        r += 1


def test_sigkill_during_commits_never_leaves_a_mixed_checkpoint(tmp_path: Path) -> None:
    """A process commits checkpoints in a loop and is SIGKILLed at random moments."""
    ctx = multiprocessing.get_context("fork")
    rng = random.Random(0)
    last = 0
    save_state(tmp_path, _state(0))
    for _ in range(6):
        child = ctx.Process(target=_save_forever, args=(str(tmp_path),), daemon=True)
        child.start()
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        assert child.exitcode == -signal.SIGKILL
        last = _assert_consistent(tmp_path, set(range(0, 100_000)))
    assert last >= 1, "the child never committed a checkpoint"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_client_state_files_holding_secrets_are_owner_only(tmp_path: Path) -> None:
    """Another local user must not read a client's SecAgg keys, mask seeds or CKKS secret key."""
    folder = tmp_path / "state"
    folder.mkdir(mode=0o755)
    old = folder / "client-3.safetensors"
    old.write_bytes(b"")
    old.chmod(0o644)  # left by an earlier version
    for durable in (False, True):
        store = DirectoryStateStore(folder, durable=durable)
        store.save(3, {"secagg/b_u": torch.arange(4), "note": "secret"})
        assert _mode(folder) == 0o700 and _mode(old) == 0o600
        assert store.load(3)["note"] == "secret"
    key_file = tmp_path / "client-0.key"
    key_file.write_text("{}")
    key_file.chmod(0o644)
    auth.write_key_file(key_file, 0, auth.new_key())
    assert _mode(key_file) == 0o600
