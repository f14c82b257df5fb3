"""`fedguard server` copies its stderr through tlslog's pump thread; what a process writes just before it exits
(why a run failed) must still reach the real stderr (the pump is drained at exit, not killed with the process)."""

from __future__ import annotations

import subprocess
import sys


def test_the_last_lines_before_exit_reach_the_real_stderr() -> None:
    code = (
        "import sys\n"
        "from fedguard.runtime.network import tlslog\n"
        "tlslog.install()\n"
        "sys.stderr.write('x' * 4_000_000 + '\\n')\n"  # more than the pump copies before the interpreter ends
        "sys.stderr.write('fedguard: run failed: the last line\\n')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stderr.endswith("fedguard: run failed: the last line\n")
    assert len(out.stderr) == 4_000_001 + len("fedguard: run failed: the last line\n")
