"""systemd's two service protocols, the few lines vvu needs of them.

Socket activation (sd_listen_fds(3)): the service manager passes listening sockets as fds 3, 4,
... and says so in ``LISTEN_FDS`` (how many), ``LISTEN_PID`` (for which process: a child that
inherits the environment must not take them) and ``LISTEN_FDNAMES`` (colon-separated names, from
``FileDescriptorName=`` in the .socket unit; ``unknown`` when unnamed).

Readiness (sd_notify(3)): with ``Type=notify`` the service sends ``READY=1`` once it serves and
``STOPPING=1`` when it begins to stop, as datagrams to the AF_UNIX socket named in
``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace).

Written out rather than taken from a library: the protocols are a handful of lines and stable;
the maintained binding (python-systemd) links libsystemd and needs its headers to build, which a
pip-installable package with a native core should not require, and the small pure-Python
notifiers on PyPI cover only half of this.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket

log = logging.getLogger(__name__)

#: The first fd systemd passes (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3


def listen_fds() -> list[tuple[str, int]]:
    """The sockets systemd passed to this process, as (name, fd), in fd order; [] when none
    were passed (or they were meant for another process). The LISTEN_* variables are removed
    from the environment so that children do not see them, and the fds are made close-on-exec
    (as sd_listen_fds(1) does)."""
    pid, count = os.environ.get("LISTEN_PID"), os.environ.get("LISTEN_FDS")
    names = os.environ.get("LISTEN_FDNAMES")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if pid is None or count is None:
        return []
    try:
        if int(pid) != os.getpid():
            return []
        n = int(count)
    except ValueError:
        log.warning("ignoring malformed LISTEN_PID=%r LISTEN_FDS=%r", pid, count)
        return []
    fds = list(range(LISTEN_FDS_START, LISTEN_FDS_START + max(n, 0)))
    labels = names.split(":") if names is not None else []
    if len(labels) != len(fds):
        labels = ["unknown"] * len(fds)
    for fd in fds:
        fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.fcntl(fd, fcntl.F_GETFD) | fcntl.FD_CLOEXEC)
    return list(zip(labels, fds, strict=True))


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1", newline-separated assignments) to the service manager;
    False when there is none (no NOTIFY_SOCKET) or it could not be reached (logged)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as err:
        log.warning("cannot notify the service manager at %s: %s", address.lstrip("\0"), err)
        return False
    return True
