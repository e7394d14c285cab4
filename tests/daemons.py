"""Helpers for tests that run daemons as child processes: wait for their socket, stop by PID."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """Wait until `proc` has created `path`; fail with its stderr if it exits first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else b""
            raise AssertionError(f"server exited early: {err!r}")
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10) -> int:
    """SIGTERM, wait, SIGKILL if it does not go (and fail then); returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    return proc.returncode
