"""Helpers for tests that run daemons as child processes: wait for their socket, stop by PID."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

#: How long a daemon gets to exit after SIGTERM before SIGKILL.
STOP_GRACE = 10.0


def need_tool(tool: str) -> str:
    """The path of a program the test runs, or skip the test (scripts/setup.sh --tests installs
    every one the suite uses)."""
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (scripts/setup.sh --tests installs it)")
    return path


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """Wait until `proc` has created `path`; fail with its stderr if it exits first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else b""
            raise AssertionError(f"server exited early: {err!r}")
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


# As systemd does after fork(): the sockets moved to fds 3, 4, ..., LISTEN_PID set to the PID
# that then execs the service (argv[1:]).
_ACTIVATION_LAUNCHER = """\
import fcntl, os, sys
fds = [int(fd) for fd in os.environ.pop("VVU_TEST_PASS_FDS").split(",")]
moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
for i, fd in enumerate(moved):
    os.dup2(fd, 3 + i)
    os.close(fd)
for fd in fds:
    if not 3 <= fd < 3 + len(fds):
        os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, sys.argv[1:])
"""


def socket_activated(
    argv: Sequence[str],
    sockets: Sequence[socket.socket],
    names: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    **popen: Any,
) -> subprocess.Popen[bytes]:
    """Start `argv` (a Python program: argv[0] is sys.executable) as systemd starts a service
    from .socket units: `sockets` are its fds 3, 4, ... with LISTEN_FDS, LISTEN_PID (the very
    process that runs argv) and, when `names` are given, LISTEN_FDNAMES. The caller closes its
    copies of the sockets."""
    fds = [s.fileno() for s in sockets]
    environment = {
        **(os.environ if env is None else env),
        "LISTEN_FDS": str(len(fds)),
        "VVU_TEST_PASS_FDS": ",".join(map(str, fds)),
        **({"LISTEN_FDNAMES": ":".join(names)} if names is not None else {}),
    }
    return subprocess.Popen(
        [sys.executable, "-c", _ACTIVATION_LAUNCHER, *argv], pass_fds=fds, env=environment, **popen
    )


def notify_socket(path: Path, timeout: float = 10) -> socket.socket:
    """A service manager's NOTIFY_SOCKET at `path`: recv() gets one sd_notify datagram."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(timeout)
    return sock


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

    def wait_for_log(self, text: str, timeout: float = 10) -> str:
        """The log once it holds `text`: a line written after something the test can see (a
        session's last line comes after its socket closed) may not be there yet."""
        deadline = time.monotonic() + timeout
        while text not in (log := self.log()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} in the log:\n{log}")
            time.sleep(0.02)
        return log

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
