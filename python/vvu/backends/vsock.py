"""virtio-vsock (virtio id 19): guest sockets reach host programs through unix sockets.

The host side follows the layout users of Firecracker and rust-vmm's `vhost-device-vsock`
script against (`--uds-path PATH`):

- host → guest: a program connects to PATH and writes `CONNECT <port>\\n`; once the guest
  accepts, it reads `OK <host port>\\n` and the connection is a byte stream to the guest's
  listener on <port> (refused or failed: the program's socket is closed);
- guest → host: a guest connection to CID 2 (the host), port P, is a connection to the unix
  socket `PATH_P`, where a host program listens (nobody there: the guest gets a reset).

Streams only (no SEQPACKET), with the virtio credit-based flow control: the device sends a
connection's data only while the guest has room for it (its `buf_alloc` minus what is in
flight), and offers the guest `BUF_ALLOC` bytes per connection, read from the host socket as
the host program takes them. A malformed packet is counted and dropped; one for a connection it
cannot belong to is answered with a reset (RST).

On the asynchronous request path (`Backend.run_queue`): receive buffers (queue 0) are held until
there is a packet for the guest; transmit buffers (queue 1) are written to the host socket and
completed at once when it takes them, else handed to their connection and completed when the
host program took the bytes, so a slow host program holds back only its own connection
(completions come out of order); event buffers (queue 2) are held (transport reset events are
not sent).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import enum
import itertools
import logging
import os
import socket
import struct
from dataclasses import dataclass, field
from typing import ClassVar

from vvu.backends.base import Backend
from vvu.backends.request import Request, RequestQueue
from vvu.transport.unix import listening_socket

log = logging.getLogger(__name__)

__all__ = ["VsockBackend"]

RXQ, TXQ, EVENTQ = 0, 1, 2
HOST_CID = 2
HEADER = struct.Struct("<QQIIIHHIII")  # virtio_vsock_hdr, 44 bytes
TYPE_STREAM = 1
SHUTDOWN_RCV, SHUTDOWN_SEND = 1, 2
#: What the device offers the guest per connection (bytes in flight towards the host program).
BUF_ALLOC = 256 * 1024
#: Largest payload read from a host socket for one packet.
MAX_PAYLOAD = 64 * 1024
#: Packets waiting for guest receive buffers, at most (then host sockets are not read).
MAX_QUEUED = 64


class Op(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


_OPS = frozenset(Op)


@dataclass
class _Connection:
    """One stream between a guest port and a host program."""

    guest_port: int
    host_port: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    established: asyncio.Future[bool]
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    tx_cnt: int = 0  # bytes sent to the guest
    fwd_cnt: int = 0  # bytes of the guest's taken by the host program
    announced_fwd_cnt: int = 0
    credit: asyncio.Event = field(default_factory=asyncio.Event)
    to_host: asyncio.Queue[Request | None] = field(default_factory=asyncio.Queue)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    closed: bool = False
    guest_done: bool = False  # the guest sends no more (SHUTDOWN with SEND)
    closing: bool = False  # the guest shut down both ways: reset once its data is written

    @property
    def key(self) -> tuple[int, int]:
        return (self.guest_port, self.host_port)

    def room(self) -> int:
        """Bytes the guest can take on this connection now."""
        return max(0, self.peer_buf_alloc - (self.tx_cnt - self.peer_fwd_cnt))


@dataclass(frozen=True)
class _Packet:
    """A packet for the guest; its header is made when it is written (a payload larger than
    the guest's buffer goes out in several packets)."""

    key: tuple[int, int]  # (guest port, host port)
    op: Op
    flags: int = 0
    payload: bytes = b""
    conn: _Connection | None = None


class VsockBackend(Backend):
    """A vsock device whose host side is unix sockets (Firecracker's layout)."""

    name: ClassVar[str] = "vsock"
    device_id: ClassVar[int] = 19

    def __init__(self, *, guest_cid: int, uds_path: str | None = None) -> None:
        super().__init__(num_queues=3)
        if guest_cid <= HOST_CID or guest_cid >= 0xFFFFFFFF:
            raise ValueError(f"guest CID {guest_cid} is reserved (valid: 3 to 2^32 - 2)")
        self.guest_cid = guest_cid
        self.uds_path = uds_path
        #: What happened, by name: connections, resets, malformed_packets, rx_bytes, tx_bytes.
        self.stats: collections.Counter[str] = collections.Counter()
        self._connections: dict[tuple[int, int], _Connection] = {}
        self._outgoing: asyncio.Queue[_Packet] | None = None
        self._listener: socket.socket | None = None
        self._server: asyncio.Server | None = None
        self._ports = itertools.count(1024)
        if uds_path is not None:
            self._listener = listening_socket(uds_path)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--guest-cid", type=int, required=True, help="the guest's CID (>= 3)")
        parser.add_argument(
            "--uds-path",
            metavar="PATH",
            help=(
                "host programs connect here ('CONNECT <port>') to reach the guest, and listen "
                "on PATH_<port> for the guest's connections to the host's port <port>"
            ),
        )

    @classmethod
    def from_arguments(cls, args: argparse.Namespace) -> VsockBackend:
        return cls(guest_cid=args.guest_cid, uds_path=args.uds_path)

    def config_space(self) -> bytes:
        return struct.pack("<Q", self.guest_cid)

    # --- packets to the guest ----------------------------------------------------------------

    def _queue(self) -> asyncio.Queue[_Packet]:
        if self._outgoing is None:
            self._outgoing = asyncio.Queue(MAX_QUEUED)
        return self._outgoing

    def _header(self, conn_key: tuple[int, int], op: Op, length: int = 0, flags: int = 0,
                conn: _Connection | None = None) -> bytes:  # fmt: skip
        guest_port, host_port = conn_key
        fwd_cnt = 0
        if conn is not None:
            fwd_cnt = conn.fwd_cnt
            conn.announced_fwd_cnt = fwd_cnt
        return HEADER.pack(
            HOST_CID, self.guest_cid, host_port, guest_port, length, TYPE_STREAM, op, flags,
            BUF_ALLOC, fwd_cnt,
        )  # fmt: skip

    def _control(self, key: tuple[int, int], op: Op, flags: int = 0) -> None:
        """A packet without payload, from outside a task that may wait; dropped (counted)
        when MAX_QUEUED wait already (a guest that takes none)."""
        try:
            self._queue().put_nowait(_Packet(key, op, flags, conn=self._connections.get(key)))
        except asyncio.QueueFull:
            self.stats["dropped_control"] += 1

    async def _send(self, conn: _Connection, op: Op, payload: bytes = b"", flags: int = 0) -> None:
        await self._queue().put(_Packet(conn.key, op, flags, payload, conn))

    # --- the host side -----------------------------------------------------------------------

    async def _start_host_side(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            self._server = await asyncio.start_unix_server(self._host_connects, sock=listener)

    async def _host_connects(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """A host program connected to the uds path: `CONNECT <port>`, then a stream."""
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            verb, port_text = line.decode("ascii").split()
            port = int(port_text)
            if verb != "CONNECT" or not 0 <= port < 1 << 32:
                raise ValueError(line)
        except (ValueError, TimeoutError, UnicodeDecodeError, ConnectionError):
            self.stats["bad_host_requests"] += 1
            writer.close()
            return
        conn = self._open(port, next(self._ports), reader, writer)
        log.info("vsock: host connects to guest port %d (host port %d)", port, conn.host_port)
        self._control(conn.key, Op.REQUEST)
        try:
            accepted = await asyncio.wait_for(conn.established, 10)
        except TimeoutError:
            accepted = False
        if not accepted:
            log.info("vsock: guest port %d refused the host", port)
            self._close(conn, reset=True)
            return
        writer.write(f"OK {conn.host_port}\n".encode())
        self._run(conn)

    async def _guest_connects(self, guest_port: int, host_port: int, peer_buf: int,
                              peer_fwd: int) -> None:  # fmt: skip
        """The guest asked for the host's port `host_port`: connect to `<uds path>_<port>`."""
        key = (guest_port, host_port)
        if self.uds_path is None:
            self._control(key, Op.RST)
            return
        log.info("vsock: guest port %d connects to host port %d", guest_port, host_port)
        try:
            reader, writer = await asyncio.open_unix_connection(f"{self.uds_path}_{host_port}")
        except OSError:
            self.stats["resets"] += 1
            self._control(key, Op.RST)
            return
        if key in self._connections:  # the guest asked twice meanwhile
            writer.close()
            return
        conn = self._open(guest_port, host_port, reader, writer)
        conn.peer_buf_alloc, conn.peer_fwd_cnt = peer_buf, peer_fwd
        conn.established.set_result(True)
        conn.credit.set()
        self._control(conn.key, Op.RESPONSE)
        self._run(conn)

    def _open(self, guest_port: int, host_port: int, reader: asyncio.StreamReader,
              writer: asyncio.StreamWriter) -> _Connection:  # fmt: skip
        conn = _Connection(
            guest_port, host_port, reader, writer, asyncio.get_running_loop().create_future()
        )
        self._connections[conn.key] = conn
        self.stats["connections"] += 1
        return conn

    def _run(self, conn: _Connection) -> None:
        loop = asyncio.get_running_loop()
        conn.tasks = [
            loop.create_task(self._from_host(conn)),
            loop.create_task(self._to_host(conn)),
        ]

    async def _from_host(self, conn: _Connection) -> None:
        """Host program → guest: read only what the guest has room for."""
        try:
            while True:
                while conn.room() == 0:
                    conn.credit.clear()
                    await conn.credit.wait()
                data = await conn.reader.read(min(conn.room(), MAX_PAYLOAD))
                if not data:
                    break
                conn.tx_cnt += len(data)
                self.stats["rx_bytes"] += len(data)
                await self._send(conn, Op.RW, data)
        except ConnectionError:
            pass
        if not conn.closed:  # the host program closed: no more data from us
            await self._send(conn, Op.SHUTDOWN, flags=SHUTDOWN_SEND)

    async def _to_host(self, conn: _Connection) -> None:
        """Guest → host program: each transmit buffer completes once its bytes were taken."""
        while (request := await conn.to_host.get()) is not None:
            try:
                payload = memoryview(request.read())[HEADER.size :]  # (one copy)
                conn.writer.write(payload)
                await conn.writer.drain()
                conn.fwd_cnt += len(payload)
                self.stats["tx_bytes"] += len(payload)
                if conn.fwd_cnt - conn.announced_fwd_cnt >= BUF_ALLOC // 2:
                    await self._send(conn, Op.CREDIT_UPDATE)
            except ConnectionError:
                self._close(conn, reset=True)
            finally:
                request.complete(0)
        if conn.closing:  # what the guest sent before it closed is written: the reset now
            self._close(conn, reset=True)
        elif conn.guest_done and not conn.closed and conn.writer.can_write_eof():
            with contextlib.suppress(OSError):  # the guest sends no more: the program sees EOF
                conn.writer.write_eof()

    def _close(self, conn: _Connection, *, reset: bool) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._connections.pop(conn.key, None)
        log.info("vsock: connection %s closed%s", conn.key, " (reset)" if reset else "")
        if reset:
            self.stats["resets"] += 1
            self._control(conn.key, Op.RST)
        conn.writer.close()
        while not conn.to_host.empty():  # handed over, not written: the guest gets them back
            request = conn.to_host.get_nowait()
            if request is not None:
                request.complete(0)
        conn.to_host.put_nowait(None)
        if not conn.established.done():
            conn.established.set_result(False)
        for task in conn.tasks:
            if task is not asyncio.current_task():
                task.cancel()

    # --- the queues --------------------------------------------------------------------------

    async def run_queue(self, queue: RequestQueue) -> None:
        await self._start_host_side()
        if queue.index == RXQ:
            await self._receive(queue)
        elif queue.index == TXQ:
            await self._transmit(queue)
        else:
            async for _ in queue:  # held (the runner keeps them): no reset events are sent
                pass

    async def _receive(self, queue: RequestQueue) -> None:
        outgoing = self._queue()
        pending: _Packet | None = None
        sent = 0  # bytes of pending's payload in earlier buffers
        async for request in queue:  # an empty receive buffer: held until a packet is due
            if pending is None:
                pending, sent = await outgoing.get(), 0
            room = request.writable_len - HEADER.size
            left = len(pending.payload) - sent
            if room < 0 or (room == 0 and left):
                self.stats["short_buffers"] += 1
                request.complete(0)
                continue
            chunk = memoryview(pending.payload)[sent : sent + room]
            header = self._header(pending.key, pending.op, len(chunk), pending.flags, pending.conn)
            request.complete(request.write(header + chunk))
            sent += len(chunk)
            if sent == len(pending.payload):
                pending = None

    async def _transmit(self, queue: RequestQueue) -> None:
        async for request in queue:
            self._packet_from_guest(request)

    def _packet_from_guest(self, request: Request) -> None:
        fields = self._parse(request)
        if fields is None:
            request.complete(0)
            return
        src_port, dst_port, op, flags, buf_alloc, fwd_cnt = fields
        key = (src_port, dst_port)
        conn = self._connections.get(key)
        if conn is not None:  # every packet carries the guest's current credit
            conn.peer_buf_alloc, conn.peer_fwd_cnt = buf_alloc, fwd_cnt
            if conn.room():
                conn.credit.set()
        if op == Op.RW and conn is not None and not conn.guest_done:
            if not self._write_now(conn, request):
                conn.to_host.put_nowait(request)  # completed by the connection's writer
            return
        request.complete(0)
        if op == Op.REQUEST:
            if conn is None:
                asyncio.get_running_loop().create_task(
                    self._guest_connects(src_port, dst_port, buf_alloc, fwd_cnt)
                )
        elif conn is None or op == Op.RW:  # no such connection, or data after SHUTDOWN
            if conn is not None:
                self.stats["malformed_packets"] += 1
            if op != Op.RST:
                self._control(key, Op.RST)
        else:
            self._on_control(conn, op, flags)

    def _write_now(self, conn: _Connection, request: Request) -> bool:
        """Write a transmit packet to the host program and complete it at once, when nothing
        is queued before it, the socket has no backlog (a slow program is held back by the
        buffers its connection's writer keeps) and no credit update is due; False: the
        connection's writer must do it."""
        transport = conn.writer.transport
        length = request.readable_len - HEADER.size
        if (
            not conn.tasks  # not running yet: a host-initiated one has not been sent `OK` yet
            or not conn.to_host.empty()
            or transport.is_closing()
            or transport.get_write_buffer_size()
            or conn.fwd_cnt + length - conn.announced_fwd_cnt >= BUF_ALLOC // 2
        ):
            return False
        conn.writer.write(memoryview(request.read())[HEADER.size :])  # (one copy)
        conn.fwd_cnt += length
        self.stats["tx_bytes"] += length
        request.complete(0)
        return True

    def _parse(self, request: Request) -> tuple[int, int, Op, int, int, int] | None:
        """(src port, dst port, op, flags, buf_alloc, fwd_cnt) of a well-formed packet from the
        guest to the host; None (counted, answered with a reset where one can be) otherwise."""
        if request.readable_len < HEADER.size:
            self.stats["malformed_packets"] += 1
            return None
        head = bytearray()
        for view in request.readable:  # the header may span descriptors
            head += view[: HEADER.size - len(head)]
            if len(head) == HEADER.size:
                break
        src_cid, dst_cid, src_port, dst_port, length, kind, op, flags, buf, fwd = HEADER.unpack(
            head
        )
        if (
            src_cid != self.guest_cid
            or dst_cid != HOST_CID
            or kind != TYPE_STREAM
            or length != request.readable_len - HEADER.size
            or op not in _OPS
        ):
            self.stats["malformed_packets"] += 1
            if op != Op.RST and src_cid == self.guest_cid:
                self._control((src_port, dst_port), Op.RST)
            return None
        return src_port, dst_port, Op(op), flags, buf, fwd

    def _on_control(self, conn: _Connection, op: Op, flags: int) -> None:
        if op == Op.RESPONSE:
            if not conn.established.done():
                conn.established.set_result(True)
                conn.credit.set()
        elif op == Op.RST:
            self._close(conn, reset=False)
        elif op == Op.SHUTDOWN:
            if flags & SHUTDOWN_SEND and not conn.guest_done:  # end the host program's input
                conn.guest_done = True
                conn.to_host.put_nowait(None)
            if flags & (SHUTDOWN_RCV | SHUTDOWN_SEND) == SHUTDOWN_RCV | SHUTDOWN_SEND:
                # Both directions: the guest waits for an RST, sent once the data it sent
                # before is written (by the connection's writer, which may still have some).
                conn.closing = True
                if len(conn.tasks) < 2 or conn.tasks[1].done():
                    self._close(conn, reset=True)
        elif op == Op.CREDIT_REQUEST:
            self._control(conn.key, Op.CREDIT_UPDATE)

    # --- life cycle --------------------------------------------------------------------------

    def reset(self) -> None:
        super().reset()
        for conn in list(self._connections.values()):
            self._close(conn, reset=False)
        if self._outgoing is not None:
            while not self._outgoing.empty():
                self._outgoing.get_nowait()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._listener is not None:
            self._listener.close()
        if self.uds_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.uds_path)
