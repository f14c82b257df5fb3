"""A job in a forked child process whose results come back as files, never as pickle.

The centralized baseline can run at the same time as the federated run
(``run.baseline_concurrent``): the child inherits the configuration, task and data by
``fork`` (copy-on-write), writes its run folder like any run, and the parent reads that
folder back once the child has finished. Nothing but files written by the child crosses the
process boundary; a failure in the child comes back as the traceback text it wrote.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from collections.abc import Callable
from pathlib import Path

import torch


def fork_available() -> bool:
    """Whether this platform can fork (Linux, most Unixes; not Windows)."""
    return "fork" in mp.get_all_start_methods()


def _child_main(job: Callable[[], None], error_path: str, threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        job()
    except BaseException:  # the parent reports it; the child must still exit non-zero
        Path(error_path).write_text(traceback.format_exc())
        os._exit(1)


class ForkedJob:
    """Runs ``job()`` in a forked process with ``threads`` torch threads.

    ``error_path`` is where the child writes its traceback if ``job`` raises; :meth:`wait`
    then raises it in the parent. Start it before the parent's own heavy torch work.
    """

    def __init__(self, job: Callable[[], None], error_path: Path, threads: int = 1, name: str = "job") -> None:
        if not fork_available():
            raise RuntimeError("a forked job needs the 'fork' start method, which this platform lacks")
        self.name, self.error_path = name, Path(error_path)
        self.error_path.unlink(missing_ok=True)
        ctx = mp.get_context("fork")
        self._proc = ctx.Process(target=_child_main, args=(job, str(self.error_path), threads), daemon=True)

    def start(self) -> ForkedJob:
        """Fork the child; returns self."""
        self._proc.start()
        return self

    def wait(self) -> None:
        """Block until the child ends; raise with its traceback if it failed."""
        self._proc.join()
        code = self._proc.exitcode
        if code == 0:
            return
        if self.error_path.exists():
            cause = self.error_path.read_text().strip().splitlines()[-1]
            raise RuntimeError(f"{self.name} failed in its child process: {cause} (traceback: {self.error_path})")
        raise RuntimeError(f"{self.name}: its child process ended with exit code {code} and left no traceback")

    def cancel(self) -> None:
        """Stop the child if it is still running (the parent failed or was interrupted)."""
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(timeout=10)
