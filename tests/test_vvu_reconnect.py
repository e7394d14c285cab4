"""Reconnection through the virtio-vhost-user device (docs/vvu-device.md, "State machine and
reconnection"): front-ends and drivers that go away at the worst moment, and come back.

In-process (the driver clears BACKEND_UP), as processes (`vvu device` + `vvu serve blk --vvu`:
the driver SIGKILLed, a front-end leaving mid-handshake, fd counts), and with QEMU guests
(marked `guest`: QEMU SIGKILLed mid-I/O, QEMU's `reconnect=1` after the driver is SIGKILLed).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from daemons import stop_process, wait_for_socket
from guest import guest_image, live_guests, qemu_escape, start_guest
from vvu.backends import BlkBackend
from vvu.device.vvu import BACKEND_UP, FRONTEND_UP, VvuDevice
from vvu.engine import BackendEngine
from vvu.frontend import BlkDriver
from vvu.frontend.core import Frontend
from vvu.protocol.constants import FrontendRequest
from vvu.transport.base import TransportError
from vvu.transport.unix import UnixListener
from vvu.transport.vvu import VvuListener
from vvu.vfio_user import VfioUserPciAccess
from vvu.vfio_user.server import VfioUserServer

TIMEOUT = 20.0
VVU = [sys.executable, "-m", "vvu"]
MiB = 1 << 20


async def _until(predicate: object, timeout: float = 10.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def _dropped(blk: BlkDriver) -> None:
    """The device closed `blk`'s connection (EOF, or a reset when data was left unread)."""
    with contextlib.suppress(TransportError):
        assert await asyncio.wait_for(blk.frontend.channel.recv(), TIMEOUT) is None


# --- in process: the driver clears BACKEND_UP ----------------------------------------------------


@contextlib.asynccontextmanager
async def vvu_served(
    backend: BlkBackend, tmp_path: Path
) -> AsyncIterator[tuple[str, VvuDevice, VvuListener]]:
    frontend_socket = str(tmp_path / "frontend.sock")
    device = VvuDevice(UnixListener(frontend_socket), max_queues=8)
    server = VfioUserServer(device, str(tmp_path / "vvu.sock"))
    tasks = [asyncio.ensure_future(server.serve_forever())]
    listener = VvuListener(await VfioUserPciAccess.open(str(tmp_path / "vvu.sock"), timeout=5))
    tasks.append(asyncio.ensure_future(BackendEngine(backend).serve_forever(listener)))
    try:
        yield frontend_socket, device, listener
    finally:
        for task in reversed(tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await listener.aclose()
        server.close()
        device.close()
        backend.close()


@pytest.mark.asyncio
async def test_driver_clearing_backend_up_disconnects_the_front_end(tmp_path: Path) -> None:
    async with vvu_served(BlkBackend(size=8 * MiB), tmp_path) as (path, device, listener):
        data = os.urandom(64 * 1024)
        blk = await asyncio.wait_for(BlkDriver.open(path, timeout=5), TIMEOUT)
        try:
            await blk.write(8, data)
            assert device.frontend_connected
            driver = listener.driver
            assert driver is not None
            await driver.set_backend_up(False)
            # The device lets the front-end go: its socket reaches EOF.
            await _dropped(blk)
            assert not device.frontend_connected
        finally:
            await blk.close()
        # The engine ends that session; the listener resynchronises (rxq discarded, txq
        # reclaimed) and sets BACKEND_UP again. Only then may a front-end come back: one
        # accepted earlier would lose its first messages to that discard.
        await _until(lambda: device.vvu_status & BACKEND_UP)
        again = await asyncio.wait_for(BlkDriver.open(path, timeout=5), TIMEOUT)
        try:
            assert await asyncio.wait_for(again.read(8, len(data)), TIMEOUT) == data
            assert device.vvu_status & FRONTEND_UP
        finally:
            await again.close()
        assert device.sessions == 2


# --- processes: `vvu device` + `vvu serve blk --vvu` ---------------------------------------------


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Rig:
    """`vvu device` and `vvu serve blk --vvu` (restartable) as child processes."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.frontend_socket = tmp_path / "fe.sock"
        self.device_socket = tmp_path / "dev.sock"
        self.image = tmp_path / "disk.img"
        with self.image.open("wb") as f:
            f.truncate(16 * MiB)
        self.device = subprocess.Popen(
            [*VVU, "-v", "device", "--socket-path", str(self.frontend_socket),
             "--vfio-user", str(self.device_socket), "--max-queues", "4"],
            stdout=subprocess.DEVNULL, stderr=(tmp_path / "device.log").open("wb"),
        )  # fmt: skip
        self.driver: subprocess.Popen[bytes] | None = None
        self.drivers = 0
        wait_for_socket(self.device_socket, self.device)

    def start_driver(self) -> subprocess.Popen[bytes]:
        self.drivers += 1
        log = (self.tmp_path / f"driver{self.drivers}.log").open("wb")
        self.driver = subprocess.Popen(
            [*VVU, "-v", "serve", "blk", "--vvu", str(self.device_socket),
             "--image", str(self.image)],
            stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
        return self.driver

    def kill_driver(self) -> None:
        assert self.driver is not None
        self.driver.send_signal(signal.SIGKILL)
        self.driver.wait(10)

    def log(self, name: str) -> str:
        return (self.tmp_path / f"{name}.log").read_text(errors="replace")

    def close(self) -> None:
        if self.driver is not None:
            stop_process(self.driver)
        stop_process(self.device)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    try:
        yield r
    finally:
        r.close()
    assert not r.frontend_socket.exists() and not r.device_socket.exists()


def test_driver_sigkilled_then_restarted_front_end_reconnects(rig: Rig) -> None:
    rig.start_driver()
    data = os.urandom(256 * 1024)

    async def scenario() -> None:
        path = str(rig.frontend_socket)
        blk = await asyncio.wait_for(BlkDriver.open(path, timeout=10), TIMEOUT)
        try:
            await blk.write(0, data)
            await blk.flush()
            rig.kill_driver()  # its vfio-user client is gone: the device drops the front-end
            await _dropped(blk)
        finally:
            await blk.close()
        rig.start_driver()
        again = await asyncio.wait_for(BlkDriver.open(path, timeout=10), TIMEOUT)
        try:
            assert await asyncio.wait_for(again.read(0, len(data)), TIMEOUT) == data
            more = os.urandom(4096)
            await again.write(1024, more)
            assert await again.read(1024, 4096) == more
        finally:
            await again.close()

    asyncio.run(scenario())
    assert rig.driver is not None and stop_process(rig.driver) == 0, rig.log("driver2")
    assert stop_process(rig.device) == 0
    assert "device stopped after 2 front-end session(s)" in rig.log("device"), rig.log("device")


async def _abandoned_handshake(path: str, stage: int) -> None:
    """A front-end that leaves after GET_FEATURES (0), SET_MEM_TABLE (1) or one ring (2)."""
    fe = await Frontend.connect(path, timeout=10)
    try:
        await asyncio.wait_for(fe.request_u64(FrontendRequest.GET_FEATURES), TIMEOUT)
        if stage >= 1:
            await asyncio.wait_for(fe.negotiate(), TIMEOUT)
            await asyncio.wait_for(fe.set_mem_table(), TIMEOUT)
        if stage >= 2:
            await asyncio.wait_for(fe.start_queue(0), TIMEOUT)
    finally:
        await fe.close()


def test_front_end_leaving_mid_handshake_leaves_nothing_stale(rig: Rig) -> None:
    driver = rig.start_driver()
    path = str(rig.frontend_socket)

    async def session(n: int) -> None:
        blk = await asyncio.wait_for(BlkDriver.open(path, timeout=10), TIMEOUT)
        try:
            block = bytes([n]) * 4096
            await blk.write(n * 8, block)
            assert await blk.read(n * 8, 4096) == block
        finally:
            await blk.close()

    def fds() -> tuple[int, int]:
        return _fds(rig.device.pid), _fds(driver.pid)

    async def settle(sessions: int) -> None:
        """The device and the driver notice a disconnect asynchronously: wait until both logged
        the end of `sessions` sessions."""
        await _until(
            lambda: (
                rig.log("device").count("vvu: session ended") >= sessions
                and rig.log("driver1").count("session released") >= sessions
            )
        )

    async def scenario() -> tuple[tuple[int, int], tuple[int, int]]:
        await session(1)  # warm up: lazily made fds (vfio-user, MSI-X, DMA) exist from here on
        await settle(1)
        before = fds()
        for round_ in range(2):
            for stage in (0, 1, 2):
                await _abandoned_handshake(path, stage)
            await session(2 + round_)
        await settle(9)
        # Cancelled tasks may close their last fds just after the log line: give them TIMEOUT.
        with contextlib.suppress(AssertionError):
            await _until(lambda: fds() == before, TIMEOUT)
        return before, fds()

    before, after = asyncio.run(scenario())
    assert after == before, (before, after, rig.log("device"), rig.log("driver1"))
    assert stop_process(driver) == 0, rig.log("driver1")
    assert stop_process(rig.device) == 0
    assert "device stopped after 9 front-end session(s)" in rig.log("device"), rig.log("device")


def test_front_ends_that_hang_up_at_once_do_not_wedge_the_device(rig: Rig) -> None:
    """Front-ends that connect and hang up before sending anything (a port scanner, a crashed
    VMM) or after a message the device itself refuses: the device ends each such session
    without the driver ever seeing it, and clears BACKEND_UP with it. The driver must set it
    again, or no later front-end is served. (Found by scripts/soak.py --vvu.)"""
    rig.start_driver()
    path = str(rig.frontend_socket)

    async def scenario() -> None:
        blk = await asyncio.wait_for(BlkDriver.open(path, timeout=10), TIMEOUT)
        await blk.close()
        for i in range(20):
            deadline = time.monotonic() + TIMEOUT
            while True:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.setblocking(False)
                try:
                    sock.connect(path)
                    break
                except BlockingIOError:  # the listen backlog is full: the device is not accepting
                    sock.close()
                    assert time.monotonic() < deadline, f"front-end {i}: the device is wedged"
                    await asyncio.sleep(0.01)
            with sock:
                if i % 2:  # a header announcing far more than the device's payload cap
                    sock.send(struct.pack("<III", 1, 1, 1 << 30))
        blk = await asyncio.wait_for(BlkDriver.open(path, timeout=10), TIMEOUT)
        try:
            block = os.urandom(4096)
            await blk.write(8, block)
            assert await blk.read(8, 4096) == block
        finally:
            await blk.close()

    asyncio.run(scenario())


def _md5(line: str) -> str:
    digest = line.split(maxsplit=1)[0]
    assert len(digest) == 32, line
    return digest


def _image_md5(image: Path, offset: int, length: int) -> str:
    with image.open("rb") as f:
        f.seek(offset)
        return hashlib.md5(f.read(length)).hexdigest()


# --- QEMU guests ---------------------------------------------------------------------------------


def _qemu_blk(socket_path: Path, *, reconnect: bool = False) -> list[str]:
    chardev = f"socket,id=vu0,path={qemu_escape(str(socket_path))}"
    if reconnect:  # QEMU 7.2 spells it reconnect=SECONDS (9.2 added reconnect-ms=)
        chardev += ",reconnect=1"
    return ["-chardev", chardev, "-device", "vhost-user-blk-pci,chardev=vu0,num-queues=1"]


GUEST_TIMEOUT = 90.0
OFFSET, LENGTH = MiB, 2 * MiB
WRITE_AND_CHECK = f"""
set -e
head -c {LENGTH} /dev/urandom > /tmp/pattern
md5sum /tmp/pattern
dd if=/tmp/pattern of=/dev/vda bs=1M seek={OFFSET // MiB} oflag=direct conv=fsync 2>/dev/null
dd if=/dev/vda bs=1M skip={OFFSET // MiB} count={LENGTH // MiB} iflag=direct 2>/dev/null | md5sum
"""


@pytest.mark.guest
def test_qemu_sigkilled_mid_io_then_a_new_qemu_on_the_same_device(rig: Rig) -> None:
    guest_image()  # skip before booting when there is no guest
    rig.start_driver()
    devices = _qemu_blk(rig.frontend_socket)
    busy = """
while true; do
    dd if=/dev/urandom of=/dev/vda bs=64k count=64 oflag=direct 2>/dev/null
    echo io-running
    dd if=/dev/vda of=/dev/null bs=64k count=64 iflag=direct 2>/dev/null
done
"""
    with start_guest(busy, qemu_args=devices, timeout=GUEST_TIMEOUT) as guest:
        guest.wait_for("io-running")  # a round of writes is done, reads follow at once
        guest.proc.send_signal(signal.SIGKILL)
        guest.proc.wait(10)
    with start_guest(WRITE_AND_CHECK, qemu_args=devices, timeout=GUEST_TIMEOUT) as guest:
        result = guest.wait()
    log = rig.log("device") + rig.log("driver1")
    assert result.exit_status == 0, f"{result.serial}\n{log}"
    lines = result.output.split("\n")
    written = _md5(lines[0])
    assert _md5(lines[1]) == written, log
    assert _image_md5(rig.image, OFFSET, LENGTH) == written
    assert live_guests() == []
    assert rig.driver is not None and stop_process(rig.driver) == 0, rig.log("driver1")
    assert stop_process(rig.device) == 0
    assert "device stopped after 2 front-end session(s)" in rig.log("device"), rig.log("device")


@pytest.mark.guest
def test_driver_sigkilled_qemu_reconnects_and_io_resumes(rig: Rig) -> None:
    guest_image()
    rig.start_driver()
    script = (
        WRITE_AND_CHECK
        + """
echo phase1-done
sleep 12
echo 3 > /proc/sys/vm/drop_caches
"""
        + f"dd if=/dev/vda bs=1M skip={OFFSET // MiB} count={LENGTH // MiB} iflag=direct "
        "2>/dev/null | md5sum\n"
        + f"dd if=/tmp/pattern of=/dev/vda bs=1M seek={(OFFSET + LENGTH) // MiB} oflag=direct "
        "conv=fsync 2>/dev/null\n"
        + f"dd if=/dev/vda bs=1M skip={(OFFSET + LENGTH) // MiB} count={LENGTH // MiB} "
        "iflag=direct 2>/dev/null | md5sum\n"
    )
    devices = _qemu_blk(rig.frontend_socket, reconnect=True)
    with start_guest(script, qemu_args=devices, timeout=GUEST_TIMEOUT) as guest:
        guest.wait_for("phase1-done")
        rig.kill_driver()  # the device drops QEMU, which reconnects every second
        rig.start_driver()
        result = guest.wait()
    log = rig.log("device") + rig.log("driver2")
    assert result.exit_status == 0, f"{result.serial}\n{guest.stderr}\n{log}"
    lines = result.output.split("\n")
    written = _md5(lines[0])
    assert _md5(lines[1]) == written
    assert lines[2] == "phase1-done"
    assert _md5(lines[3]) == written, "read after the reconnection"
    assert _md5(lines[4]) == written, "written after the reconnection"
    assert _image_md5(rig.image, OFFSET, LENGTH) == written
    assert _image_md5(rig.image, OFFSET + LENGTH, LENGTH) == written
    assert rig.driver is not None and stop_process(rig.driver) == 0, rig.log("driver2")
    assert stop_process(rig.device) == 0
    assert "device stopped after 2 front-end session(s)" in rig.log("device"), rig.log("device")
