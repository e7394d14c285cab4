"""vhost-user over AF_UNIX stream sockets, with fds as SCM_RIGHTS, on asyncio.

Nothing here blocks the event loop: sockets are non-blocking and every wait is a loop reader or
writer. A message is read as a 12-byte header and then exactly `size` payload bytes across short
reads; fds are collected from every recvmsg of the message (the spec sends them with the first
byte). The payload cap is checked before a byte of payload is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from vvu.protocol.codec import HEADER_LAYOUT
from vvu.transport.base import (
    HEADER_SIZE,
    MAX_PAYLOAD,
    Channel,
    Listener,
    RawMessage,
    TransportError,
    close_fds,
)
from vvu.transport.stream import FdStream, connect_socket

log = logging.getLogger(__name__)


class UnixChannel(Channel):
    """One connected AF_UNIX stream socket."""

    def __init__(self, sock: socket.socket, peer: str = "unix") -> None:
        self._stream = FdStream(sock, peer)

    @property
    def peer(self) -> str:
        return self._stream.peer

    def fileno(self) -> int:
        return self._stream.fileno()

    async def recv(self) -> RawMessage | None:
        fds: list[int] = []
        try:
            frame = await self._stream.recv_frame(HEADER_SIZE, self._payload_size, fds)
        except BaseException:
            close_fds(fds)
            raise
        if frame is None:
            return None
        header, payload = frame
        request, flags, _ = HEADER_LAYOUT.unpack(header)
        return RawMessage(request, flags, payload, fds)

    async def serve_each(self, handle: Callable[[RawMessage], Coroutine[Any, Any, None]]) -> None:
        def handle_frame(
            header: bytes, payload: bytes, fds: list[int]
        ) -> Coroutine[Any, Any, None]:
            request, flags, _ = HEADER_LAYOUT.unpack(header)
            return handle(RawMessage(request, flags, payload, fds))

        await self._stream.serve_frames(HEADER_SIZE, self._payload_size, handle_frame)

    def _payload_size(self, header: bytes) -> int:
        request, _, size = HEADER_LAYOUT.unpack(header)
        if size > MAX_PAYLOAD:
            raise TransportError(
                f"{self.peer}: request {request} announces {size} payload bytes, "
                f"more than the {MAX_PAYLOAD}-byte cap"
            )
        return int(size)

    async def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        await self._stream.send(data, fds)

    def open_backend_channel(self, fd: int | None) -> Channel:
        if fd is None:
            raise TransportError("SET_BACKEND_REQ_FD over AF_UNIX needs a socket fd")
        try:
            sock = socket.socket(fileno=fd)
        except OSError as err:
            os.close(fd)
            raise TransportError(f"back-end channel fd {fd} is not a socket: {err}") from err
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.close()
            raise TransportError("back-end channel fd is not an AF_UNIX stream socket")
        return UnixChannel(sock, peer=f"{self.peer} (back-end channel)")

    def close(self) -> None:
        self._stream.close()


class UnixListener(Listener):
    """A listening AF_UNIX socket: bound to a path (created with `mode`) or inherited as an fd."""

    def __init__(
        self, path: str | None = None, *, fd: int | None = None, mode: int = 0o600
    ) -> None:
        if (path is None) == (fd is None):
            raise ValueError("give exactly one of path or fd")
        self._path = path
        if fd is not None:
            sock = socket.socket(fileno=fd)
            if sock.family != socket.AF_UNIX:
                sock.detach()
                raise ValueError(f"fd {fd} is not an AF_UNIX socket")
        else:
            assert path is not None
            sock = listening_socket(path, mode)
        sock.setblocking(False)
        self._sock = sock
        self._count = 0

    @property
    def path(self) -> str | None:
        return self._path

    async def accept(self) -> UnixChannel:
        loop = asyncio.get_running_loop()
        conn, _ = await loop.sock_accept(self._sock)
        self._count += 1
        return UnixChannel(conn, peer=f"front-end #{self._count}")

    def close(self) -> None:
        self._sock.close()
        if self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)


class UnixConnector(Listener):
    """Client mode: the back-end connects to a front-end that listens on `path` (QEMU's
    `-chardev socket,server=on`, DPDK's vhost client mode). Each `accept()` is a new connection,
    so a back-end serving "forever" finds its front-end again after a session ends or after
    either side restarts. Between attempts it waits `retry_first` seconds, doubling up to
    `retry_max`: while nobody listens (no socket file, refused), and after a session that lasted
    less than `retry_max` (a front-end that accepts and drops at once is not hammered). The wait
    starts short again after a session that lasted longer."""

    def __init__(self, path: str, *, retry_first: float = 0.05, retry_max: float = 2.0) -> None:
        self._path = path
        self.retry_first = retry_first
        self.retry_max = retry_max
        self._delay = retry_first
        self._connected_at: float | None = None
        self._count = 0

    @property
    def path(self) -> str:
        return self._path

    async def _back_off(self) -> None:
        await asyncio.sleep(self._delay)
        self._delay = min(self._delay * 2, self.retry_max)

    async def accept(self) -> UnixChannel:
        loop = asyncio.get_running_loop()
        if self._connected_at is not None:  # the previous session ended
            if time.monotonic() - self._connected_at < self.retry_max:
                await self._back_off()
            else:
                self._delay = self.retry_first
        failing = False
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, self._path)
            except OSError as err:
                sock.close()
                # One line for a run of failures, not one per attempt.
                log.log(
                    logging.DEBUG if failing else logging.INFO,
                    "%s: cannot connect (%s); retrying until a front-end listens",
                    self._path,
                    err.strerror or err,
                )
                failing = True
                await self._back_off()
                continue
            except BaseException:
                sock.close()
                raise
            self._connected_at = time.monotonic()
            self._count += 1
            return UnixChannel(sock, peer=f"front-end #{self._count}")

    def close(self) -> None:
        """Nothing to release: the socket file is the front-end's."""


def inherited_socket(fd: int) -> UnixListener | UnixChannel:
    """The AF_UNIX stream socket a parent passed as `fd` (`--fd N`, systemd socket activation):
    a listening socket becomes a listener (front-ends one after another), a connected one the
    channel of its single session. SO_ACCEPTCONN tells them apart, as the back-end program
    conventions ask (libvirt passes either, depending on the device type)."""
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ValueError(f"fd {fd} is not an AF_UNIX stream socket")
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        return UnixListener(fd=fd)
    sock.setblocking(False)
    return UnixChannel(sock, peer=f"front-end on fd {fd}")


def listening_socket(path: str, mode: int = 0o600, backlog: int = 16) -> socket.socket:
    """A listening AF_UNIX socket bound to `path`, its file created with `mode` from the start
    (no window where it is more open than asked). A stale socket file left by a dead server is
    replaced; anything else at `path` is refused (FileExistsError)."""
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        old_umask = os.umask(0o777 & ~mode)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, mode)
        sock.listen(backlog)
    except OSError as err:
        sock.close()
        if err.filename is not None:
            raise
        # bind() does not name the path, and "No such file or directory" alone says nothing.
        raise OSError(err.errno, err.strerror, path) from err
    except BaseException:
        sock.close()
        raise
    return sock


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left behind by a dead server; refuse to clobber anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nobody listens: stale
        return
    finally:
        probe.close()
    raise FileExistsError(errno.EADDRINUSE, "another server is listening on", path)


async def connect_unix(
    path: str, *, timeout: float = 0.0, retry_interval: float = 0.1
) -> UnixChannel:
    """Connect to a listening back-end (client mode), retrying for up to `timeout` seconds while
    the socket does not exist yet or refuses connections."""
    sock = await connect_socket(path, timeout=timeout, retry_interval=retry_interval)
    return UnixChannel(sock, peer=path)


def socketpair_channels() -> tuple[UnixChannel, UnixChannel]:
    """Two connected channels (tests, and in-process front-end ↔ back-end)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return UnixChannel(a, peer="pair-a"), UnixChannel(b, peer="pair-b")
