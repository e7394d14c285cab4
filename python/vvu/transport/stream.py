"""A non-blocking AF_UNIX stream socket on asyncio, with fds as SCM_RIGHTS.

Both protocols vvu speaks over sockets (vhost-user and vfio-user) frame messages the same way at
this level: read exactly N bytes across short reads, collecting the fds that arrive with any of
them; send a whole message with its fds attached to the first byte. Nothing here blocks the event
loop: every wait is a loop reader or writer.
"""

from __future__ import annotations

import array
import asyncio
import errno
import os
import socket
import time
from collections.abc import Sequence

from vvu.transport.base import TransportError

__all__ = ["FdStream", "connect_socket"]

#: Room for many more fds than any message may carry, so that a peer sending too many is caught
#: by the per-message fd check (and its fds closed) instead of losing some to truncation. Past
#: this the kernel sets MSG_CTRUNC and drops the rest: the stream is broken.
MAX_RECV_FDS = 64
_FD_SPACE = socket.CMSG_SPACE(MAX_RECV_FDS * array.array("i").itemsize)


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


class FdStream:
    """One connected stream socket. `broken` is the error class for a stream that can no longer
    be delimited (EOF mid-message, fds lost to truncation); other failures raise TransportError."""

    def __init__(
        self, sock: socket.socket, peer: str, *, broken: type[TransportError] = TransportError
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.peer = peer
        self._broken = broken
        self._send_lock = asyncio.Lock()
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    async def _wait(self, writable: bool) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        fd = self.sock.fileno()

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

    async def recv_exact(self, size: int, fds: list[int], *, at_boundary: bool) -> bytes | None:
        """Exactly `size` bytes, appending the fds that came with them to `fds` (the caller owns
        and closes those, also when this raises). None for a clean EOF before the first byte
        when `at_boundary`."""
        buf = bytearray()
        while len(buf) < size:
            if self.closed:
                raise TransportError(f"{self.peer}: connection closed")
            try:
                data, ancdata, msg_flags, _ = self.sock.recvmsg(size - len(buf), _FD_SPACE)
            except (BlockingIOError, InterruptedError):
                await self._wait(writable=False)
                continue
            except OSError as err:
                raise TransportError(f"{self.peer}: receive failed: {err}") from err
            fds.extend(_take_fds(ancdata))
            if msg_flags & socket.MSG_CTRUNC:
                raise self._broken(
                    f"{self.peer}: more than {MAX_RECV_FDS} fds attached, some were lost"
                )
            if not data:
                if at_boundary and not buf:
                    return None
                raise self._broken(
                    f"{self.peer}: peer closed mid-message ({len(buf)} of {size} bytes)"
                )
            buf += data
        return bytes(buf)

    async def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send `data` whole with `fds` attached to its first byte (the caller keeps them)."""
        async with self._send_lock:
            view = memoryview(data)
            ancillary = (
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                if fds
                else []
            )
            while view:
                if self.closed:
                    raise TransportError(f"{self.peer}: connection closed")
                try:
                    sent = self.sock.sendmsg([view], ancillary)
                except (BlockingIOError, InterruptedError):
                    await self._wait(writable=True)
                    continue
                except OSError as err:
                    raise TransportError(f"{self.peer}: send failed: {err}") from err
                ancillary = []  # fds travel once, with the first byte
                view = view[sent:]

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()


async def connect_socket(
    path: str, *, timeout: float = 0.0, retry_interval: float = 0.1
) -> socket.socket:
    """A connected non-blocking socket to `path` (client mode), retrying for up to `timeout`
    seconds while the socket does not exist yet or refuses connections."""
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, path)
            # A full listen backlog fails an AF_UNIX connect with EAGAIN, which asyncio takes
            # for a connect in progress and reports as done: not connected (ENOTCONN) then.
            try:
                sock.getpeername()
            except OSError as err:
                if err.errno != errno.ENOTCONN:
                    raise
                raise ConnectionRefusedError(errno.ENOTCONN, "listen backlog full") from err
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as err:
            sock.close()
            if time.monotonic() >= deadline:
                raise TransportError(f"cannot connect to {path}: {err.strerror}") from err
            await asyncio.sleep(retry_interval)
        except BaseException:
            sock.close()
            raise
