"""The back-end engine driven the way real front-ends drive it.

A raw scripted front-end (`Peer`) sends exact messages with exact flags and fds and reads exact
replies, over each transport (`Connector`): a socketpair ("unix"), or the front-end socket of an
in-process virtio-vhost-user device that the engine is served behind ("vvu"). Data goes through
split rings laid out in a memfd that is shared with SET_MEM_TABLE (`Guest`, `Ring`), or through
our own `Frontend` with `BlkDriver`/`RngDriver`.

Synchronisation is always an awaited event: a reply, a call eventfd, a completion future, the end
of the serving task. `TIMEOUT` only guards against hangs. "No reply was sent" is proved with a
GET_FEATURES barrier: the engine answers in order, so the next message must be that reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from uuid import UUID

import pytest
import pytest_asyncio
from _pytest.mark import ParameterSet

from vvu._core import EventFd, GuestMemory, SplitQueue, SplitQueueDriver, memfd
from vvu.aio import wait_eventfd
from vvu.backends import BlkBackend, RngBackend
from vvu.backends.base import ConfigError
from vvu.backends.blk import BlkFeature
from vvu.device.vvu import (
    BACKEND_UP,
    FEATURES_FILTERED,
    MAX_AREAS,
    PROTOCOL_FEATURES_ALLOWED,
    VvuDevice,
)
from vvu.engine import MAX_MEM_SLOTS, REFUSED, BackendEngine, RequestFailed
from vvu.frontend import BlkDriver, Frontend, FrontendError, FrontendQueue, RngDriver
from vvu.frontend.blk import T_IN, T_OUT, BlkIOError
from vvu.frontend.core import UVA_BASE, WANTED_PROTOCOL_FEATURES
from vvu.protocol import (
    EMPTY,
    NEED_REPLY,
    REPLY_FLAGS,
    U64,
    VERSION,
    VRING_NOFD,
    BackendRequest,
    Config,
    DeviceStateTransfer,
    DeviceStatus,
    FrontendRequest,
    Header,
    Inflight,
    MemoryRegion,
    MemoryTable,
    Payload,
    ProtocolFeature,
    RawPayload,
    SharedObject,
    ShmemConfig,
    ShmemMap,
    SingleRegion,
    VhostFeature,
    VirtioFeature,
    VringAddr,
    VringArea,
    VringState,
    decode_message,
    encode_ack,
)
from vvu.protocol.table import spec_for
from vvu.transport.base import Channel, RawMessage, TransportError
from vvu.transport.unix import UnixListener, connect_unix, socketpair_channels
from vvu_harness import served

pytestmark = pytest.mark.timeout(30)

F = FrontendRequest
PF = ProtocolFeature
MiB = 1 << 20
TIMEOUT = 5.0  # hang guard only
#: Guest physical and front-end virtual addresses differ, so a GPA/UVA mix-up fails loudly.
GPA = 0x1_0000_0000
UVA = 0x7F00_0000_0000
DISK = 4 * MiB
#: The raw peers here lay out split rings (`Ring`): they never ack VIRTIO_F_RING_PACKED. Packed
#: rings are driven by our Frontend (`packed=True`) in the tests parametrized over the format.
SPLIT_RINGS = ~VirtioFeature.RING_PACKED.mask
PROTOCOL_FEATURES = VhostFeature.PROTOCOL_FEATURES.mask
#: What QEMU asks of a blk back-end (it also asks for bits we do not offer; they are masked).
QEMU_PROTOCOL = (
    PF.MQ.mask
    | PF.REPLY_ACK.mask
    | PF.BACKEND_REQ.mask
    | PF.CONFIG.mask
    | PF.RESET_DEVICE.mask
    | PF.CONFIGURE_MEM_SLOTS.mask
    | PF.STATUS.mask
)
RUNNING = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK


def without_viommu(features: int) -> int:
    """What a front-end with no vIOMMU in front of the device acks (QEMU without
    iommu_platform=on): never VIRTIO_F_ACCESS_PLATFORM, which would make every ring and buffer
    address an IOVA (tests/test_iommu.py covers that)."""
    return features & ~VirtioFeature.ACCESS_PLATFORM.mask


# --- the scripted front-end's pieces ------------------------------------------------------------


def open_fds() -> dict[int, str]:
    """Every open fd of this process and what it refers to."""
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the directory's own fd is gone already
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return fds


def assert_no_fd_leak(before: dict[int, str]) -> None:
    after = open_fds()
    assert len(after) == len(before), {fd: t for fd, t in after.items() if before.get(fd) != t}


def mappings(name: str) -> int:
    """How many mappings of the memfd called `name` this process has (ours and the engine's)."""
    with open("/proc/self/maps") as maps:
        return sum(1 for line in maps if line.rstrip().endswith(f"/memfd:{name} (deleted)"))


class Guest:
    """Front-end guest memory: memfd regions, mapped here at UVA + gpa, handed out bump-style."""

    _serial = 0

    def __init__(self, size: int = 2 * MiB) -> None:
        Guest._serial += 1
        self.name = f"vvu-test-{os.getpid()}-{Guest._serial}"
        self.memory = GuestMemory()
        self.regions: list[tuple[MemoryRegion, int, str]] = []
        self.add(GPA, size)
        self._next = GPA + 0x1000
        self._end = GPA + size

    def add(self, gpa: int, size: int) -> tuple[MemoryRegion, int]:
        """Another region (memfd) at `gpa`; the caller tells the back-end about it."""
        name = f"{self.name}-{len(self.regions)}"
        fd = memfd(size, name)
        self.memory.add_region(fd, gpa, size, userspace_addr=UVA + gpa)
        region = MemoryRegion(gpa, size, UVA + gpa, 0)
        self.regions.append((region, fd, name))
        return region, fd

    @property
    def table(self) -> MemoryTable:
        return MemoryTable(tuple(r for r, _, _ in self.regions))

    @property
    def fds(self) -> list[int]:
        return [fd for _, fd, _ in self.regions]

    def alloc(self, size: int, align: int = 64) -> int:
        gpa = (self._next + align - 1) & ~(align - 1)
        assert gpa + size <= self._end, "test guest memory exhausted"
        self._next = gpa + size
        return gpa

    def engine_mappings(self) -> int:
        """Mappings of our regions that are not our own: the engine's."""
        return sum(mappings(name) - 1 for _, _, name in self.regions)

    def close(self) -> None:
        for _, fd, _ in self.regions:
            os.close(fd)
        self.regions.clear()
        self.memory = GuestMemory()  # unmaps ours once the rings' drivers are gone too


class Ring:
    """One split ring in guest memory, with its kick, call and err eventfds."""

    def __init__(
        self,
        guest: Guest,
        index: int = 0,
        size: int = 64,
        *,
        event_idx: bool = False,
        start: int = 0,
    ) -> None:
        self.guest = guest
        self.index = index
        self.size = size
        self.desc = guest.alloc(16 * size, 4096)
        self.avail = guest.alloc(6 + 2 * size, 64)
        self.used = guest.alloc(6 + 8 * size, 64)
        self.driver = SplitQueueDriver(
            guest.memory,
            size,
            self.desc,
            self.avail,
            self.used,
            event_idx=event_idx,
            start_index=start,
        )
        self.kick, self.call, self.err = EventFd(), EventFd(), EventFd()
        self.queue = FrontendQueue(index, size, self.driver, self.kick, self.call)

    @property
    def addr(self) -> VringAddr:
        return VringAddr(self.index, 0, UVA + self.desc, UVA + self.used, UVA + self.avail, 0)

    @property
    def used_idx(self) -> int:
        return self.guest.memory.load_u16(self.used + 2)

    def close(self) -> None:
        self.queue.close()  # kick and call
        self.err.close()
        del self.queue, self.driver  # they hold the guest memory


@dataclass
class BlkRequest:
    head: int
    status: int
    data: int


def blk_submit(
    ring: Ring,
    kind: int,
    sector: int,
    *,
    out: bytes = b"",
    in_len: int = 0,
    data: int | None = None,
) -> BlkRequest:
    """Add one virtio-blk request to the ring (not published)."""
    memory = ring.guest.memory
    header, status = ring.guest.alloc(16, 16), ring.guest.alloc(1, 1)
    memory.write(header, struct.pack("<IIQ", kind, 0, sector))
    memory.write(status, b"\xff")
    length = len(out) or in_len
    if data is None:
        data = ring.guest.alloc(length, 512) if length else 0
    readable, writable = [(header, 16)], []
    if out:
        memory.write(data, out)
        readable.append((data, len(out)))
    if in_len:
        writable.append((data, in_len))
    writable.append((status, 1))
    return BlkRequest(ring.queue.submit(readable, writable), status, data)


def blk_status(ring: Ring, request: BlkRequest) -> int:
    return ring.guest.memory.read(request.status, 1)[0]


async def blk_io(
    ring: Ring,
    kind: int,
    sector: int,
    *,
    out: bytes = b"",
    in_len: int = 0,
    data: int | None = None,
) -> bytes:
    request = blk_submit(ring, kind, sector, out=out, in_len=in_len, data=data)
    done = ring.queue.completion(request.head)
    ring.queue.notify()
    await asyncio.wait_for(done, TIMEOUT)
    assert blk_status(ring, request) == 0
    return ring.guest.memory.read(request.data, in_len) if in_len else b""


async def check_io(ring: Ring, sector: int = 8, *, data: int | None = None) -> None:
    """A written block reads back (through buffers at `data`, if given)."""
    block = os.urandom(4096)
    await blk_io(ring, T_OUT, sector, out=block, data=data)
    assert await blk_io(ring, T_IN, sector, in_len=4096, data=data) == block


class Peer:
    """A raw front-end on one engine session: exact bytes out, exact replies in."""

    def __init__(
        self,
        engine: BackendEngine,
        channel: Channel,
        task: asyncio.Future[None],
        *,
        offered: int | None = None,
    ) -> None:
        self.engine = engine
        self.channel = channel
        self.task = task  # the engine serving this session
        # What GET_FEATURES answers on this transport.
        self.offered = engine.offered_features() if offered is None else offered

    async def send(
        self,
        request: int,
        payload: Payload | bytes = EMPTY,
        fds: Sequence[int] = (),
        *,
        need_reply: bool = False,
        flags: int | None = None,
    ) -> None:
        body = payload if isinstance(payload, bytes) else payload.pack()
        if flags is None:
            flags = VERSION | (NEED_REPLY if need_reply else 0)
        await self.channel.send(Header(request, flags, len(body)).pack() + body, fds)

    async def recv(self) -> RawMessage | None:
        return await asyncio.wait_for(self.channel.recv(), TIMEOUT)

    async def raw_reply(self, request: int) -> RawMessage:
        raw = await self.recv()
        assert raw is not None, f"the engine hung up instead of answering request {request}"
        raw.close_fds()
        assert raw.request == request, f"reply to {raw.request}, expected one to {request}"
        assert raw.flags == REPLY_FLAGS, f"reply flags {raw.flags:#x}, must be exactly 0x5"
        return raw

    async def reply(self, request: FrontendRequest) -> Payload:
        raw = await self.raw_reply(request)
        header = Header(raw.request, raw.flags, len(raw.payload))
        return decode_message(header, raw.payload, is_reply=True).payload

    async def ack(self, request: int) -> int:
        """The u64 of a REPLY_ACK reply (0 ok)."""
        raw = await self.raw_reply(request)
        assert len(raw.payload) == 8, f"an ack is a u64, got {len(raw.payload)} bytes"
        return int.from_bytes(raw.payload, "little")

    async def get(
        self, request: FrontendRequest, payload: Payload = EMPTY, *, need_reply: bool = False
    ) -> Payload:
        await self.send(request, payload, need_reply=need_reply)
        return await self.reply(request)

    async def get_reply_u64(self, request: FrontendRequest) -> int:
        """The u64 of a typed reply to a request already sent."""
        reply = await self.reply(request)
        assert isinstance(reply, U64)
        return reply.value

    async def get_u64(self, request: FrontendRequest, *, need_reply: bool = False) -> int:
        reply = await self.get(request, need_reply=need_reply)
        assert isinstance(reply, U64)
        return reply.value

    async def do(
        self,
        request: FrontendRequest,
        payload: Payload = EMPTY,
        fds: Sequence[int] = (),
        *,
        need_reply: bool = False,
    ) -> None:
        """Send a request that has no reply of its own; with NEED_REPLY, expect a success ack."""
        await self.send(request, payload, fds, need_reply=need_reply)
        if need_reply:
            assert await self.ack(request) == 0, f"{request.name} was refused"

    async def barrier(self) -> None:
        """GET_FEATURES round trip (QEMU's sync without REPLY_ACK): also proves that nothing was
        sent since the last expected reply."""
        assert await self.get_u64(F.GET_FEATURES) == self.offered

    async def close(self) -> None:
        """Hang up and wait until the engine released the session."""
        self.channel.close()
        await asyncio.wait_for(self.task, TIMEOUT)

    async def expect_dropped(self) -> None:
        """The engine hangs up on us (EOF, or a reset if it left our bytes unread)."""
        try:
            raw = await self.recv()
        except TransportError:
            raw = None
        assert raw is None, f"expected the engine to hang up, got {raw}"
        await self.close()


async def negotiate(
    peer: Peer,
    *,
    protocol: int = QEMU_PROTOCOL,
    features: int | None = None,
    need_reply: bool = False,
) -> int:
    """Features and protocol features, QEMU-style (no vIOMMU); returns the acked features."""
    offered = await peer.get_u64(F.GET_FEATURES)
    if offered & PROTOCOL_FEATURES:
        offered_protocol = await peer.get_u64(F.GET_PROTOCOL_FEATURES)
        await peer.do(F.SET_PROTOCOL_FEATURES, U64(offered_protocol & protocol))
    await peer.do(F.SET_OWNER, need_reply=need_reply)
    acked = without_viommu(offered if features is None else features) & SPLIT_RINGS
    await peer.do(F.SET_FEATURES, U64(acked), need_reply=need_reply)
    return acked


async def start_ring(peer: Peer, ring: Ring, *, need_reply: bool = False, base: int = 0) -> None:
    """NUM, BASE, ADDR, CALL, ERR, KICK, ENABLE: the ring runs when this returns (with
    need_reply; otherwise once a later reply proves the engine got this far)."""
    i = ring.index
    await peer.do(F.SET_VRING_NUM, VringState(i, ring.size), need_reply=need_reply)
    await peer.do(F.SET_VRING_BASE, VringState(i, base), need_reply=need_reply)
    await peer.do(F.SET_VRING_ADDR, ring.addr, need_reply=need_reply)
    await peer.do(F.SET_VRING_CALL, U64.vring(i), [ring.call.fileno()], need_reply=need_reply)
    await peer.do(F.SET_VRING_ERR, U64.vring(i), [ring.err.fileno()], need_reply=need_reply)
    await peer.do(F.SET_VRING_KICK, U64.vring(i), [ring.kick.fileno()], need_reply=need_reply)
    await peer.do(F.SET_VRING_ENABLE, VringState(i, 1), need_reply=need_reply)


async def blk_session(peer: Peer, guest: Guest, ring: Ring, *, io: bool = True) -> None:
    """The whole QEMU handshake with REPLY_ACK, one running ring, and a checked write/read."""
    await negotiate(peer, features=peer.engine.offered_features() & ~VirtioFeature.EVENT_IDX.mask)
    await peer.do(F.SET_MEM_TABLE, guest.table, guest.fds, need_reply=True)
    await start_ring(peer, ring, need_reply=True)
    if io:
        await check_io(ring)


async def fresh_blk_frontend(connect: Connector, engine: BackendEngine) -> None:
    """Our own Frontend and BlkDriver on a new connection to `engine`: data round-trips."""
    client, task = await connect.channel(engine)
    frontend = Frontend(client, memory_size=2 * MiB)
    try:
        await frontend.negotiate()
        await frontend.set_mem_table()
        (capacity,) = struct.unpack("<Q", await frontend.get_config(0, 8))
        assert capacity == DISK // 512
        queue = await frontend.start_queue(0, 64)
        blk = BlkDriver(frontend, queue, capacity, depth=4, max_request=64 * 1024)
        data = os.urandom(3 * 4096)
        await asyncio.wait_for(blk.write(100, data), TIMEOUT)
        assert await asyncio.wait_for(blk.read(100, len(data)), TIMEOUT) == data
    finally:
        await frontend.close()
    await asyncio.wait_for(task, TIMEOUT)


def warning_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
def blk() -> Iterator[BlkBackend]:
    backend = BlkBackend(size=DISK)
    yield backend
    backend.close()


@pytest.fixture
def engine(blk: BlkBackend) -> BackendEngine:
    return BackendEngine(blk)


@pytest.fixture
def engine2() -> Iterator[BackendEngine]:
    """A two-queue blk device."""
    backend = BlkBackend(size=DISK, num_queues=2)
    yield BackendEngine(backend)
    backend.close()


# --- the transports -----------------------------------------------------------------------------

TRANSPORTS = ["unix", "vvu"]


class Connector:
    """Connects scripted front-ends to an engine over one transport. "unix": a socketpair the
    engine serves directly (exactly what a UnixListener hands it). "vvu": the engine is served
    in this loop behind an in-process VvuDevice (vfio-user, direct kicks; `vvu_harness.served`)
    and the front-end connects to the device's socket."""

    def __init__(self, transport: str, tmp_path: Path, stack: contextlib.AsyncExitStack) -> None:
        self.transport = transport
        self._tmp_path = tmp_path
        self._stack = stack
        self._served: dict[int, tuple[str, asyncio.Queue[asyncio.Task[None]]]] = {}
        self._devices: list[VvuDevice] = []

    @property
    def vvu(self) -> bool:
        return self.transport == "vvu"

    async def path(self, engine: BackendEngine) -> tuple[str, asyncio.Queue[asyncio.Task[None]]]:
        """The socket `engine` is served on (started on first use) and its sessions' tasks."""
        if id(engine) not in self._served:
            sessions: asyncio.Queue[asyncio.Task[None]] = asyncio.Queue()
            where = self._tmp_path / f"engine-{len(self._served)}"
            where.mkdir()
            path = await self._stack.enter_async_context(
                served(engine, self.transport, where, self._devices, sessions=sessions)
            )
            self._served[id(engine)] = (path, sessions)
        return self._served[id(engine)]

    async def channel(self, engine: BackendEngine) -> tuple[Channel, asyncio.Future[None]]:
        """A new front-end connection and the task of the engine session serving it."""
        if not self.vvu:
            client, server = socketpair_channels()
            return client, asyncio.ensure_future(engine.serve(server))
        path, sessions = await self.path(engine)
        client = await connect_unix(path, timeout=TIMEOUT)
        return client, await asyncio.wait_for(sessions.get(), TIMEOUT)

    async def peer(self, engine: BackendEngine) -> Peer:
        channel, task = await self.channel(engine)
        return Peer(engine, channel, task, offered=self.offered(engine))

    async def open_fds(self, engine: BackendEngine) -> dict[int, str]:
        """An fd snapshot to compare with after the session (`assert_no_fd_leak`). Over VVU the
        in-process device and driver are started first: their own fds (sockets, the vfio-user
        connection) live as long as the test, not the session."""
        if self.vvu:
            await self.path(engine)
            device = self._devices[-1]
            # The driver's set-up (DMA window, interrupt eventfds, rx buffers) ends with it
            # setting BACKEND_UP; the device signals no event for it.
            deadline = asyncio.get_running_loop().time() + TIMEOUT
            while not device.vvu_status & BACKEND_UP:
                assert asyncio.get_running_loop().time() < deadline, "the VVU driver never came up"
                await asyncio.sleep(0.01)
        # Fds an earlier test left to the garbage collector close now, not mid-session where
        # one would cancel out a leak in the count (or fail a session that leaked nothing).
        gc.collect()
        return open_fds()

    async def assert_no_fd_leak(self, before: dict[int, str]) -> None:
        """Every fd the session had is closed. Over AF_UNIX at once; over VVU the in-process
        device and driver release their per-session fds (BAR areas, ioeventfds, relays) when
        they have handled the disconnect, not when the session task ends: wait until they have
        (TIMEOUT), then check."""
        if self.vvu:
            deadline = asyncio.get_running_loop().time() + TIMEOUT
            while len(open_fds()) != len(before):
                if asyncio.get_running_loop().time() > deadline:
                    break
                await asyncio.sleep(0.01)  # polled: the device signals no "released" event
        assert_no_fd_leak(before)

    @property
    def per_region(self) -> int:
        """Mappings of each front-end region besides ours while a session has it: the engine's,
        and over VVU the in-process device's too (its BAR4 backing, docs/vvu-device.md)."""
        return 2 if self.vvu else 1

    def offered(self, engine: BackendEngine) -> int:
        """What GET_FEATURES answers: over VVU the device filters out dirty logging."""
        offered = engine.offered_features()
        return offered & ~FEATURES_FILTERED if self.vvu else offered

    def offered_protocol(self, engine: BackendEngine) -> int:
        """What GET_PROTOCOL_FEATURES answers: over VVU the device filters the engine's offer
        with its allow-list (docs/vvu-device.md, "Message handling")."""
        offered = engine.offered_protocol_features()
        return offered & PROTOCOL_FEATURES_ALLOWED if self.vvu else offered

    @property
    def max_mem_slots(self) -> int:
        """What GET_MAX_MEM_SLOTS answers: over VVU the device clamps it to the BAR4 areas
        a region-info reply can carry, less the log's and the inflight region's."""
        return min(MAX_MEM_SLOTS, MAX_AREAS - 2) if self.vvu else MAX_MEM_SLOTS


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest_asyncio.fixture
async def connect(transport: str, tmp_path: Path) -> AsyncIterator[Connector]:
    async with contextlib.AsyncExitStack() as stack:
        yield Connector(transport, tmp_path, stack)


# --- handshake orders of real front-ends (§15) --------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("reply_ack", [True, False], ids=["reply-ack", "no-reply-ack"])
async def test_qemu_order(engine: BackendEngine, reply_ack: bool, connect: Connector) -> None:
    """CALL and ERR before SET_FEATURES, GET_FEATURES barriers anywhere, MEM_TABLE, NUM BASE ADDR
    KICK, the real CALL, ENABLE (acked, or synced with GET_FEATURES), STATUS, stop."""
    before = await connect.open_fds(engine)
    guest = Guest()
    ring = Ring(guest, event_idx=True)
    masked = EventFd()
    ours, theirs = socket.socketpair()
    peer = await connect.peer(engine)

    offered = await peer.get_u64(F.GET_FEATURES)
    assert offered & PROTOCOL_FEATURES and offered & VirtioFeature.VERSION_1.mask
    offered_protocol = await peer.get_u64(F.GET_PROTOCOL_FEATURES)
    wanted = QEMU_PROTOCOL if reply_ack else QEMU_PROTOCOL & ~PF.REPLY_ACK.mask
    assert offered_protocol & wanted == wanted
    await peer.send(F.SET_PROTOCOL_FEATURES, U64(wanted))
    assert await peer.get_u64(F.GET_QUEUE_NUM) == 1
    assert 8 <= await peer.get_u64(F.GET_MAX_MEM_SLOTS) <= 512
    await peer.do(F.SET_BACKEND_REQ_FD, fds=[theirs.fileno()], need_reply=reply_ack)
    theirs.close()
    await peer.do(F.SET_OWNER)
    assert await peer.get_u64(F.GET_FEATURES) == offered
    await peer.send(F.SET_VRING_CALL, U64.vring(0), [masked.fileno()])  # the masked notifier
    await peer.send(F.SET_VRING_ERR, U64.vring(0), [ring.err.fileno()])
    await peer.barrier()
    await peer.do(F.SET_FEATURES, U64(without_viommu(offered) & SPLIT_RINGS))
    await peer.do(F.SET_STATUS, U64(RUNNING))
    await peer.do(F.SET_MEM_TABLE, guest.table, guest.fds, need_reply=reply_ack)
    await peer.send(F.SET_VRING_NUM, VringState(0, ring.size))
    await peer.send(F.SET_VRING_BASE, VringState(0, 0))
    await peer.send(F.SET_VRING_ADDR, ring.addr)
    await peer.send(F.SET_VRING_KICK, U64.vring(0), [ring.kick.fileno()])
    await peer.barrier()
    await peer.send(F.SET_VRING_CALL, U64.vring(0), [ring.call.fileno()])  # the guest notifier
    await peer.send(F.SET_VRING_ENABLE, VringState(0, 1), need_reply=reply_ack)
    if reply_ack:
        assert await peer.ack(F.SET_VRING_ENABLE) == 0
    else:
        await peer.barrier()
    await peer.do(F.SET_STATUS, U64(RUNNING | DeviceStatus.DRIVER_OK))
    assert await peer.get_u64(F.GET_STATUS) == RUNNING | DeviceStatus.DRIVER_OK

    await check_io(ring)
    await check_io(ring, sector=DISK // 512 - 8)  # the last block
    stopped = await peer.get(F.GET_VRING_BASE, VringState(0, 0))
    assert stopped == VringState(0, 4)
    await peer.close()
    ring.close()
    masked.close()
    ours.close()
    guest.close()
    await connect.assert_no_fd_leak(before)


@pytest.mark.asyncio
async def test_cloud_hypervisor_order(engine2: BackendEngine, connect: Connector) -> None:
    """NEED_REPLY on every message once REPLY_ACK is negotiated; NUM for all rings first;
    SET_BACKEND_REQ_FD last, after the rings are enabled."""
    before = await connect.open_fds(engine2)
    guest = Guest()
    rings = [Ring(guest, 0), Ring(guest, 1)]
    ours, theirs = socket.socketpair()
    peer = await connect.peer(engine2)

    await peer.do(F.SET_OWNER)
    offered = await peer.get_u64(F.GET_FEATURES)
    offered_protocol = await peer.get_u64(F.GET_PROTOCOL_FEATURES)
    wanted = PF.MQ.mask | PF.REPLY_ACK.mask | PF.BACKEND_REQ.mask | PF.CONFIG.mask
    wanted |= PF.CONFIGURE_MEM_SLOTS.mask
    assert offered_protocol & wanted == wanted
    await peer.send(F.SET_PROTOCOL_FEATURES, U64(wanted))  # not yet acked: REPLY_ACK starts now
    acked = without_viommu(offered) & ~VirtioFeature.EVENT_IDX.mask & SPLIT_RINGS
    await peer.do(F.SET_FEATURES, U64(acked), need_reply=True)
    await peer.do(F.SET_MEM_TABLE, guest.table, guest.fds, need_reply=True)
    for ring in rings:
        await peer.do(F.SET_VRING_NUM, VringState(ring.index, ring.size), need_reply=True)
    for ring in rings:
        i = ring.index
        await peer.do(F.SET_VRING_ADDR, ring.addr, need_reply=True)
        await peer.do(F.SET_VRING_BASE, VringState(i, 0), need_reply=True)
        await peer.do(F.SET_VRING_CALL, U64.vring(i), [ring.call.fileno()], need_reply=True)
        await peer.do(F.SET_VRING_KICK, U64.vring(i), [ring.kick.fileno()], need_reply=True)
    for ring in rings:
        await peer.do(F.SET_VRING_ENABLE, VringState(ring.index, 1), need_reply=True)
    await peer.do(F.SET_BACKEND_REQ_FD, fds=[theirs.fileno()], need_reply=True)
    theirs.close()

    await check_io(rings[0], 8)
    await check_io(rings[1], 16)
    # Requests with a reply of their own get that one reply, NEED_REPLY or not.
    assert await peer.get_u64(F.GET_FEATURES, need_reply=True) == offered
    for ring in rings:
        stopped = await peer.get(F.GET_VRING_BASE, VringState(ring.index, 0), need_reply=True)
        assert stopped == VringState(ring.index, 2)
    await peer.barrier()
    await peer.close()
    for ring in rings:
        ring.close()
    ours.close()
    guest.close()
    await connect.assert_no_fd_leak(before)


@pytest.mark.asyncio
async def test_crosvm_order(engine: BackendEngine, connect: Connector) -> None:
    """REPLY_ACK negotiated but NEED_REPLY never set (so no ack ever comes); stop with
    ENABLE(0), then GET_VRING_BASE."""
    before = await connect.open_fds(engine)
    guest = Guest()
    ring = Ring(guest)
    ours, theirs = socket.socketpair()
    peer = await connect.peer(engine)

    await peer.send(F.SET_OWNER)
    offered = await peer.get_u64(F.GET_FEATURES)
    offered_protocol = await peer.get_u64(F.GET_PROTOCOL_FEATURES)
    wanted = PF.MQ.mask | PF.REPLY_ACK.mask | PF.BACKEND_REQ.mask | PF.CONFIG.mask
    await peer.send(F.SET_PROTOCOL_FEATURES, U64(offered_protocol & wanted))
    await peer.send(F.SET_BACKEND_REQ_FD, fds=[theirs.fileno()])
    theirs.close()
    assert await peer.get_u64(F.GET_QUEUE_NUM) == 1
    acked = without_viommu(offered) & ~VirtioFeature.EVENT_IDX.mask & SPLIT_RINGS
    await peer.send(F.SET_FEATURES, U64(acked))
    await peer.send(F.SET_MEM_TABLE, guest.table, guest.fds)
    await peer.send(F.SET_VRING_NUM, VringState(0, ring.size))
    await peer.send(F.SET_VRING_ADDR, ring.addr)
    await peer.send(F.SET_VRING_BASE, VringState(0, 0))
    await peer.send(F.SET_VRING_CALL, U64.vring(0), [ring.call.fileno()])
    await peer.send(F.SET_VRING_KICK, U64.vring(0), [ring.kick.fileno()])
    await peer.send(F.SET_VRING_ENABLE, VringState(0, 1))
    await peer.barrier()  # no ack came for any of the above

    await check_io(ring)
    await peer.send(F.SET_VRING_ENABLE, VringState(0, 0))
    assert await peer.get(F.GET_VRING_BASE, VringState(0, 0)) == VringState(0, 2)
    await peer.barrier()
    await peer.close()
    ring.close()
    ours.close()
    guest.close()
    await connect.assert_no_fd_leak(before)


@pytest.mark.asyncio
async def test_dpdk_order(engine: BackendEngine, connect: Connector) -> None:
    """Only MQ, REPLY_ACK and STATUS; every CALL before SET_FEATURES; SET_MEM_TABLE with
    NEED_REPLY; NUM BASE ADDR KICK; ENABLE; status through SET/GET_STATUS; stop ENABLE(0),
    GET_VRING_BASE."""
    before = await connect.open_fds(engine)
    guest = Guest()
    ring = Ring(guest, event_idx=True)
    peer = await connect.peer(engine)

    offered = await peer.get_u64(F.GET_FEATURES)
    await peer.send(F.SET_OWNER)
    offered_protocol = await peer.get_u64(F.GET_PROTOCOL_FEATURES)
    wanted = PF.MQ.mask | PF.REPLY_ACK.mask | PF.STATUS.mask
    assert offered_protocol & wanted == wanted
    await peer.send(F.SET_PROTOCOL_FEATURES, U64(wanted))
    await peer.send(F.SET_VRING_CALL, U64.vring(0), [ring.call.fileno()])
    await peer.send(F.SET_FEATURES, U64(without_viommu(offered) & SPLIT_RINGS))
    await peer.do(F.SET_MEM_TABLE, guest.table, guest.fds, need_reply=True)
    await peer.send(F.SET_VRING_NUM, VringState(0, ring.size))
    await peer.send(F.SET_VRING_BASE, VringState(0, 0))
    await peer.send(F.SET_VRING_ADDR, ring.addr)
    await peer.send(F.SET_VRING_KICK, U64.vring(0), [ring.kick.fileno()])
    await peer.send(F.SET_VRING_ENABLE, VringState(0, 1))
    await peer.do(F.SET_STATUS, U64(RUNNING | DeviceStatus.DRIVER_OK), need_reply=True)
    assert await peer.get_u64(F.GET_STATUS) == RUNNING | DeviceStatus.DRIVER_OK

    await check_io(ring)
    await peer.send(F.SET_VRING_ENABLE, VringState(0, 0))
    assert await peer.get(F.GET_VRING_BASE, VringState(0, 0)) == VringState(0, 2)
    await peer.close()
    ring.close()
    guest.close()
    await connect.assert_no_fd_leak(before)


# --- REPLY_ACK (§10) ----------------------------------------------------------------------------


async def _acked_requests(
    peer: Peer, guest: Guest, ring: Ring, *, need_reply: bool, acked: bool
) -> None:
    """Every kind of request without a reply of its own, each sent with `need_reply`; `acked`:
    each must get its ack (and only one), otherwise none may come."""
    features = (
        without_viommu(peer.engine.offered_features()) & ~VirtioFeature.EVENT_IDX.mask & SPLIT_RINGS
    )
    requests: list[tuple[FrontendRequest, Payload, list[int]]] = [
        (F.SET_OWNER, EMPTY, []),
        (F.SET_FEATURES, U64(features), []),
        (F.SET_MEM_TABLE, guest.table, guest.fds),
        (F.SET_VRING_NUM, VringState(0, ring.size), []),
        (F.SET_VRING_BASE, VringState(0, 0), []),
        (F.SET_VRING_ADDR, ring.addr, []),
        (F.SET_VRING_CALL, U64.vring(0), [ring.call.fileno()]),
        (F.SET_VRING_ERR, U64.vring(0), [ring.err.fileno()]),
        (F.SET_VRING_KICK, U64.vring(0), [ring.kick.fileno()]),
        (F.SET_VRING_ENABLE, VringState(0, 1), []),
        (F.SET_STATUS, U64(RUNNING), []),
        (F.RESET_OWNER, EMPTY, []),  # deprecated: stops the ring, keeps everything else
        # Taken only by a stopped ring (test_bad_input, "ring-base-while-running"): acked, it
        # proves RESET_OWNER stopped the ring. Nothing was used yet: 0 is where it stopped.
        (F.SET_VRING_BASE, VringState(0, 0), []),
        (F.SET_VRING_KICK, U64.vring(0), [ring.kick.fileno()]),  # running again
    ]
    for request, payload, fds in requests:
        await peer.send(request, payload, fds, need_reply=need_reply)
        if acked:
            raw = await peer.raw_reply(request)  # flags exactly 0x5 and the request id
            assert raw.payload == bytes(8), f"{request.name}: {raw.payload.hex()}"
            await peer.barrier()  # exactly one reply


@pytest.mark.asyncio
async def test_reply_ack_is_one_u64_with_flags_0x5_and_the_request_id(
    engine: BackendEngine, connect: Connector
) -> None:
    guest, peer = Guest(), await connect.peer(engine)
    ring = Ring(guest)
    await peer.get_u64(F.GET_FEATURES)
    await peer.send(F.SET_PROTOCOL_FEATURES, U64(PF.REPLY_ACK.mask | PF.STATUS.mask))
    await _acked_requests(peer, guest, ring, need_reply=True, acked=True)
    await check_io(ring)
    await peer.close()
    ring.close()
    guest.close()


@pytest.mark.asyncio
async def test_no_ack_without_need_reply(engine: BackendEngine, connect: Connector) -> None:
    guest, peer = Guest(), await connect.peer(engine)
    ring = Ring(guest)
    await peer.get_u64(F.GET_FEATURES)
    await peer.send(F.SET_PROTOCOL_FEATURES, U64(PF.REPLY_ACK.mask | PF.STATUS.mask))
    await _acked_requests(peer, guest, ring, need_reply=False, acked=False)
    await peer.barrier()  # the first message to come back is this reply
    await check_io(ring)
    await peer.close()
    ring.close()
    guest.close()


@pytest.mark.asyncio
async def test_no_ack_when_reply_ack_is_not_negotiated(
    engine: BackendEngine, connect: Connector
) -> None:
    """NEED_REPLY without REPLY_ACK (never offered to this peer, or not acked) is ignored."""
    guest, peer = Guest(), await connect.peer(engine)
    ring = Ring(guest)
    await peer.send(F.SET_OWNER, need_reply=True)  # before any negotiation
    await peer.barrier()
    await peer.get_u64(F.GET_PROTOCOL_FEATURES)
    await peer.send(F.SET_PROTOCOL_FEATURES, U64(PF.MQ.mask | PF.STATUS.mask), need_reply=True)
    await _acked_requests(peer, guest, ring, need_reply=True, acked=False)
    await peer.barrier()
    await check_io(ring)
    await peer.close()
    ring.close()
    guest.close()


@pytest.mark.asyncio
async def test_requests_with_a_reply_get_exactly_one_with_need_reply(
    engine: BackendEngine, connect: Connector
) -> None:
    guest, peer = Guest(), await connect.peer(engine)
    ring = Ring(guest)
    await blk_session(peer, guest, ring)
    offered = connect.offered(engine)
    assert await peer.get_u64(F.GET_FEATURES, need_reply=True) == offered
    offered_protocol = await peer.get_u64(F.GET_PROTOCOL_FEATURES, need_reply=True)
    assert offered_protocol == connect.offered_protocol(engine)
    assert await peer.get_u64(F.GET_QUEUE_NUM, need_reply=True) == 1
    assert await peer.get_u64(F.GET_MAX_MEM_SLOTS, need_reply=True) == connect.max_mem_slots
    assert await peer.get_u64(F.GET_STATUS, need_reply=True) == 0
    config = await peer.get(F.GET_CONFIG, Config(0, 0, bytes(8)), need_reply=True)
    assert config == Config(0, 0, struct.pack("<Q", DISK // 512))
    assert await peer.get(F.GET_VRING_BASE, VringState(0, 0), need_reply=True) == VringState(0, 2)
    await peer.barrier()
    await peer.close()
    ring.close()
    guest.close()


@pytest.mark.asyncio
async def test_failing_request_with_need_reply_gets_a_failure_ack_and_the_session_goes_on(
    engine: BackendEngine, caplog: pytest.LogCaptureFixture, connect: Connector
) -> None:
    guest, peer = Guest(), await connect.peer(engine)
    ring = Ring(guest)
    await blk_session(peer, guest, ring)
    caplog.set_level(logging.INFO, logger="vvu")
    await peer.send(F.SET_VRING_NUM, VringState(0, 32), need_reply=True)  # resize while running
    assert await peer.ack(F.SET_VRING_NUM) == 1
    assert warning_lines(caplog) == [
        "SET_VRING_NUM failed: vring 0 is running; stop it before resizing"
    ]
    await peer.barrier()
    await check_io(ring)
    await peer.close()
    ring.close()
    guest.close()


# --- features -----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_protocol_features_apply_before_set_features(
    engine: BackendEngine, connect: Connector
) -> None:
    peer = await connect.peer(engine)
    offered_protocol = await peer.get_u64(F.GET_PROTOCOL_FEATURES)  # before even GET_FEATURES
    assert offered_protocol == connect.offered_protocol(engine)
    assert offered_protocol & (PF.MQ.mask | PF.REPLY_ACK.mask | PF.CONFIG.mask)
    await peer.send(F.SET_PROTOCOL_FEATURES, U64(PF.REPLY_ACK.mask | PF.STATUS.mask))
    # Both are in force at once, with no SET_FEATURES yet.
    await peer.do(F.SET_STATUS, U64(DeviceStatus.ACKNOWLEDGE), need_reply=True)
    assert await peer.get_u64(F.GET_STATUS) == DeviceStatus.ACKNOWLEDGE
    await peer.close()


@pytest.mark.asyncio
async def test_unoffered_feature_bits_are_refused(
    engine: BackendEngine, caplog: pytest.LogCaptureFixture, connect: Connector
) -> None:
    peer = await connect.peer(engine)
    offered = await peer.get_u64(F.GET_FEATURES)
    await peer.send(F.SET_PROTOCOL_FEATURES, U64(PF.REPLY_ACK.mask | PF.STATUS.mask))
    caplog.set_level(logging.INFO, logger="vvu")
    in_order = VirtioFeature.IN_ORDER.mask
    assert not offered & in_order
    await peer.send(F.SET_FEATURES, U64(offered | in_order), need_reply=True)
    assert await peer.ack(F.SET_FEATURES) == 1
    crypto = PF.CRYPTO_SESSION.mask
    assert not engine.offered_protocol_features() & crypto
    await peer.send(F.SET_PROTOCOL_FEATURES, U64(PF.REPLY_ACK.mask | crypto), need_reply=True)
    assert await peer.ack(F.SET_PROTOCOL_FEATURES) == 1
    assert len(warning_lines(caplog)) == 2
    assert "were never offered" in warning_lines(caplog)[0]
    # Nothing of the refused masks was taken: STATUS is still negotiated, features are not set.
    assert await peer.get_u64(F.GET_STATUS) == 0
    assert engine.session is not None and not engine.session.features_set
    await peer.do(F.SET_FEATURES, U64(without_viommu(offered)), need_reply=True)
    # Without NEED_REPLY, a refusal can only be a hang-up.
    await peer.send(F.SET_FEATURES, U64(without_viommu(offered) | in_order))
    await peer.expect_dropped()


@pytest.mark.asyncio
async def test_without_protocol_features_rings_are_enabled_at_set_features(
    engine: BackendEngine, connect: Connector
) -> None:
    guest, peer = Guest(), await connect.peer(engine)
    ring = Ring(guest)
    offered = await peer.get_u64(F.GET_FEATURES)
    await peer.send(F.SET_OWNER)
    acked = (
        without_viommu(offered) & ~PROTOCOL_FEATURES & ~VirtioFeature.EVENT_IDX.mask & SPLIT_RINGS
    )
    await peer.send(F.SET_FEATURES, U64(acked))
    await peer.send(F.SET_MEM_TABLE, guest.table, guest.fds)
    await peer.send(F.SET_VRING_NUM, VringState(0, ring.size))
    await peer.send(F.SET_VRING_BASE, VringState(0, 0))
    await peer.send(F.SET_VRING_ADDR, ring.addr)
    await peer.send(F.SET_VRING_CALL, U64.vring(0), [ring.call.fileno()])
    await peer.send(F.SET_VRING_KICK, U64.vring(0), [ring.kick.fileno()])  # no ENABLE at all
    await check_io(ring)
    await peer.close()
    ring.close()
    guest.close()


@pytest.mark.asyncio
async def test_with_protocol_features_rings_wait_for_enable(
    engine: BackendEngine, connect: Connector
) -> None:
    guest, peer = Guest(), await connect.peer(engine)
    ring = Ring(guest)
    await negotiate(peer, features=engine.offered_features() & ~VirtioFeature.EVENT_IDX.mask)
    await peer.do(F.SET_MEM_TABLE, guest.table, guest.fds, need_reply=True)
    await peer.do(F.SET_VRING_NUM, VringState(0, ring.size), need_reply=True)
    await peer.do(F.SET_VRING_BASE, VringState(0, 0), need_reply=True)
    await peer.do(F.SET_VRING_ADDR, ring.addr, need_reply=True)
    await peer.do(F.SET_VRING_CALL, U64.vring(0), [ring.call.fileno()], need_reply=True)
    await peer.do(F.SET_VRING_KICK, U64.vring(0), [ring.kick.fileno()], need_reply=True)

    # Started but disabled: a kicked request stays in the ring.
    request = blk_submit(ring, T_OUT, 8, out=os.urandom(512))
    done = ring.queue.completion(request.head)
    ring.queue.notify()
    await peer.barrier()
    assert engine.session is not None and engine.session.vrings[0].runner is None
    assert ring.used_idx == 0 and not done.done()
    await peer.do(F.SET_VRING_ENABLE, VringState(0, 1), need_reply=True)
    await asyncio.wait_for(done, TIMEOUT)
    assert blk_status(ring, request) == 0
    # Disabled again and re-enabled: processing resumes where it stopped.
    await peer.do(F.SET_VRING_ENABLE, VringState(0, 0), need_reply=True)
    assert engine.session.vrings[0].runner is None
    await peer.do(F.SET_VRING_ENABLE, VringState(0, 1), need_reply=True)
    await check_io(ring)
    assert await peer.get(F.GET_VRING_BASE, VringState(0, 0)) == VringState(0, 3)
    await peer.close()
    ring.close()
    guest.close()


# --- vring life cycle (§6) ----------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("device", ["blk", "rng"])
async def test_requests_already_in_the_ring_run_at_set_vring_kick_without_a_kick(
    device: str, connect: Connector
) -> None:
    backend = BlkBackend(size=DISK) if device == "blk" else RngBackend()
    engine = BackendEngine(backend)
    guest, peer = Guest(), await connect.peer(engine)
    ring = Ring(guest)
    await negotiate(peer, features=engine.offered_features() & ~VirtioFeature.EVENT_IDX.mask)
    await peer.do(F.SET_MEM_TABLE, guest.table, guest.fds, need_reply=True)
    await peer.do(F.SET_VRING_NUM, VringState(0, ring.size), need_reply=True)
    await peer.do(F.SET_VRING_ADDR, ring.addr, need_reply=True)
    await peer.do(F.SET_VRING_CALL, U64.vring(0), [ring.call.fileno()], need_reply=True)
    await peer.do(F.SET_VRING_ENABLE, VringState(0, 1), need_reply=True)
    done = []
    for i in range(3):
        if device == "blk":
            head = blk_submit(ring, T_OUT, 8 * i, out=bytes([i]) * 512).head
        else:
            head = ring.queue.submit([], [(ring.guest.alloc(32), 32)])
        done.append(ring.queue.completion(head))
    ring.driver.publish()  # and never kick
    await peer.do(F.SET_VRING_KICK, U64.vring(0), [ring.kick.fileno()], need_reply=True)
    used = await asyncio.wait_for(asyncio.gather(*done), TIMEOUT)
    assert used == ([1, 1, 1] if device == "blk" else [32, 32, 32])
    assert ring.kick.consume() == 0  # nobody kicked
    await peer.close()
    ring.close()
    guest.close()
    if isinstance(backend, BlkBackend):
        backend.close()


@pytest.mark.asyncio
async def test_a_completion_whose_call_died_with_the_last_back_end_reaches_the_driver(
    connect: Connector,
) -> None:
    """A back-end killed between publishing a used entry and signalling the call fd leaves the
    driver waiting for an interrupt nobody will send (a QEMU guest, for ever: test_inflight.py).
    The next back-end signals each ring's call once when the ring starts, as libvhost-user does."""
    backend = BlkBackend(size=DISK)
    engine = BackendEngine(backend)
    guest, peer = Guest(), await connect.peer(engine)
    ring = Ring(guest)
    request = blk_submit(ring, T_OUT, 0, out=b"\x5a" * 512)
    ring.driver.publish()
    done = ring.queue.completion(request.head)
    # The dead back-end: it completed the request and published it, then died before the call.
    dead = SplitQueue(ring.size, ring.desc, ring.avail, ring.used)
    dead.attach(guest.memory)
    (chain,) = dead.pop()
    chain.write(b"\x00", chain.writable_len - 1)
    dead.push_used(chain.head, 1)
    dead.publish_used()
    del chain, dead
    assert ring.call.consume() == 0
    # The restarted back-end, at the base QEMU gives when GET_VRING_BASE failed: the used index.
    await negotiate(peer, features=engine.offered_features() & ~VirtioFeature.EVENT_IDX.mask)
    await peer.do(F.SET_MEM_TABLE, guest.table, guest.fds, need_reply=True)
    await start_ring(peer, ring, need_reply=True, base=1)
    assert await asyncio.wait_for(done, TIMEOUT) == 1
    assert blk_status(ring, request) == 0
    assert await peer.get(F.GET_VRING_BASE, VringState(0, 0)) == VringState(0, 1)  # not redone
    await peer.close()
    ring.close()
    guest.close()
    backend.close()


@pytest.mark.asyncio
async def test_get_vring_base_stops_after_in_flight_requests_and_the_ring_resumes(
    engine: BackendEngine, connect: Connector
) -> None:
    """GET_VRING_BASE answers once every request the ring took is completed, with the next avail
    index (free-running, here across the 16-bit wrap); SET_VRING_BASE + KICK resume from it."""
    start = 0xFFF0
    guest, peer = Guest(4 * MiB), await connect.peer(engine)
    ring = Ring(guest, size=256, start=start)
    await negotiate(peer, features=engine.offered_features() & ~VirtioFeature.EVENT_IDX.mask)
    await peer.do(F.SET_MEM_TABLE, guest.table, guest.fds, need_reply=True)
    await start_ring(peer, ring, need_reply=True, base=start)

    blocks = [os.urandom(4096) for _ in range(64)]
    requests = [blk_submit(ring, T_OUT, 8 * i, out=block) for i, block in enumerate(blocks)]
    ring.queue.notify()  # kick, and stop at once
    stopped = await peer.get(F.GET_VRING_BASE, VringState(0, 0))
    assert isinstance(stopped, VringState) and stopped.index == 0
    taken = (stopped.num - start) & 0xFFFF
    assert 0 <= taken <= len(requests)
    assert stopped.num == ring.used_idx  # everything taken is completed and published
    assert all(blk_status(ring, r) == 0 for r in requests[:taken])
    assert all(blk_status(ring, r) == 0xFF for r in requests[taken:])
    await peer.barrier()
    assert ring.used_idx == stopped.num  # and nothing moved after the answer

    done = [ring.queue.completion(r.head) for r in requests]
    await peer.do(F.SET_VRING_BASE, VringState(0, stopped.num), need_reply=True)
    await peer.do(F.SET_VRING_KICK, U64.vring(0), [ring.kick.fileno()], need_reply=True)
    await asyncio.wait_for(asyncio.gather(*done), TIMEOUT)  # the rest, without another kick
    for i, block in enumerate(blocks):
        assert await blk_io(ring, T_IN, 8 * i, in_len=4096) == block
    final = await peer.get(F.GET_VRING_BASE, VringState(0, 0))
    assert final == VringState(0, (start + 2 * len(blocks)) & 0xFFFF)
    await peer.close()
    ring.close()
    guest.close()


@pytest.mark.asyncio
async def test_python_ring_stopped_right_after_it_started_stays_stopped(
    caplog: pytest.LogCaptureFixture, connect: Connector
) -> None:
    """SET_VRING_KICK and GET_VRING_BASE back to back, handled without the loop running in
    between: the Python path must not touch the ring after it reported the base."""
    engine = BackendEngine(RngBackend())
    guest, peer = Guest(), await connect.peer(engine)
    ring = Ring(guest)
    await negotiate(peer, features=engine.offered_features() & ~VirtioFeature.EVENT_IDX.mask)
    await peer.do(F.SET_MEM_TABLE, guest.table, guest.fds, need_reply=True)
    await peer.do(F.SET_VRING_NUM, VringState(0, ring.size), need_reply=True)
    await peer.do(F.SET_VRING_ADDR, ring.addr, need_reply=True)
    await peer.do(F.SET_VRING_ERR, U64.vring(0), [ring.err.fileno()], need_reply=True)
    await peer.do(F.SET_VRING_ENABLE, VringState(0, 1), need_reply=True)
    caplog.set_level(logging.INFO, logger="vvu")
    for _ in range(4):
        ring.queue.submit([], [(guest.alloc(16), 16)])
    ring.driver.publish()
    kick = Header(F.SET_VRING_KICK, VERSION, 8).pack() + U64.vring(0).pack()
    stop = Header(F.GET_VRING_BASE, VERSION, 8).pack() + VringState(0, 0).pack()
    await peer.channel.send(kick + stop, [ring.kick.fileno()])
    stopped = await peer.reply(F.GET_VRING_BASE)
    assert isinstance(stopped, VringState)
    await peer.barrier()  # the loop has run since
    assert ring.used_idx == stopped.num
    assert ring.err.consume() == 0 and warning_lines(caplog) == []
    await peer.close()
    ring.close()
    guest.close()


@pytest.mark.asyncio
async def test_call_fd_replaced_while_running_loses_no_completion(
    engine: BackendEngine, connect: Connector
) -> None:
    guest, peer = Guest(4 * MiB), await connect.peer(engine)
    ring = Ring(guest, size=256)
    await blk_session(peer, guest, ring, io=False)  # the front-end reaps by hand here
    call = ring.call  # from now on the front-end listens on the newest call fd only
    completed = 0
    for i in range(100):
        request = blk_submit(ring, T_OUT, i % 64, out=bytes([i]) * 512)
        ring.queue.notify()
        new = EventFd()
        await peer.send(F.SET_VRING_CALL, U64.vring(0), [new.fileno()])  # racing the completion
        if call is not ring.call:
            call.close()
        call = new
        while True:
            await wait_eventfd(call, TIMEOUT)
            reaped = ring.driver.reap_all()
            completed += len(reaped)
            if any(head == request.head for head, _ in reaped):
                break
    assert completed == 100
    await peer.barrier()
    call.close()
    await peer.close()
    ring.close()
    guest.close()


@pytest.mark.asyncio
async def test_set_mem_table_while_running_reattaches_the_rings(
    engine: BackendEngine, connect: Connector
) -> None:
    guest, peer = Guest(), await connect.peer(engine)
    ring = Ring(guest)
    await blk_session(peer, guest, ring)
    assert guest.engine_mappings() == connect.per_region
    hotplugged = GPA + 256 * MiB
    guest.add(hotplugged, MiB)
    await peer.do(F.SET_MEM_TABLE, guest.table, guest.fds, need_reply=True)
    await check_io(ring, 24, data=hotplugged + 0x1000)  # a buffer in the new region
    await check_io(ring, 32)
    # The old table is unmapped, the new one mapped.
    assert guest.engine_mappings() == 2 * connect.per_region
    await peer.close()
    assert guest.engine_mappings() == 0
    ring.close()
    guest.close()


@pytest.mark.asyncio
async def test_add_and_remove_memory_regions(
    engine: BackendEngine, caplog: pytest.LogCaptureFixture, connect: Connector
) -> None:
    before = await connect.open_fds(engine)
    guest, peer = Guest(), await connect.peer(engine)
    ring = Ring(guest)
    await negotiate(peer, features=engine.offered_features() & ~VirtioFeature.EVENT_IDX.mask)
    assert await peer.get_u64(F.GET_MAX_MEM_SLOTS) == connect.max_mem_slots
    [(region, fd, _)] = guest.regions
    await peer.do(F.ADD_MEM_REG, SingleRegion(region), [fd], need_reply=True)
    await start_ring(peer, ring, need_reply=True)
    await check_io(ring)

    extra_gpa = GPA + 256 * MiB
    extra, extra_fd = guest.add(extra_gpa, MiB)
    await peer.do(F.ADD_MEM_REG, SingleRegion(extra), [extra_fd], need_reply=True)
    await check_io(ring, 16, data=extra_gpa)
    assert guest.engine_mappings() == 2 * connect.per_region
    await peer.do(F.REM_MEM_REG, SingleRegion(extra), [extra_fd], need_reply=True)  # fd tolerated
    assert guest.engine_mappings() == connect.per_region
    await check_io(ring, 24)

    caplog.set_level(logging.INFO, logger="vvu")
    await peer.send(F.REM_MEM_REG, SingleRegion(extra), need_reply=True)  # gone already
    assert await peer.ack(F.REM_MEM_REG) == 1
    overlapping = MemoryRegion(GPA + MiB, MiB, UVA + extra_gpa, 0)
    await peer.send(F.ADD_MEM_REG, SingleRegion(overlapping), [extra_fd], need_reply=True)
    assert await peer.ack(F.ADD_MEM_REG) == 1
    assert len(warning_lines(caplog)) == 2
    await check_io(ring, 32)  # the refused changes left the ring running
    await peer.close()
    ring.close()
    guest.close()
    await connect.assert_no_fd_leak(before)


@pytest.mark.asyncio
async def test_reset_device_stops_everything_and_a_new_handshake_works(
    engine: BackendEngine, connect: Connector
) -> None:
    guest, peer = Guest(), await connect.peer(engine)
    ring = Ring(guest)
    await blk_session(peer, guest, ring)
    await peer.do(F.SET_STATUS, U64(RUNNING | DeviceStatus.DRIVER_OK), need_reply=True)
    await peer.do(F.RESET_DEVICE, need_reply=True)
    session = engine.session
    assert session is not None and session.owner
    assert all(v.runner is None and not v.enabled for v in session.vrings)
    assert not session.features_set
    assert await peer.get_u64(F.GET_STATUS) == 0
    # Protocol features survive (REPLY_ACK still works); the driver sets the device up again.
    ring.close()
    ring = Ring(guest)
    await peer.do(
        F.SET_FEATURES,
        U64(
            without_viommu(engine.offered_features()) & ~VirtioFeature.EVENT_IDX.mask & SPLIT_RINGS
        ),
        need_reply=True,
    )
    await peer.do(F.SET_MEM_TABLE, guest.table, guest.fds, need_reply=True)
    await start_ring(peer, ring, need_reply=True)
    await check_io(ring)
    await peer.close()
    ring.close()
    guest.close()


@pytest.mark.asyncio
async def test_status_config_and_queue_num(
    engine2: BackendEngine, caplog: pytest.LogCaptureFixture, connect: Connector
) -> None:
    peer = await connect.peer(engine2)
    await negotiate(peer)
    assert await peer.get_u64(F.GET_QUEUE_NUM) == 2
    assert await peer.get_u64(F.GET_STATUS) == 0
    for status in (DeviceStatus.ACKNOWLEDGE, RUNNING, RUNNING | DeviceStatus.DRIVER_OK, 0):
        await peer.do(F.SET_STATUS, U64(status), need_reply=True)
        assert await peer.get_u64(F.GET_STATUS) == status
    config = await peer.get(F.GET_CONFIG, Config(0, 0, bytes(60)))
    assert isinstance(config, Config) and config.size == 60
    capacity, _size_max, seg_max = struct.unpack_from("<QII", config.data)
    assert (capacity, seg_max) == (DISK // 512, 126)
    assert struct.unpack_from("<I", config.data, 20) == (512,)  # blk_size
    assert struct.unpack_from("<H", config.data, 34) == (2,)  # num_queues
    part = await peer.get(F.GET_CONFIG, Config(20, 0, bytes(4)))
    assert part == Config(20, 0, struct.pack("<I", 512))
    caplog.set_level(logging.INFO, logger="vvu")
    await peer.send(F.SET_CONFIG, Config(0, 0, bytes(8)), need_reply=True)  # capacity: read-only
    assert await peer.ack(F.SET_CONFIG) == 1
    await peer.send(F.SET_STATUS, U64(0x100), need_reply=True)  # not a status byte
    assert await peer.ack(F.SET_STATUS) == 1
    assert len(warning_lines(caplog)) == 2
    await peer.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("order", ["qemu-7.2", "qemu-8.1"])
async def test_set_status_0_resets_the_device_and_get_vring_base_still_answers(
    engine: BackendEngine, order: str, connect: Connector
) -> None:
    """SET_STATUS(0) resets the device (virtio 1.2, 2.1): the ring stops once the requests it
    took are completed, a request kicked after it is not taken, the device's own state (blk's
    cache mode) is back to its default. QEMU 7.2 stops vhost with SET_STATUS(0), then
    SET_VRING_ENABLE(0) and GET_VRING_BASE; 8.1 and later send SET_STATUS(0) last. Either way
    GET_VRING_BASE answers where the ring stopped, and BASE + KICK + ENABLE resume from there."""
    guest, peer = Guest(), await connect.peer(engine)
    ring = Ring(guest)
    await blk_session(peer, guest, ring)  # a write and a read: used index 2
    await peer.do(F.SET_STATUS, U64(RUNNING | DeviceStatus.DRIVER_OK), need_reply=True)
    await peer.do(F.SET_CONFIG, Config(32, 0, b"\0"), need_reply=True)  # write through
    assert await peer.get(F.GET_CONFIG, Config(32, 0, b"\0")) == Config(32, 0, b"\0")
    blocks = [os.urandom(4096) for _ in range(16)]
    requests = [blk_submit(ring, T_OUT, 8 * i, out=block) for i, block in enumerate(blocks)]
    ring.queue.notify()
    late: BlkRequest | None = None
    if order == "qemu-7.2":
        await peer.do(F.SET_STATUS, U64(0), need_reply=True)
        assert engine.session is not None and engine.session.vrings[0].runner is None
        late = blk_submit(ring, T_OUT, 200, out=os.urandom(512))
        ring.queue.notify()
        await peer.do(F.SET_VRING_ENABLE, VringState(0, 0), need_reply=True)
        stopped = await peer.get(F.GET_VRING_BASE, VringState(0, 0))
    else:
        await peer.do(F.SET_VRING_ENABLE, VringState(0, 0), need_reply=True)
        stopped = await peer.get(F.GET_VRING_BASE, VringState(0, 0))
        await peer.do(F.SET_STATUS, U64(0), need_reply=True)
    assert isinstance(stopped, VringState) and stopped.index == 0
    taken = stopped.num - 2
    assert 0 <= taken <= len(requests)
    assert stopped.num == ring.used_idx  # everything taken is completed and published
    assert all(blk_status(ring, r) == 0 for r in requests[:taken])
    assert all(blk_status(ring, r) == 0xFF for r in requests[taken:])
    if late is not None:
        assert blk_status(ring, late) == 0xFF  # kicked after the reset: not taken
    assert await peer.get_u64(F.GET_STATUS) == 0
    assert await peer.get(F.GET_CONFIG, Config(32, 0, b"\0")) == Config(32, 0, b"\1")

    # The driver starts the device again; the rest of the requests run from where it stopped.
    done = [ring.queue.completion(r.head) for r in requests[taken:]]
    if late is not None:
        done.append(ring.queue.completion(late.head))
    await peer.do(F.SET_STATUS, U64(RUNNING), need_reply=True)
    await peer.do(F.SET_VRING_BASE, VringState(0, stopped.num), need_reply=True)
    await peer.do(F.SET_VRING_KICK, U64.vring(0), [ring.kick.fileno()], need_reply=True)
    await peer.do(F.SET_VRING_ENABLE, VringState(0, 1), need_reply=True)
    await asyncio.wait_for(asyncio.gather(*done), TIMEOUT)
    for i, block in enumerate(blocks):
        assert await blk_io(ring, T_IN, 8 * i, in_len=4096) == block
    await peer.close()
    ring.close()
    guest.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("device", ["blk", "rng"])
async def test_a_broken_ring_sets_needs_reset_until_the_driver_resets(
    device: str, connect: Connector
) -> None:
    """A ring that breaks (a buffer outside guest memory) sets DEVICE_NEEDS_RESET in GET_STATUS,
    on the native (blk) and the Python (rng) path; writing the status does not clear it,
    stopping the ring does not either, SET_STATUS(0) does."""
    backend = BlkBackend(size=DISK) if device == "blk" else RngBackend()
    engine = BackendEngine(backend)
    guest, peer = Guest(), await connect.peer(engine)
    ring = Ring(guest)
    await negotiate(peer, features=engine.offered_features() & ~VirtioFeature.EVENT_IDX.mask)
    await peer.do(F.SET_MEM_TABLE, guest.table, guest.fds, need_reply=True)
    await start_ring(peer, ring, need_reply=True)
    ok = RUNNING | DeviceStatus.DRIVER_OK
    await peer.do(F.SET_STATUS, U64(ok), need_reply=True)
    assert await peer.get_u64(F.GET_STATUS) == ok
    ring.queue.submit([], [(GPA + 64 * MiB, 16)])
    ring.queue.notify()
    await wait_eventfd(ring.err, TIMEOUT)
    assert await peer.get_u64(F.GET_STATUS) == ok | DeviceStatus.NEEDS_RESET
    await peer.do(F.SET_STATUS, U64(ok), need_reply=True)
    await peer.get(F.GET_VRING_BASE, VringState(0, 0))
    assert await peer.get_u64(F.GET_STATUS) == ok | DeviceStatus.NEEDS_RESET
    await peer.do(F.SET_STATUS, U64(0), need_reply=True)
    assert await peer.get_u64(F.GET_STATUS) == 0
    await peer.close()
    ring.close()
    guest.close()
    if isinstance(backend, BlkBackend):
        backend.close()


@pytest.mark.asyncio
async def test_a_suspended_device_sends_nothing_until_a_ring_starts(connect: Connector) -> None:
    """vhost-user.rst, "Suspended device state": while every ring is stopped (before the first
    one starts, and once the last one stopped) the device sends no back-end message. A resize
    meanwhile is announced once, acked, when a ring starts."""
    backend = BlkBackend(size=DISK)
    engine = BackendEngine(backend)
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    loop = asyncio.get_running_loop()

    async def announced() -> None:
        header = await asyncio.wait_for(loop.sock_recv(ours, 12), TIMEOUT)
        assert struct.unpack("<III", header) == (2, 1 | NEED_REPLY, 0)  # CONFIG_CHANGE_MSG
        await loop.sock_sendall(ours, struct.pack("<IIIQ", 2, REPLY_FLAGS, 8, 0))

    def nothing_sent() -> None:
        with pytest.raises(BlockingIOError):
            ours.recv(12)

    guest, peer = Guest(), await connect.peer(engine)
    ring = Ring(guest)
    try:
        await negotiate(peer, features=engine.offered_features() & ~VirtioFeature.EVENT_IDX.mask)
        await peer.do(F.SET_BACKEND_REQ_FD, EMPTY, [theirs.fileno()], need_reply=True)
        theirs.close()
        await peer.do(F.SET_MEM_TABLE, guest.table, guest.fds, need_reply=True)
        for size in (2 * DISK, 3 * DISK):
            assert backend.resize(size) is True
            assert await asyncio.wait_for(engine.config_changed(), TIMEOUT) is False
        await peer.barrier()
        nothing_sent()
        await start_ring(peer, ring, need_reply=True)
        await announced()
        await check_io(ring)
        await peer.barrier()
        nothing_sent()  # once for both resizes
        # Stopped again: suspended; the next start announces the next change.
        stopped = await peer.get(F.GET_VRING_BASE, VringState(0, 0))
        assert isinstance(stopped, VringState)
        assert backend.resize(4 * DISK) is True
        assert await asyncio.wait_for(engine.config_changed(), TIMEOUT) is False
        await peer.barrier()
        nothing_sent()
        await peer.do(F.SET_VRING_BASE, VringState(0, stopped.num), need_reply=True)
        await peer.do(F.SET_VRING_KICK, U64.vring(0), [ring.kick.fileno()], need_reply=True)
        await announced()
        assert await peer.get(F.GET_CONFIG, Config(0, 0, bytes(8))) == Config(
            0, 0, struct.pack("<Q", 4 * DISK // 512)
        )
        await peer.close()
    finally:
        ours.close()
        ring.close()
        guest.close()
        backend.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("need_reply", [False, True], ids=["plain", "need-reply"])
async def test_failed_get_config_replies_with_size_0_and_the_session_goes_on(
    engine: BackendEngine, need_reply: bool, connect: Connector
) -> None:
    """vhost-user.rst, GET_CONFIG: "the back-end uses zero length of payload to indicate an
    error" -- a Config header with size 0 (as rust-vmm answers), never a dropped session."""
    peer = await connect.peer(engine)
    await negotiate(peer)
    beyond = Config(250, 0, bytes(8))  # 250 + 8 > the 256 bytes of a config space
    assert await peer.get(F.GET_CONFIG, beyond, need_reply=need_reply) == Config(250, 0, b"")
    await peer.barrier()
    assert await peer.get(F.GET_CONFIG, Config(0, 0, bytes(8))) == Config(
        0, 0, struct.pack("<Q", DISK // 512)
    )
    await peer.close()


@pytest.mark.asyncio
async def test_failed_get_inflight_fd_replies_with_mmap_size_0_and_no_fd(
    engine: BackendEngine, connect: Connector
) -> None:
    """QEMU's vhost_user_get_inflight_fd takes mmap_size 0 for "no buffer" (and looks for no
    fd): a region the back-end cannot give is answered that way, the session goes on."""
    peer = await connect.peer(engine)
    await negotiate(peer, protocol=QEMU_PROTOCOL | PF.INFLIGHT_SHMFD.mask)
    await peer.barrier()
    assert engine.session is not None
    assert engine.session.protocol_features & PF.INFLIGHT_SHMFD.mask
    too_many = engine.backend.num_queues + 1
    await peer.send(F.GET_INFLIGHT_FD, Inflight(0, 0, too_many, 128))
    raw = await peer.recv()
    assert raw is not None, "the engine hung up instead of answering GET_INFLIGHT_FD"
    assert raw.fds == [] and raw.request == F.GET_INFLIGHT_FD and raw.flags == REPLY_FLAGS
    header = Header(raw.request, raw.flags, len(raw.payload))
    reply = decode_message(header, raw.payload, is_reply=True).payload
    assert isinstance(reply, Inflight) and reply.mmap_size == 0
    await peer.barrier()
    await peer.close()


@pytest.mark.asyncio
async def test_set_config_honours_its_flags(engine: BackendEngine, connect: Connector) -> None:
    """vhost-user.rst, the config space payload's flags: 0 (VHOST_SET_CONFIG_TYPE_FRONTEND) for
    a driver's write of writable fields, 1 (..._MIGRATION) for live migration. A migration write
    carries the source's config space: bytes equal to ours are taken as they are, a differing
    one must be writable; any other flags value is refused and changes nothing."""
    peer = await connect.peer(engine)
    await negotiate(peer)  # with CONFIG_WCE: the cache mode (byte 32) is writable
    config = await peer.get(F.GET_CONFIG, Config(0, 0, bytes(60)))
    assert isinstance(config, Config) and config.data[32] == 1  # write back
    through = config.data[:32] + b"\0" + config.data[33:]
    await peer.send(F.SET_CONFIG, Config(0, 0, through), need_reply=True)
    assert await peer.ack(F.SET_CONFIG) == 1, "a driver write of read-only fields"
    for mode in (b"\0", b"\1"):  # a driver write of the cache mode alone: taken
        await peer.send(F.SET_CONFIG, Config(32, 0, mode), need_reply=True)
        assert await peer.ack(F.SET_CONFIG) == 0, "a driver write of the cache mode"
        assert (await peer.get(F.GET_CONFIG, Config(32, 0, b"\0"))) == Config(32, 0, mode)
    await peer.send(F.SET_CONFIG, Config(32, 2, b"\0"), need_reply=True)
    assert await peer.ack(F.SET_CONFIG) == 1, "flags 2 mean nothing"
    assert (await peer.get(F.GET_CONFIG, Config(32, 0, b"\0"))) == Config(32, 0, b"\1")
    await peer.send(F.SET_CONFIG, Config(0, 1, through), need_reply=True)
    assert await peer.ack(F.SET_CONFIG) == 0, "the source's config space, cache mode changed"
    assert (await peer.get(F.GET_CONFIG, Config(32, 0, b"\0"))) == Config(32, 0, b"\0")
    # Write back again, but the source had another number of queues (u16 at 34): refused,
    # and the cache mode written before the refusal is undone.
    other = bytearray(config.data)
    struct.pack_into("<H", other, 34, 4)
    await peer.send(F.SET_CONFIG, Config(0, 1, bytes(other)), need_reply=True)
    assert await peer.ack(F.SET_CONFIG) == 1, "the source had another number of queues"
    assert (await peer.get(F.GET_CONFIG, Config(32, 0, b"\0"))) == Config(32, 0, b"\0")
    await peer.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("device", ["blk", "rng"])
async def test_broken_ring_signals_the_current_err_fd_and_the_session_goes_on(
    device: str, caplog: pytest.LogCaptureFixture, connect: Connector
) -> None:
    """A ring whose driver hands out a buffer outside guest memory stops; the err fd that was
    set while it ran is signalled, one line is logged, and the other ring keeps working."""
    backend = BlkBackend(size=DISK, num_queues=2) if device == "blk" else RngBackend(num_queues=2)
    engine = BackendEngine(backend)
    before = await connect.open_fds(engine)
    guest, peer = Guest(), await connect.peer(engine)
    good, bad = Ring(guest, 0), Ring(guest, 1)
    await negotiate(peer, features=engine.offered_features() & ~VirtioFeature.EVENT_IDX.mask)
    await peer.do(F.SET_MEM_TABLE, guest.table, guest.fds, need_reply=True)
    await start_ring(peer, good, need_reply=True)
    await start_ring(peer, bad, need_reply=True)
    err = EventFd()
    await peer.do(F.SET_VRING_ERR, U64.vring(1), [err.fileno()], need_reply=True)
    caplog.set_level(logging.INFO, logger="vvu")

    bad.queue.submit([], [(GPA + 64 * MiB, 16)])
    bad.queue.notify()
    await wait_eventfd(err, TIMEOUT)
    assert bad.err.consume() == 0  # replaced: no longer signalled
    if device == "blk":
        await check_io(good)
    else:
        done = good.queue.completion(good.queue.submit([], [(guest.alloc(16), 16)]))
        good.queue.notify()
        assert await asyncio.wait_for(done, TIMEOUT) == 16
    stopped = await peer.get(F.GET_VRING_BASE, VringState(1, 0))
    assert isinstance(stopped, VringState) and stopped.index == 1
    await peer.barrier()
    lines = warning_lines(caplog)
    assert len(lines) == 1 and lines[0].startswith("queue 1 broken: "), lines
    assert "outside guest memory" in lines[0]
    await peer.close()
    err.close()
    good.close()
    bad.close()
    guest.close()
    await connect.assert_no_fd_leak(before)
    if isinstance(backend, BlkBackend):
        backend.close()


# --- bad input ----------------------------------------------------------------------------------


#: "drop": the engine hangs up; "nack": a failure ack to `request` and the session goes on;
#: "eof": we hang up ourselves; over VVU only: "accepted": a success ack to `request` and the
#: session goes on; "ignored": nothing reaches the engine and the session goes on.
#: "nack-drop": a failure ack, then a hang-up (a malformed request that asked for an ack).
Outcome = Literal["drop", "nack", "nack-drop", "eof", "accepted", "ignored"]


@dataclass(frozen=True)
class BadInput:
    name: str
    send: Callable[[Peer, Guest], Awaitable[None]]
    outcome: Outcome
    log: str  # in the one warning line; "" for none
    request: int = 0
    #: Over VVU, where the device changes what reaches the engine (docs/vvu-device.md): the
    #: outcome and one substring per warning line, in order; None: as over AF_UNIX.
    vvu: tuple[Outcome, tuple[str, ...]] | None = None
    #: Why the case runs over AF_UNIX only; "" when it runs over both.
    unix_only: str = ""
    #: A library bug that makes the case fail over VVU (strict xfail); "" for none.
    vvu_bug: str = ""


async def _send_bytes(peer: Peer, data: bytes, fds: Sequence[int] = ()) -> None:
    await peer.channel.send(data, fds)


async def _with_eventfd(peer: Peer, request: int, payload: Payload, need_reply: bool) -> None:
    efd = EventFd()
    try:
        await peer.send(request, payload, [efd.fileno()], need_reply=need_reply)
    finally:
        efd.close()


def _region(gpa: int, size: int) -> MemoryRegion:
    return MemoryRegion(gpa, size, UVA + gpa, 0)


async def _two_regions_one_fd(peer: Peer, guest: Guest) -> None:
    table = MemoryTable((*guest.table.regions, _region(GPA + 256 * MiB, MiB)))
    await peer.send(F.SET_MEM_TABLE, table, guest.fds, need_reply=True)


async def _one_slot_too_many(peer: Peer, guest: Guest) -> None:
    """ADD_MEM_REG until every slot is used (SET_MEM_TABLE filled one), then one more."""
    page = 4096
    for i in range(MAX_MEM_SLOTS):
        fd = memfd(page, "vvu-slot")
        try:
            region = _region(GPA + 512 * MiB + i * page, page)
            await peer.send(F.ADD_MEM_REG, SingleRegion(region), [fd], need_reply=True)
        finally:
            os.close(fd)
        if i < MAX_MEM_SLOTS - 1:
            assert await peer.ack(F.ADD_MEM_REG) == 0, f"slot {i + 2} refused"


async def _remove_by_gpa_alone(peer: Peer, guest: Guest) -> None:
    """REM_MEM_REG names the region by gpa, uva and size: the same gpa with another size (or
    another uva) is not that region, and the ring in it keeps running."""
    [region] = guest.table.regions
    other = MemoryRegion(region.guest_phys_addr, region.memory_size // 2, region.userspace_addr, 0)
    await peer.send(F.REM_MEM_REG, SingleRegion(other), need_reply=True)


async def _overlapping_regions(peer: Peer, guest: Guest) -> None:
    table = MemoryTable((*guest.table.regions, _region(GPA + MiB, MiB)))
    await peer.send(F.SET_MEM_TABLE, table, guest.fds * 2, need_reply=True)


async def _nine_regions(peer: Peer, guest: Guest) -> None:
    regions = b"".join(_region(GPA + i * MiB, MiB).pack() for i in range(9))
    fds = guest.fds * 9
    await peer.send(F.SET_MEM_TABLE, struct.pack("<II", 9, 0) + regions, fds, need_reply=True)


async def _region_beyond_its_fd(peer: Peer, guest: Guest) -> None:
    small = memfd(4096, "vvu-test-small")
    try:
        table = MemoryTable((_region(GPA, MiB),))
        await peer.send(F.SET_MEM_TABLE, table, [small], need_reply=True)
    finally:
        os.close(small)


async def _ring_outside_memory(peer: Peer, guest: Guest) -> None:
    far = UVA + GPA + 512 * MiB
    await peer.do(F.SET_VRING_NUM, VringState(1, 64), need_reply=True)
    await peer.do(
        F.SET_VRING_ADDR, VringAddr(1, 0, far, far + 0x1000, far + 0x2000, 0), need_reply=True
    )
    await peer.do(F.SET_VRING_ENABLE, VringState(1, 1), need_reply=True)
    await _with_eventfd(peer, F.SET_VRING_KICK, U64.vring(1), need_reply=True)


async def _backend_channel_not_a_socket(peer: Peer, guest: Guest) -> None:
    await _with_eventfd(peer, F.SET_BACKEND_REQ_FD, EMPTY, need_reply=True)


async def _hang_up_mid_message(peer: Peer, guest: Guest) -> None:
    data = Header(F.SET_MEM_TABLE, VERSION, 40).pack() + guest.table.pack()[:10]
    await peer.channel.send(data, guest.fds)


async def _hang_up_mid_handshake(peer: Peer, guest: Guest) -> None:
    await peer.send(F.SET_VRING_NUM, VringState(1, 64))
    await peer.send(F.SET_VRING_BASE, VringState(1, 0))


BAD_INPUT = [
    BadInput(
        "bad-version",
        lambda p, g: p.send(F.GET_FEATURES, flags=0x2),
        "drop",
        "unsupported version 2",
    ),
    BadInput(
        "unknown-flag-bits",
        lambda p, g: p.send(F.SET_OWNER, flags=VERSION | 0x10),
        "drop",
        "unknown flag bits 0x10",
    ),
    BadInput(
        "reply-flag-on-a-request",
        lambda p, g: p.send(F.SET_OWNER, flags=REPLY_FLAGS),
        "drop",
        "REPLY flag set on a request",
        # rxq carries front-end replies to back-end requests too: the driver routes a REPLY
        # message to the back-end channel, and without one drops it with a log line.
        vvu=("ignored", ("reply 3 without a back-end channel dropped",)),
    ),
    BadInput(
        "payload-size-wrong",
        lambda p, g: p.send(F.SET_FEATURES, bytes(4), need_reply=True),
        "nack-drop",
        "SET_FEATURES",
        F.SET_FEATURES,
    ),
    BadInput(
        "payload-too-large",
        lambda p, g: _send_bytes(p, Header(F.SET_MEM_TABLE, VERSION, 4097).pack() + bytes(4097)),
        "drop",
        "4096-byte cap",
    ),
    BadInput(
        "call-without-nofd-and-without-fd",
        lambda p, g: p.send(F.SET_VRING_CALL, U64.vring(0), need_reply=True),
        "nack-drop",
        "0 fds attached",
        F.SET_VRING_CALL,
        # The device forwards every CALL without fds and the driver synthesises one (doorbell
        # i's ioeventfd, or an eventfd of its own), so the engine sees a well-formed request
        # (and completions stop reaching our call fd until the next SET_VRING_CALL).
        vvu=("accepted", ()),
    ),
    BadInput(
        "call-with-nofd-and-an-fd",
        lambda p, g: _with_eventfd(p, F.SET_VRING_CALL, U64.vring(0, nofd=True), True),
        "nack-drop",
        "1 fds attached",
        F.SET_VRING_CALL,
        # The device takes the fd (as doorbell 0, NOFD notwithstanding) and forwards the message
        # without it; the driver synthesises the doorbell's fd: the engine sees a well-formed
        # request and signals the fd we closed, not our ring's.
        vvu=("accepted", ()),
    ),
    BadInput(
        "mem-table-fewer-fds",
        _two_regions_one_fd,
        "nack-drop",
        "1 fds attached, expected 2",
        F.SET_MEM_TABLE,
        # The device publishes no region and refuses the table itself (failure ack): the
        # driver never sees it.
        vvu=("nack", ("SET_MEM_TABLE: 1 fds for 2 regions",)),
    ),
    BadInput(
        "vring-index-out-of-range-acked",
        lambda p, g: _with_eventfd(p, F.SET_VRING_CALL, U64.vring(7), True),
        "nack",
        "vring index 7 out of range",
        F.SET_VRING_CALL,
    ),
    BadInput(
        "vring-index-out-of-range",
        lambda p, g: p.send(F.SET_VRING_NUM, VringState(2, 64)),
        "drop",
        "vring index 2 out of range",
    ),
    BadInput("overlapping-regions", _overlapping_regions, "nack", "overlaps", F.SET_MEM_TABLE),
    BadInput(
        "nine-regions",
        _nine_regions,
        "nack-drop",
        "at most 8",
        F.SET_MEM_TABLE,
        # The device cannot bind the table, says so, and forwards it as is: the engine refuses.
        vvu=("nack-drop", ("not bound: MemoryTable has 9 regions, at most 8", "at most 8")),
    ),
    BadInput(
        "region-beyond-its-fd",
        _region_beyond_its_fd,
        "nack",
        "file is",
        F.SET_MEM_TABLE,
        # The device cannot map it: it refuses the table itself (failure ack), so no
        # unpublished region reaches the driver (whose lookup could find another's memory).
        vvu=("nack", ("cannot be mapped",)),
    ),
    BadInput(
        "ring-outside-guest-memory",
        _ring_outside_memory,
        "nack",
        "outside guest memory",
        F.SET_VRING_KICK,
    ),
    BadInput(
        "ring-size-not-a-power-of-two",
        lambda p, g: p.send(F.SET_VRING_NUM, VringState(1, 100), need_reply=True),
        "nack",
        "size 100 is not a power of two",
        F.SET_VRING_NUM,
    ),
    BadInput(
        "ring-size-above-the-maximum",
        lambda p, g: p.send(F.SET_VRING_NUM, VringState(1, 65536), need_reply=True),
        "nack",
        "size 65536 is not in 1..",
        F.SET_VRING_NUM,
    ),
    BadInput(
        "split-ring-base-above-16-bits",
        lambda p, g: p.send(F.SET_VRING_BASE, VringState(1, 0x10000), need_reply=True),
        "nack",
        "does not fit 16 bits",
        F.SET_VRING_BASE,
    ),
    BadInput(
        "ring-base-while-running",
        lambda p, g: p.send(F.SET_VRING_BASE, VringState(0, 5), need_reply=True),
        "nack",
        "SET_VRING_BASE needs it stopped",
        F.SET_VRING_BASE,
    ),
    BadInput(
        "one-memory-slot-too-many",
        _one_slot_too_many,
        "nack",
        f"all {MAX_MEM_SLOTS} memory slots are in use",
        F.ADD_MEM_REG,
        unix_only="over VVU the device has fewer areas than the engine has slots (its own "
        "limit, GET_MAX_MEM_SLOTS): test_add_and_remove_memory_regions",
    ),
    BadInput(
        "remove-region-by-gpa-alone",
        _remove_by_gpa_alone,
        "nack",
        "no region at gpa",
        F.REM_MEM_REG,
    ),
    BadInput(
        "unknown-request-acked",
        lambda p, g: p.send(99, b"abc", need_reply=True),
        "nack",
        "unknown frontend request 99",
        99,
    ),
    BadInput(
        "unknown-request", lambda p, g: p.send(99, b"abc"), "drop", "unknown frontend request 99"
    ),
    BadInput(
        "backend-channel-not-a-socket",
        _backend_channel_not_a_socket,
        "nack",
        "not a socket",
        F.SET_BACKEND_REQ_FD,
        unix_only="the fd is the device's to check: over VVU the engine always gets a socketpair "
        "end the transport made (the device logs 'not bound' and forwards the message)",
    ),
    BadInput("hang-up-mid-message", _hang_up_mid_message, "eof", "peer closed mid-message"),
    BadInput("hang-up-mid-handshake", _hang_up_mid_handshake, "eof", ""),
]


def _bad_input_params() -> list[ParameterSet]:
    params = []
    for case in BAD_INPUT:
        for transport in TRANSPORTS:
            if transport != "unix" and case.unix_only:
                continue  # AF_UNIX only: see the case's `unix_only`
            bug = transport == "vvu" and case.vvu_bug
            marks = [pytest.mark.xfail(strict=True, reason=case.vvu_bug)] if bug else []
            params.append(pytest.param(transport, case, id=f"{transport}-{case.name}", marks=marks))
    return params


@pytest.mark.asyncio
@pytest.mark.parametrize(("transport", "case"), _bad_input_params(), indirect=["transport"])
async def test_bad_input(
    engine2: BackendEngine,
    caplog: pytest.LogCaptureFixture,
    transport: str,
    case: BadInput,
    connect: Connector,
) -> None:
    """One clear warning (over VVU: the device's or transport's line, if any, then the
    engine's); a failure ack (and the session goes on), a hang-up, or both (a malformed request
    that asked for an ack: REPLY_ACK's back-end "MUST respond"); every fd and mapping
    released; and the same engine then serves a fresh front-end."""
    outcome: Outcome = case.outcome
    logs: tuple[str, ...] = (case.log,) if case.log else ()
    if connect.vvu and case.vvu is not None:
        outcome, logs = case.vvu
    before = await connect.open_fds(engine2)
    guest, peer = Guest(), await connect.peer(engine2)
    ring = Ring(guest)
    await blk_session(peer, guest, ring)
    caplog.set_level(logging.INFO, logger="vvu")
    caplog.clear()

    await case.send(peer, guest)
    if outcome in ("nack", "nack-drop", "accepted"):
        assert await peer.ack(case.request) == (0 if outcome == "accepted" else 1)
    if outcome == "accepted":  # it replaced ring 0's call fd (all such cases): ours back
        await peer.do(F.SET_VRING_CALL, U64.vring(0), [ring.call.fileno()], need_reply=True)
    if outcome in ("nack", "accepted", "ignored"):
        await peer.barrier()
        await check_io(ring)
        await peer.close()
    elif outcome in ("drop", "nack-drop"):
        await peer.expect_dropped()
    else:
        await peer.close()

    lines = warning_lines(caplog)
    assert len(lines) == len(logs), lines
    for line, text in zip(lines, logs, strict=True):
        assert text in line, lines
    if not logs:
        assert any("disconnected; session released" in r.getMessage() for r in caplog.records)
    assert engine2.session is None
    assert guest.engine_mappings() == 0
    ring.close()
    guest.close()
    await connect.assert_no_fd_leak(before)

    await fresh_blk_frontend(connect, engine2)
    assert engine2.sessions_served == 2
    await connect.assert_no_fd_leak(before)


# --- serving front-ends one after another -------------------------------------------------------


class _Released(logging.Handler):
    """Sets an event whenever the engine logs that a session was released."""

    def __init__(self) -> None:
        super().__init__()
        self.event = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "session released" in record.getMessage():
            self.event.set()

    async def wait(self) -> None:
        await asyncio.wait_for(self.event.wait(), TIMEOUT)
        self.event.clear()


@pytest.mark.asyncio
# AF_UNIX only: it is about `serve_forever` on a UnixListener itself and counts this process's
# fds across it; a VvuListener's sessions one after another are test_vvu_reconnect.py's.
async def test_serve_forever_on_a_unix_listener(
    engine: BackendEngine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A front-end that hangs up mid-handshake, then one that does I/O with BlkDriver, then one
    still connected when the server is cancelled (SIGTERM): each session is released whole."""
    before = open_fds()
    path = str(tmp_path / "blk.sock")
    released = _Released()
    caplog.set_level(logging.INFO, logger="vvu")
    logging.getLogger("vvu.engine").addHandler(released)
    listener = UnixListener(path)
    server = asyncio.ensure_future(engine.serve_forever(listener))
    try:
        guest = Guest()
        channel = await connect_unix(path, timeout=TIMEOUT)
        await channel.send(Header(F.SET_OWNER, VERSION, 0).pack())
        await channel.send(
            Header(F.SET_MEM_TABLE, VERSION, 40).pack() + guest.table.pack(), guest.fds
        )
        channel.close()
        await released.wait()
        assert guest.engine_mappings() == 0
        guest.close()

        blk = await BlkDriver.open(path, depth=4, max_request=64 * 1024, queue_size=64)
        async with blk:
            data = os.urandom(8192)
            await asyncio.wait_for(blk.write(0, data), TIMEOUT)
            assert await asyncio.wait_for(blk.read(0, 8192), TIMEOUT) == data
            assert await asyncio.wait_for(blk.get_id(), TIMEOUT) == b"vvu"
        await released.wait()

        blk = await BlkDriver.open(path, depth=4, max_request=64 * 1024, queue_size=64)
        await asyncio.wait_for(blk.write(0, data), TIMEOUT)
        server.cancel()
        with pytest.raises(asyncio.CancelledError):
            await server
        assert engine.session is None and engine.sessions_served == 3
        await blk.close()
        del blk  # our guest memory
    finally:
        server.cancel()
        listener.close()
        logging.getLogger("vvu.engine").removeHandler(released)
    assert_no_fd_leak(before)


# --- the Python handler path --------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
async def test_rng_returns_random_bytes_of_the_requested_size(
    connect: Connector, packed: bool
) -> None:
    backend = RngBackend()
    engine = BackendEngine(backend)
    before = await connect.open_fds(engine)
    client, task = await connect.channel(engine)
    frontend = Frontend(client, memory_size=MiB, packed=packed)
    try:
        await frontend.negotiate()
        assert bool(backend.acked_features & VirtioFeature.RING_PACKED.mask) == packed
        await frontend.set_mem_table()
        # A packed ring of a size that is not a power of two.
        rng = RngDriver(frontend, await frontend.start_queue(0, 50 if packed else 64))
        seen = set()
        for size in (1, 16, 64, 1000, 4096):
            data = await asyncio.wait_for(rng.read(size), TIMEOUT)
            assert len(data) == size
            seen.add(data)
        assert len(seen) == 5
        big = await asyncio.wait_for(rng.read(4096), TIMEOUT)
        assert len(set(big)) > 200  # 4096 random bytes hit nearly every byte value
    finally:
        await frontend.close()
    await asyncio.wait_for(task, TIMEOUT)
    del rng, frontend  # our guest memory
    await connect.assert_no_fd_leak(before)


@pytest.mark.asyncio
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
async def test_blk_driver_round_trips_and_get_vring_base_reports_the_position(
    engine: BackendEngine, connect: Connector, packed: bool
) -> None:
    """Our BlkDriver against the native blk worker, on either ring format: data round-trips,
    and GET_VRING_BASE reports where the ring stands (packed: both positions and wraps)."""
    client, task = await connect.channel(engine)
    frontend = Frontend(client, memory_size=4 * MiB, packed=packed)
    try:
        await frontend.negotiate()
        await frontend.set_mem_table()
        (capacity,) = struct.unpack("<Q", await frontend.get_config(0, 8))
        size = 24 if packed else 32  # requests take 3 slots: the packed ring wraps unevenly
        queue = await frontend.start_queue(0, size)
        blk = BlkDriver(frontend, queue, capacity, depth=4, max_request=64 * 1024)
        requests = 0
        for i in range(40):  # 40 writes and 40 reads: 240 slots, 10 laps of 24
            data = os.urandom(4096 + 512 * (i % 3))
            await asyncio.wait_for(blk.write(8 * i, data), TIMEOUT)
            assert await asyncio.wait_for(blk.read(8 * i, len(data)), TIMEOUT) == data
            requests += 2
        base = await frontend.stop_queue(0)
        if packed:
            # 3 slots per request: 240 slots on a ring of 24 = exactly 10 laps, wrap back to 1.
            slots = 3 * requests
            pos = (slots % size) | (0x8000 if (slots // size) % 2 == 0 else 0)
            assert base == pos | pos << 16
        else:
            assert base == requests
    finally:
        await frontend.close()
    await asyncio.wait_for(task, TIMEOUT)


@pytest.mark.asyncio
async def test_packed_vring_base_forms_and_a_base_beyond_the_ring(
    engine: BackendEngine, connect: Connector
) -> None:
    """Packed SET_VRING_BASE: the full 32-bit form is applied as is, a value with only the low
    half (DPDK virtio-user) means used = avail, and an offset beyond the ring refuses the start
    (a failure ack for the request that would start it) without ending the session."""
    client, task = await connect.channel(engine)
    frontend = Frontend(client, memory_size=2 * MiB, packed=True)
    try:
        await frontend.negotiate()
        await frontend.set_mem_table()
        size = 24
        desc = frontend.allocator.alloc(16 * size, 4096)
        events = frontend.allocator.alloc(8, 64)
        addr = VringAddr(0, 0, UVA_BASE + desc, UVA_BASE + events + 4, UVA_BASE + events, 0)
        kick, call = EventFd(), EventFd()

        async def start(base: int) -> None:
            await frontend.request(F.SET_VRING_NUM, VringState(0, size))
            await frontend.request(F.SET_VRING_BASE, VringState(0, base))
            await frontend.request(F.SET_VRING_ADDR, addr)
            await frontend.request(F.SET_VRING_KICK, U64.vring(0), [kick.fileno()])
            await frontend.request(F.SET_VRING_CALL, U64.vring(0), [call.fileno()])
            await frontend.request(F.SET_VRING_ENABLE, VringState(0, 1))

        async def stop() -> int:
            reply = await frontend.request(F.GET_VRING_BASE, VringState(0, 0))
            assert isinstance(reply, VringState)
            return reply.num

        await start(0x0005_8003)  # avail (3, wrap 1), used (5, wrap 0)
        assert await stop() == 0x0005_8003
        await start(0x0007)  # only the low half: avail = used = (7, wrap 0)
        assert await stop() == 0x0007_0007
        # Avail offset 24 on a 24-entry ring. The ring stayed enabled, so the kick starts it.
        with pytest.raises(FrontendError, match="refused SET_VRING_KICK"):
            await start(0x8000_8000 | size)
        await start(0x8000_8000)  # the session goes on
        assert await stop() == 0x8000_8000
        kick.close()
        call.close()
    finally:
        await frontend.close()
    await asyncio.wait_for(task, TIMEOUT)


@pytest.mark.asyncio
async def test_rng_polls_a_ring_without_kick_fd(connect: Connector) -> None:
    """NOFD kick: nobody kicks, the Python path polls."""
    engine = BackendEngine(RngBackend())
    guest, peer = Guest(), await connect.peer(engine)
    ring = Ring(guest)
    await negotiate(peer, features=engine.offered_features() & ~VirtioFeature.EVENT_IDX.mask)
    await peer.do(F.SET_MEM_TABLE, guest.table, guest.fds, need_reply=True)
    await peer.do(F.SET_VRING_NUM, VringState(0, ring.size), need_reply=True)
    await peer.do(F.SET_VRING_ADDR, ring.addr, need_reply=True)
    await peer.do(F.SET_VRING_CALL, U64.vring(0), [ring.call.fileno()], need_reply=True)
    await peer.do(F.SET_VRING_KICK, U64.vring(0, nofd=True), need_reply=True)
    await peer.do(F.SET_VRING_ENABLE, VringState(0, 1), need_reply=True)
    for _ in range(3):
        buffer = guest.alloc(128)
        done = ring.queue.completion(ring.queue.submit([], [(buffer, 128)]))
        ring.driver.publish()
        assert await asyncio.wait_for(done, TIMEOUT) == 128
    assert await peer.get(F.GET_VRING_BASE, VringState(0, 0)) == VringState(0, 3)
    await peer.close()
    ring.close()
    guest.close()


@pytest.mark.asyncio
async def test_blk_native_worker_polls_a_ring_without_kick_fd(connect: Connector) -> None:
    """NOFD kick on a native worker: the Rust thread polls the ring; nothing is ever kicked."""
    engine = BackendEngine(BlkBackend(size=8 << 20))
    guest, peer = Guest(), await connect.peer(engine)
    ring = Ring(guest, event_idx=True)  # EVENT_IDX is negotiated below
    await negotiate(peer)
    await peer.do(F.SET_MEM_TABLE, guest.table, guest.fds, need_reply=True)
    await peer.do(F.SET_VRING_NUM, VringState(0, ring.size), need_reply=True)
    await peer.do(F.SET_VRING_ADDR, ring.addr, need_reply=True)
    await peer.do(F.SET_VRING_CALL, U64.vring(0), [ring.call.fileno()], need_reply=True)
    await peer.do(F.SET_VRING_KICK, U64.vring(0, nofd=True), need_reply=True)
    await peer.do(F.SET_VRING_ENABLE, VringState(0, 1), need_reply=True)
    await check_io(ring)
    assert await peer.get(F.GET_VRING_BASE, VringState(0, 0)) == VringState(0, 2)
    await peer.close()
    ring.close()
    guest.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("reply_ack", [False, True], ids=["no-reply-ack", "reply-ack"])
async def test_config_change_is_announced_on_the_backend_channel(
    connect: Connector, reply_ack: bool
) -> None:
    """Over VVU the message goes back-end → relay → txq → device → the socket the front-end
    gave with SET_BACKEND_REQ_FD, and its ack comes back device → rxq → relay → engine."""
    backend = BlkBackend(size=8 << 20)
    engine = BackendEngine(backend)
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        client, task = await connect.channel(engine)
        frontend = Frontend(client, memory_size=MiB)
        assert await engine.notify_config_change() is False  # no back-end channel yet
        wanted = WANTED_PROTOCOL_FEATURES | ProtocolFeature.BACKEND_REQ.mask
        if not reply_ack:
            wanted &= ~ProtocolFeature.REPLY_ACK.mask
        await frontend.negotiate(protocol_features=wanted)
        await frontend.request(F.SET_BACKEND_REQ_FD, EMPTY, [theirs.fileno()])
        theirs.close()
        # A started ring (no memory, so nothing runs): the device is not suspended.
        await frontend.request(F.SET_VRING_KICK, U64.vring(0, nofd=True))
        await frontend.request_u64(F.GET_FEATURES)  # a barrier: both were handled
        if not reply_ack:
            assert await engine.notify_config_change() is True
            header = await asyncio.wait_for(loop.sock_recv(ours, 12), TIMEOUT)
            assert struct.unpack("<III", header) == (2, 1, 0)  # CONFIG_CHANGE_MSG, no NEED_REPLY
        else:
            # NEED_REPLY is set and the engine waits for the ack: a success ack...
            notified = asyncio.ensure_future(engine.notify_config_change())
            header = await asyncio.wait_for(loop.sock_recv(ours, 12), TIMEOUT)
            assert struct.unpack("<III", header) == (2, 1 | NEED_REPLY, 0)
            await loop.sock_sendall(ours, struct.pack("<IIIQ", 2, REPLY_FLAGS, 8, 0))
            assert await asyncio.wait_for(notified, TIMEOUT) is True
            # ... and a failure ack is an error for the caller; the channel stays usable.
            notified = asyncio.ensure_future(engine.notify_config_change())
            await asyncio.wait_for(loop.sock_recv(ours, 12), TIMEOUT)
            await loop.sock_sendall(ours, struct.pack("<IIIQ", 2, REPLY_FLAGS, 8, 1))
            with pytest.raises(RequestFailed, match="refused BACKEND_CONFIG_CHANGE_MSG"):
                await asyncio.wait_for(notified, TIMEOUT)
        await frontend.close()
        await asyncio.wait_for(task, TIMEOUT)
    finally:
        ours.close()
        backend.close()


@pytest.mark.asyncio
async def test_backend_request_without_an_answer_drops_the_backend_channel(
    engine: BackendEngine,
) -> None:
    """Silence (timeout) or giving up (cancellation) leaves the channel out of step, as a late
    ack would be taken for the next request's: it is dropped; a new one works again."""
    client, server = socketpair_channels()
    task = asyncio.ensure_future(engine.serve(server))
    frontend = Frontend(client, memory_size=MiB)
    loop = asyncio.get_running_loop()
    await frontend.negotiate(
        protocol_features=WANTED_PROTOCOL_FEATURES | ProtocolFeature.BACKEND_REQ.mask
    )
    # A started ring (no memory, so nothing runs): the device is not suspended.
    await frontend.request(F.SET_VRING_KICK, U64.vring(0, nofd=True))
    for give_up in ("timeout", "cancel"):
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        try:
            await frontend.request(F.SET_BACKEND_REQ_FD, EMPTY, [theirs.fileno()])
            theirs.close()
            if give_up == "timeout":
                with pytest.raises(RequestFailed, match="no answer"):
                    await engine.backend_request(
                        BackendRequest.BACKEND_CONFIG_CHANGE_MSG, timeout=0.2
                    )
            else:
                notified = asyncio.ensure_future(engine.notify_config_change())
                await asyncio.wait_for(loop.sock_recv(ours, 12), TIMEOUT)
                notified.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await notified
            assert await engine.notify_config_change() is False  # no channel any more
        finally:
            ours.close()
    await frontend.close()
    await asyncio.wait_for(task, TIMEOUT)


@pytest.mark.asyncio
async def test_blk_resize_while_running_reaches_our_frontend(connect: Connector) -> None:
    """BlkBackend.resize + BackendEngine.config_changed: our front-end gets CONFIG_CHANGE_MSG on
    its back-end channel (acked), re-reads the capacity, and I/O beyond the old end works (the
    running native worker was restarted with the new capacity)."""
    backend = BlkBackend(size=DISK)
    engine = BackendEngine(backend)
    try:
        client, task = await connect.channel(engine)
        blk = await BlkDriver.start(
            Frontend(client, memory_size=2 * MiB),
            depth=4,
            max_request=64 * 1024,
            queue_size=64,
            backend_channel=True,
        )
        assert blk.capacity == DISK // 512
        beyond = DISK // 512 + 8
        with pytest.raises(BlkIOError):
            await asyncio.wait_for(blk.read(beyond, 4096), TIMEOUT)
        data = os.urandom(4096)
        await asyncio.wait_for(blk.write(8, data), TIMEOUT)

        assert backend.resize(2 * DISK) is True
        assert backend.resize(2 * DISK) is False  # nothing changed: nothing to announce
        assert await asyncio.wait_for(engine.config_changed(), TIMEOUT) is True
        await asyncio.wait_for(blk.resized.wait(), TIMEOUT)
        assert blk.capacity == 2 * DISK // 512
        assert blk.frontend.backend_requests == {BackendRequest.BACKEND_CONFIG_CHANGE_MSG: 1}
        await asyncio.wait_for(blk.write(beyond, data), TIMEOUT)
        assert await asyncio.wait_for(blk.read(beyond, 4096), TIMEOUT) == data
        assert await asyncio.wait_for(blk.read(8, 4096), TIMEOUT) == data  # kept across it
        await blk.close()
        await asyncio.wait_for(task, TIMEOUT)
        assert await engine.config_changed() is False  # no session
    finally:
        backend.close()


@pytest.mark.asyncio
async def test_a_ring_restart_racing_with_the_frontend_leaving_ends_cleanly(
    connect: Connector,
) -> None:
    """restart_rings (a daemon's set-read-only) while the front-end hangs up: whatever the
    interleaving, the restart neither fails nor starts a runner on the torn-down session, and
    the next front-end is served."""
    backend = BlkBackend(size=DISK)
    engine = BackendEngine(backend)
    try:
        for yields in range(6):  # let the restart get that far before the front-end leaves
            client, task = await connect.channel(engine)
            blk = await BlkDriver.start(
                Frontend(client, memory_size=2 * MiB), depth=4, max_request=4096, queue_size=16
            )
            await asyncio.wait_for(blk.write(0, bytes(4096)), TIMEOUT)
            session = engine.session
            assert session is not None
            restart = asyncio.create_task(engine.restart_rings())
            for _ in range(yields):
                await asyncio.sleep(0)
            await blk.close()
            await asyncio.wait_for(task, TIMEOUT)
            await asyncio.wait_for(restart, TIMEOUT)  # no AssertionError on a gone session
            assert engine.session is None
            assert [v.index for v in session.vrings if v.runner is not None] == [], yields
        client, task = await connect.channel(engine)
        blk = await BlkDriver.start(
            Frontend(client, memory_size=2 * MiB), depth=4, max_request=4096, queue_size=16
        )
        data = os.urandom(4096)
        await asyncio.wait_for(blk.write(8, data), TIMEOUT)
        assert await asyncio.wait_for(blk.read(8, 4096), TIMEOUT) == data
        await blk.close()
        await asyncio.wait_for(task, TIMEOUT)
    finally:
        backend.close()


def test_blk_resize_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(DISK))
    read_only = BlkBackend(str(image), read_only=True)
    try:
        with pytest.raises(ValueError, match="read-only"):
            read_only.resize(2 * DISK)
        with open(image, "r+b") as f:
            f.truncate(3 * DISK)
        assert read_only.reload() is True  # re-reading the image is fine when read-only
        assert read_only.capacity == 3 * DISK // 512
        with open(image, "r+b") as f:
            f.truncate(100)
        with pytest.raises(ValueError, match="less than one sector"):
            read_only.reload()
        assert read_only.capacity == 3 * DISK // 512
    finally:
        read_only.close()
    backend = BlkBackend(size=DISK)
    try:
        with pytest.raises(ValueError, match="one 512-byte sector"):
            backend.resize(511)
        assert backend.capacity == DISK // 512
    finally:
        backend.close()


# --- in-band notifications (INBAND_NOTIFICATIONS) -----------------------------------------------

INBAND = PF.INBAND_NOTIFICATIONS.mask | PF.BACKEND_REQ.mask | PF.REPLY_ACK.mask


@pytest.mark.asyncio
async def test_blk_and_rng_data_with_inband_notifications(connect: Connector) -> None:
    """Our front-end with `inband`: no kick or call fd crosses; every kick is a VRING_KICK
    message and every call a BACKEND_VRING_CALL on the back-end channel, for the native blk
    worker and the Python rng path alike. Over VVU they travel through rxq and txq."""
    blk_backend = BlkBackend(size=DISK)
    engine = BackendEngine(blk_backend)
    try:
        client, task = await connect.channel(engine)
        blk = await BlkDriver.start(
            Frontend(client, memory_size=2 * MiB),
            depth=4,
            max_request=64 * 1024,
            queue_size=64,
            inband=True,
        )
        assert blk.frontend.inband
        session = engine.session
        assert session is not None and session.vrings[0].inband_call is not None
        blocks = [os.urandom(8192) for _ in range(8)]
        writes = [blk.write(16 * i, block) for i, block in enumerate(blocks)]
        await asyncio.wait_for(asyncio.gather(*writes), TIMEOUT)
        reads = [blk.read(16 * i, 8192) for i in range(len(blocks))]
        assert await asyncio.wait_for(asyncio.gather(*reads), TIMEOUT) == blocks
        assert blk.frontend.backend_requests[BackendRequest.BACKEND_VRING_CALL] >= 1
        await blk.close()
        await asyncio.wait_for(task, TIMEOUT)
    finally:
        blk_backend.close()

    engine = BackendEngine(RngBackend())
    client, task = await connect.channel(engine)
    frontend = Frontend(client, memory_size=MiB)
    try:
        await frontend.negotiate(inband=True)
        assert frontend.inband
        await frontend.set_mem_table()
        rng = RngDriver(frontend, await frontend.start_queue(0, 64))
        sizes = [1, 64, 4096, 100]
        got = [len(await asyncio.wait_for(rng.read(size), TIMEOUT)) for size in sizes]
        assert got == sizes
        assert frontend.backend_requests[BackendRequest.BACKEND_VRING_CALL] >= len(sizes)
    finally:
        await frontend.close()
    await asyncio.wait_for(task, TIMEOUT)


@pytest.mark.asyncio
async def test_inband_vring_kick_starts_a_ring_and_calls_arrive_as_messages(
    engine: BackendEngine, connect: Connector
) -> None:
    """Raw: no SET_VRING_KICK at all; VRING_KICK starts the ring and processes what is in it;
    the completion is announced by BACKEND_VRING_CALL (index 0) on the back-end socket, and a
    broken ring by BACKEND_VRING_ERR."""
    guest, peer = Guest(), await connect.peer(engine)
    ring = Ring(guest)
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await negotiate(peer, protocol=QEMU_PROTOCOL | INBAND, features=ring_features(engine))
        await peer.do(F.SET_BACKEND_REQ_FD, EMPTY, [theirs.fileno()], need_reply=True)
        await peer.do(F.SET_MEM_TABLE, guest.table, guest.fds, need_reply=True)
        await peer.do(F.SET_VRING_NUM, VringState(0, ring.size), need_reply=True)
        await peer.do(F.SET_VRING_ADDR, ring.addr, need_reply=True)
        await peer.do(F.SET_VRING_CALL, U64.vring(0, nofd=True), need_reply=True)
        await peer.do(F.SET_VRING_ERR, U64.vring(0, nofd=True), need_reply=True)
        await peer.do(F.SET_VRING_ENABLE, VringState(0, 1), need_reply=True)
        request = blk_submit(ring, T_OUT, 8, out=os.urandom(512))
        ring.driver.publish()
        await peer.do(F.VRING_KICK, VringState(0, 0), need_reply=True)
        # With NEED_REPLY (0x8): INBAND implies REPLY_ACK, which "needs to be used with the
        # in-band notification messages to block until they are processed" (vhost-user.rst).
        message = await asyncio.wait_for(loop.sock_recv(ours, 20), TIMEOUT)
        assert struct.unpack("<IIIII", message) == (4, 1 | 8, 8, 0, 0)  # VRING_CALL, vring 0
        await loop.sock_sendall(ours, encode_ack(4, ok=True, channel="backend"))
        assert ring.used_idx == 1 and blk_status(ring, request) == 0
        # A buffer outside guest memory breaks the ring: BACKEND_VRING_ERR instead of the err fd.
        ring.queue.submit([], [(GPA + 64 * MiB, 16)])
        ring.driver.publish()
        await peer.do(F.VRING_KICK, VringState(0, 0), need_reply=True)
        message = await asyncio.wait_for(loop.sock_recv(ours, 20), TIMEOUT)
        assert struct.unpack("<IIIII", message) == (5, 1 | 8, 8, 0, 0)  # VRING_ERR, vring 0
        await loop.sock_sendall(ours, encode_ack(5, ok=True, channel="backend"))
        stopped = await peer.get(F.GET_VRING_BASE, VringState(0, 0))
        assert isinstance(stopped, VringState) and stopped.index == 0
    finally:
        await peer.close()
        ours.close()
        theirs.close()
        ring.close()
        guest.close()


def ring_features(engine: BackendEngine) -> int:
    return engine.offered_features() & ~VirtioFeature.EVENT_IDX.mask


@pytest.mark.asyncio
async def test_inband_without_reply_ack_and_backend_req_closes_and_vring_kick_needs_inband(
    engine: BackendEngine, connect: Connector
) -> None:
    peer = await connect.peer(engine)
    await peer.get_u64(F.GET_PROTOCOL_FEATURES)
    # Without INBAND negotiated, VRING_KICK is refused (failure ack) and the session goes on.
    await peer.do(F.SET_PROTOCOL_FEATURES, U64(PF.REPLY_ACK.mask))
    await peer.send(F.VRING_KICK, VringState(0, 0), need_reply=True)
    assert await peer.ack(F.VRING_KICK) != 0
    # INBAND without BACKEND_REQ: "the back-end should close the connection" (vhost-user.rst,
    # INBAND_NOTIFICATIONS); asked for an ack (REPLY_ACK negotiated before), a failure ack first.
    await peer.send(F.SET_PROTOCOL_FEATURES, U64(INBAND & ~PF.BACKEND_REQ.mask), need_reply=True)
    assert await peer.ack(F.SET_PROTOCOL_FEATURES) != 0
    await peer.expect_dropped()
    # INBAND without REPLY_ACK, as the first protocol features: closed, nothing answered.
    peer = await connect.peer(engine)
    await peer.get_u64(F.GET_PROTOCOL_FEATURES)
    await peer.send(F.SET_PROTOCOL_FEATURES, U64(INBAND & ~PF.REPLY_ACK.mask))
    await peer.expect_dropped()


# --- device state (DEVICE_STATE) ------------------------------------------------------------------


@pytest.mark.asyncio
async def test_device_state_is_not_offered_through_the_vvu_device(
    engine: BackendEngine, connect: Connector
) -> None:
    """The engine offers it for blk; the VVU device filters it (the state fd cannot cross)."""
    assert engine.offered_protocol_features() & PF.DEVICE_STATE.mask
    peer = await connect.peer(engine)
    offered = await peer.get_u64(F.GET_PROTOCOL_FEATURES)
    assert bool(offered & PF.DEVICE_STATE.mask) is not connect.vvu
    await peer.close()


async def _state_session(engine: BackendEngine) -> tuple[Frontend, asyncio.Future[None]]:
    client, server = socketpair_channels()
    task = asyncio.ensure_future(engine.serve(server))
    frontend = Frontend(client, memory_size=MiB)
    await frontend.negotiate()
    await frontend.set_mem_table()
    return frontend, task


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "state",
    [b"", b"garbage", bytes(44), b"x" * 5000],
    ids=["empty", "short", "zeros", "long"],
)
async def test_malformed_device_state_is_refused_and_changes_nothing(
    engine: BackendEngine, blk: BlkBackend, state: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    frontend, task = await _state_session(engine)
    try:
        with pytest.raises(FrontendError, match="CHECK_DEVICE_STATE"):
            await asyncio.wait_for(frontend.load_device_state(state), TIMEOUT)
        assert "the state transfer failed" in " ".join(warning_lines(caplog))
        assert blk.writeback and blk.serial == b"vvu"
        # The session goes on, and a good state loads afterwards.
        good = BlkBackend(size=DISK, serial="other")
        good.writeback = False
        await asyncio.wait_for(frontend.load_device_state(good.save_state()), TIMEOUT)
        good.close()
        assert not blk.writeback and blk.serial == b"other"
    finally:
        await frontend.close()
    await asyncio.wait_for(task, TIMEOUT)
    assert blk.writeback and blk.serial == b"vvu"  # the next front-end starts from defaults


@pytest.mark.asyncio
async def test_device_state_of_another_disk_or_version_is_refused(
    engine: BackendEngine, blk: BlkBackend
) -> None:
    bigger = BlkBackend(size=2 * DISK)
    state = bigger.save_state()
    bigger.close()
    read_only_state = bytearray(blk.save_state())
    read_only_state[20] = 1
    future_version = bytearray(blk.save_state())
    future_version[8] = 2
    frontend, task = await _state_session(engine)
    try:
        for bad in (state, bytes(read_only_state), bytes(future_version)):
            with pytest.raises(FrontendError, match="CHECK_DEVICE_STATE"):
                await asyncio.wait_for(frontend.load_device_state(bad), TIMEOUT)
        # The same state loads on the device it came from.
        await asyncio.wait_for(frontend.load_device_state(blk.save_state()), TIMEOUT)
    finally:
        await frontend.close()
    await asyncio.wait_for(task, TIMEOUT)


@pytest.mark.asyncio
async def test_set_device_state_fd_refuses_bad_transfers_with_an_error_code(
    engine: BackendEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unknown direction or phase, a running ring, CHECK without a transfer, a pipe that never
    ends, a state over the size cap: error codes (bit 8, no fd), never a crash or a hang."""
    peer = Peer(engine, *await _peer_pair(engine))
    guest, ring = Guest(), None
    read_end, write_end = os.pipe()
    try:
        await negotiate(peer, protocol=QEMU_PROTOCOL | PF.DEVICE_STATE.mask)
        for transfer in (DeviceStateTransfer(2, 0), DeviceStateTransfer(0, 1)):
            await peer.send(F.SET_DEVICE_STATE_FD, transfer, [read_end])
            assert await peer.get_reply_u64(F.SET_DEVICE_STATE_FD) == 0x101  # error, no fd
        assert await peer.get_u64(F.CHECK_DEVICE_STATE) != 0  # no transfer started

        await peer.do(F.SET_MEM_TABLE, guest.table, guest.fds, need_reply=True)
        ring = Ring(guest)
        await start_ring(peer, ring, need_reply=True)
        await peer.send(F.SET_DEVICE_STATE_FD, DeviceStateTransfer(0, 0), [write_end])
        assert await peer.get_reply_u64(F.SET_DEVICE_STATE_FD) == 0x101  # rings are running
        assert await peer.get(F.GET_VRING_BASE, VringState(0, 0)) == VringState(0, 0)

        # A load whose pipe the front-end keeps open: CHECK gives up after its timeout.
        monkeypatch.setattr("vvu.engine.STATE_TRANSFER_TIMEOUT", 0.2)
        await peer.send(F.SET_DEVICE_STATE_FD, DeviceStateTransfer(1, 0), [read_end])
        assert await peer.get_reply_u64(F.SET_DEVICE_STATE_FD) == 0x100  # accepted, no fd
        await peer.send(F.SET_DEVICE_STATE_FD, DeviceStateTransfer(1, 0), [read_end])
        assert await peer.get_reply_u64(F.SET_DEVICE_STATE_FD) == 0x101  # one at a time
        assert await peer.get_u64(F.CHECK_DEVICE_STATE) != 0

        # A save into an fd that cannot be written (the read end of a pipe): failed at CHECK.
        await peer.send(F.SET_DEVICE_STATE_FD, DeviceStateTransfer(0, 0), [read_end])
        assert await peer.get_reply_u64(F.SET_DEVICE_STATE_FD) == 0x100
        assert await peer.get_u64(F.CHECK_DEVICE_STATE) != 0

        # More than the cap: refused at CHECK.
        monkeypatch.setattr("vvu.engine.MAX_DEVICE_STATE", 16)
        await peer.send(F.SET_DEVICE_STATE_FD, DeviceStateTransfer(1, 0), [read_end])
        assert await peer.get_reply_u64(F.SET_DEVICE_STATE_FD) == 0x100
        os.write(write_end, b"y" * 100)
        os.close(write_end)
        write_end = -1
        assert await peer.get_u64(F.CHECK_DEVICE_STATE) != 0
        await peer.barrier()
    finally:
        await peer.close()
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)
        if ring is not None:
            ring.close()
        guest.close()


async def _peer_pair(engine: BackendEngine) -> tuple[Channel, asyncio.Future[None]]:
    client, server = socketpair_channels()
    return client, asyncio.ensure_future(engine.serve(server))


def test_blk_cache_mode_is_writable_only_with_config_wce(blk: BlkBackend) -> None:
    with pytest.raises(ConfigError, match="read-only"):
        blk.write_config(32, b"\0")  # CONFIG_WCE not acked
    blk.set_features(1 << BlkFeature.CONFIG_WCE)
    for offset, data in ((32, b"\2"), (32, b"\0\0"), (0, b"\0"), (33, b"\0")):
        with pytest.raises(ConfigError, match="only writeback"):
            blk.write_config(offset, data)
    assert blk.writeback and blk.config_space()[32] == 1
    blk.write_config(32, b"\0")
    assert not blk.writeback and blk.config_space()[32] == 0
    blk.reset()
    assert blk.writeback


# --- requests the engine refuses ------------------------------------------------------------------


@dataclass
class Refused:
    """A request the engine refuses, and the answer it gets with NEED_REPLY: "ack" (a failure
    ack), a typed failure reply (no fd attached), None (no failure form: dropped), or
    "ack-drop" (malformed: a failure ack, then dropped)."""

    request: FrontendRequest
    payload: Payload
    expected: Payload | str | None
    with_fd: bool = False
    # Over VVU, if different: the device passes no fd, so a request that needs one is malformed
    # (and asked for an ack: it gets a failure ack before the drop).
    over_vvu: Payload | str | None = "same"


def _refused_cases() -> list[ParameterSet]:
    uuid = SharedObject(UUID("12345678-9abc-def0-1234-56789abcdef0"))
    session = RawPayload(struct.pack("<q", 7) + bytes(56))
    cases = [
        Refused(F.SET_VRING_ENDIAN, VringState(0, 1), "ack"),
        Refused(F.CREATE_CRYPTO_SESSION, session, RawPayload(struct.pack("<q", -1) + bytes(56))),
        Refused(F.CLOSE_CRYPTO_SESSION, U64(7), "ack"),
        Refused(F.POSTCOPY_ADVISE, EMPTY, EMPTY),
        Refused(F.POSTCOPY_LISTEN, EMPTY, "ack"),
        Refused(F.POSTCOPY_END, EMPTY, U64(1)),
        Refused(F.GPU_SET_SOCKET, EMPTY, "ack", with_fd=True, over_vvu="ack-drop"),
        Refused(F.GET_SHARED_OBJECT, uuid, EMPTY),
        Refused(F.GET_SHMEM_CONFIG, EMPTY, ShmemConfig(0)),
        Refused(F.GET_VRING_BASE_SKIP_DRAIN, VringState(0, 0), None),
    ]
    return [pytest.param(case, id=case.request.name) for case in cases]


@pytest.mark.asyncio
@pytest.mark.parametrize("case", _refused_cases())
async def test_refused_requests_get_their_failure_answer_and_a_reason(
    engine: BackendEngine, caplog: pytest.LogCaptureFixture, case: Refused, connect: Connector
) -> None:
    """Requests whose feature is never offered (docs/protocol-support.md): with NEED_REPLY they
    get the failure form of their answer and a log line with the reason; the session goes on."""
    spec = spec_for(case.request)
    assert spec is not None and case.request in REFUSED
    assert spec.feature is None or not engine.offered_protocol_features() & spec.feature.mask
    peer = await connect.peer(engine)
    ours, theirs = socket.socketpair()
    try:
        await negotiate(peer)
        fds = [theirs.fileno()] if case.with_fd else []
        await peer.send(case.request, case.payload, fds, need_reply=True)
        expected = case.expected if case.over_vvu == "same" or not connect.vvu else case.over_vvu
        if expected is None:
            await peer.expect_dropped()
            return
        raw = await peer.recv()
        assert raw is not None and raw.fds == []
        assert raw.request == case.request and raw.flags == REPLY_FLAGS
        header = Header(raw.request, raw.flags, len(raw.payload))
        reply = decode_message(header, raw.payload, is_reply=True).payload
        assert reply == (U64(1) if expected in ("ack", "ack-drop") else expected)
        if expected == "ack-drop":
            await peer.expect_dropped()
            return
        assert REFUSED[case.request] in " ".join(warning_lines(caplog))
        await peer.barrier()
        await peer.close()
    finally:
        ours.close()
        theirs.close()


@pytest.mark.asyncio
async def test_our_frontend_answers_back_end_requests_it_does_not_support_with_a_failure_ack(
    engine: BackendEngine,
) -> None:
    """Every back-end request docs/protocol-support.md lists as "not offered" (host notifiers,
    shared objects, shared memory maps), an unknown id, in-band calls that were not
    negotiated: each well-formed (with its fd where it needs one), each refused with a failure
    ack (NEED_REPLY), nothing carried out, and the channel goes on."""
    client, server = socketpair_channels()
    task = asyncio.ensure_future(engine.serve(server))
    frontend = Frontend(client, memory_size=MiB)
    shm = os.memfd_create("shmem-map")
    try:
        await frontend.negotiate(protocol_features=WANTED_PROTOCOL_FEATURES | PF.BACKEND_REQ.mask)
        await frontend.open_backend_channel()
        await frontend.request_u64(F.GET_FEATURES)  # SET_BACKEND_REQ_FD was handled
        assert engine.session is not None and engine.session.backend_channel is not None
        channel = engine.session.backend_channel
        uuid = SharedObject(UUID(int=1)).pack()
        mapping = ShmemMap(0, 0, 0, 4096, 1).pack()
        notifier = VringArea(VRING_NOFD, 0, 0).pack()  # NOFD: unmap, no fd
        refused: list[tuple[int, bytes, list[int]]] = [
            (BackendRequest.BACKEND_VRING_HOST_NOTIFIER_MSG, notifier, []),
            (BackendRequest.BACKEND_SHARED_OBJECT_ADD, uuid, []),
            (BackendRequest.BACKEND_SHARED_OBJECT_REMOVE, uuid, []),
            (BackendRequest.BACKEND_SHARED_OBJECT_LOOKUP, uuid, []),
            (BackendRequest.BACKEND_SHMEM_MAP, mapping, [shm]),
            (BackendRequest.BACKEND_SHMEM_UNMAP, mapping, []),
            (BackendRequest.BACKEND_VRING_CALL, VringState(0, 0).pack(), []),
            (99, b"", []),
        ]
        for request, body, fds in refused:
            header = Header(request, VERSION | NEED_REPLY, len(body)).pack()
            await channel.send(header + body, fds)
            raw = await asyncio.wait_for(channel.recv(), TIMEOUT)
            assert raw is not None and (raw.request, raw.flags) == (request, REPLY_FLAGS)
            assert int.from_bytes(raw.payload, "little") != 0, request
            assert raw.fds == [], request
        assert frontend.backend_requests == {}  # nothing was carried out
        # A started ring (no memory, so nothing runs): the device is not suspended.
        await frontend.request(F.SET_VRING_KICK, U64.vring(0, nofd=True))
        assert await engine.notify_config_change() is True  # and the channel still works
    finally:
        os.close(shm)
        await frontend.close()
    await asyncio.wait_for(task, TIMEOUT)
