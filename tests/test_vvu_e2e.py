"""The same back-ends over AF_UNIX and over virtio-vhost-user, end to end.

front-end (vvu.frontend) → AF_UNIX → [VvuDevice → vfio-user → VvuDriver] → engine → back-end.
Every test here runs over both transports: the back-ends and the engine do not change.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from daemons import stop_process, wait_for_socket
from vvu.backends import BlkBackend, NetBackend, RngBackend
from vvu.device.vvu import DIRECT_KICK, INFLIGHT_BAR, VvuDevice
from vvu.frontend import BlkDriver, BlkIOError, RngDriver
from vvu.frontend.net import NetDriver
from vvu.vfio_user import ClientOptions, VfioUserServer
from vvu.vfio_user.protocol import Command
from vvu_harness import served, tmpfs_file

TIMEOUT = 20.0
VVU = [sys.executable, "-m", "vvu"]


TRANSPORTS = pytest.mark.parametrize("transport", ["unix", "vvu", "vvu-msix"])
#: A vfio-user client that knows no vvu extension and never asks for ioeventfds: what QEMU 11's
#: vfio-user-pci is.
STANDARD_CLIENT = ClientOptions(sparse_mmap_fds=False, io_fds=False)


@pytest.mark.asyncio
@pytest.mark.parametrize("client", ["standard", "vvu"])
async def test_blk_with_frontend_memory_from_a_file(client: str, tmp_path: Path) -> None:
    """`--frontend-memory`: the front-end's RAM is a tmpfs file, BAR4 is that file behind one
    standard sparse-mmap area, and the front-end's regions are matched to it. A client without
    vvu's extensions (QEMU 11's kind) serves blk over it: BAR4 reached by mmap only (no
    REGION_READ/WRITE on it), doorbells as REGION_WRITEs, kicks as MSI-X (the device refuses
    DIRECT). The inflight region is the device's memfd (BAR3, mapped too), and the engine
    tracks the ring in it. Our own client still gets its fast paths."""
    devices: list[VvuDevice] = []
    servers: list[VfioUserServer] = []
    options = STANDARD_CLIENT if client == "standard" else None
    with tmpfs_file(48 << 20) as mem:
        async with served(
            BlkBackend(size=16 << 20),
            "vvu",
            tmp_path,
            devices,
            servers=servers,
            frontend_memory=str(mem),
            client_options=options,
        ) as path:
            (device,), (server,) = devices, servers
            blk = await asyncio.wait_for(
                BlkDriver.open(path, depth=8, timeout=5, memory_path=str(mem)), TIMEOUT
            )
            try:
                data = os.urandom(1 << 20)
                await blk.write(128, data)
                await blk.flush()
                back = await blk.read(128, 1 << 20)
                assert hashlib.sha256(back).digest() == hashlib.sha256(data).digest()
                blocks = {i: os.urandom(4096) for i in range(16)}
                await asyncio.gather(*(blk.write(4096 + i * 8, b) for i, b in blocks.items()))
                got = await asyncio.gather(*(blk.read(4096 + i * 8, 4096) for i in blocks))
                assert got == list(blocks.values())
                # INFLIGHT_SHMFD negotiated: the front-end holds the device's inflight memfd,
                # and the engine initialised queue 0's part of it (version 1, desc_num).
                inflight, area = blk.frontend.inflight, device.shm_area(3)
                assert inflight is not None and area is not None
                fd = blk.frontend._inflight_fd
                assert os.fstat(fd).st_ino == os.fstat(area.fd).st_ino
                assert struct.unpack("<HH", os.pread(fd, 4, 8)) == (1, inflight.queue_size)
            finally:
                await blk.close()
            assert server.region_accesses[4] == 0  # front-end memory: mapped, never trapped
            assert server.region_accesses[INFLIGHT_BAR] == 0  # the inflight memory too
            fwd = device.forwarder
            assert fwd is not None
            if client == "standard":
                assert server.commands[Command.DEVICE_GET_REGION_IO_FDS] == 0
                assert device.doorbell_writes > 0  # calls: REGION_WRITEs the device relays
                assert all(device.aux_vector(i) != DIRECT_KICK for i in range(8))
                assert (fwd.forwarded(0) or 0) > 0  # kicks relayed to MSI-X
            else:
                assert device.aux_vector(0) == DIRECT_KICK and fwd.tokens() == []
                assert device.doorbell_writes == 0  # calls: the ioeventfds, zero hops


@pytest.mark.asyncio
@pytest.mark.parametrize("transport", ["vvu", "vvu-msix"])
async def test_kicks_bypass_the_device_in_direct_mode(transport: str, tmp_path: Path) -> None:
    """Direct kicks: the back-end waits on the front-end's kick eventfd, the device's forwarder
    watches nothing and relays nothing. MSI-X kicks: the forwarder relays every ring's kicks."""
    devices: list[VvuDevice] = []
    async with served(BlkBackend(size=16 << 20), transport, tmp_path, devices) as path:
        (device,) = devices
        blk = await asyncio.wait_for(BlkDriver.open(path, depth=32, timeout=5), TIMEOUT)
        try:
            blocks = {i: os.urandom(4096) for i in range(64)}
            await asyncio.gather(*(blk.write(i * 8, b) for i, b in blocks.items()))
            assert await asyncio.gather(*(blk.read(i * 8, 4096) for i in blocks)) == list(
                blocks.values()
            )
            fwd = device.forwarder
            assert fwd is not None
            if transport == "vvu":
                assert fwd.tokens() == []
                assert all(device.aux_vector(i) == DIRECT_KICK for i in range(8))
            else:
                assert fwd.tokens() == [0]
                assert (fwd.forwarded(0) or 0) > 0
        finally:
            await blk.close()


@TRANSPORTS
@pytest.mark.asyncio
async def test_blk_io_and_a_second_session(transport: str, tmp_path: Path) -> None:
    async with served(BlkBackend(size=16 << 20, serial="both"), transport, tmp_path) as path:
        data = os.urandom(1 << 20)
        blk = await asyncio.wait_for(BlkDriver.open(path, timeout=5), TIMEOUT)
        try:
            assert blk.capacity == 16 << 11
            assert await blk.get_id() == b"both"
            await blk.write(64, data)
            await blk.flush()
            assert await blk.read(64, 1 << 20) == data
            await blk.discard(64, 8)
            assert await blk.read(64, 4096) == bytes(4096)
            with pytest.raises(BlkIOError):
                await blk.read(blk.capacity, 512)  # past the end
        finally:
            await blk.close()
        # The next front-end gets a clean session and the data the first one left.
        again = await asyncio.wait_for(BlkDriver.open(path, timeout=5), TIMEOUT)
        try:
            assert await again.read(72, 4096) == data[4096:8192]
        finally:
            await again.close()


@TRANSPORTS
@pytest.mark.asyncio
async def test_many_requests_in_flight(transport: str, tmp_path: Path) -> None:
    async with served(BlkBackend(size=16 << 20), transport, tmp_path) as path:
        blk = await asyncio.wait_for(BlkDriver.open(path, depth=32, timeout=5), TIMEOUT)
        try:
            blocks = {i: os.urandom(4096) for i in range(256)}
            await asyncio.gather(*(blk.write(i * 8, b) for i, b in blocks.items()))
            got = await asyncio.gather(*(blk.read(i * 8, 4096) for i in blocks))
            assert got == list(blocks.values())
        finally:
            await blk.close()


@TRANSPORTS
@pytest.mark.asyncio
async def test_rng_python_handler(transport: str, tmp_path: Path) -> None:
    async with served(RngBackend(), transport, tmp_path) as path:
        rng = await asyncio.wait_for(RngDriver.open(path, timeout=5), TIMEOUT)
        try:
            samples = {await rng.read(32) for _ in range(4)}
            assert len(samples) == 4 and all(len(s) == 32 for s in samples)
        finally:
            await rng.close()


@TRANSPORTS
@pytest.mark.asyncio
async def test_net_pair_exchanges_frames_with_an_af_unix_peer(
    transport: str, tmp_path: Path
) -> None:
    """Side A of a peer link served over `transport`, side B over AF_UNIX: frames of every
    size cross both ways (over VVU, A's rings live behind the device's BAR4). NetDriver's
    memfd is not a page multiple, unlike QEMU's."""
    a, b = NetBackend.peers()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with (
        served(a, transport, tmp_path / "a") as path_a,
        served(b, "unix", tmp_path / "b") as path_b,
    ):
        da = await asyncio.wait_for(NetDriver.open(path_a), TIMEOUT)
        db = await asyncio.wait_for(NetDriver.open(path_b), TIMEOUT)
        try:
            sizes = [14, 60, 1514, 9000, 65535]
            out_a = [bytes([i]) * n for i, n in enumerate(sizes)]
            out_b = [bytes([100 + i]) * n for i, n in enumerate(reversed(sizes))]
            await asyncio.gather(da.send_all(out_a), db.send_all(out_b))
            assert [await db.recv(TIMEOUT) for _ in out_a] == out_a
            assert [await da.recv(TIMEOUT) for _ in out_b] == out_b
        finally:
            await da.close()
            await db.close()


def test_cli_device_and_serve_vvu(tmp_path: Path) -> None:
    """`vvu device` + `vvu serve blk --vvu` as separate processes, stopped by PID."""
    frontend_socket, device_socket = tmp_path / "fe.sock", tmp_path / "dev.sock"
    device = subprocess.Popen(
        [*VVU, "-q", "device", "--socket-path", str(frontend_socket),
         "--vfio-user", str(device_socket), "--max-queues", "4"],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    serve = None
    try:
        wait_for_socket(device_socket, device)
        serve = subprocess.Popen(
            [*VVU, "-q", "serve", "blk", "--vvu", str(device_socket), "--size", "8"],
            stderr=subprocess.PIPE,
        )

        async def use() -> None:
            blk = await asyncio.wait_for(BlkDriver.open(str(frontend_socket), timeout=10), 30)
            try:
                await blk.write(0, b"over vvu".ljust(512, b"."))
                assert (await blk.read(0, 512))[:8] == b"over vvu"
            finally:
                await blk.close()

        asyncio.run(use())
    finally:
        if serve is not None:
            assert stop_process(serve) == 0
        assert stop_process(device) == 0
    err = device.stderr.read().decode() if device.stderr else ""
    assert "device process CPU time" in err, err
    assert not frontend_socket.exists() and not device_socket.exists()
