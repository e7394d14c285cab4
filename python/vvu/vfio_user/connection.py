"""vfio-user framing over an AF_UNIX stream socket, with fds as SCM_RIGHTS, on asyncio.

A message is a 16-byte header whose `size` covers the whole message, then `size - 16` payload
bytes. Fds ride with the first byte of a message; we collect them from every recvmsg of the
message anyway. A header that cannot be trusted (size below 16 or above the cap, an unknown
message type) is a framing error: `FramingError`, and the session ends, because nothing after it
can be delimited. Everything else about a message is judged by whoever handles it.
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from vvu.transport.base import TransportError, close_fds
from vvu.transport.unix import UnixListener
from vvu.vfio_user.protocol import HEADER_SIZE, TYPE_COMMAND, TYPE_REPLY, Header

__all__ = ["Frame", "FramingError", "VfioUserConnection", "VfioUserListener", "connect_unix"]

log = logging.getLogger(__name__)

# Room for many more fds than anything may carry, so that a peer sending too many is caught by
# the per-command fd check (and its fds closed) rather than losing some to truncation. Past this
# the kernel sets MSG_CTRUNC and the fds are gone: a framing error.
MAX_RECV_FDS = 64
_FD_SPACE = socket.CMSG_SPACE(MAX_RECV_FDS * array.array("i").itemsize)


class FramingError(TransportError):
    """The stream cannot be delimited any more: bad header, truncated fds, EOF mid-message."""


@dataclass
class Frame:
    """One received message. The receiver owns `fds` and must adopt or close every one."""

    header: Header
    payload: bytes
    fds: list[int] = field(default_factory=list)

    def close_fds(self) -> None:
        close_fds(self.fds)
        self.fds = []


def _take_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            usable = len(data) - len(data) % arr.itemsize
            arr.frombytes(data[:usable])
            fds.extend(arr)
    for fd in fds:
        os.set_inheritable(fd, False)
    return fds


class VfioUserConnection:
    """One connected socket: `recv()` whole frames, `send()` whole messages."""

    def __init__(self, sock: socket.socket, peer: str, *, max_message_size: int) -> None:
        sock.setblocking(False)
        self._sock = sock
        self.peer = peer
        self.max_message_size = max_message_size
        self._send_lock = asyncio.Lock()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def fileno(self) -> int:
        return self._sock.fileno()

    async def _wait(self, writable: bool) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        fd = self._sock.fileno()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        if writable:
            loop.add_writer(fd, ready)
        else:
            loop.add_reader(fd, ready)
        try:
            await fut
        finally:
            if writable:
                loop.remove_writer(fd)
            else:
                loop.remove_reader(fd)

    async def _recv_exact(self, size: int, fds: list[int], *, at_boundary: bool) -> bytes | None:
        buf = bytearray()
        while len(buf) < size:
            if self._closed:
                raise TransportError(f"{self.peer}: connection closed")
            try:
                data, ancdata, msg_flags, _ = self._sock.recvmsg(size - len(buf), _FD_SPACE)
            except (BlockingIOError, InterruptedError):
                await self._wait(writable=False)
                continue
            except OSError as err:
                raise TransportError(f"{self.peer}: receive failed: {err}") from err
            fds.extend(_take_fds(ancdata))
            if msg_flags & socket.MSG_CTRUNC:
                raise FramingError(
                    f"{self.peer}: more than {MAX_RECV_FDS} fds attached, some were lost"
                )
            if not data:
                if at_boundary and not buf:
                    return None
                raise FramingError(
                    f"{self.peer}: peer closed mid-message ({len(buf)} of {size} bytes)"
                )
            buf += data
        return bytes(buf)

    async def recv(self) -> Frame | None:
        """The next message, or None on a clean EOF between messages."""
        fds: list[int] = []
        try:
            raw = await self._recv_exact(HEADER_SIZE, fds, at_boundary=True)
            if raw is None:
                return None
            header = Header.unpack(raw)
            if header.size < HEADER_SIZE or header.size > self.max_message_size:
                raise FramingError(
                    f"{self.peer}: message id {header.id} command {header.command} claims "
                    f"{header.size} bytes (allowed {HEADER_SIZE}..{self.max_message_size})"
                )
            if header.msg_type not in (TYPE_COMMAND, TYPE_REPLY):
                raise FramingError(f"{self.peer}: message type {header.msg_type} is unknown")
            body = header.size - HEADER_SIZE
            payload = await self._recv_exact(body, fds, at_boundary=False) if body else b""
        except BaseException:
            close_fds(fds)
            raise
        assert payload is not None
        return Frame(header, payload, fds)

    async def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send one whole message with `fds` attached to its first byte (caller keeps them)."""
        async with self._send_lock:
            view = memoryview(data)
            ancillary = (
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                if fds
                else []
            )
            while view:
                if self._closed:
                    raise TransportError(f"{self.peer}: connection closed")
                try:
                    sent = self._sock.sendmsg([view], ancillary)
                except (BlockingIOError, InterruptedError):
                    await self._wait(writable=True)
                    continue
                except OSError as err:
                    raise TransportError(f"{self.peer}: send failed: {err}") from err
                ancillary = []
                view = view[sent:]

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sock.close()


class VfioUserListener(UnixListener):
    """A listening AF_UNIX socket (bound to a path created with `mode`, or inherited as an fd),
    handing out raw sockets for vfio-user sessions. Stale socket files are replaced; anything
    else at the path is refused."""

    async def accept_socket(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        conn, _ = await loop.sock_accept(self._sock)
        return conn


async def connect_unix(
    path: str, *, timeout: float = 0.0, retry_interval: float = 0.05
) -> socket.socket:
    """A connected non-blocking socket to `path`, retrying for up to `timeout` seconds while the
    socket does not exist yet or refuses connections."""
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as err:
            sock.close()
            if time.monotonic() >= deadline:
                raise TransportError(f"cannot connect to {path}: {err.strerror}") from err
            await asyncio.sleep(retry_interval)
        except BaseException:
            sock.close()
            raise
