"""Run the real CLI on hostile input and check the refusal contract of issue 14.

``run_cli`` starts ``python -m rwkv_opt.cli ...`` from the repository root (so the code under test
is what runs) and measures the child alone: wall time, and its peak resident set from
``os.wait4`` (ru_maxrss of that one process; RUSAGE_CHILDREN would be the maximum over every child
the test process ever had). ``assert_refused`` then checks what every refusal must look like.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MAX_SECONDS = 10.0
MAX_BYTES = 1 << 30


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str
    seconds: float
    peak_bytes: int  # the child's maximum resident set


def run_cli(*args, timeout: float = 120.0) -> Run:
    """Run the CLI with ``args``; kill it after ``timeout`` seconds (then ``code`` is -9)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "rwkv_opt.cli", *map(str, args)],
            cwd=REPO,
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
        )
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            killer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
        seconds = time.monotonic() - start
        out.seek(0)
        err.seek(0)
        return Run(
            proc.returncode,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
            seconds,
            usage.ru_maxrss * 1024,
        )


def assert_refused(run: Run, *words: str) -> str:
    """Exit code 2, one line on stderr that says ``words``, no traceback, within 10 s and 1 GB.

    Returns the message (after "rwkv-opt: error: ")."""
    assert run.code == 2, (run.code, run.stderr[-2000:])
    assert "Traceback" not in run.stderr + run.stdout, run.stderr[-2000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rwkv-opt: error: "), run.stderr[-2000:]
    message = lines[0].removeprefix("rwkv-opt: error: ")
    assert len(message) < 500, message
    for word in words:
        assert word in message, (word, message)
    assert run.seconds < MAX_SECONDS, (run.seconds, message)
    assert run.peak_bytes < MAX_BYTES, (run.peak_bytes, message)
    return message
