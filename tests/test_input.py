"""`vvu serve input` (virtio id 18): a keyboard fed by scripts over a unix socket.

Through vvu's own front-end first (the config space the driver selects from, events into held
buffers, bad input), then a Linux guest on QEMU's `vhost-user-input-pci` reading the events a
host script sends from `/dev/input/event0`.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from daemons import Daemon
from guest import guest_image, qemu11, qemu_escape, start_guest
from vvu.backends import InputBackend
from vvu.backends.input import CFG_EV_BITS, CFG_ID_NAME, EV_KEY, MAX_PENDING
from vvu.engine import BackendEngine
from vvu.frontend.core import Frontend
from vvu.protocol import Config, FrontendRequest
from vvu.transport.unix import socketpair_channels

TIMEOUT = 5.0
EVENT = struct.Struct("<HHi")


@pytest_asyncio.fixture
async def backend(tmp_path: Path) -> AsyncIterator[InputBackend]:
    device = InputBackend(socket_path=str(tmp_path / "events.sock"))
    yield device
    device.close()


async def _frontend(backend: InputBackend) -> AsyncIterator[Frontend]:
    ours, theirs = socketpair_channels()
    task = asyncio.ensure_future(BackendEngine(backend).serve(theirs))
    frontend = Frontend(ours, memory_size=1 << 20)
    try:
        await frontend.negotiate()
        await frontend.set_mem_table()
        yield frontend
    finally:
        await frontend.close()
        await asyncio.wait_for(task, TIMEOUT)


async def _select(frontend: Frontend, select: int, subsel: int) -> bytes:
    """What a driver does: write select and subsel, read size and the data."""
    await frontend.request(FrontendRequest.SET_CONFIG, Config(0, 0, bytes([select, subsel])))
    head = await frontend.get_config(0, 136)
    return head[8 : 8 + head[2]]


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_config_events_and_bad_lines(backend: InputBackend) -> None:
    assert backend.socket_path is not None
    async for frontend in _frontend(backend):
        assert await _select(frontend, CFG_ID_NAME, 0) == b"vvu keyboard"
        keys = await _select(frontend, CFG_EV_BITS, EV_KEY)
        assert len(keys) == 32 and keys[0] == 0xFE  # KEY_ESC (1) on, code 0 off
        assert await _select(frontend, CFG_EV_BITS, 2) == b""  # no relative axes
        eventq = await frontend.start_queue(0, 16)
        buffers = [frontend.allocator.alloc(8) for _ in range(3)]
        got = [eventq.completion(eventq.submit([], [(b, 8)])) for b in buffers]
        eventq.notify()
        _, writer = await asyncio.open_unix_connection(backend.socket_path)
        writer.write(b"1 30 1\nnot an event\n1 0x1e 0\n0 0 0\n")
        await writer.drain()
        assert await asyncio.wait_for(asyncio.gather(*got), TIMEOUT) == [8, 8, 8]
        events = [EVENT.unpack(frontend.memory.read(b, 8)) for b in buffers]
        assert events == [(1, 30, 1), (1, 30, 0), (0, 0, 0)]
        assert backend.stats["bad_lines"] == 1
        # A line longer than any event ends that program's connection, nobody else's.
        reader2, writer2 = await asyncio.open_unix_connection(backend.socket_path)
        writer2.write(b"1" * 1000 + b"\n")
        assert await asyncio.wait_for(reader2.read(), TIMEOUT) == b""
        assert backend.stats["bad_lines"] == 2
        writer.close()


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_a_guest_that_gives_no_event_buffers_blocks_the_scripts_not_the_device(
    backend: InputBackend,
) -> None:
    assert backend.socket_path is not None
    async for frontend in _frontend(backend):
        eventq = await frontend.start_queue(0, 16)
        _, writer = await asyncio.open_unix_connection(backend.socket_path)
        writer.write(b"1 30 1\n" * 150_000)  # far more than the device and the socket keep
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(writer.drain(), 0.5)
        pending = backend._pending
        assert pending is not None and pending.qsize() == MAX_PENDING
        # A buffer that cannot hold an event is returned empty, counted.
        short = frontend.allocator.alloc(4)
        assert await asyncio.wait_for(eventq.request([], [(short, 4)]), TIMEOUT) == 0
        assert backend.stats["short_buffers"] == 1
        buf = frontend.allocator.alloc(8)
        assert await asyncio.wait_for(eventq.request([], [(buf, 8)]), TIMEOUT) == 8
        writer.close()


GUEST_SCRIPT = """
dev=
for i in $(seq 100); do
    for e in /sys/class/input/event*; do
        [ "$(cat $e/device/name 2>/dev/null)" = "vvu keyboard" ] && dev=/dev/input/${e##*/}
    done
    [ -n "$dev" ] && break
    sleep 0.1
done
exec 3<$dev
echo vvu-input-ready > /dev/console
dd bs=24 count=4 <&3 2>/dev/null | od -An -tu2 -w24 -v
"""


@pytest.mark.guest
@pytest.mark.timeout(300)
def test_a_linux_guest_reads_the_events_a_host_script_sends(tmp_path: Path) -> None:
    image = guest_image()
    vhost, events = tmp_path / "input.vhost", tmp_path / "events.sock"
    daemon = Daemon(
        ["input", "--socket-path", str(vhost), "--events-socket", str(events)],
        vhost,
        tmp_path / "input.log",
    )
    try:
        devices = [
            "-chardev", f"socket,id=inp,path={qemu_escape(str(vhost))}",
            "-device", "vhost-user-input-pci,chardev=inp",
        ]  # fmt: skip
        # QEMU 7.2's vhost-user-input-pci refuses to start without KVM ("requires kvm").
        with start_guest(
            GUEST_SCRIPT, qemu=qemu11(), image=image, qemu_args=devices, timeout=60
        ) as guest:
            guest.wait_for("vvu-input-ready", timeout=60)
            with socket.socket(socket.AF_UNIX) as script:
                script.connect(str(events))
                script.sendall(b"1 30 1\n0 0 0\n1 30 0\n0 0 0\n")  # KEY_A down, up
            result = guest.wait()
        assert result.exit_status == 0, f"{result.serial}\n{daemon.log()}"
        # od's rows of struct input_event: a timestamp, then type, code, value (two u16 halves).
        rows = [row.split() for row in result.output.split("\n")]
        got = [tuple(int(w) for w in row[8:]) for row in rows if len(row) == 12]
        assert got == [(1, 30, 1, 0), (0, 0, 0, 0), (1, 30, 0, 0), (0, 0, 0, 0)]
    finally:
        daemon.stop()
