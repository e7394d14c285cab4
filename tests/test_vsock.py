"""`vvu serve vsock` (virtio id 19) with vvu's own front-end playing the guest's vsock driver:
host- and guest-initiated streams through the Firecracker unix-socket layout, the credit-based
flow control, and malformed packets."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import struct
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio

from daemons import Daemon
from guest import HOST_ROOT_ARGS, HOST_ROOT_SETUP, guest_image, qemu_escape, start_guest
from vvu.backends import VsockBackend
from vvu.backends.vsock import HEADER, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, Op
from vvu.engine import BackendEngine
from vvu.frontend.core import Frontend, FrontendQueue
from vvu.transport.unix import socketpair_channels

CID = 3
TIMEOUT = 5.0
RX_BUF = HEADER.size + 4096  # what Linux gives: a header and a page


@dataclass
class Packet:
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int
    payload: bytes


@dataclass
class GuestDriver:
    """The guest's side of the device: keeps receive buffers posted, sends packets."""

    frontend: Frontend
    rx: FrontendQueue
    tx: FrontendQueue
    buf_alloc: int = 256 * 1024
    fwd_cnt: int = 0
    announced: int = 0  # the fwd_cnt the device was last told
    received: asyncio.Queue[Packet] = field(default_factory=asyncio.Queue)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self, buffers: int = 32) -> None:
        for _ in range(buffers):
            self.tasks.append(
                asyncio.ensure_future(self._receive_into(self.frontend.allocator.alloc(RX_BUF)))
            )

    async def _receive_into(self, buf: int) -> None:
        while True:
            length = await self.rx.request([], [(buf, RX_BUF)])
            data = self.frontend.memory.read(buf, length)
            if length < HEADER.size:
                continue
            fields = HEADER.unpack(data[: HEADER.size])
            src_cid, dst_cid, src_port, dst_port, plen, _, op, flags, buf_alloc, fwd = fields
            assert plen == length - HEADER.size
            self.received.put_nowait(
                Packet(
                    src_cid,
                    dst_cid,
                    src_port,
                    dst_port,
                    op,
                    flags,
                    buf_alloc,
                    fwd,
                    data[HEADER.size :],
                )
            )

    async def packet(self) -> Packet:
        return await asyncio.wait_for(self.received.get(), TIMEOUT)

    def raw(self, data: bytes) -> asyncio.Future[int]:
        buf = self.frontend.allocator.alloc(max(len(data), 1))
        self.frontend.memory.write(buf, data)
        head = self.tx.submit([(buf, len(data))], [])
        done = self.tx.completion(head)
        self.tx.notify()
        return done

    def send(
        self, src_port: int, dst_port: int, op: Op, payload: bytes = b"", flags: int = 0
    ) -> asyncio.Future[int]:
        header = HEADER.pack(
            CID,
            HOST_CID,
            src_port,
            dst_port,
            len(payload),
            1,
            op,
            flags,
            self.buf_alloc,
            self.fwd_cnt,
        )
        self.announced = self.fwd_cnt
        return self.raw(header + payload)

    async def stream(self, total: int, *, credit_updates: bool = True) -> bytes:
        """RW payloads until `total` bytes came, counting what it took (fwd_cnt) and, as Linux
        does, telling the device once half its buffer was taken (CREDIT_UPDATE)."""
        data = bytearray()
        while len(data) < total:
            packet = await self.packet()
            assert packet.op == Op.RW, packet
            data += packet.payload
            self.fwd_cnt += len(packet.payload)
            if credit_updates and self.fwd_cnt - self.announced >= self.buf_alloc // 2:
                self.send(packet.dst_port, packet.src_port, Op.CREDIT_UPDATE)
        return bytes(data)


@pytest_asyncio.fixture
async def device(tmp_path: Path) -> AsyncIterator[VsockBackend]:
    backend = VsockBackend(guest_cid=CID, uds_path=str(tmp_path / "v.sock"))
    yield backend
    backend.close()


@pytest_asyncio.fixture
async def guest(device: VsockBackend) -> AsyncIterator[GuestDriver]:
    ours, theirs = socketpair_channels()
    task = asyncio.ensure_future(BackendEngine(device).serve(theirs))
    frontend = Frontend(ours, memory_size=16 << 20)
    driver = None
    try:
        await frontend.negotiate()
        await frontend.set_mem_table()
        assert struct.unpack("<Q", await frontend.get_config(0, 8)) == (CID,)
        rx = await frontend.start_queue(0, 64)
        tx = await frontend.start_queue(1, 64)
        await frontend.start_queue(2, 8)
        driver = GuestDriver(frontend, rx, tx)
        driver.start()
        yield driver
    finally:
        if driver is not None:
            for t in driver.tasks:
                t.cancel()
        await frontend.close()
        await asyncio.wait_for(task, TIMEOUT)


async def _host_connect(
    device: VsockBackend, guest: GuestDriver, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    assert device.uds_path is not None
    reader, writer = await asyncio.open_unix_connection(device.uds_path)
    writer.write(f"CONNECT {port}\n".encode())
    request = await guest.packet()
    assert (request.op, request.src_cid, request.dst_cid, request.dst_port) == (
        Op.REQUEST,
        HOST_CID,
        CID,
        port,
    )
    guest.send(port, request.src_port, Op.RESPONSE)
    assert await asyncio.wait_for(reader.readline(), TIMEOUT) == f"OK {request.src_port}\n".encode()
    return reader, writer, request.src_port


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_host_initiated_stream_both_ways(device: VsockBackend, guest: GuestDriver) -> None:
    reader, writer, host_port = await _host_connect(device, guest, 1234)
    to_guest = os.urandom(300 * 1024)  # more than a receive buffer, more than one read
    writer.write(to_guest)
    assert await guest.stream(len(to_guest)) == to_guest
    to_host = os.urandom(100 * 1024)
    for start in range(0, len(to_host), 4096):
        guest.send(1234, host_port, Op.RW, to_host[start : start + 4096])
    assert await asyncio.wait_for(reader.readexactly(len(to_host)), TIMEOUT) == to_host
    # The guest closes: SHUTDOWN both ways, answered with a reset; the host program sees EOF.
    guest.send(1234, host_port, Op.SHUTDOWN, flags=SHUTDOWN_RCV | SHUTDOWN_SEND)
    assert (await guest.packet()).op == Op.RST
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    writer.close()


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_what_the_guest_sent_just_before_closing_reaches_the_host(
    device: VsockBackend, guest: GuestDriver
) -> None:
    reader, writer, host_port = await _host_connect(device, guest, 1235)
    # Both in the ring at once, as a guest's last echo and its close() come: the data is
    # written before the connection goes.
    guest.send(1235, host_port, Op.RW, b"last words")
    guest.send(1235, host_port, Op.SHUTDOWN, flags=SHUTDOWN_RCV | SHUTDOWN_SEND)
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b"last words"  # then EOF
    assert (await guest.packet()).op == Op.RST
    writer.close()


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_guest_initiated_stream_and_a_port_nobody_listens_on(
    device: VsockBackend, guest: GuestDriver
) -> None:
    accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def on_connect(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        accepted.put_nowait((r, w))

    server = await asyncio.start_unix_server(on_connect, f"{device.uds_path}_5000")
    try:
        guest.send(40000, 5000, Op.REQUEST)
        response = await guest.packet()
        assert (response.op, response.src_port, response.dst_port) == (Op.RESPONSE, 5000, 40000)
        reader, writer = await asyncio.wait_for(accepted.get(), TIMEOUT)
        guest.send(40000, 5000, Op.RW, b"from the guest")
        assert await asyncio.wait_for(reader.readexactly(14), TIMEOUT) == b"from the guest"
        writer.write(b"from the host")
        assert await guest.stream(13) == b"from the host"
        # The host program closes: the guest hears SHUTDOWN (no more data).
        writer.close()
        shutdown = await guest.packet()
        assert (shutdown.op, shutdown.flags & SHUTDOWN_SEND) == (Op.SHUTDOWN, SHUTDOWN_SEND)
    finally:
        server.close()
    guest.send(40001, 5001, Op.REQUEST)  # nobody listens on _5001
    refused = await guest.packet()
    assert (refused.op, refused.dst_port) == (Op.RST, 40001)


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_the_device_sends_only_what_the_guest_has_room_for(
    device: VsockBackend, guest: GuestDriver
) -> None:
    guest.buf_alloc = 16 * 1024
    reader, writer, host_port = await _host_connect(device, guest, 7)
    writer.write(os.urandom(64 * 1024))
    got = await guest.stream(16 * 1024, credit_updates=False)
    assert len(got) == 16 * 1024
    with pytest.raises(TimeoutError):  # no credit left: nothing more
        await asyncio.wait_for(guest.received.get(), 0.3)
    guest.send(7, host_port, Op.CREDIT_UPDATE)  # took 16 KiB: room for 16 more
    assert len(await guest.stream(16 * 1024, credit_updates=False)) == 16 * 1024
    writer.close()
    del reader


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_malformed_packets_are_counted_and_reset_and_the_device_goes_on(
    device: VsockBackend, guest: GuestDriver
) -> None:
    assert await asyncio.wait_for(guest.raw(b"short"), TIMEOUT) == 0  # shorter than a header
    bad_len = HEADER.pack(CID, HOST_CID, 9, 9, 100, 1, Op.RW, 0, 0, 0) + b"x"  # says 100, has 1
    assert await asyncio.wait_for(guest.raw(bad_len), TIMEOUT) == 0
    assert (await guest.packet()).op == Op.RST
    wrong_cid = HEADER.pack(99, HOST_CID, 9, 9, 0, 1, Op.REQUEST, 0, 0, 0)
    assert await asyncio.wait_for(guest.raw(wrong_cid), TIMEOUT) == 0
    guest.send(9, 9, Op.RW, b"no such connection")
    assert (await guest.packet()).op == Op.RST
    assert device.stats["malformed_packets"] == 3
    # Still a working device.
    reader, writer, _ = await _host_connect(device, guest, 99)
    writer.write(b"ping")
    assert await guest.stream(4) == b"ping"
    writer.close()
    del reader


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_many_connections_at_once_each_stream_intact(
    device: VsockBackend, guest: GuestDriver
) -> None:
    conns = [await _host_connect(device, guest, 2000 + i) for i in range(16)]
    sent = {}
    for i, (_, writer, host_port) in enumerate(conns):
        sent[host_port] = os.urandom(20_000 + 997 * i)
        writer.write(sent[host_port])
    got: dict[int, bytearray] = {port: bytearray() for port in sent}
    while any(len(got[p]) < len(sent[p]) for p in sent):
        packet = await guest.packet()
        assert packet.op == Op.RW, packet
        got[packet.src_port] += packet.payload  # interleaved, each in order
        guest.fwd_cnt += len(packet.payload)
    assert {p: bytes(d) for p, d in got.items()} == sent
    assert device.stats["connections"] == 16
    for _, writer, _ in conns:
        writer.close()


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_a_host_program_that_closes_mid_stream_gets_the_guest_a_reset(
    device: VsockBackend, guest: GuestDriver
) -> None:
    accepted: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue()

    async def on_connect(_: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        accepted.put_nowait(w)

    server = await asyncio.start_unix_server(on_connect, f"{device.uds_path}_6000")
    try:
        guest.send(41000, 6000, Op.REQUEST)
        assert (await guest.packet()).op == Op.RESPONSE
        writer = await asyncio.wait_for(accepted.get(), TIMEOUT)
        writer.transport.abort()  # the host program goes away
        assert (await guest.packet()).op == Op.SHUTDOWN  # no more data from the host
        op = None
        while op != Op.RST:  # the guest keeps sending: the connection is reset
            done = guest.send(41000, 6000, Op.RW, b"x" * 4096)
            assert await asyncio.wait_for(done, TIMEOUT) == 0
            with contextlib.suppress(TimeoutError):
                op = (await asyncio.wait_for(guest.received.get(), 0.05)).op
        assert device.stats["resets"] >= 1
    finally:
        server.close()


# --- a Linux guest on QEMU's vhost-user-vsock-pci ---------------------------------------------

GUEST_KIB = 2048
GUEST_PROGRAM = f"""
import hashlib, os, socket, threading

def both_ways(sock, data):
    sender = threading.Thread(target=lambda: (sock.sendall(data), sock.shutdown(socket.SHUT_WR)))
    sender.start()
    got = bytearray()
    while chunk := sock.recv(65536):
        got += chunk
    sender.join()
    print(hashlib.md5(data).hexdigest(), hashlib.md5(got).hexdigest(), len(got), flush=True)

# guest -> host: CID 2, port 5000 (the host program listens on <uds path>_5000)
out = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
out.connect((2, 5000))
both_ways(out, os.urandom({GUEST_KIB} << 10))
# host -> guest: the host program sends CONNECT 1234
listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
listener.bind((socket.VMADDR_CID_ANY, 1234))
listener.listen()
with open("/dev/console", "w") as console:
    console.write("vvu-vsock-listening\\n")
conn, _ = listener.accept()
both_ways(conn, os.urandom({GUEST_KIB} << 10))
"""


def _host_both_ways(sock: socket.socket, data: bytes) -> bytes:
    def send() -> None:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    sender.start()
    got = bytearray()
    while chunk := sock.recv(65536):
        got += chunk
    sender.join()
    return bytes(got)


@pytest.mark.guest
@pytest.mark.timeout(300)
def test_a_linux_guest_streams_both_ways_through_unix_sockets(tmp_path: Path) -> None:
    image = guest_image("vm")
    vhost, uds = tmp_path / "vsock.vhost", tmp_path / "v.sock"
    daemon = Daemon(
        ["vsock", "--socket-path", str(vhost), "--guest-cid", "3", "--uds-path", str(uds)],
        vhost,
        tmp_path / "vsock.log",
    )
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(f"{uds}_5000")
    listener.listen()
    listener.settimeout(90)
    to_guest = [os.urandom(GUEST_KIB << 10), os.urandom(GUEST_KIB << 10)]
    from_guest: list[bytes] = []
    try:
        devices = [
            *HOST_ROOT_ARGS,
            "-chardev", f"socket,id=vs,path={qemu_escape(str(vhost))}",
            "-device", "vhost-user-vsock-pci,chardev=vs",
        ]  # fmt: skip
        script = f"{HOST_ROOT_SETUP}\nhost python3 - <<'PY'\n{GUEST_PROGRAM}\nPY\n"
        with start_guest(script, image=image, qemu_args=devices, timeout=240) as guest:
            try:
                conn, _ = listener.accept()  # guest-initiated
                conn.settimeout(60)
                with conn:
                    from_guest.append(_host_both_ways(conn, to_guest[0]))
            except TimeoutError:
                guest.stop()
                raise AssertionError(f"{guest.serial}\n{daemon.log()}") from None
            guest.wait_for("vvu-vsock-listening", timeout=120)
            with socket.socket(socket.AF_UNIX) as host:  # host-initiated
                host.settimeout(60)
                host.connect(str(uds))
                host.sendall(b"CONNECT 1234\n")
                ok = b""
                while not ok.endswith(b"\n") and (byte := host.recv(1)):
                    ok += byte
                assert ok.startswith(b"OK "), ok
                from_guest.append(_host_both_ways(host, to_guest[1]))
            result = guest.wait()
        assert result.exit_status == 0, f"{result.serial}\n{daemon.log()}"
        rows = [line.split() for line in result.output.split("\n") if len(line.split()) == 3]
        assert rows == [
            [hashlib.md5(sent).hexdigest(), hashlib.md5(got).hexdigest(), str(len(got))]
            for sent, got in zip(from_guest, to_guest, strict=True)
        ], result.output
    finally:
        listener.close()
        daemon.stop()
