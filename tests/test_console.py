"""`vvu serve console` (virtio id 3): hvc0's bytes to and from a host unix socket.

First through vvu's own front-end (fast; the bad-input cases), then a Linux guest on QEMU 11's
generic vhost-user device (`vhost-user-test-device-pci,virtio-id=3`; QEMU 7.2 has no front-end
for a vhost-user console) writing and reading checksummed data on /dev/hvc0.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio

from daemons import Daemon
from guest import guest_image, qemu11, qemu_escape, start_guest
from vvu.backends import ConsoleBackend
from vvu.engine import BackendEngine
from vvu.frontend.core import Frontend, FrontendQueue
from vvu.protocol import FrontendRequest, VringState
from vvu.transport.unix import socketpair_channels

MiB = 1 << 20
PAGE = 4096
TIMEOUT = 5.0
RING = 16


@dataclass
class Console:
    frontend: Frontend
    rx: FrontendQueue
    tx: FrontendQueue
    futures: list[asyncio.Future[int]] = field(default_factory=list)

    def give_rx(self, n: int, size: int = PAGE) -> list[tuple[int, asyncio.Future[int]]]:
        buffers = []
        for _ in range(n):
            buf = self.frontend.allocator.alloc(size)
            buffers.append((buf, self.rx.completion(self.rx.submit([], [(buf, size)]))))
            self.futures.append(buffers[-1][1])
        self.rx.notify()
        return buffers

    def send(self, data: bytes) -> asyncio.Future[int]:
        buf = self.frontend.allocator.alloc(max(len(data), 1))
        self.frontend.memory.write(buf, data)
        future = self.tx.completion(self.tx.submit([(buf, len(data))], []))
        self.futures.append(future)
        self.tx.notify()
        return future


async def _session(backend: ConsoleBackend) -> AsyncIterator[Console]:
    ours, theirs = socketpair_channels()
    task = asyncio.ensure_future(BackendEngine(backend).serve(theirs))
    frontend = Frontend(ours, memory_size=16 * MiB)
    try:
        await frontend.negotiate()
        await frontend.set_mem_table()
        rx = await frontend.start_queue(0, RING)
        tx = await frontend.start_queue(1, RING)
        console = Console(frontend, rx, tx)
        yield console
        for future in console.futures:  # buffers the device still holds: nobody waits
            future.cancel()
    finally:
        await frontend.close()
        await asyncio.wait_for(task, TIMEOUT)


@pytest_asyncio.fixture
async def backend(tmp_path: Path) -> AsyncIterator[ConsoleBackend]:
    console = ConsoleBackend(socket_path=str(tmp_path / "console.sock"))
    yield console
    console.close()


async def _host(backend: ConsoleBackend) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert backend.socket_path is not None
    return await asyncio.open_unix_connection(backend.socket_path)


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_bytes_flow_both_ways_and_the_host_end_outlives_a_session(
    backend: ConsoleBackend,
) -> None:
    reader, writer = await _host(backend)
    async for console in _session(backend):
        (buf, got), *_ = console.give_rx(2)
        writer.write(b"typed on the host")
        await writer.drain()
        assert await asyncio.wait_for(got, TIMEOUT) == 17
        assert console.frontend.memory.read(buf, 17) == b"typed on the host"
        assert await asyncio.wait_for(console.send(b"written by the guest"), TIMEOUT) == 0
        assert await asyncio.wait_for(reader.readexactly(20), TIMEOUT) == b"written by the guest"
    async for console in _session(backend):  # a new front-end, the same host program
        assert await asyncio.wait_for(console.send(b"again"), TIMEOUT) == 0
        assert await asyncio.wait_for(reader.readexactly(5), TIMEOUT) == b"again"
    # A second host program is refused while the first is connected.
    second_reader, second = await _host(backend)
    assert await asyncio.wait_for(second_reader.read(), TIMEOUT) == b""  # closed at once
    second.close()
    assert backend.stats["refused_clients"] == 1
    writer.close()


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_a_guest_that_gives_no_receive_buffers_makes_the_host_wait_not_the_device_grow(
    backend: ConsoleBackend,
) -> None:
    reader, writer = await _host(backend)
    async for console in _session(backend):
        data = os.urandom(2 * MiB)
        writer.write(data)
        # The socket fills up and the host's writer blocks: nothing is read without buffers.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(writer.drain(), 0.3)
        assert backend.stats["rx_bytes"] == 0
        # Buffers come: everything arrives, in order, one buffer at a time.
        received = bytearray()
        while len(received) < len(data):
            for buf, got in console.give_rx(RING):
                received += console.frontend.memory.read(buf, await asyncio.wait_for(got, TIMEOUT))
                if len(received) == len(data):
                    break
        assert received == data
        await asyncio.wait_for(writer.drain(), TIMEOUT)
    writer.close()
    del reader


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_transmit_floods_are_dropped_without_a_host_and_held_by_a_slow_one(
    backend: ConsoleBackend,
) -> None:
    async for console in _session(backend):
        # No host program: the guest's output goes nowhere, counted, and nothing piles up.
        for _ in range(4):
            futures = [console.send(b"x" * PAGE) for _ in range(RING)]
            assert await asyncio.wait_for(asyncio.gather(*futures), TIMEOUT) == [0] * RING
        assert backend.stats["tx_dropped_bytes"] == 4 * RING * PAGE
        # A host program that does not read: transmit buffers stay with the device, at most
        # the ring's worth, until it reads; the ring still stops at once when asked.
        reader, writer = await _host(backend)
        (_, got), *_ = console.give_rx(1)  # one byte through: the device has the connection
        writer.write(b"!")
        assert await asyncio.wait_for(got, TIMEOUT) == 1
        futures = [console.send(b"y" * (256 * 1024)) for _ in range(RING)]
        _, pending = await asyncio.wait(futures, timeout=0.3)
        assert pending  # held: the host's socket is full
        reply = await console.frontend.request(FrontendRequest.GET_VRING_BASE, VringState(1, 0))
        console.tx.reap()
        # The one being sent was completed as the ring stopped (its bytes went, in part);
        # those not started went back into the ring, for the guest to find after a restart.
        sent = [f for f in futures if f.done()]
        assert 1 <= len(sent) < RING and {f.result() for f in sent} == {0}
        assert isinstance(reply, VringState) and reply.num == 4 * RING + len(sent)
        writer.close()
        del reader


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_malformed_and_oversized_chains(
    backend: ConsoleBackend,
) -> None:
    reader, writer = await _host(backend)
    async for console in _session(backend):
        # A receive buffer with nothing device-writable, an empty transmit buffer.
        src = console.frontend.allocator.alloc(16)
        bad_rx = console.rx.completion(console.rx.submit([(src, 16)], []))
        console.rx.notify()
        assert await asyncio.wait_for(bad_rx, TIMEOUT) == 0
        assert await asyncio.wait_for(console.send(b""), TIMEOUT) == 0
        assert backend.stats["malformed_chains"] == 2
        (_, got), *_ = console.give_rx(1)
        writer.write(b"ok")
        assert await asyncio.wait_for(got, TIMEOUT) == 2
        # An oversized transmit buffer (4 MiB in one descriptor) goes out whole, streamed
        # from guest memory while the host reads.
        big = os.urandom(4 * MiB)
        sent = console.send(big)
        assert await asyncio.wait_for(reader.readexactly(len(big)), TIMEOUT) == big
        assert await asyncio.wait_for(sent, TIMEOUT) == 0
    writer.close()


# --- a Linux guest on QEMU 11 ------------------------------------------------------------------

GUEST_BYTES = 64 * 1024
GUEST_SCRIPT = f"""
set -e
for i in $(seq 100); do [ -e /dev/hvc0 ] && break; sleep 0.1; done
exec 3<>/dev/hvc0
stty -F /dev/hvc0 raw -echo
head -c {GUEST_BYTES} /dev/urandom > /tmp/out
md5sum /tmp/out
cat /tmp/out >&3
head -c {GUEST_BYTES} <&3 > /tmp/in
md5sum /tmp/in
"""


@pytest.mark.guest
@pytest.mark.timeout(300)
def test_a_linux_guest_writes_and_reads_hvc0(tmp_path: Path) -> None:
    qemu = qemu11()
    image = guest_image()
    vhost = tmp_path / "console.vhost"
    host_path = tmp_path / "console.sock"
    daemon = Daemon(
        ["console", "--socket-path", str(vhost), "--console-socket", str(host_path)],
        vhost,
        tmp_path / "console.log",
    )
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        host.settimeout(120)
        host.connect(str(host_path))
        devices = [
            "-chardev", f"socket,id=con,path={qemu_escape(str(vhost))}",
            "-device",
            "vhost-user-test-device-pci,chardev=con,virtio-id=3,num_vqs=2,config_size=0",
        ]  # fmt: skip
        with start_guest(GUEST_SCRIPT, qemu=qemu, image=image, qemu_args=devices) as guest:
            from_guest = bytearray()
            while len(from_guest) < GUEST_BYTES:
                chunk = host.recv(GUEST_BYTES - len(from_guest))
                assert chunk, f"the console closed early:\n{daemon.log()}"
                from_guest += chunk
            to_guest = os.urandom(GUEST_BYTES)
            host.sendall(to_guest)
            result = guest.wait()
        assert result.exit_status == 0, f"{result.serial}\n{daemon.log()}"
        sums = [line.split()[0] for line in result.output.split("\n") if line]
        assert sums == [hashlib.md5(from_guest).hexdigest(), hashlib.md5(to_guest).hexdigest()]
    finally:
        host.close()
        daemon.stop()
