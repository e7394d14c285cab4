"""vvu.systemd: the socket-activation variables and sd_notify datagrams, in process."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from vvu import systemd


def test_sockets_meant_for_another_process_are_not_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert systemd.listen_fds() == []
    assert "LISTEN_FDS" not in os.environ  # not passed on to children either


def test_names_come_from_listen_fdnames(monkeypatch: pytest.MonkeyPatch) -> None:
    # fds 200 and 201 stand for 3 and 4, which belong to pytest in this process.
    monkeypatch.setattr(systemd, "LISTEN_FDS_START", 200)
    a, b = socket.socketpair()
    moved = [os.dup2(a.fileno(), 200), os.dup2(b.fileno(), 201)]
    try:
        monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
        monkeypatch.setenv("LISTEN_FDS", "2")
        monkeypatch.setenv("LISTEN_FDNAMES", "vhost:spare")
        assert systemd.listen_fds() == [("vhost", 200), ("spare", 201)]
        assert not os.get_inheritable(200) and not os.get_inheritable(201)
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            assert name not in os.environ
    finally:
        for fd in moved:
            os.close(fd)
        a.close()
        b.close()


def test_notify_sends_one_datagram(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert not systemd.notify("READY=1")  # no service manager: nothing to do
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(tmp_path / "notify"))
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        assert systemd.notify("READY=1\nSTATUS=serving")
        assert manager.recv(4096) == b"READY=1\nSTATUS=serving"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(f"\0vvu-test-{os.getpid()}")
        monkeypatch.setenv("NOTIFY_SOCKET", f"@vvu-test-{os.getpid()}")
        assert systemd.notify("STOPPING=1")
        assert manager.recv(4096) == b"STOPPING=1"
