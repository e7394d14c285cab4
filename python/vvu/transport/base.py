"""The transport interface the engine sees: ordered messages with fds, nothing else.

A transport never interprets payloads. It frames messages (12-byte header, then exactly `size`
payload bytes), hands over the fds that came with them, and sends bytes plus fds back. A
transport that has no real fds (virtio-vhost-user) synthesises them — a shared-memory fd for a
memory region, an interrupt eventfd for a kick, a doorbell eventfd for a call — so the engine
handles one kind of message whatever carries it.
"""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from vvu.errors import VvuError
from vvu.protocol.constants import HEADER_SIZE, MAX_PAYLOAD

__all__ = ["HEADER_SIZE", "MAX_PAYLOAD", "Channel", "Listener", "RawMessage", "TransportError"]


class TransportError(VvuError):
    """The channel broke: short message, oversized payload, lost fds, or a closed peer."""


@dataclass
class RawMessage:
    """One framed message: the header fields, the payload bytes and the fds that came with it.

    The receiver owns `fds`: whoever consumes the message must adopt or close each one.
    """

    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    def close_fds(self) -> None:
        """Close every fd of this message (for messages that are rejected or need none)."""
        close_fds(self.fds)
        self.fds = []


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def is_eventfd(fd: int) -> bool:
    """Whether `fd` is an eventfd (a peer's "eventfd" may be any fd: a pipe, a socket, a file)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


class Channel(ABC):
    """One session with one peer: an ordered, reliable stream of messages with fds."""

    @abstractmethod
    async def recv(self) -> RawMessage | None:
        """The next message, or None when the peer closed the channel cleanly between messages.

        Raises TransportError when the stream breaks mid-message or violates framing.
        """

    async def serve_each(self, handle: Callable[[RawMessage], Coroutine[Any, Any, None]]) -> None:
        """`handle` each message to the end, one after another in order (the next is read only
        once the previous one's handling returned), until the peer closes cleanly between
        messages; raises what `recv` or a handling raised. A transport may run a handling from
        its event-loop callback as part of the calling task (`UnixChannel`), so a message whose
        handling does not wait costs no task wake-up."""
        while (raw := await self.recv()) is not None:
            await handle(raw)

    @abstractmethod
    async def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send one whole encoded message (header and payload) with `fds` attached.

        The caller keeps ownership of `fds`.
        """

    @abstractmethod
    def open_backend_channel(self, fd: int | None) -> Channel:
        """The back-end channel named by SET_BACKEND_REQ_FD (`fd` is adopted when given)."""

    @abstractmethod
    def close(self) -> None:
        """Close the channel; pending and later operations fail with TransportError."""

    @property
    @abstractmethod
    def peer(self) -> str:
        """A short description of the peer, for logs."""


class Listener(ABC):
    """Accepts sessions, one Channel each."""

    @abstractmethod
    async def accept(self) -> Channel: ...

    @abstractmethod
    def close(self) -> None: ...
