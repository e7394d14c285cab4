"""vfio-user: the wire format, the device helpers, client <-> server round trips over a real unix
socket for every command, hostile clients, fd hygiene, and conformance against rust-vmm's
`vfio_user` crate client (rust/vfio-user-peer)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import shutil
import socket
import struct
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from vvu._core import EventFd, GuestMemory, memfd
from vvu.device.vvu import BACKEND_UP, VVU_VIRTIO_ID, VvuDevice
from vvu.errors import GuestMemoryError, ProtocolError
from vvu.transport.base import TransportError
from vvu.transport.unix import UnixListener
from vvu.vfio_user import (
    ClientOptions,
    ConfigSpace,
    EchoDevice,
    IrqIndex,
    ServerLimits,
    VfioUserClient,
    VfioUserError,
    VfioUserPciAccess,
    VfioUserServer,
    echo,
)
from vvu.vfio_user.connection import Frame, VfioUserConnection
from vvu.vfio_user.device import IrqBindings, IrqRequest, IrqSpec
from vvu.vfio_user.protocol import (
    NO_REPLY,
    TYPE_REPLY,
    Capabilities,
    Command,
    DeviceInfo,
    DmaAccess,
    DmaMap,
    DmaUnmap,
    Header,
    IoFdEntry,
    IoFdsReply,
    IoFdsRequest,
    IrqInfo,
    IrqInfoFlag,
    IrqSet,
    IrqSetFlag,
    Migration,
    PayloadError,
    RegionAccess,
    RegionFlag,
    RegionInfo,
    SparseMmapCap,
    SparseMmapFdsCap,
    TwinSocket,
    TypeCap,
    UnknownCap,
    Version,
    WriteMulti,
    encode,
)
from vvu_harness import running_server

TIMEOUT = 10.0
ROOT = Path(__file__).resolve().parent.parent
EINVAL = errno.EINVAL
TRIGGER_EVENTFD = int(IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER)
TRIGGER_NONE = int(IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_TRIGGER)
MSIX = int(IrqIndex.MSIX)


def u32(value: int) -> bytes:
    return struct.pack("<I", value)


def u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def open_fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return fds


def assert_no_fd_leak(before: dict[int, str]) -> None:
    # Fds the test opened and kept; one an earlier test left to the garbage collector may
    # close meanwhile (fewer fds is not a leak).
    after = open_fds()
    new = {fd: t for fd, t in after.items() if before.get(fd) != t}
    assert len(after) <= len(before) and not new, new


def memfd_mappings(name: str) -> int:
    with open("/proc/self/maps") as maps:
        return sum(1 for line in maps if f"/memfd:{name} " in line)


# --- fixtures -----------------------------------------------------------------------------------


@dataclass
class Served:
    path: str
    device: EchoDevice
    server: VfioUserServer

    async def connect(self, options: ClientOptions | None = None) -> VfioUserClient:
        return await asyncio.wait_for(
            VfioUserClient.connect(self.path, timeout=2.0, options=options), TIMEOUT
        )

    async def idle(self) -> None:
        """Wait until the server has finished with its client (teardown done)."""
        for _ in range(500):
            if not self.server.connected:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the server still serves a client")


@contextlib.asynccontextmanager
async def serve(tmp_path: Path, device: EchoDevice | None = None) -> AsyncIterator[Served]:
    dev = device or EchoDevice()
    path = str(tmp_path / "vfio-user.sock")
    async with running_server(dev, path) as server:
        yield Served(path, dev, server)


@pytest_asyncio.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    async with serve(tmp_path) as s:
        yield s


@pytest_asyncio.fixture
async def client(served: Served) -> AsyncIterator[VfioUserClient]:
    c = await served.connect()
    try:
        yield c
    finally:
        await c.close()


class Raw:
    """A hand-driven client: send any bytes and fds, read whatever comes back."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.conn = VfioUserConnection(sock, "raw", max_message_size=1 << 22)

    @classmethod
    async def open(cls, path: str) -> Raw:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, path)
        return cls(sock)

    async def send(self, data: bytes, fds: list[int] | None = None) -> None:
        await self.conn.send(data, fds or [])

    async def recv(self) -> Frame | None:
        return await asyncio.wait_for(self.conn.recv(), TIMEOUT)

    async def call(
        self, command: int, payload: bytes = b"", fds: list[int] | None = None, msg_id: int = 7
    ) -> Frame:
        await self.send(encode(msg_id, command, payload), fds)
        frame = await self.recv()
        assert frame is not None, "server hung up"
        assert (frame.header.id, frame.header.command) == (msg_id, command)
        assert frame.header.is_reply
        return frame

    async def expect_error(
        self, command: int, payload: bytes = b"", fds: list[int] | None = None, code: int = EINVAL
    ) -> None:
        frame = await self.call(command, payload, fds)
        frame.close_fds()
        assert frame.header.is_error, f"{command} succeeded"
        assert frame.header.error == code
        assert frame.header.size == 16 and frame.payload == b""

    async def negotiate(self) -> None:
        frame = await self.call(Command.VERSION, Version(0, 1, Capabilities(max_msg_fds=16)).pack())
        assert not frame.header.is_error

    async def expect_hangup(self) -> None:
        """EOF, or a reset when the server closed with our bytes still unread."""
        try:
            assert await self.recv() is None
        except TransportError as err:
            assert "reset by peer" in str(err)

    def close(self) -> None:
        self.conn.close()


# --- wire format --------------------------------------------------------------------------------


def test_header_layout() -> None:
    hdr = Header(0x1234, Command.REGION_READ, 48, TYPE_REPLY | NO_REPLY, 5)
    raw = hdr.pack()
    assert raw == struct.pack("<HHIII", 0x1234, 9, 48, 0x11, 5)
    assert Header.unpack(raw) == hdr and hdr.is_reply and hdr.no_reply
    with pytest.raises(ValueError):
        Header(1 << 16, 1, 16).pack()


def test_version_json_round_trip_and_validation() -> None:
    caps = Capabilities(
        max_msg_fds=16,
        max_data_xfer_size=1 << 20,
        max_dma_maps=100,
        pgsizes=4096,
        migration=Migration(4096, 1 << 20),
        twin_socket=TwinSocket(True),
        write_multiple=True,
        sparse_mmap_fds=True,
    )
    raw = Version(0, 2, caps).pack()
    assert raw.endswith(b"\0") and raw[:4] == struct.pack("<HH", 0, 2)
    assert Version.unpack(raw) == Version(0, 2, caps)
    assert Version.unpack(struct.pack("<HH", 0, 0)) == Version(0, 0)  # JSON is optional
    # Unknown members are ignored; absent ones take the spec defaults.
    doc = b'{"capabilities":{"future":1}}\0'
    parsed = Version.unpack(struct.pack("<HH", 0, 1) + doc).capabilities
    assert parsed == Capabilities() and parsed.msg_fds == 1 and parsed.data_xfer_size == 1 << 20
    for bad in (
        b'{"capabilities":{"max_msg_fds":"16"}}\0',
        b'{"capabilities":{"max_msg_fds":true}}\0',
        b'{"capabilities":{"max_data_xfer_size":0}}\0',
        b'{"capabilities":{"max_msg_fds":-1}}\0',
        b'{"capabilities":[]}\0',
        b"[1]\0",
        b'{"capabilities":{}}',  # no NUL
        b'{"capabilities":{}}\0\0',
        b"{\xff}\0",
        b"{not json}\0",
    ):
        with pytest.raises(PayloadError):
            Version.unpack(struct.pack("<HH", 0, 1) + bad)
    with pytest.raises(PayloadError):
        Version.unpack(b"\0\0")


def test_region_info_capability_chain() -> None:
    caps = (
        SparseMmapCap(((0, 0x1000), (0x2000, 0x2000))),
        TypeCap(0x8086, 1),
        SparseMmapFdsCap(((0, 0x1000, 0x1000, 0), (0x2000, 0, 0x1000, 1))),
        UnknownCap(0x77, 3, b"abcd"),
    )
    info = RegionInfo(2, int(RegionFlag.READ | RegionFlag.MMAP), 0x4000, 0x10000, caps=caps)
    full = info.full_argsz()
    raw = RegionInfo(2, info.flags, 0x4000, 0x10000, full, caps=caps).pack()
    assert len(raw) == full
    parsed = RegionInfo.unpack(raw)
    assert parsed.caps == caps and parsed.flags & RegionFlag.CAPS and parsed.cap_offset == 32
    # Without caps: the struct alone, CAPS cleared.
    short = RegionInfo.unpack(info.pack(with_caps=False))
    assert short.caps == () and not short.flags & RegionFlag.CAPS
    # A chain that loops or points outside is refused.
    loop = bytearray(raw)
    struct.pack_into("<I", loop, 32 + 4, 32)
    with pytest.raises(PayloadError):
        RegionInfo.unpack(bytes(loop))
    outside = bytearray(raw)
    struct.pack_into("<I", outside, 32 + 4, 10_000)
    with pytest.raises(PayloadError):
        RegionInfo.unpack(bytes(outside))
    huge = bytearray(raw)
    struct.pack_into("<I", huge, 32 + 8, 1 << 30)  # nr_areas
    with pytest.raises(PayloadError):
        RegionInfo.unpack(bytes(huge))


def test_io_fds_reply_entries_and_stride() -> None:
    entries = (IoFdEntry(0x10, 4, 0), IoFdEntry(0x20, 2, 1, flags=1, datamatch=7))
    reply = IoFdsReply(0, 2, entries, argsz=16 + 80)
    assert IoFdsReply.unpack(reply.pack()) == reply
    # libvfio-user's 48-byte shadow entries: the stride comes from the size.
    wide = struct.pack("<IIII", 112, 0, 0, 2) + b"".join(e.pack() + bytes(8) for e in entries)
    assert IoFdsReply.unpack(wide).entries == entries
    assert IoFdsReply.unpack(struct.pack("<IIII", 96, 0, 0, 2)).entries == ()  # short reply
    with pytest.raises(PayloadError):
        IoFdsReply.unpack(struct.pack("<IIII", 96, 0, 0, 2) + bytes(30))


def test_fixed_payloads() -> None:
    assert len(DmaMap(3, 0, 0x1000, 0x1000).pack()) == 32
    assert DmaMap.unpack(DmaMap(3, 5, 0x1000, 0x2000).pack()) == DmaMap(3, 5, 0x1000, 0x2000)
    with pytest.raises(PayloadError):
        DmaMap.unpack(bytes(31))
    assert DmaUnmap.unpack(DmaUnmap(0, 1, 2).pack()) == DmaUnmap(0, 1, 2)
    assert DeviceInfo.unpack(DeviceInfo(3, 9, 5).pack()) == DeviceInfo(3, 9, 5)
    assert IrqInfo.unpack(IrqInfo(2, 1, 4).pack()) == IrqInfo(2, 1, 4)
    assert IoFdsRequest.unpack(IoFdsRequest(3).pack()) == IoFdsRequest(3)
    irq = IrqSet(int(IrqSetFlag.DATA_BOOL | IrqSetFlag.ACTION_TRIGGER), 2, 1, 2, b"\1\0")
    assert len(irq.pack()) == 22 and IrqSet.unpack(irq.pack()) == IrqSet(
        irq.flags, 2, 1, 2, b"\1\0", 22
    )
    access = RegionAccess(8, 0, 4, b"abcd")
    assert RegionAccess.unpack(access.pack(), with_data=True) == access
    with pytest.raises(PayloadError):
        RegionAccess.unpack(RegionAccess(8, 0, 5, b"abcd").pack(), with_data=True)
    with pytest.raises(PayloadError):
        RegionAccess.unpack(access.pack(), with_data=False)
    assert DmaAccess.unpack(DmaAccess(1, 2, b"xy").pack(), with_data=True).data == b"xy"
    multi = WriteMulti((RegionAccess(0, 0, 1, b"a"), RegionAccess(4, 0, 8, bytes(8))))
    assert WriteMulti.unpack(multi.pack()) == multi
    for bad in (u64(0), u64(2) + bytes(24), u64(1 << 40)):
        with pytest.raises(PayloadError):
            WriteMulti.unpack(bad)
    assert issubclass(PayloadError, ProtocolError)


# --- device helpers -----------------------------------------------------------------------------


def test_config_space_write_masks_and_bar_sizing() -> None:
    cfg = ConfigSpace()
    cfg.header(vendor_id=0x1AF4, device_id=0x1041)
    cfg.add_bar(0, 0x1000)
    cfg.add_bar(2, 0x4000, is_64bit=True, prefetchable=True)
    msix = cfg.add_msix(3, table_bar=1, table_offset=0, pba_bar=1, pba_offset=0x800)
    cfg.freeze()
    cfg.write(0, u32(0xFFFFFFFF))  # ids are RO
    assert cfg.u32(0) == 0x10411AF4
    cfg.write(0x04, b"\xff\xff")
    assert cfg.u16(0x04) == 0x0547  # only I/O, mem, master, parity, SERR, INTx-disable
    for reg, expect in ((0x10, 0xFFFFF000), (0x18, 0xFFFFC00C), (0x1C, 0xFFFFFFFF), (0x30, 0)):
        cfg.write(reg, u32(0xFFFFFFFF))
        assert cfg.u32(reg) == expect, hex(reg)
    cfg.write(0x10, u32(0xFEB00000))
    assert cfg.u32(0x10) == 0xFEB00000
    assert cfg.u16(0x06) & 0x10 and cfg.u8(0x34) == msix
    cfg.write(msix + 2, b"\xff\xff")
    assert cfg.u16(msix + 2) == 0xC002 and cfg.msix_enabled  # size bits are RO
    cfg.reset()
    assert cfg.u32(0x10) == 0 and not cfg.msix_enabled
    with pytest.raises(VfioUserError):
        cfg.read(250, 8)
    with pytest.raises(ValueError):
        cfg.add_bar(0, 0x1800)


def test_irq_bindings_pending_and_masks() -> None:
    irq = IrqBindings(
        [IrqSpec(0), IrqSpec(0), IrqSpec(2, IrqInfoFlag.EVENTFD), IrqSpec(0), IrqSpec(0)]
    )
    assert not irq.trigger(MSIX, 1)  # nothing bound: pending
    assert irq.pending(MSIX) == [False, True]
    efds = [EventFd(), EventFd()]
    irq.apply(IrqRequest(MSIX, TRIGGER_EVENTFD & 0x38, 0, 2, 4, eventfds=efds))
    assert efds[1].consume() == 1 and irq.pending(MSIX) == [False, False]  # delivered on bind
    irq.apply(IrqRequest(MSIX, 8, 0, 1, 1))  # mask vector 0
    assert not irq.trigger(MSIX, 0) and efds[0].consume() == 0
    irq.apply(IrqRequest(MSIX, 16, 0, 1, 1))  # unmask: the pending one arrives
    assert efds[0].consume() == 1
    irq.apply(IrqRequest(MSIX, 32, 0, 2, 2, bools=(False, True)))  # client fires vector 1
    assert efds[0].consume() == 0 and efds[1].consume() == 1
    irq.apply(IrqRequest(MSIX, 32, 0, 0, 1))  # disable the type: eventfds closed
    assert all(e.closed for e in efds) and irq.bound(MSIX, 0) is None


# --- round trips --------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_version_reply_is_a_subset_of_the_proposal(served: Served) -> None:
    raw = await Raw.open(served.path)
    proposal = Version(
        0,
        7,
        Capabilities(
            max_msg_fds=8,
            max_data_xfer_size=65536,
            twin_socket=TwinSocket(True),
            migration=Migration(4096),
        ),
    )
    frame = await raw.call(Command.VERSION, proposal.pack())
    reply = Version.unpack(frame.payload)
    assert (reply.major, reply.minor) == (0, 1)
    assert reply.capabilities == Capabilities(max_msg_fds=16, max_data_xfer_size=1 << 20)
    assert len(frame.payload) <= len(proposal.pack())  # QEMU sizes its buffer from its request
    raw.close()
    # A terse proposal gets a reply no longer than itself: optional members are shed.
    for terse in (Version(0, 0, Capabilities(max_msg_fds=1)), Version(0, 0)):
        await served.idle()
        raw = await Raw.open(served.path)
        frame = await raw.call(Command.VERSION, terse.pack())
        assert not frame.header.is_error and len(frame.payload) <= len(terse.pack())
        raw.close()


@pytest.mark.asyncio
async def test_device_and_region_info(client: VfioUserClient) -> None:
    assert client.version == (0, 1)
    assert client.server_caps.msg_fds == 16 and client.server_caps.sparse_mmap_fds
    info = await client.device_info()
    assert (info.flags, info.num_regions, info.num_irqs) == (3, 9, 5)  # PCI | RESET
    sizes = {i: (await client.region_info(i)).size for i in range(9)}
    assert sizes == {0: 0x1000, 1: 0x1000, 2: 0x4000, 3: 0, 4: 0, 5: 0, 6: 0, 7: 256, 8: 0}
    bar2 = await client.region_info(2)
    assert bar2.mappable and bar2.readable and bar2.writable
    assert bar2.info.caps == (SparseMmapCap(((0, 0x1000), (0x2000, 0x2000))),)
    assert not (await client.region_info(3)).flags
    irqs = [await client.irq_info(i) for i in range(5)]
    assert [(i.index, i.count) for i in irqs] == [(0, 0), (1, 0), (2, 4), (3, 1), (4, 1)]
    assert irqs[2].flags == IrqInfoFlag.EVENTFD


@pytest.mark.asyncio
async def test_region_info_short_argsz_gets_the_struct_alone(served: Served) -> None:
    raw = await Raw.open(served.path)
    await raw.negotiate()
    frame = await raw.call(Command.DEVICE_GET_REGION_INFO, RegionInfo(2, argsz=32).pack_request())
    info = RegionInfo.unpack(frame.payload)
    assert len(frame.payload) == 32 and frame.fds == []
    assert info.argsz == 80 and not info.flags & RegionFlag.CAPS and info.caps == ()
    frame = await raw.call(Command.DEVICE_GET_REGION_INFO, RegionInfo(2, argsz=80).pack_request())
    assert len(frame.payload) == 80 and len(frame.fds) == 1
    frame.close_fds()
    raw.close()


@pytest.mark.asyncio
async def test_config_space_round_trip(client: VfioUserClient) -> None:
    head = await client.config_read(0, 256)
    assert struct.unpack_from("<HH", head) == (echo.VENDOR_ID, echo.DEVICE_ID)
    assert head[0x06] & 0x10 and head[0x34] == 0x40
    assert head[0x40] == 0x11 and head[0x41] == 0x4C and head[0x4C] == 0x09
    await client.config_write(0x10, u32(0xFFFFFFFF))
    assert await client.config_read(0x10, 4) == u32(0xFFFFF000)
    await client.config_write(0x04, b"\x06\x00")
    assert await client.config_read(0x04, 2) == b"\x06\x00"
    await client.config_write(0x30, u32(0xFFFFF800))  # ROM sizing: no ROM
    assert await client.config_read(0x30, 4) == bytes(4)


@pytest.mark.asyncio
async def test_a_cancelled_request_does_not_break_the_connection(client: VfioUserClient) -> None:
    """The reply to a request whose caller was cancelled arrives later and is dropped quietly;
    it must not be taken for a stray reply that ends the connection."""
    for _ in range(20):
        task = asyncio.ensure_future(client.config_read(0, 4))
        await asyncio.sleep(0)  # sent, reply not read yet
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    head = await client.config_read(0, 4)
    assert struct.unpack_from("<HH", head) == (echo.VENDOR_ID, echo.DEVICE_ID)


@pytest.mark.asyncio
async def test_bar0_registers_and_posted_writes(served: Served, client: VfioUserClient) -> None:
    assert await client.region_read(0, 0, 4) == b"ECHO"
    await client.region_write(0, 4, u32(0xDEADBEEF))
    await client.region_write(0, 8, u32(0x12345678), posted=True)  # NO_REPLY
    assert await client.region_read(0, 4, 8) == u32(0xDEADBEEF) + u32(0x12345678)
    await client.region_write(0, 0, u32(0))  # RO
    assert await client.region_read(0, 0, 4) == b"ECHO"
    await client.region_write(0, 0x100, bytes(range(256)))
    assert await client.region_read(0, 0x100, 256) == bytes(range(256))
    # MSI-X table (BAR1) is stored; PBA reads pending bits.
    await client.region_write(1, 0x10, u64(0xFEE00000) + u32(0x4021) + u32(0))
    assert await client.region_read(1, 0x10, 16) == u64(0xFEE00000) + u32(0x4021) + u32(0)
    served.device.raise_irq(3)  # nothing bound: pending
    assert await client.region_read(1, 0x800, 8) == u64(1 << 3)


@pytest.mark.asyncio
async def test_write_multi(served: Served) -> None:
    c = await served.connect(ClientOptions(write_multiple=True))
    assert c.server_caps.write_multiple
    assert await c.region_write_multi([(0, 4, b"\x01\x02"), (0, 8, u32(7)), (0, 0x10, u32(1))]) == 3
    assert await c.region_read(0, 4, 8) == b"\x01\x02\0\0" + u32(7)
    assert served.device.doorbells == 1
    await c.close()
    c = await served.connect()
    with pytest.raises(VfioUserError) as err:
        await c.request(
            Command.REGION_WRITE_MULTI, WriteMulti((RegionAccess(4, 0, 1, b"x"),)).pack()
        )
    assert err.value.errno == errno.ENOTSUP
    await c.close()


@pytest.mark.asyncio
async def test_msix_interrupt_reaches_the_clients_eventfd(
    served: Served, client: VfioUserClient
) -> None:
    efds = await client.enable_irqs(MSIX, 4)
    try:
        await client.region_write(0, echo.REG_IRQ, u32(0))
        assert efds[0].wait(TIMEOUT)
        await client.region_write(0, echo.REG_IRQ, u32(2))
        assert efds[2].wait(TIMEOUT) and efds[1].consume() == 0
        assert await client.region_read(0, echo.REG_IRQ_COUNT, 4) == u32(2)
        # The client fires a vector itself (NONE|TRIGGER), or several (BOOL).
        await client.set_irqs(MSIX, 1, 1)
        assert efds[1].wait(TIMEOUT)
        await client.set_irqs(MSIX, 0, 4, bools=[True, False, False, True])
        assert efds[0].consume() == 1 and efds[3].consume() == 1 and efds[2].consume() == 0
        # Unbind one vector (EVENTFD with no fds): its interrupt becomes pending.
        await client.set_irqs(MSIX, 0, 1, eventfds=[])
        await client.region_write(0, echo.REG_IRQ, u32(0))
        assert efds[0].consume() == 0 and served.device.irq.pending(MSIX)[0]
        await client.disable_irqs(MSIX)
        assert served.device.irq.bound(MSIX, 1) is None
        # ERR and REQ take one eventfd each.
        for index in (IrqIndex.ERR, IrqIndex.REQ):
            (efd,) = await client.enable_irqs(index, 1)
            served.device.raise_irq(0, index)
            assert efd.wait(TIMEOUT)
            efd.close()
        with pytest.raises(VfioUserError):  # MSI-X is not maskable
            await client.set_irqs(MSIX, 0, 1, action=IrqSetFlag.ACTION_MASK)
    finally:
        for efd in efds:
            efd.close()


@pytest.mark.asyncio
async def test_eventfds_are_split_at_the_servers_max_msg_fds(tmp_path: Path) -> None:
    device = EchoDevice()
    path = str(tmp_path / "s.sock")
    server = VfioUserServer(device, path, limits=ServerLimits(max_msg_fds=1))
    task = asyncio.ensure_future(server.serve_forever())
    try:
        c = await VfioUserClient.connect(path, timeout=2)
        assert c.server_caps.msg_fds == 1
        efds = await c.enable_irqs(MSIX, 4)  # four SET_IRQS of one fd each
        for vector in range(4):
            device.raise_irq(vector)
            assert efds[vector].wait(TIMEOUT)
        for efd in efds:
            efd.close()
        await c.close()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        server.close()
        device.close()


@pytest.mark.asyncio
async def test_ioeventfd_signalled_by_the_client_reaches_the_device(
    served: Served, client: VfioUserClient
) -> None:
    (doorbell,) = await client.region_io_fds(0)
    assert (doorbell.offset, doorbell.size, doorbell.datamatch) == (echo.REG_DOORBELL, 4, None)
    assert await client.region_io_fds(1) == []
    doorbell.eventfd.signal()  # no message: straight to the device's eventfd
    for _ in range(200):
        if served.device.doorbells:
            break
        await asyncio.sleep(0.01)
    assert served.device.doorbells == 1
    await client.region_write(0, echo.REG_DOORBELL, u32(1))  # the message path counts too
    assert await client.region_read(0, echo.REG_DOORBELL_COUNT, 4) == u32(2)
    doorbell.eventfd.close()


@pytest.mark.asyncio
async def test_io_fds_short_argsz_and_bad_requests(served: Served) -> None:
    raw = await Raw.open(served.path)
    await raw.negotiate()
    frame = await raw.call(Command.DEVICE_GET_REGION_IO_FDS, IoFdsRequest(0, argsz=16).pack())
    assert IoFdsReply.unpack(frame.payload) == IoFdsReply(0, 1, (), argsz=56) and not frame.fds
    frame = await raw.call(Command.DEVICE_GET_REGION_IO_FDS, IoFdsRequest(0, argsz=56).pack())
    reply = IoFdsReply.unpack(frame.payload)
    assert reply.entries == (IoFdEntry(0x10, 4, 0),) and len(frame.fds) == 1
    frame.close_fds()
    await raw.expect_error(Command.DEVICE_GET_REGION_IO_FDS, IoFdsRequest(0, count=1).pack())
    await raw.expect_error(Command.DEVICE_GET_REGION_IO_FDS, IoFdsRequest(9).pack())
    raw.close()


@pytest.mark.asyncio
async def test_sparse_mmap_is_shared_both_ways(served: Served, client: VfioUserClient) -> None:
    areas = await client.mmap_region(2)
    assert [(a.offset, a.size, a.fd_offset) for a in areas] == [
        (0, 0x1000, 0),
        (0x2000, 0x2000, 0x2000),
    ]
    bar = GuestMemory()  # the client's mapping of BAR2, addressed by BAR offset
    for area in areas:
        bar.add_region(area.fd, area.offset, area.size, mmap_offset=area.fd_offset)
        area.close()
    bar.write(0x2010, b"client-side")
    assert served.device.bar2.read(0x2010, 11) == b"client-side"
    assert await client.region_read(2, 0x2010, 11) == b"client-side"  # message path agrees
    served.device.bar2.write(0x20, b"device-side")
    assert bar.read(0x20, 11) == b"device-side"
    await client.region_write(2, 0x30, b"by-message")
    assert bar.read(0x30, 10) == b"by-message"
    # The hole between the areas is emulated, reached by message; an access may span parts.
    await client.region_write(2, 0xFFC, b"ABCDEFGH")
    assert await client.region_read(2, 0xFFC, 8) == b"ABCDEFGH" and bar.read(0xFFC, 4) == b"ABCD"
    assert await client.mmap_region(0) == []
    bar.remove_region(0)
    bar.remove_region(0x2000)


@pytest.mark.asyncio
async def test_areas_from_several_fds_need_the_extension(tmp_path: Path) -> None:
    async with serve(tmp_path, EchoDevice(split_bar2=True)) as s:
        c = await s.connect()  # proposes sparse_mmap_fds: per-area fds
        areas = await c.mmap_region(2)
        assert len(areas) == 2 and os.path.samestat(
            os.fstat(areas[1].fd), os.fstat(s.device.regions()[2].areas[1].fd)
        )
        assert (await c.region_info(2)).info.caps[0].__class__ is SparseMmapFdsCap
        bar = GuestMemory()
        for area in areas:
            bar.add_region(area.fd, area.offset, area.size, mmap_offset=area.fd_offset)
            area.close()
        bar.write(0x2000, b"second memfd")
        assert await c.region_read(2, 0x2000, 12) == b"second memfd"
        bar.remove_region(0)
        bar.remove_region(0x2000)
        await c.close()
        await s.idle()
        # A client without the extension sees the region without MMAP, reachable by message.
        c = await s.connect(ClientOptions(sparse_mmap_fds=False))
        region = await c.region_info(2)
        assert not region.mappable and region.info.caps == ()
        assert await c.mmap_region(2) == []
        await c.region_write(2, 0x2000, b"by message")  # (the device was reset in between)
        assert s.device.bar2.read(0x2000, 10) == b"by message"
        assert await c.region_read(2, 0x1FF8, 18) == bytes(8) + b"by message"
        await c.close()


@pytest.mark.asyncio
async def test_dma_map_makes_client_memory_readable_by_the_device(
    served: Served, client: VfioUserClient
) -> None:
    fd = memfd(0x4000, "vvu-test-dma")
    try:
        os.pwrite(fd, b"from the client", 0x1000)
        await client.dma_map(fd, 0x10000, 0x4000)
        assert served.server.dma is not None
        memory = served.server.dma.memory
        assert memory.read(0x11000, 15) == b"from the client"
        # The device copies DMA -> its buffer, synchronously for fd-backed windows.
        await client.region_write(0, echo.REG_DMA_ADDR, u64(0x11000))
        await client.region_write(0, echo.REG_DMA_LEN, u32(15))
        await client.region_write(0, echo.REG_DMA_CMD, u32(echo.DMA_TO_BUFFER))
        assert await client.region_read(0, echo.REG_DMA_STATUS, 4) == u32(echo.DMA_DONE)
        assert await client.region_read(0, echo.BUFFER, 15) == b"from the client"
        # ... and back, into client memory.
        await client.region_write(0, echo.BUFFER, b"from the device")
        await client.region_write(0, echo.REG_DMA_ADDR, u64(0x12000))
        await client.region_write(0, echo.REG_DMA_CMD, u32(echo.DMA_FROM_BUFFER))
        assert os.pread(fd, 15, 0x2000) == b"from the device"
        assert client.memory.read(0x12000, 15) == b"from the device"
        # Overlaps are refused; an unmap may not cut a window in two.
        with pytest.raises(GuestMemoryError):  # the client refuses it itself
            await client.dma_map(fd, 0x13000, 0x2000)
        with pytest.raises(VfioUserError) as err:  # and so does the server
            await client.request(Command.DMA_MAP, DmaMap(3, 0, 0x13000, 0x2000).pack(), [fd])
        assert err.value.errno == errno.EEXIST
        with pytest.raises(VfioUserError) as err:
            await client.dma_unmap(0x10000, 0x1000)
        assert err.value.errno == errno.EINVAL
        # A reset keeps the windows.
        await client.reset()
        assert memory.read(0x11000, 15) == b"from the client"
        await client.dma_unmap(0x10000, 0x4000)
        assert memory.regions == [] and memfd_mappings("vvu-test-dma") == 0
    finally:
        os.close(fd)


@pytest.mark.asyncio
async def test_a_dma_region_shrunk_by_the_client_fails_that_window_and_the_server_lives(
    served: Served, client: VfioUserClient
) -> None:
    """Issue 11: a client that shrinks a DMA region's file after DMA_MAP used to kill the
    server (SIGBUS, status 135: here, the test process). Now the device's access to that window
    fails with GuestMemoryError (the echo device reports DMA_ERROR), other windows still work."""
    hostile = os.memfd_create("vvu-test-shrunk")  # sealing not allowed: the handler's case
    fine = memfd(0x4000, "vvu-test-dma-ok")
    try:
        os.ftruncate(hostile, 0x4000)
        await client.dma_map(hostile, 0x10000, 0x4000)
        await client.dma_map(fine, 0x20000, 0x4000)
        os.ftruncate(hostile, 0)

        async def dma_to_buffer(addr: int) -> bytes:
            await client.region_write(0, echo.REG_DMA_ADDR, u64(addr))
            await client.region_write(0, echo.REG_DMA_LEN, u32(12))
            await client.region_write(0, echo.REG_DMA_CMD, u32(echo.DMA_TO_BUFFER))
            return await client.region_read(0, echo.REG_DMA_STATUS, 4)

        assert await dma_to_buffer(0x11000) == u32(echo.DMA_ERROR)
        assert served.server.dma is not None and served.server.dma.memory.poisoned
        os.pwrite(fine, b"still served", 0x1000)
        assert await dma_to_buffer(0x21000) == u32(echo.DMA_DONE)
        assert await client.region_read(0, echo.BUFFER, 12) == b"still served"
        await client.dma_unmap(0x10000, 0x4000)
        await client.dma_unmap(0x20000, 0x4000)
        assert memfd_mappings("vvu-test-shrunk") == 0
    finally:
        os.close(hostile)
        os.close(fine)


@pytest.mark.asyncio
async def test_dma_unmap_of_a_range_removes_the_windows_inside_it(
    served: Served, client: VfioUserClient
) -> None:
    """Linux VFIO type1 semantics (what QEMU behind a vIOMMU expects): an unmap range removes
    every window inside it, a range holding none succeeds, a range cutting a window fails."""
    fd = memfd(0x10000, "vvu-test-unmap")
    try:
        for i in range(3):
            await client.dma_map(fd, 0x100000 + 0x10000 * i, 0x4000, offset=0x4000 * i)
        assert served.server.dma is not None
        memory = served.server.dma.memory
        # QEMU's vIOMMU unmaps big power-of-two ranges that match nothing: success.
        await client.dma_unmap(1 << 40, 1 << 39)
        await client.dma_unmap(0, 0x100000)
        assert len(served.server.dma.mappings) == 3
        # A range that would split a window: refused, nothing removed.
        with pytest.raises(VfioUserError) as err:
            await client.dma_unmap(0x100000, 0x12000)
        assert err.value.errno == errno.EINVAL and len(served.server.dma.mappings) == 3
        # A range holding the first two windows and the hole after them removes both.
        await client.dma_unmap(0x100000, 0x20000)
        assert [m.iova for m in served.server.dma.mappings] == [0x120000]
        assert len(memory.regions) == 1 and len(client.memory.regions) == 1
        # An exact match still works.
        await client.dma_unmap(0x120000, 0x4000)
        assert served.server.dma.mappings == [] and memfd_mappings("vvu-test-unmap") == 0
    finally:
        os.close(fd)


@pytest.mark.asyncio
async def test_dma_without_a_shared_fd_goes_through_messages(
    served: Served, client: VfioUserClient
) -> None:
    fd = memfd(0x2000, "vvu-test-dma-msg")
    try:
        os.pwrite(fd, b"fetched by DMA_READ", 0)
        await client.dma_map(fd, 0x40000, 0x2000, share_fd=False)
        await client.region_write(0, echo.REG_DMA_ADDR, u64(0x40000))
        await client.region_write(0, echo.REG_DMA_LEN, u32(19))
        await client.region_write(0, echo.REG_DMA_CMD, u32(echo.DMA_TO_BUFFER))

        async def status() -> int:
            for _ in range(500):
                value = int.from_bytes(
                    await client.region_read(0, echo.REG_DMA_STATUS, 4), "little"
                )
                if value != echo.DMA_BUSY:
                    return value
                await asyncio.sleep(0.01)
            raise AssertionError("DMA never finished")

        assert await status() == echo.DMA_DONE
        assert await client.region_read(0, echo.BUFFER, 19) == b"fetched by DMA_READ"
        await client.region_write(0, echo.BUFFER, b"stored by DMA_WRITE")
        await client.region_write(0, echo.REG_DMA_ADDR, u64(0x41000))
        await client.region_write(0, echo.REG_DMA_CMD, u32(echo.DMA_FROM_BUFFER))
        assert await status() == echo.DMA_DONE
        assert os.pread(fd, 19, 0x1000) == b"stored by DMA_WRITE"
        # Outside every window: the device gets an error, nothing is sent.
        await client.region_write(0, echo.REG_DMA_ADDR, u64(0x90000))
        await client.region_write(0, echo.REG_DMA_CMD, u32(echo.DMA_TO_BUFFER))
        assert await status() == echo.DMA_ERROR
        await client.dma_unmap_all()
    finally:
        os.close(fd)


@pytest.mark.asyncio
async def test_reset_clears_device_state(served: Served, client: VfioUserClient) -> None:
    await client.region_write(0, 4, u32(99))
    await client.config_write(0x04, b"\x06\x00")
    await client.reset()
    assert await client.region_read(0, 4, 4) == bytes(4)
    assert await client.config_read(0x04, 2) == bytes(2)


@pytest.mark.asyncio
async def test_pci_access_layer(served: Served) -> None:
    pci = await VfioUserPciAccess.open(served.path, timeout=2)
    try:
        assert [pci.bar_info(i).size for i in range(6)] == [0x1000, 0x1000, 0x4000, 0, 0, 0]
        assert await pci.config_read_u16(0) == echo.VENDOR_ID
        assert await pci.find_capability(0x11) == 0x40 and await pci.find_capability(0x05) is None
        await pci.bar_write(0, 4, u32(5))
        assert await pci.bar_read(0, 4, 4) == u32(5)
        bar2 = await pci.map_bar(2)
        assert bar2 is not None and await pci.map_bar(0) is None
        await pci.bar_write(2, 0x2000, b"mapped")  # through the mapping: no message
        assert served.device.bar2.read(0x2000, 6) == b"mapped"
        # A doorbell write becomes an eventfd signal when the device offers an ioeventfd.
        bell = pci.doorbell(0, echo.REG_DOORBELL, 4, 0)
        assert bell is not None and pci.doorbell(0, 0x20, 4, 0) is None
        await pci.bar_write(0, echo.REG_DOORBELL, u32(0))
        for _ in range(200):
            if served.device.doorbells:
                break
            await asyncio.sleep(0.01)
        assert served.device.doorbells == 1
        assert await pci.msix_vectors() == 4
        vectors = await pci.enable_msix(2)
        assert served.device.config.msix_enabled
        served.device.raise_irq(1)
        assert vectors[1].wait(TIMEOUT)
        await pci.disable_msix()
        assert not served.device.config.msix_enabled
        fd = memfd(0x1000)
        await pci.map_dma(fd, 0x8000, 0x1000)
        pci.dma_memory.write(0x8000, b"ring")
        assert served.server.dma is not None
        assert served.server.dma.memory.read(0x8000, 4) == b"ring"
        await pci.unmap_dma(0x8000, 0x1000)
        os.close(fd)
        await pci.reset()
    finally:
        await pci.close()


# --- hostile clients ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_commands_before_version_are_refused(served: Served) -> None:
    raw = await Raw.open(served.path)
    await raw.expect_error(Command.DEVICE_GET_INFO, DeviceInfo().pack())
    await raw.expect_error(Command.REGION_READ, RegionAccess(0, 0, 4).pack())
    r, w = os.pipe()
    await raw.expect_error(Command.VERSION, Version(0, 0).pack(), fds=[w])  # VERSION takes none
    os.close(r)
    os.close(w)
    await raw.expect_error(Command.VERSION, Version(1, 0).pack(), code=errno.ENOTSUP)
    await raw.expect_error(Command.VERSION, struct.pack("<HH", 0, 0) + b"{]\0")
    await raw.negotiate()  # still possible after all that
    await raw.expect_error(Command.VERSION, Version(0, 0).pack())  # but only once
    raw.close()


@pytest_asyncio.fixture
async def raw(served: Served) -> AsyncIterator[Raw]:
    """A hand-driven client that negotiated VERSION; checks at the end that the session still
    works and the device saw none of the refused requests."""
    peer = await Raw.open(served.path)
    await peer.negotiate()
    yield peer
    frame = await peer.call(Command.REGION_READ, RegionAccess(0, 0, 4).pack())
    assert frame.payload[16:] == b"ECHO"
    assert served.device.irq.bound(MSIX, 0) is None and served.device.doorbells == 0
    peer.close()


@pytest.mark.asyncio
async def test_bad_sizes_get_error_replies(raw: Raw) -> None:
    e = raw.expect_error
    await e(Command.DEVICE_GET_INFO, bytes(8))
    await e(Command.DEVICE_GET_INFO, DeviceInfo(argsz=8).pack())
    await e(Command.DEVICE_GET_REGION_INFO, bytes(31))
    await e(Command.DEVICE_GET_REGION_INFO, RegionInfo(0, argsz=16).pack_request())
    await e(Command.DEVICE_GET_IRQ_INFO, bytes(20))
    await e(Command.REGION_READ, RegionAccess(0, 0, 4).pack() + bytes(4))
    await e(Command.REGION_WRITE, RegionAccess(0, 0, 8, b"abcd").pack())
    await e(Command.REGION_READ, RegionAccess(0, 0, 0).pack())
    await e(Command.REGION_READ, RegionAccess(0, 0, (1 << 20) + 1).pack(), code=errno.E2BIG)
    await e(Command.DMA_MAP, DmaMap(3, 0, 0x1000, 0x1000).pack()[:28])
    await e(Command.DMA_MAP, DmaMap(3, 0, 0x1000, 0x1000, argsz=40).pack())
    await e(Command.DMA_UNMAP, DmaUnmap(0, 0x1000, 0x1000, argsz=8).pack())
    await e(Command.DEVICE_RESET, b"x")


@pytest.mark.asyncio
async def test_bad_indexes_and_offsets_get_error_replies(raw: Raw) -> None:
    e = raw.expect_error
    for index in (9, 0xFFFFFFFF):
        await e(Command.DEVICE_GET_REGION_INFO, RegionInfo(index).pack_request())
        await e(Command.REGION_READ, RegionAccess(0, index, 4).pack())
        await e(Command.REGION_WRITE, RegionAccess(0, index, 1, b"x").pack())
    await e(Command.DEVICE_GET_IRQ_INFO, IrqInfo(5).pack())
    await e(Command.REGION_READ, RegionAccess(0, 3, 4).pack())  # a region of size 0
    # Past the end, and overflowing 64 bits.
    await e(Command.REGION_READ, RegionAccess(0xFFC, 0, 8).pack())
    await e(Command.REGION_READ, RegionAccess((1 << 64) - 4, 0, 8).pack())
    await e(Command.REGION_WRITE, RegionAccess((1 << 64) - 1, 7, 2, b"xy").pack())
    await e(Command.REGION_READ, RegionAccess(256, 7, 1).pack())
    await e(Command.REGION_WRITE, RegionAccess(echo.REG_IRQ, 0, 4, u32(9)).pack())  # no vector 9


@pytest.mark.asyncio
async def test_bad_set_irqs_get_error_replies(raw: Raw) -> None:
    e = raw.expect_error
    irqs = Command.DEVICE_SET_IRQS
    await e(irqs, IrqSet(TRIGGER_NONE, MSIX, 3, 2).pack())
    await e(irqs, IrqSet(TRIGGER_NONE, MSIX, 0xFFFFFFFF, 2).pack())
    await e(irqs, IrqSet(TRIGGER_NONE, 7, 0, 1).pack())
    await e(irqs, IrqSet(TRIGGER_EVENTFD, MSIX, 0, 0).pack())
    await e(irqs, IrqSet(TRIGGER_NONE | 2, MSIX, 0, 1).pack())  # two DATA bits
    await e(irqs, IrqSet(int(IrqSetFlag.DATA_NONE), MSIX, 0, 1).pack())  # no ACTION bit
    await e(irqs, IrqSet(TRIGGER_NONE, MSIX, 0, 1, argsz=24).pack())
    bools = int(IrqSetFlag.DATA_BOOL | IrqSetFlag.ACTION_TRIGGER)
    await e(irqs, IrqSet(bools, MSIX, 0, 2, b"\1").pack())
    masks = int(IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_MASK)
    await e(irqs, IrqSet(masks, MSIX, 0, 1).pack())  # not maskable
    efds = [EventFd() for _ in range(17)]
    fds = [efd.fileno() for efd in efds]
    r, w = os.pipe()
    try:
        await e(irqs, IrqSet(TRIGGER_EVENTFD, MSIX, 0, 2).pack(), fds[:1])
        await e(irqs, IrqSet(TRIGGER_EVENTFD, MSIX, 0, 4).pack(), fds)  # over max_msg_fds
        await e(irqs, IrqSet(TRIGGER_NONE, MSIX, 0, 1).pack(), fds[:1])
        await e(irqs, IrqSet(TRIGGER_EVENTFD, MSIX, 0, 1).pack(), [r])  # not an eventfd
        await e(Command.DEVICE_GET_INFO, DeviceInfo().pack(), fds[:1])  # takes no fds
    finally:
        for efd in efds:
            efd.close()
        os.close(r)
        os.close(w)


@pytest.mark.asyncio
async def test_bad_dma_maps_get_error_replies(raw: Raw) -> None:
    e = raw.expect_error
    dma = Command.DMA_MAP
    mem = memfd(0x2000)
    r, w = os.pipe()
    try:
        await e(dma, DmaMap(3, 0, 0x1000, 0x1000).pack(), [mem, mem])
        await e(dma, DmaMap(3, 0, 0x1001, 0x1000).pack(), [mem])
        await e(dma, DmaMap(3, 0, 0x1000, 0).pack(), [mem])
        await e(dma, DmaMap(3, 0, (1 << 64) - 0x1000, 0x2000).pack(), [mem])
        await e(dma, DmaMap(3, 0, 0x1000, 0x1000).pack(), [r])  # not mappable
        await e(dma, DmaMap(3, 0x1000, 0x1000, 0x2000).pack(), [mem])  # past the file's end
        await e(dma, DmaMap(0, 0, 0x1000, 0x1000).pack(), [mem])
        await e(dma, DmaMap(0x13, 0, 0x1000, 0x1000).pack(), [mem])
        await e(dma, DmaMap(4 | 3, 0, 0x1000, 0x1000).pack())  # mmap access, no fd
        await e(dma, DmaMap(8 | 3, 0, 0x1000, 0x1000).pack(), code=errno.ENOTSUP)
        await e(Command.DMA_UNMAP, DmaUnmap(1, 0x1000, 0x1000).pack(), code=errno.ENOTSUP)
        await e(Command.DMA_UNMAP, DmaUnmap(2, 0x1000, 0x1000).pack())
        await e(Command.DMA_UNMAP, DmaUnmap(0x10, 0, 0).pack())
        await e(Command.DMA_UNMAP, DmaUnmap(0, 0x1000, 0).pack())  # empty
        await e(Command.DMA_UNMAP, DmaUnmap(0, 0x1800, 0x1000).pack())  # unaligned
    finally:
        for fd in (mem, r, w):
            os.close(fd)


@pytest.mark.asyncio
async def test_unsupported_commands_and_bad_flags(raw: Raw) -> None:
    await raw.expect_error(Command.DMA_READ, DmaAccess(0, 4).pack())  # server -> client only
    for cmd in (Command.DIRTY_PAGES, Command.DEVICE_FEATURE, Command.MIG_DATA_READ, 99):
        await raw.expect_error(cmd, bytes(8), code=errno.ENOTSUP)
    await raw.send(struct.pack("<HHIII", 7, Command.DEVICE_RESET, 16, 0x40, 0))
    frame = await raw.recv()
    assert frame is not None and frame.header.error == EINVAL
    # A bad command with NO_REPLY gets no reply: the next reply is the next command's.
    await raw.send(struct.pack("<HHIII", 1, Command.REGION_READ, 32, NO_REPLY, 0) + bytes(16))
    frame = await raw.call(Command.DEVICE_GET_INFO, DeviceInfo().pack(), msg_id=2)
    assert not frame.header.is_error


@pytest.mark.parametrize(
    "garbage",
    [
        struct.pack("<HHIII", 1, 4, 8, 0, 0),  # size below the header
        struct.pack("<HHIII", 1, 4, 1 << 30, 0, 0),  # size above any message
        struct.pack("<HHIII", 1, 4, 32, 5, 0) + bytes(16),  # message type 5
        struct.pack("<HHIII", 9, 11, 16, 1, 0),  # a reply nobody asked for
        struct.pack("<HHIII", 1, 4, 32, 0, 0) + bytes(3),  # EOF mid-message
    ],
    ids=["tiny", "huge", "type", "stray-reply", "truncated"],
)
@pytest.mark.asyncio
async def test_framing_errors_disconnect_and_the_next_client_is_served(
    served: Served, garbage: bytes
) -> None:
    raw = await Raw.open(served.path)
    await raw.negotiate()
    await raw.send(garbage)
    if garbage.endswith(bytes(3)):
        raw.sock.shutdown(socket.SHUT_WR)
    await raw.expect_hangup()
    raw.close()
    await served.idle()
    c = await served.connect()
    assert (await c.device_info()).num_regions == 9
    await c.close()


@pytest.mark.asyncio
async def test_more_fds_than_the_receive_buffer_disconnects(served: Served) -> None:
    raw = await Raw.open(served.path)
    await raw.negotiate()
    r, w = os.pipe()
    sock = raw.sock
    sock.setblocking(True)
    msg = encode(3, Command.DEVICE_GET_INFO, DeviceInfo().pack())
    socket.send_fds(sock, [msg], [w] * 100)
    sock.setblocking(False)
    await raw.expect_hangup()
    raw.close()
    os.close(r)
    os.close(w)
    await served.idle()


@pytest.mark.asyncio
async def test_no_fd_leaks_across_clients_and_state_reset(tmp_path: Path) -> None:
    async with serve(tmp_path) as s:
        await asyncio.sleep(0)
        baseline = open_fds()
        for _ in range(3):
            c = await s.connect()
            efds = await c.enable_irqs(MSIX, 4)
            (bell,) = await c.region_io_fds(0)
            areas = await c.mmap_region(2)
            fd = memfd(0x2000, "vvu-test-leak")
            await c.dma_map(fd, 0x100000, 0x2000)
            await c.dma_map(fd, 0x200000, 0x1000, share_fd=False)
            await c.region_write(0, 4, u32(0xABCD))
            raw = await Raw.open(s.path)  # queued behind the current client
            await c.close()
            await raw.negotiate()  # served once the previous client is torn down
            assert s.device.irq.bound(MSIX, 0) is None
            assert memfd_mappings("vvu-test-leak") == 0  # the server unmapped, so did we
            # The next client gets a reset device.
            frame = await raw.call(Command.REGION_READ, RegionAccess(4, 0, 4).pack())
            assert frame.payload[16:] == bytes(4)
            await raw.send(struct.pack("<HHIII", 1, 1, 4, 0, 0))  # and goes away rudely
            raw.close()
            await s.idle()
            for efd in efds:
                efd.close()
            bell.eventfd.close()
            for area in areas:
                area.close()
            os.close(fd)
        assert_no_fd_leak(baseline)


# --- conformance: rust-vmm's vfio_user crate as the client --------------------------------------


@pytest.fixture(scope="session")
def vfio_user_peer() -> Iterator[str]:
    """Build rust/vfio-user-peer once per session (in the workspace's shared target dir)."""
    cargo = shutil.which("cargo") or str(Path.home() / ".cargo/bin/cargo")
    if not Path(cargo).exists():
        pytest.skip("cargo is not installed")
    build = subprocess.run(
        [cargo, "build", "-p", "vfio-user-peer", "--message-format=json-render-diagnostics"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if build.returncode != 0:
        pytest.fail(f"cargo build -p vfio-user-peer failed:\n{build.stderr[-4000:]}")
    executable = None
    for line in build.stdout.splitlines():
        msg: dict[str, Any] = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg["target"]["name"] == "vfio-user-peer":
            executable = msg.get("executable")
    assert executable, "cargo reported no vfio-user-peer executable"
    yield executable


async def run_peer(executable: str, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        executable, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.asyncio
async def test_rust_vfio_user_crate_client_conformance(served: Served, vfio_user_peer: str) -> None:
    baseline = open_fds()
    code, out, err = await run_peer(vfio_user_peer, served.path)
    assert code == 0, f"vfio-user-peer failed:\n{err}"
    summary = json.loads(out)
    regions = {r["index"]: r for r in summary["regions"]}
    assert regions[2]["sparse_areas"] == [[0, 0x1000], [0x2000, 0x2000]] and regions[2]["fd"]
    assert regions[7]["size"] == 256
    assert [i["count"] for i in summary["irqs"]] == [0, 0, 4, 1, 1]
    assert summary["config"]["vendor_id"] == echo.VENDOR_ID
    assert summary["config"]["msix_table_size"] == 4
    assert summary["bar0"]["msix_vector0_signalled"] >= 1
    assert summary["sparse_mmap"]["both_ways"] and summary["dma"]["device_read"]
    # The crate's inverted FLAGS_RESET check (documented in docs/vfio-user.md).
    assert summary["reset"]["crate_resettable"] is False
    await served.idle()
    assert served.server.clients_served == 1
    # A second run against the same server: it was reset and cleaned up in between.
    code, _, err = await run_peer(vfio_user_peer, served.path)
    assert code == 0, err
    await served.idle()
    assert_no_fd_leak(baseline)


@pytest.mark.asyncio
async def test_rust_vfio_user_crate_client_drives_the_vvu_device(
    tmp_path: Path, vfio_user_peer: str
) -> None:
    """The virtio-vhost-user device itself, not only the echo device, through the crate's
    client: found by its capabilities, VERSION_1 negotiated, its config space read and
    BACKEND_UP set and cleared, DEVICE_RESET honoured (rust/vfio-user-peer `--vvu`)."""
    device = VvuDevice(UnixListener(str(tmp_path / "frontend.sock")), max_queues=5)
    path = str(tmp_path / "vvu.sock")
    async with running_server(device, path) as server:
        code, out, err = await run_peer(vfio_user_peer, "--vvu", path)
        assert code == 0, f"vfio-user-peer --vvu failed:\n{err}"
        summary = json.loads(out)
        assert (summary["vendor_id"], summary["device_id"]) == (0x1AF4, 0x1040 + VVU_VIRTIO_ID)
        assert summary["max_vhost_queues"] == 5
        assert bytes.fromhex(summary["uuid"]) == device.uuid
        assert summary["num_queues"] == 2 and all(summary["queue_sizes"])
        assert summary["msix_vectors"] >= 3 + 5  # config, rxq, txq, one per vhost queue
        assert summary["backend_up_read_back"] & BACKEND_UP
        assert device.vvu_status == 0 and device.status == 0  # cleared, then reset
        for _ in range(500):
            if not server.connected:
                break
            await asyncio.sleep(0.01)
        assert server.clients_served == 1
