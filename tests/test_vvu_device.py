"""The VVU device (docs/vvu-device.md) served over vfio-user, driven by a minimal test driver
(`VirtioPciDriver` over `VfioUserPciAccess`) and a vhost-user front-end (`vvu.frontend`)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import os
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from vvu._core import EventFd, EventForwarder, GuestMemory
from vvu.device import BACKEND_UP, FRONTEND_UP, PROTOCOL_FEATURES_ALLOWED, VvuDevice
from vvu.device.vvu import (
    BAR4_SIZE,
    DIRECT_KICK,
    DRIVER_AUX_OFFSET,
    INFLIGHT_BAR,
    KICK_FDS_OFFSET,
    MAX_AREAS,
    inflight_memory_size,
)
from vvu.frontend.core import UVA_BASE, Frontend, FrontendError
from vvu.pci import NO_VECTOR, CfgType, Status, VirtioPciDriver
from vvu.protocol import (
    U64,
    FrontendRequest,
    Inflight,
    MemoryRegion,
    MemoryTable,
    ProtocolFeature,
    SingleRegion,
    VringState,
)
from vvu.protocol.constants import NEED_REPLY, REPLY, VERSION
from vvu.transport.unix import UnixListener
from vvu.vfio_user import ClientOptions, VfioUserListener, VfioUserPciAccess, VfioUserServer
from vvu.vfio_user.protocol import RegionFlag, SparseMmapCap, VfioUserError

N = 4
TIMEOUT = 10.0
_F = FrontendRequest
HDR = struct.Struct("<III")
BUF = 12 + 4096


def fd_count() -> int:
    return len(fd_set())


def fd_set() -> dict[str, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out[name] = os.readlink(f"/proc/self/fd/{name}")
    return out


@dataclass
class Rig:
    tmp: Path
    device: VvuDevice
    server: VfioUserServer
    vfio_path: str
    frontend_path: str


@dataclass
class VvuTestDriver:
    """A minimal VVU driver: rxq buffers, status, txq messages."""

    pci: VfioUserPciAccess
    drv: VirtioPciDriver
    rx_bufs: dict[int, int] = field(default_factory=dict)
    rx_seen: list[bytes] = field(default_factory=list)

    async def post_rx(self, count: int, size: int = BUF) -> None:
        q = self.drv.queues[0]
        for _ in range(count):
            addr = self.drv.alloc(size)
            self.rx_bufs[q.add([], [(addr, size)])] = addr
        await self.drv.kick(0, force=True)

    async def recv(self, timeout: float = 5.0) -> bytes:
        while not self.rx_seen:
            for head, length in await self.drv.wait_used(0, timeout):
                addr = self.rx_bufs.pop(head)
                self.rx_seen.append(self.drv.memory.read(addr, length))
        return self.rx_seen.pop(0)

    async def send(self, data: bytes) -> None:
        addr = self.drv.alloc(max(len(data), 1))
        self.drv.memory.write(addr, data)
        self.drv.queues[1].add([(addr, len(data))])
        await self.drv.kick(1, force=True)
        await self.drv.wait_used(1)

    async def reply(self, request: int, payload: bytes) -> None:
        await self.send(HDR.pack(request, VERSION | REPLY, len(payload)) + payload)

    async def status(self) -> int:
        return int(struct.unpack("<I", await self.drv.read_config(0, 4))[0])

    async def set_status(self, value: int) -> None:
        await self.drv.write_config(0, struct.pack("<I", value))

    async def close(self) -> None:
        await self.drv.close()
        await self.pci.close()


@contextlib.asynccontextmanager
async def rig(tmp_path: Path, frontend_memory: str | None = None) -> AsyncIterator[Rig]:
    vfio_path = str(tmp_path / "vvu.sock")
    fe_path = str(tmp_path / "fe.sock")
    device = VvuDevice(
        UnixListener(fe_path),
        max_queues=N,
        uuid=bytes(range(16)),
        frontend_memory=frontend_memory,
    )
    server = VfioUserServer(device, VfioUserListener(vfio_path))
    task = asyncio.ensure_future(server.serve_forever())
    try:
        yield Rig(tmp_path, device, server, vfio_path, fe_path)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        server.close()
        device.close()


@contextlib.asynccontextmanager
async def driver(
    r: Rig, *, rx: int = 8, options: ClientOptions | None = None
) -> AsyncIterator[VvuTestDriver]:
    pci = await asyncio.wait_for(
        VfioUserPciAccess.open(r.vfio_path, timeout=2, options=options), TIMEOUT
    )
    drv = await VirtioPciDriver.open(pci)
    await drv.setup_interrupts(3 + N)
    await drv.init(queues=2)
    td = VvuTestDriver(pci, drv)
    try:
        if rx:
            await td.post_rx(rx)
        yield td
    finally:
        await td.close()


async def until(cond: object, what: str) -> None:
    for _ in range(500):
        if callable(cond) and cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(what)


async def connect(td: VvuTestDriver, r: Rig, **kwargs: Any) -> Frontend:
    fe = await Frontend.connect(r.frontend_path, **({"memory_size": 4 << 20} | kwargs))
    await until(lambda: r.device.frontend_connected, "front-end accepted")
    await td.drv.wait_config_change()
    assert await td.status() == BACKEND_UP | FRONTEND_UP
    return fe


@contextlib.asynccontextmanager
async def session(
    r: Rig, *, rx: int = 8, reply_ack: bool = False, options: ClientOptions | None = None
) -> AsyncIterator[tuple[VvuTestDriver, Frontend]]:
    """A driver with BACKEND_UP and a connected front-end (closed after); `reply_ack`: the
    front-end asks for acks (NEED_REPLY) as if REPLY_ACK had been negotiated."""
    async with driver(r, rx=rx, options=options) as td:
        await td.set_status(BACKEND_UP)
        fe = await connect(td, r)
        if reply_ack:
            fe.protocol_features = ProtocolFeature.REPLY_ACK.mask
        try:
            yield td, fe
        finally:
            await fe.close()


@pytest_asyncio.fixture
async def rigged(tmp_path: Path) -> AsyncIterator[Rig]:
    async with rig(tmp_path) as r:
        yield r


def test_event_forwarder_from_python() -> None:
    fwd = EventForwarder()
    src, dst = EventFd(), EventFd()
    fwd.add(src, dst, 3)
    src.signal()
    assert dst.wait(5.0)
    assert fwd.forwarded(3) == 1 and fwd.tokens() == [3]
    assert fwd.set_dst(3, None) and fwd.remove(3) and not fwd.remove(3)
    fwd.close()
    assert not fwd.running


@pytest.mark.asyncio
async def test_layout_config_and_capabilities(rigged: Rig) -> None:
    pci = await VfioUserPciAccess.open(rigged.vfio_path, timeout=2)
    try:
        assert await pci.config_read_u16(2) == 0x107F
        assert pci.bar_info(2).size == 0x8000
        assert pci.bar_info(4).size == BAR4_SIZE
        assert await pci.config_read_u32(0x20) & 0xF == 0xC  # 64-bit prefetchable
        assert await pci.msix_vectors() == 3 + N
        caps = await VirtioPciDriver.find_caps(pci)
        # No PCI_CFG: its 20 bytes make room for the third shared-memory cap64.
        assert CfgType.PCI_CFG not in [c.cfg_type for c in caps]
        extra = [(c.cfg_type, c.bar, c.offset, c.length) for c in caps[4:]]
        assert extra[:2] == [(6, 2, 0, 4 * (2 * N + 1)), (7, 2, DRIVER_AUX_OFFSET, 4)]
        shm = [c for c in caps if c.cfg_type == CfgType.SHARED_MEMORY]
        assert [await pci.config_read_u8(c.at + 5) for c in shm] == [1, 2, 3]
        # (offset, length) = (0, 16 GiB), (16 GiB, 1 GiB), (17 GiB, 1 GiB): low and high halves.
        assert [(c.offset, c.length) for c in shm] == [(0, 0), (0, 1 << 30), (1 << 30, 1 << 30)]
        assert [struct.unpack("<II", c.extra) for c in shm] == [(0, 4), (4, 0), (4, 0)]
        assert max(c.at for c in shm) + 24 <= 0x100
        drv = await VirtioPciDriver.open(pci)
        cfg = await drv.read_config(0, 24)
        assert cfg == struct.pack("<II", 0, N) + bytes(range(16))
        # Only BACKEND_UP is the driver's; max_queues and uuid are read-only.
        await drv.write_config(0, struct.pack("<I", 0xFE))
        await drv.write_config(4, struct.pack("<I", 9))
        assert await drv.read_config(0, 8) == struct.pack("<II", 0, N)
    finally:
        await pci.close()


@pytest.mark.asyncio
async def test_handshake_and_get_features_round_trip(rigged: Rig) -> None:
    async with driver(rigged) as td:
        # No BACKEND_UP: the front-end waits in the backlog.
        fe = await Frontend.connect(rigged.frontend_path, memory_size=4 << 20)
        # The device's accept loop is parked until BACKEND_UP: nothing can accept it.
        assert rigged.device._can_accept is not None and not rigged.device._can_accept.is_set()
        assert not rigged.device.frontend_connected
        await td.set_status(BACKEND_UP)
        await until(lambda: rigged.device.frontend_connected, "front-end accepted")
        await td.drv.wait_config_change()
        assert await td.status() == BACKEND_UP | FRONTEND_UP
        task = asyncio.ensure_future(fe.request_u64(_F.GET_FEATURES))
        msg = await td.recv()
        assert HDR.unpack_from(msg) == (_F.GET_FEATURES, VERSION, 0)
        await td.reply(_F.GET_FEATURES, U64(0x1234).pack())
        assert await asyncio.wait_for(task, TIMEOUT) == 0x1234
        await fe.close()
        await until(lambda: not rigged.device.frontend_connected, "disconnect seen")


@pytest.mark.asyncio
async def test_protocol_features_are_filtered(rigged: Rig) -> None:
    async with driver(rigged) as td:
        await td.set_status(BACKEND_UP)
        fe = await connect(td, rigged)
        task = asyncio.ensure_future(fe.request_u64(_F.GET_PROTOCOL_FEATURES))
        await td.recv()
        offered = (1 << 64) - 1
        await td.reply(_F.GET_PROTOCOL_FEATURES, U64(offered).pack())
        got = await asyncio.wait_for(task, TIMEOUT)
        assert got == PROTOCOL_FEATURES_ALLOWED
        for unsafe in (
            ProtocolFeature.BACKEND_SEND_FD,
            ProtocolFeature.HOST_NOTIFIER,
            ProtocolFeature.SHARED_OBJECT,
            ProtocolFeature.DEVICE_STATE,
        ):
            assert not got & (1 << unsafe)
        await fe.close()


@pytest.mark.asyncio
async def test_mem_table_call_kick_and_release(rigged: Rig) -> None:  # noqa: PLR0915
    dev = rigged.device
    async with driver(rigged) as td:
        await td.set_status(BACKEND_UP)
        fe = await connect(td, rigged)
        # SET_MEM_TABLE: BAR4 area is the front-end's memfd; mmap_offset rewritten.
        await fe.set_mem_table()
        msg = await td.recv()
        request, _flags, size = HDR.unpack_from(msg)
        assert request == _F.SET_MEM_TABLE
        table = MemoryTable.unpack(msg[12 : 12 + size])
        (region,) = table.regions
        assert (region.guest_phys_addr, region.memory_size, region.userspace_addr) == (
            0,
            4 << 20,
            UVA_BASE,
        )
        areas = await td.pci.client.mmap_region(4)
        assert len(areas) == 1 and areas[0].offset == region.mmap_offset == 0
        mem = GuestMemory()
        mem.add_region(areas[0].fd, areas[0].offset, areas[0].size, mmap_offset=areas[0].fd_offset)
        areas[0].close()
        fe.memory.write(0x2000, b"shared through BAR4")
        assert mem.read(region.mmap_offset + 0x2000, 19) == b"shared through BAR4"
        assert await td.pci.bar_read(4, 0x2000, 6) == b"shared"  # message access too
        del mem
        # SET_VRING_CALL 1: the BAR2 ioeventfd at 4 is the front-end's call fd.
        call, kick = EventFd(), EventFd()
        await fe.request(_F.SET_VRING_CALL, U64.vring(1), [call.fileno()])
        assert HDR.unpack_from(await td.recv())[0] == _F.SET_VRING_CALL
        iofds = await td.pci.client.region_io_fds(2)
        assert [f.offset for f in iofds] == [4]
        iofds[0].eventfd.signal()
        assert call.wait(5.0)
        await td.pci.client.region_write(2, 4, struct.pack("<I", 1))
        assert call.wait(5.0)
        for f in iofds:
            f.eventfd.close()
        # Out-of-range doorbell, select and vector: ignored.
        await td.pci.client.region_write(2, 4 * (2 * N + 5), struct.pack("<I", 1))
        await td.pci.client.region_write(2, DRIVER_AUX_OFFSET, struct.pack("<H", N + 3))
        assert await td.pci.bar_read(2, DRIVER_AUX_OFFSET + 2, 2) == struct.pack("<H", NO_VECTOR)
        await td.pci.client.region_write(2, DRIVER_AUX_OFFSET + 2, struct.pack("<H", 1))
        # SET_VRING_KICK 1 → MSI-X vector 3 + 1 once the driver maps notification 1.
        await fe.request(_F.SET_VRING_KICK, U64.vring(1), [kick.fileno()])
        assert HDR.unpack_from(await td.recv())[0] == _F.SET_VRING_KICK
        kick.signal()  # unmapped: only ISR bit 2
        await until(lambda: dev._isr & 0x4, "ISR bit 2")
        await td.pci.client.region_write(2, DRIVER_AUX_OFFSET, struct.pack("<HH", 1, 4))
        assert await td.pci.bar_read(2, DRIVER_AUX_OFFSET, 4) == struct.pack("<HH", 1, 4)
        await td.pci.client.region_write(2, DRIVER_AUX_OFFSET + 2, struct.pack("<H", 999))
        assert await td.pci.bar_read(2, DRIVER_AUX_OFFSET + 2, 2) == struct.pack("<H", NO_VECTOR)
        await td.pci.client.region_write(2, DRIVER_AUX_OFFSET + 2, struct.pack("<H", 4))
        before = td.drv.interrupts[4]
        kick.signal()
        await until(lambda: td.drv.interrupts[4] > before, "kick forwarded to MSI-X vector 4")
        assert (
            dev.forwarder is not None and dev.forwarder.forwarded(1) == 2
        )  # ISR fallback + vector
        # GET_VRING_BASE 1: released after the reply.
        task = asyncio.ensure_future(fe.request(_F.GET_VRING_BASE, VringState(1, 0)))
        assert HDR.unpack_from(await td.recv())[0] == _F.GET_VRING_BASE
        assert dev.doorbells
        await td.reply(_F.GET_VRING_BASE, VringState(1, 7).pack())
        assert await asyncio.wait_for(task, TIMEOUT) == VringState(1, 7)
        assert not dev.doorbells and dev.forwarder.tokens() == []
        call.close()
        kick.close()
        await fe.close()
        await until(lambda: not dev.areas, "areas dropped")


@pytest.mark.asyncio
async def test_direct_kick_is_the_front_ends_eventfd_and_never_relayed(rigged: Rig) -> None:
    """vvu extension: msix_vector DIRECT (0xFFFE) for notification 2 makes BAR2's ioeventfd at
    KICK_FDS_OFFSET + 4·2 the front-end's kick eventfd, from SET_VRING_KICK (bound before the
    message is forwarded) to GET_VRING_BASE; the device neither forwards it nor sets ISR bit 2."""
    dev = rigged.device
    async with driver(rigged) as td:
        await td.set_status(BACKEND_UP)
        await td.pci.client.region_write(2, DRIVER_AUX_OFFSET, struct.pack("<HH", 2, DIRECT_KICK))
        assert await td.pci.bar_read(2, DRIVER_AUX_OFFSET, 4) == struct.pack("<HH", 2, DIRECT_KICK)
        assert dev.aux_vector(2) == DIRECT_KICK
        fe = await connect(td, rigged)
        assert await td.pci.client.region_io_fds(2) == []
        kick = EventFd()
        await fe.request(_F.SET_VRING_KICK, U64.vring(2), [kick.fileno()])
        assert HDR.unpack_from(await td.recv())[0] == _F.SET_VRING_KICK
        iofds = await td.pci.client.region_io_fds(2)
        assert [f.offset for f in iofds] == [KICK_FDS_OFFSET + 4 * 2]
        iofds[0].eventfd.signal()  # the same eventfd (anon inodes all share one st_ino)
        assert kick.consume()
        assert dev.forwarder is not None and dev.forwarder.tokens() == []
        dev._isr = 0
        kick.signal()
        assert iofds[0].eventfd.wait(5.0)  # the driver reads the front-end's kick itself
        assert dev.forwarder.tokens() == []  # nobody else watches it ...
        kick.signal()
        assert iofds[0].eventfd.consume()  # ... so nobody else consumed it
        assert not dev._isr & 0x4 and dev.forwarder.tokens() == []
        # A REGION_WRITE there does what the ioeventfd does.
        await td.pci.client.region_write(2, KICK_FDS_OFFSET + 4 * 2, struct.pack("<I", 1))
        assert kick.wait(5.0)
        # Back to a vector: forwarded again; back to DIRECT: not any more.
        await td.pci.client.region_write(2, DRIVER_AUX_OFFSET, struct.pack("<HH", 2, 5))
        assert dev.forwarder.tokens() == [2]
        before = td.drv.interrupts[5]
        kick.signal()
        await until(lambda: td.drv.interrupts[5] > before, "kick forwarded to MSI-X vector 5")
        await td.pci.client.region_write(2, DRIVER_AUX_OFFSET, struct.pack("<HH", 2, DIRECT_KICK))
        assert dev.forwarder.tokens() == []
        for f in iofds:
            f.eventfd.close()
        # GET_VRING_BASE 2: the entry goes away after the reply.
        task = asyncio.ensure_future(fe.request(_F.GET_VRING_BASE, VringState(2, 0)))
        assert HDR.unpack_from(await td.recv())[0] == _F.GET_VRING_BASE
        assert len(await td.pci.client.region_io_fds(2)) == 1
        await td.reply(_F.GET_VRING_BASE, VringState(2, 3).pack())
        assert await asyncio.wait_for(task, TIMEOUT) == VringState(2, 3)
        leftover = await td.pci.client.region_io_fds(2)
        assert leftover == []
        kick.close()
        await fe.close()


@pytest.mark.asyncio
async def test_backend_requests_need_the_backend_channel(rigged: Rig) -> None:
    dev = rigged.device
    async with driver(rigged) as td:
        await td.set_status(BACKEND_UP)
        fe = await connect(td, rigged)
        request = HDR.pack(2, VERSION | NEED_REPLY, 0)  # BACKEND_CONFIG_CHANGE_MSG
        dropped = dev.dropped_tx
        await td.send(request)
        assert dev.dropped_tx == dropped + 1
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        await fe.request(_F.SET_BACKEND_REQ_FD, fds=[theirs.fileno()])
        theirs.close()
        assert HDR.unpack_from(await td.recv())[0] == _F.SET_BACKEND_REQ_FD
        await td.send(request)
        ours.settimeout(5)
        got = await asyncio.get_running_loop().run_in_executor(None, ours.recv, 100)
        assert got == request
        # The front-end's reply comes back on rxq.
        ours.sendall(HDR.pack(2, VERSION | REPLY, 8) + U64(0).pack())
        msg = await td.recv()
        assert HDR.unpack_from(msg) == (2, VERSION | REPLY, 8)
        ours.close()
        await fe.close()


@pytest.mark.asyncio
async def test_hostile_txq_buffers_are_dropped(rigged: Rig) -> None:
    dev = rigged.device
    async with driver(rigged) as td:
        await td.set_status(BACKEND_UP)
        fe = await connect(td, rigged)
        bad = [
            b"short",
            HDR.pack(1, VERSION | REPLY, 8) + b"\0" * 4,  # size mismatch
            HDR.pack(1, 2 | REPLY, 0),  # version 2
            HDR.pack(1, VERSION | REPLY | 0x100, 0),  # unknown flag
        ]
        for data in bad:
            await td.send(data)
        assert dev.dropped_tx == len(bad)
        # Still serving.
        task = asyncio.ensure_future(fe.request_u64(_F.GET_FEATURES))
        await td.recv()
        await td.reply(_F.GET_FEATURES, U64(5).pack())
        assert await asyncio.wait_for(task, TIMEOUT) == 5
        await fe.close()


@pytest.mark.asyncio
async def test_small_rx_buffer_sets_needs_reset(rigged: Rig) -> None:
    async with driver(rigged, rx=0) as td:
        await td.post_rx(1, size=16)
        await td.set_status(BACKEND_UP)
        fe = await connect(td, rigged)
        await fe.set_mem_table()  # 12 + 40 bytes > 16
        await until(lambda: rigged.device.status & Status.DEVICE_NEEDS_RESET, "needs reset")
        await fe.close()


@pytest.mark.asyncio
async def test_no_rx_buffers_front_end_waits_and_disconnect_is_clean(rigged: Rig) -> None:
    dev = rigged.device
    before_set = fd_set()
    before = len(before_set)
    async with driver(rigged, rx=0) as td:
        await td.set_status(BACKEND_UP)
        fe = await connect(td, rigged)
        task = asyncio.ensure_future(fe.request_u64(_F.GET_FEATURES))
        await until(lambda: len(dev._rx_pending) == 1, "the message waits for an rx buffer")
        assert not task.done()
        # Posting a buffer later delivers it; nothing was dropped.
        await td.post_rx(1)
        assert HDR.unpack_from(await td.recv())[0] == _F.GET_FEATURES
        task.cancel()
        # Pending txq buffers are completed on disconnect.
        addr = td.drv.alloc(64)
        td.drv.queues[1].add([(addr, 12)])
        td.drv.queues[1].ring.publish()  # published, not kicked
        await fe.close()
        await until(lambda: not dev.frontend_connected, "disconnect")
        await td.drv.wait_config_change()
        assert await td.status() == 0
        assert await td.drv.wait_used(1) == [(0, 0)]  # completed, discarded
        # A second session is clean.
        await td.post_rx(2)
        await td.set_status(BACKEND_UP)
        fe2 = await connect(td, rigged)
        t2 = asyncio.ensure_future(fe2.request_u64(_F.GET_FEATURES))
        assert HDR.unpack_from(await td.recv())[0] == _F.GET_FEATURES
        await td.reply(_F.GET_FEATURES, U64(9).pack())
        assert await asyncio.wait_for(t2, TIMEOUT) == 9
        assert dev.sessions == 2
        # The driver clears BACKEND_UP: the front-end is disconnected.
        await td.set_status(0)
        await until(lambda: not dev.frontend_connected, "driver-side disconnect")
        assert await fe2.channel.recv() is None
        await fe2.close()
        del fe, fe2  # their GuestMemory keeps a mapping (and an fd) until collected
    for _ in range(100):
        if not rigged.server.connected:
            break
        await asyncio.sleep(0.01)
    gc.collect()
    after = fd_set()
    assert fd_count() <= before + 1, {k: v for k, v in after.items() if k not in before_set}


@pytest.mark.asyncio
async def test_get_inflight_fd_reply_carries_a_device_region_that_is_shmid_3(rigged: Rig) -> None:
    async with driver(rigged) as td:
        await td.set_status(BACKEND_UP)
        fe = await connect(td, rigged)
        fds: list[int] = []
        try:
            asked = Inflight(0, 0, 1, 64)
            task = asyncio.ensure_future(fe.request(_F.GET_INFLIGHT_FD, asked, reply_fds=fds))
            assert HDR.unpack_from(await td.recv())[0] == _F.GET_INFLIGHT_FD
            # The back-end answers with the size it needs (its own fd cannot cross the device).
            await td.reply(_F.GET_INFLIGHT_FD, Inflight(0x2100, 0, 1, 64).pack())
            assert await asyncio.wait_for(task, TIMEOUT) == Inflight(0x2100, 0, 1, 64)
            assert len(fds) == 1 and os.fstat(fds[0]).st_size == 0x2100
            area = rigged.device.shm_area(3)
            assert area is not None and area.offset == 17 << 30 and area.size == 0x3000
            # The back-end is told where the region is, in a SET_INFLIGHT_FD of the device's.
            told = await td.recv()
            assert HDR.unpack_from(told) == (_F.SET_INFLIGHT_FD, VERSION, 24)
            assert Inflight.unpack(told[12:]) == Inflight(0x2100, 0, 1, 64)
            # One region: what the front-end writes, the back-end reads in BAR4 at 17 GiB.
            os.pwrite(fds[0], b"inflight", 0x2000)
            assert await td.pci.bar_read(4, (17 << 30) + 0x2000, 8) == b"inflight"

            # A size that does not fit shmid 3 (1 GiB): the failure form, no fd, no region.
            os.close(fds.pop())
            task = asyncio.ensure_future(fe.request(_F.GET_INFLIGHT_FD, asked, reply_fds=fds))
            await td.recv()
            await td.reply(_F.GET_INFLIGHT_FD, Inflight(2 << 30, 0, 1, 64).pack())
            assert await asyncio.wait_for(task, TIMEOUT) == Inflight(0, 0, 1, 64)
            assert fds == [] and rigged.device.shm_area(3) is None
        finally:
            for fd in fds:
                os.close(fd)
            await fe.close()


@pytest.mark.asyncio
async def test_set_inflight_fd_region_becomes_shmid_3_with_its_offset_rewritten(
    rigged: Rig,
) -> None:
    async with driver(rigged) as td:
        await td.set_status(BACKEND_UP)
        fe = await connect(td, rigged)
        region = os.memfd_create("inflight")
        try:
            os.ftruncate(region, 0x3000)
            os.pwrite(region, b"kept", 0x1040)
            await fe.request(_F.SET_INFLIGHT_FD, Inflight(0x1000, 0x1040, 1, 64), [region])
            got = await td.recv()
            assert HDR.unpack_from(got)[0] == _F.SET_INFLIGHT_FD
            # The page holding the region's start is shmid 3's first page.
            assert Inflight.unpack(got[12:]) == Inflight(0x1000, 0x40, 1, 64)
            area = rigged.device.shm_area(3)
            assert area is not None and (area.offset, area.fd_offset) == (17 << 30, 0x1000)
            assert await td.pci.bar_read(4, (17 << 30) + 0x40, 4) == b"kept"
            # A region that does not fit shmid 3 is not published; the back-end refuses it.
            await fe.request(_F.SET_INFLIGHT_FD, Inflight(1 << 30, 0, 1, 64), [region])
            got = await td.recv()
            assert Inflight.unpack(got[12:]) == Inflight(1 << 30, 0, 1, 64)
            assert rigged.device.shm_area(3) is None
        finally:
            os.close(region)
            await fe.close()


def _memfd(size: int, name: str = "vvu-test-region") -> int:
    fd = os.memfd_create(name)
    os.ftruncate(fd, size)
    return fd


async def _acked(fe: Frontend, td: VvuTestDriver, request: int, *args: Any) -> bytes:
    """Send a request with NEED_REPLY; the test driver receives it and acks success."""
    task = asyncio.ensure_future(fe.request(request, *args))  # type: ignore[arg-type]
    msg = await td.recv()
    assert HDR.unpack_from(msg)[0] == request
    await td.reply(request, U64(0).pack())
    await asyncio.wait_for(task, TIMEOUT)
    return msg


async def _still_serving(fe: Frontend, td: VvuTestDriver) -> None:
    """The next message the driver gets is the front-end's next request (nothing refused got
    through), and the session works."""
    task = asyncio.ensure_future(fe.request_u64(_F.GET_FEATURES))
    assert HDR.unpack_from(await td.recv())[0] == _F.GET_FEATURES
    await td.reply(_F.GET_FEATURES, U64(7).pack())
    assert await asyncio.wait_for(task, TIMEOUT) == 7


@pytest.mark.asyncio
async def test_an_unpublished_region_never_reaches_the_driver(rigged: Rig) -> None:
    """A region the device cannot publish (here: its fd cannot be mapped) is refused: a
    failure ack, and the table never reaches the driver. Forwarded as it was before, its
    `mmap_offset` (0) was found by the driver in the first region's BAR4 area: aliasing."""
    dev = rigged.device
    good, bad = _memfd(2 << 20), _memfd(0)
    async with driver(rigged) as td:
        await td.set_status(BACKEND_UP)
        fe = await connect(td, rigged)
        fe.protocol_features = ProtocolFeature.REPLY_ACK.mask
        try:
            table = MemoryTable(
                (MemoryRegion(0, 2 << 20, UVA_BASE, 0), MemoryRegion(4 << 20, 2 << 20, 1 << 40, 0))
            )
            with pytest.raises(FrontendError):
                await asyncio.wait_for(fe.request(_F.SET_MEM_TABLE, table, [good, bad]), TIMEOUT)
            assert dev.areas == []
            await _still_serving(fe, td)
            # Without NEED_REPLY: the front-end is disconnected; the device takes the next one.
            await fe.request(
                _F.ADD_MEM_REG, SingleRegion(table.regions[1]), [bad], need_reply=False
            )
            await until(lambda: not dev.frontend_connected, "refused front-end disconnected")
            await td.drv.wait_config_change()
            assert await td.status() == 0
        finally:
            os.close(good)
            os.close(bad)
            await fe.close()
        await td.set_status(BACKEND_UP)
        fe2 = await connect(td, rigged)
        await _still_serving(fe2, td)
        await fe2.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("max_msg_fds", [16, 4])
async def test_regions_beyond_the_fds_a_region_info_reply_carries_are_refused(
    rigged: Rig, max_msg_fds: int
) -> None:
    """Each region is one BAR4 area with its own fd, and a region-info reply carries at most
    the client's max_msg_fds (16 at most): the next region is refused, BAR4's info stays a
    reply the client takes, and GET_MAX_MEM_SLOTS is clamped to leave room for the log and
    inflight areas."""
    limit = min(MAX_AREAS, max_msg_fds)
    fds = [_memfd(0x10000) for _ in range(limit + 1)]
    options = ClientOptions(max_msg_fds=max_msg_fds)
    async with session(rigged, rx=32, reply_ack=True, options=options) as (td, fe):
        try:
            task = asyncio.ensure_future(fe.request_u64(_F.GET_MAX_MEM_SLOTS))
            await td.recv()
            await td.reply(_F.GET_MAX_MEM_SLOTS, U64(509).pack())
            assert await asyncio.wait_for(task, TIMEOUT) == limit - 2
            for i, fd in enumerate(fds[:limit]):
                region = MemoryRegion(i << 21, 0x10000, (1 << 40) + (i << 21), 0)
                await _acked(fe, td, _F.ADD_MEM_REG, SingleRegion(region), [fd])
            region = MemoryRegion(limit << 21, 0x10000, 1 << 41, 0)
            with pytest.raises(FrontendError):
                await asyncio.wait_for(
                    fe.request(_F.ADD_MEM_REG, SingleRegion(region), [fds[-1]]), TIMEOUT
                )
            areas = await td.pci.client.mmap_region(4)
            assert len(areas) == limit
            for area in areas:
                area.close()
            await _still_serving(fe, td)
        finally:
            for fd in fds:
                os.close(fd)
            await fe.close()


@contextlib.asynccontextmanager
async def file_rig(tmp_path: Path, size: int) -> AsyncIterator[tuple[Path, Rig, VvuTestDriver]]:
    """A device with `--frontend-memory` (a `size`-byte file) and a driver whose client knows
    no vvu extension."""
    mem = tmp_path / "guest-ram"
    with open(mem, "wb") as f:
        f.truncate(size)
    async with (
        rig(tmp_path, frontend_memory=str(mem)) as r,
        driver(r, options=ClientOptions(sparse_mmap_fds=False, io_fds=False)) as td,
    ):
        yield mem, r, td


@pytest.mark.asyncio
async def test_frontend_memory_is_bar4_for_a_standard_client(tmp_path: Path) -> None:
    """--frontend-memory: BAR4 is the file (one standard sparse-mmap area, fd offset = BAR4
    offset), sized to it (a power of two); shmid 1 is the file's size; shmid 3 is BAR3, the
    device's inflight memfd (one standard area too); no shmid 2."""
    size = 6 << 20
    async with file_rig(tmp_path, size) as (mem, r, td):
        assert td.pci.bar_info(4).size == 8 << 20 and td.pci.bar_info(4).mappable
        inflight = inflight_memory_size(N)
        assert td.pci.bar_info(INFLIGHT_BAR).size == inflight
        assert td.pci.bar_info(INFLIGHT_BAR).mappable
        shm = [c for c in td.drv.caps if c.cfg_type == CfgType.SHARED_MEMORY]
        assert [(c.cap_id, c.bar, c.offset, c.length, c.extra) for c in shm] == [
            (1, 4, 0, size, bytes(8)),
            (3, INFLIGHT_BAR, 0, inflight, bytes(8)),
        ]
        info = await td.pci.client.region_info(INFLIGHT_BAR)
        assert info.flags & RegionFlag.MMAP and info.offset == 0
        assert info.info.caps == (SparseMmapCap(((0, inflight),)),)
        (area,) = await td.pci.bar_areas(INFLIGHT_BAR)
        dev_area = r.device.shm_area(3)
        assert dev_area is not None
        assert os.fstat(area.fd).st_ino == os.fstat(dev_area.fd).st_ino
        area.close()
        # Two cap64s instead of three: the PCI_CFG window fits again, and reaches the file.
        (window,) = [c for c in td.drv.caps if c.cfg_type == CfgType.PCI_CFG]
        assert window.at == 0x90 and shm[-1].at + 24 <= 0x100
        with open(mem, "r+b") as f:
            f.seek(0x5000)
            f.write(b"cfgw")
        await td.pci.config_write(window.at + 4, b"\x04")  # bar
        await td.pci.config_write(window.at + 8, struct.pack("<II", 0x5000, 4))  # offset, length
        assert await td.pci.config_read(window.at + 16, 4) == b"cfgw"

        info = await td.pci.client.region_info(4)
        assert info.flags & RegionFlag.MMAP and info.offset == 0
        assert info.info.caps == (SparseMmapCap(((0, size),)),)
        (area,) = await td.pci.bar_areas(4)
        assert (area.offset, area.size, area.fd_offset) == (0, size, 0)
        assert os.fstat(area.fd).st_ino == os.stat(mem).st_ino
        area.close()


@pytest.mark.asyncio
async def test_frontend_memory_regions_are_matched_to_the_file(tmp_path: Path) -> None:
    """--frontend-memory: the features that would need shmid 2 (and LOG_ALL) are filtered;
    a region inside the file passes with its file offset (= its BAR4 offset); another file's
    region, or one leaving the file, is refused and never reaches the driver."""
    async with file_rig(tmp_path, 6 << 20) as (mem, r, td):
        await td.set_status(BACKEND_UP)
        fe = await connect(td, r, memory_path=str(mem), memory_offset=1 << 20)
        fe.protocol_features = ProtocolFeature.REPLY_ACK.mask
        other = _memfd(4 << 20)
        try:
            task = asyncio.ensure_future(fe.request_u64(_F.GET_PROTOCOL_FEATURES))
            await td.recv()
            await td.reply(_F.GET_PROTOCOL_FEATURES, U64((1 << 64) - 1).pack())
            got = await asyncio.wait_for(task, TIMEOUT)
            assert got == PROTOCOL_FEATURES_ALLOWED & ~ProtocolFeature.LOG_SHMFD.mask
            task = asyncio.ensure_future(fe.request_u64(_F.GET_FEATURES))
            await td.recv()
            await td.reply(_F.GET_FEATURES, U64(1 << 26 | 1 << 32).pack())
            assert await asyncio.wait_for(task, TIMEOUT) == 1 << 32  # no LOG_ALL
            # The table passes unchanged: mmap_offset is the file offset = the BAR4 offset.
            msg = await _acked(
                fe,
                td,
                _F.SET_MEM_TABLE,
                MemoryTable((MemoryRegion(0, 4 << 20, UVA_BASE, 1 << 20),)),
                [fe._memfd],
            )
            (region,) = MemoryTable.unpack(msg[12:]).regions
            assert region.mmap_offset == 1 << 20
            bar4 = await td.pci.map_bar(4)
            assert bar4 is not None
            fe.memory.write(0x3000, b"in the file")
            assert bar4.read((1 << 20) + 0x3000, 11) == b"in the file"
            # Another file, or past the file's end: refused, not forwarded.
            outside = MemoryRegion(8 << 20, 4 << 20, 1 << 40, 3 << 20)
            for fd, bad in (
                (other, MemoryRegion(8 << 20, 4 << 20, 1 << 40, 0)),
                (fe._memfd, outside),
            ):
                with pytest.raises(FrontendError):
                    await asyncio.wait_for(
                        fe.request(_F.ADD_MEM_REG, SingleRegion(bad), [fd]), TIMEOUT
                    )
            await _still_serving(fe, td)
        finally:
            os.close(other)
            await fe.close()


@pytest.mark.asyncio
async def test_frontend_memory_inflight_regions_are_the_devices_memfd_in_bar3(
    tmp_path: Path,
) -> None:
    """--frontend-memory: GET_INFLIGHT_FD's reply gives the front-end the device's inflight
    memfd (the region zeroed, its size sealed) and the back-end a SET_INFLIGHT_FD naming shmid 3
    offset 0; what one side writes, the other reads in BAR3. SET_INFLIGHT_FD with that memfd
    (what QEMU sends on every reconnect) passes unchanged; another fd, or a region leaving the
    memfd, is refused and never reaches the driver."""
    async with file_rig(tmp_path, 4 << 20) as (mem, r, td):
        await td.set_status(BACKEND_UP)
        fe = await connect(td, r, memory_path=str(mem))
        fe.protocol_features = ProtocolFeature.REPLY_ACK.mask
        other = _memfd(0x10000)
        fds: list[int] = []
        try:
            bar3 = await td.pci.map_bar(INFLIGHT_BAR)
            assert bar3 is not None
            bar3.write(0x40, b"stale")  # a previous session's leftovers
            asked = Inflight(0, 0, 1, 64)
            task = asyncio.ensure_future(fe.request(_F.GET_INFLIGHT_FD, asked, reply_fds=fds))
            assert HDR.unpack_from(await td.recv())[0] == _F.GET_INFLIGHT_FD
            await td.reply(_F.GET_INFLIGHT_FD, Inflight(0x2100, 0, 1, 64).pack())
            assert await asyncio.wait_for(task, TIMEOUT) == Inflight(0x2100, 0, 1, 64)
            (fd,) = fds
            area = r.device.shm_area(3)
            assert area is not None and os.fstat(fd).st_ino == os.fstat(area.fd).st_ino
            with pytest.raises(PermissionError):  # sealed: nobody shrinks the mappings' file
                os.ftruncate(fd, 0x1000)
            told = await td.recv()
            assert HDR.unpack_from(told) == (_F.SET_INFLIGHT_FD, VERSION, 24)
            assert Inflight.unpack(told[12:]) == Inflight(0x2100, 0, 1, 64)
            assert bar3.read(0x40, 5) == bytes(5)  # a fresh region
            os.pwrite(fd, b"inflight", 0x2000)
            assert bar3.read(0x2000, 8) == b"inflight"

            # QEMU's reconnect: the same fd comes back, forwarded as it is.
            region = Inflight(0x2100, 0, 1, 64)
            msg = await _acked(fe, td, _F.SET_INFLIGHT_FD, region, [fd])
            assert Inflight.unpack(msg[12:]) == region
            assert bar3.read(0x2000, 8) == b"inflight"  # not zeroed: the same region
            # Another memfd, or the device's beyond its end: refused, never forwarded.
            beyond = Inflight(0x2000, inflight_memory_size(N) - 0x1000, 1, 64)
            for bad_fd, bad in ((other, region), (fd, beyond)):
                with pytest.raises(FrontendError):
                    await asyncio.wait_for(fe.request(_F.SET_INFLIGHT_FD, bad, [bad_fd]), TIMEOUT)
            await _still_serving(fe, td)
            # A region bigger than the inflight memory: the "no region" form, no fd.
            os.close(fds.pop())
            task = asyncio.ensure_future(fe.request(_F.GET_INFLIGHT_FD, asked, reply_fds=fds))
            await td.recv()
            big = inflight_memory_size(N) + 0x1000
            await td.reply(_F.GET_INFLIGHT_FD, Inflight(big, 0, 1, 64).pack())
            assert await asyncio.wait_for(task, TIMEOUT) == Inflight(0, 0, 1, 64)
            assert fds == []
            await _still_serving(fe, td)
            assert r.server.region_accesses[INFLIGHT_BAR] == 0  # mapped, never trapped
        finally:
            close = [other, *fds]
            for each in close:
                os.close(each)
            await fe.close()


@pytest.mark.asyncio
async def test_no_config_interrupt_for_the_drivers_own_change(rigged: Rig) -> None:
    """The driver clearing BACKEND_UP ends the session and clears FRONTEND_UP at once (the
    status it reads back says so), without a config interrupt: the driver caused it. The
    front-end leaving on its own does raise one."""
    dev = rigged.device
    async with driver(rigged) as td:
        await td.set_status(BACKEND_UP)
        fe = await connect(td, rigged)
        generation = dev.config_generation
        raised: list[bool] = []
        raise_config_irq = dev._raise_config_irq

        def spy() -> bool:
            raised.append(True)
            return raise_config_irq()

        dev._raise_config_irq = spy  # type: ignore[method-assign]
        await td.set_status(0)  # handled before the vfio-user reply comes back
        assert await td.status() == 0 and not dev.frontend_connected
        dev._raise_config_irq = raise_config_irq  # type: ignore[method-assign]
        assert raised == []  # (a new generation, no interrupt)
        assert dev.config_generation == (generation + 1) & 0xFF
        assert await fe.channel.recv() is None
        await fe.close()
        await td.set_status(BACKEND_UP)
        fe = await connect(td, rigged)
        generation = dev.config_generation
        await fe.close()
        await td.drv.wait_config_change()
        assert dev.config_generation == generation + 1 and await td.status() == 0


@pytest.mark.asyncio
async def test_non_eventfds_are_refused_as_kick_call_err_and_log_fds(rigged: Rig) -> None:
    dev = rigged.device
    async with session(rigged, reply_ack=True) as (td, fe):
        r, w = os.pipe()
        try:
            for request in (_F.SET_VRING_KICK, _F.SET_VRING_CALL, _F.SET_VRING_ERR):
                with pytest.raises(FrontendError):
                    await asyncio.wait_for(fe.request(request, U64.vring(0), [r]), TIMEOUT)
            with pytest.raises(FrontendError):
                await asyncio.wait_for(fe.request(_F.SET_LOG_FD, fds=[w]), TIMEOUT)
            assert dev.doorbells == {} and await td.pci.client.region_io_fds(2) == []
            await _still_serving(fe, td)
        finally:
            os.close(r)
            os.close(w)
            await fe.close()


@pytest.mark.asyncio
async def test_txq_replies_nobody_asked_for_are_dropped(rigged: Rig) -> None:
    """A reply is forwarded only to a request the front-end sent and that replies: a stale or
    forged one is dropped (it would answer the front-end's next request); a forged
    GET_INFLIGHT_FD reply allocates nothing."""
    dev = rigged.device
    async with session(rigged) as (td, fe):
        try:
            dropped = dev.dropped_tx
            await td.reply(_F.GET_FEATURES, U64(0xBAD).pack())
            await td.reply(_F.GET_INFLIGHT_FD, Inflight(0x2000, 0, 1, 64).pack())
            assert dev.dropped_tx == dropped + 2 and dev.shm_area(3) is None
            await _still_serving(fe, td)  # answered 7, not 0xBAD
            # Two replies to one request: the second is dropped.
            task = asyncio.ensure_future(fe.request_u64(_F.GET_QUEUE_NUM))
            await td.recv()
            await td.reply(_F.GET_QUEUE_NUM, U64(1).pack())
            await td.reply(_F.GET_QUEUE_NUM, U64(2).pack())
            assert await asyncio.wait_for(task, TIMEOUT) == 1
            assert dev.dropped_tx == dropped + 3
            await _still_serving(fe, td)
        finally:
            await fe.close()


@pytest.mark.asyncio
async def test_txq_messages_are_capped_and_the_outbound_queue_is_bounded(rigged: Rig) -> None:
    """A txq buffer longer than a vhost-user message is dropped unread; a front-end that does
    not read its back-end channel while the driver keeps writing is disconnected once the
    device's outbound queue is full, instead of the device buffering without end."""
    dev = rigged.device
    async with session(rigged) as (td, fe):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await fe.request(_F.SET_BACKEND_REQ_FD, fds=[theirs.fileno()])
            theirs.close()
            assert HDR.unpack_from(await td.recv())[0] == _F.SET_BACKEND_REQ_FD
            dropped = dev.dropped_tx
            huge = 4097 + 4096
            await td.send(HDR.pack(2, VERSION, huge) + bytes(huge))
            assert dev.dropped_tx == dropped + 1
            small = HDR.pack(2, VERSION, 8) + U64(1).pack()
            await td.send(small)
            ours.settimeout(5)
            assert ours.recv(100) == small
            # Nobody reads `ours` any more: the socket fills, then the device's queue.
            request = HDR.pack(2, VERSION, 4096) + bytes(4096)
            for _ in range(2000):
                if not dev.frontend_connected:
                    break
                await td.send(request)
            assert not dev.frontend_connected
        finally:
            ours.close()
            await fe.close()


@pytest.mark.asyncio
async def test_a_driver_gone_with_dma_windows_still_held_is_torn_down_at_once(
    rigged: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """A VMM behind a vIOMMU maps DMA memory page by page: hundreds of windows. When it goes
    away while something in the device still holds them (here: live views, as a popped chain's
    buffers would be), the teardown must not wait on each window: it used to wait 1 s per held
    window with the event loop blocked (minutes for a vIOMMU guest), no new driver accepted."""
    windows, base = 30, 0x7000_0000_0000
    pci = await VfioUserPciAccess.open(rigged.vfio_path, timeout=2)
    fds = [_memfd(4096, f"vvu-test-window-{i}") for i in range(windows)]
    try:
        for i, fd in enumerate(fds):
            await pci.map_dma(fd, base + i * 0x1000, 4096)
    finally:
        for fd in fds:
            os.close(fd)
    dma = rigged.server.dma
    assert dma is not None
    held = [dma.memory.view(base + i * 0x1000, 16) for i in range(windows)]
    start = asyncio.get_running_loop().time()
    await pci.close()  # the socket closes: no reset, no unmap
    async with driver(rigged) as td:
        await td.set_status(BACKEND_UP)
        assert await td.status() == BACKEND_UP
    # A generous bound that only the old one-second-per-window wait (30 s) misses.
    assert asyncio.get_running_loop().time() - start < 10
    assert caplog.text.count("still in use") <= 1, caplog.text  # one line, not one per window
    for view in held:
        view.release()


@pytest.mark.asyncio
async def test_a_vmm_gone_mid_message_ends_the_session_and_the_next_driver_is_served(
    rigged: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """The driver's VMM dies in the middle of a vfio-user message (half a REGION_WRITE on the
    wire, then the socket closes) while a front-end session runs: the device ends that session
    (the front-end sees its socket close), and a new driver and front-end are served."""
    pci = await VfioUserPciAccess.open(rigged.vfio_path, timeout=2)
    drv = await VirtioPciDriver.open(pci)
    await drv.setup_interrupts(3 + N)
    await drv.init(queues=2)
    td = VvuTestDriver(pci, drv)
    await td.post_rx(8)
    await td.set_status(BACKEND_UP)
    fe = await connect(td, rigged)
    half = struct.pack("<HHIII", 0x7777, 9, 16 + 16 + 4, 0, 0)[:11]  # REGION_WRITE's header
    os.write(pci.client._conn.fileno(), half)
    drv._unwatch()  # this process's event loop forgets the dead driver's interrupt eventfds
    await pci.close()
    assert await asyncio.wait_for(fe.channel.recv(), TIMEOUT) is None
    assert "closed mid-message" in caplog.text
    await fe.close()
    async with session(rigged) as (td2, fe2):
        task = asyncio.ensure_future(fe2.request_u64(_F.GET_FEATURES))
        assert HDR.unpack_from(await td2.recv())[0] == _F.GET_FEATURES
        await td2.reply(_F.GET_FEATURES, U64(5).pack())
        assert await asyncio.wait_for(task, TIMEOUT) == 5
    assert rigged.device.sessions == 2


@pytest.mark.asyncio
async def test_frontend_memory_shrunk_under_the_device_fails_the_access_not_the_device(
    rigged: Rig, tmp_path: Path
) -> None:
    """Issue 11: a front-end that shrinks its memory file after SET_MEM_TABLE used to kill the
    device process (SIGBUS: here, the test process) at the next BAR4 message access. Now that
    access fails (an error reply) and the device keeps serving."""
    memory = tmp_path / "guest-ram"
    async with driver(rigged) as td:
        await td.set_status(BACKEND_UP)
        fe = await connect(td, rigged, memory_path=str(memory))
        try:
            await fe.set_mem_table()
            assert HDR.unpack_from(await td.recv())[0] == _F.SET_MEM_TABLE
            fe.memory.write(0x2000, b"shared")
            assert await td.pci.bar_read(4, 0x2000, 6) == b"shared"
            os.truncate(memory, 0)
            with pytest.raises(VfioUserError) as err:
                await td.pci.bar_read(4, 0x2000, 6)
            assert err.value.errno == errno.EIO
            assert rigged.device.frontend_connected
            assert await td.status() == BACKEND_UP | FRONTEND_UP
        finally:
            await fe.close()
