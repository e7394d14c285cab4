"""virtio-console (virtio id 3): the guest's hvc0, with its host end on a unix socket.

One port, no multiport, no features: queue 0 (receiveq) carries bytes to the guest, queue 1
(transmitq) bytes from it. The host end is a unix socket (`--console-socket PATH`) that one
program at a time connects to (`socat - UNIX-CONNECT:PATH`); what it sends the guest reads from
hvc0, what the guest writes to hvc0 it receives. The connection outlives front-end sessions
(a guest reboot, a QEMU restart); a second program is refused while one is connected.

The device is a short example of the asynchronous request path (`Backend.run_queue`):

- receive buffers are held until host bytes arrive, and the bytes go straight from the socket
  into guest memory (`sock_recv_into` a buffer's memoryview). While the guest gives no buffers,
  nothing is read from the socket: the host's writes block, memory stays bounded;
- a transmit buffer is held until the host program took its bytes (`sock_sendall` from the
  buffer's memoryview, no copy). A host that does not read stops the guest's writes, not the
  device; with no host program connected the guest's output is dropped (and counted).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import logging
import os
import socket
from typing import ClassVar

from vvu.backends.base import Backend
from vvu.backends.request import Request, RequestQueue
from vvu.transport.unix import listening_socket

log = logging.getLogger(__name__)

__all__ = ["ConsoleBackend"]

RECEIVEQ, TRANSMITQ = 0, 1


class ConsoleBackend(Backend):
    """A single-port virtio console whose host end is a unix socket."""

    name: ClassVar[str] = "console"
    device_id: ClassVar[int] = 3

    def __init__(self, *, socket_path: str | None = None, socket_mode: int = 0o600) -> None:
        super().__init__(num_queues=2)
        self.socket_path = socket_path
        #: What happened, by name: rx_bytes, tx_bytes, tx_dropped_bytes, refused_clients,
        #: malformed_chains (a receive buffer with nothing writable, an empty transmit buffer).
        self.stats: collections.Counter[str] = collections.Counter()
        self._listener: socket.socket | None = None
        self._client: socket.socket | None = None
        self._client_changed: asyncio.Event | None = None
        self._accepting: asyncio.Task[None] | None = None
        if socket_path is not None:
            self._listener = listening_socket(socket_path, socket_mode, backlog=1)
            self._listener.setblocking(False)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--console-socket",
            metavar="PATH",
            help=(
                "the host end: a unix socket to listen on; the program connected to it reads "
                "what the guest writes to hvc0 and types what the guest reads "
                "(default: none, the guest's output is dropped)"
            ),
        )

    @classmethod
    def from_arguments(cls, args: argparse.Namespace) -> ConsoleBackend:
        return cls(socket_path=args.console_socket)

    def describe(self) -> str:
        where = self.socket_path or "nowhere (no --console-socket)"
        return f"{super().describe()}, host end {where}"

    # --- the host end ------------------------------------------------------------------------

    def _start_host_end(self) -> asyncio.Event:
        if self._client_changed is None:
            self._client_changed = asyncio.Event()
            if self._listener is not None:
                self._accepting = asyncio.get_running_loop().create_task(self._accept())
        return self._client_changed

    async def _accept(self) -> None:
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        while True:
            client, _ = await loop.sock_accept(self._listener)
            if self._client is not None:
                self.stats["refused_clients"] += 1
                log.warning("console: a second host program was refused (one at a time)")
                client.close()
                continue
            client.setblocking(False)
            log.info("console: host program connected")
            self._client = client
            self._changed()

    def _changed(self) -> None:
        assert self._client_changed is not None
        self._client_changed.set()
        self._client_changed.clear()  # waiters woke; later ones wait for the next change

    def _hang_up(self, client: socket.socket) -> None:
        if self._client is client:
            log.info("console: host program disconnected")
            self._client = None
            client.close()
            self._changed()

    async def _connected(self) -> socket.socket:
        changed = self._start_host_end()
        while self._client is None:
            await changed.wait()
        return self._client

    # --- the queues --------------------------------------------------------------------------

    async def run_queue(self, queue: RequestQueue) -> None:
        self._start_host_end()
        if queue.index == RECEIVEQ:
            await self._receive(queue)
        else:
            await self._transmit(queue)

    async def _receive(self, queue: RequestQueue) -> None:
        """Host → guest: each receive buffer waits for the host's next bytes."""
        loop = asyncio.get_running_loop()
        async for request in queue:
            buffers = request.writable
            if not buffers:
                self.stats["malformed_chains"] += 1
                request.complete(0)
                continue
            while True:
                client = await self._connected()
                try:
                    got = await loop.sock_recv_into(client, buffers[0])
                except OSError:
                    got = 0
                if got:
                    break
                self._hang_up(client)  # end of file: keep the buffer for the next program
            self.stats["rx_bytes"] += got
            request.complete(got)

    async def _transmit(self, queue: RequestQueue) -> None:
        """Guest → host: each transmit buffer is held until the host program took it."""
        async for request in queue:
            try:
                await self._send(request)
            finally:  # also when the ring stops mid-send: the bytes are as good as sent
                request.complete(0)

    async def _send(self, request: Request) -> None:
        length = request.readable_len
        if length == 0:
            self.stats["malformed_chains"] += 1
            return
        client = self._client
        if client is None:
            self.stats["tx_dropped_bytes"] += length
            return
        loop = asyncio.get_running_loop()
        try:
            for view in request.readable:
                await loop.sock_sendall(client, view)
        except OSError:
            self.stats["tx_dropped_bytes"] += length
            self._hang_up(client)
            return
        self.stats["tx_bytes"] += length

    def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            self._accepting = None
        for sock in (self._client, self._listener):
            if sock is not None:
                sock.close()
        self._client = self._listener = None
        if self.socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
