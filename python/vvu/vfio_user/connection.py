"""vfio-user framing over an AF_UNIX stream socket, with fds as SCM_RIGHTS, on asyncio.

A message is a 16-byte header whose `size` covers the whole message, then `size - 16` payload
bytes. Fds ride with the first byte of a message; we collect them from every recvmsg of the
message anyway. A header that cannot be trusted (size below 16 or above the cap, an unknown
message type) is a framing error: `FramingError`, and the session ends, because nothing after it
can be delimited. Everything else about a message is judged by whoever handles it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

from vvu.transport.base import TransportError, close_fds
from vvu.transport.stream import FdStream, connect_socket
from vvu.transport.unix import UnixListener
from vvu.vfio_user.protocol import HEADER_SIZE, TYPE_COMMAND, TYPE_REPLY, Header

__all__ = ["Frame", "FramingError", "VfioUserConnection", "VfioUserListener", "connect_unix"]

log = logging.getLogger(__name__)


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


class VfioUserConnection:
    """One connected socket: `recv()` whole frames, `send()` whole messages."""

    def __init__(self, sock: socket.socket, peer: str, *, max_message_size: int) -> None:
        self._stream = FdStream(sock, peer, broken=FramingError)
        self.peer = peer
        self.max_message_size = max_message_size

    @property
    def closed(self) -> bool:
        return self._stream.closed

    def fileno(self) -> int:
        return self._stream.fileno()

    async def recv(self) -> Frame | None:
        """The next message, or None on a clean EOF between messages."""
        fds: list[int] = []
        try:
            raw = await self._stream.recv_exact(HEADER_SIZE, fds, at_boundary=True)
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
            payload = await self._stream.recv_exact(body, fds, at_boundary=False) if body else b""
        except BaseException:
            close_fds(fds)
            raise
        assert payload is not None
        return Frame(header, payload, fds)

    async def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send one whole message with `fds` attached to its first byte (caller keeps them)."""
        await self._stream.send(data, fds)

    def close(self) -> None:
        self._stream.close()


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
    return await connect_socket(path, timeout=timeout, retry_interval=retry_interval)
