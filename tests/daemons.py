"""Helpers for tests that run daemons as child processes: wait for their socket, stop by PID."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

#: How long a daemon gets to exit after SIGTERM before SIGKILL.
STOP_GRACE = 10.0


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


class Daemon:
    """`vvu -v serve ...` in a child process, logging to a file; stopped by PID. Construction
    waits until the daemon has created `socket_path`, unless `wait` is false (a client-mode
    back-end creates no socket)."""

    def __init__(
        self,
        args: Sequence[str],
        socket_path: Path,
        log_path: Path,
        *,
        command: str = "serve",
        wait: bool = True,
    ) -> None:
        self.socket_path = socket_path
        self.log_path = log_path
        argv = [sys.executable, "-m", "vvu", "-v", command, *args]
        setpriv = shutil.which("setpriv")
        if setpriv is not None:  # killed if the test process dies without cleaning up
            argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        try:
            deadline = time.monotonic() + 10
            while wait and not socket_path.exists():
                if self.proc.poll() is not None:
                    raise AssertionError(f"vvu serve exited early:\n{self.log()}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"{socket_path} did not appear:\n{self.log()}")
                time.sleep(0.02)
        except BaseException:
            self.stop()
            raise

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after a grace period; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
