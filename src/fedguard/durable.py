"""Files that survive a crash and files only their owner can read.

:func:`write_durably` writes, sets the permissions (also of a file that existed) and fsyncs;
:func:`fsync_dir` makes a rename durable. Secrets (client keys, SecAgg and CKKS state) are
written with :func:`write_private` (mode 0600). Only :mod:`os`: cheap to import anywhere.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_durably(path: str | Path, data: bytes, mode: int = 0o644, sync: bool = True) -> None:
    """Write ``data`` to ``path`` with permissions ``mode`` (also when it existed) and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode applies to new files only, and through the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def write_private(path: str | Path, data: bytes, sync: bool = True) -> None:
    """Write a file only its owner can read or write (0600): keys, seeds, secret state."""
    write_durably(path, data, 0o600, sync)


def fsync_dir(folder: str | Path) -> None:
    """Make renames and unlinks in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
