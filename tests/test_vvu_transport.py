"""The VVU transport (`vvu.transport.vvu`) against a small fake VVU device served over vfio-user.

`FakeVvu` implements just enough of docs/vvu-device.md: the 24-byte config (status bits,
max_vhost_queues, uuid), rxq/txq, BAR2 (doorbells whose ioeventfds are the front-end's own call
eventfds; the driver aux notification select/msix_vector registers), BAR4 areas from memfds, and
a kick forwarder (front-end kick eventfd → the kick's MSI-X vector). The test plays the device
side of the front-end: it injects messages into rxq and collects txq.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from test_engine import (
    DISK,
    GPA,
    QEMU_PROTOCOL,
    SPLIT_RINGS,
    Guest,
    MiB,
    Ring,
    assert_no_fd_leak,
    check_io,
    open_fds,
    without_viommu,
)
from vvu._core import DescriptorChain, EventFd, SplitQueue
from vvu.backends import BlkBackend
from vvu.engine import BackendEngine
from vvu.pci import VirtioPciDevice
from vvu.pci.virtio_device import NO_VECTOR
from vvu.protocol import (
    EMPTY,
    NEED_REPLY,
    REPLY,
    REPLY_FLAGS,
    U64,
    VERSION,
    BackendRequest,
    FrontendRequest,
    Header,
    MemoryRegion,
    MemoryTable,
    Payload,
    VirtioFeature,
    VringState,
)
from vvu.protocol.constants import VRING_NOFD
from vvu.transport.vvu import (
    BACKEND_UP,
    DIRECT_KICK,
    FRONTEND_UP,
    KICK_FDS_OFFSET,
    KickMode,
    VvuChannel,
    VvuListener,
)
from vvu.vfio_user import VfioUserListener, VfioUserPciAccess, VfioUserServer
from vvu.vfio_user.device import IoEventFd, MmapArea, RegionSpec

pytestmark = pytest.mark.timeout(60)

F = FrontendRequest
N = 4
TIMEOUT = 5.0
UUID = bytes(range(16))
SHM_AREA = 2 * MiB  # where the fake device "places" the guest's region in shmid 1


class FakeVvu(VirtioPciDevice):
    def __init__(
        self, txq_size: int = 16, refuse_kicks: tuple[int, ...] = (), *, direct: bool = False
    ) -> None:
        self.direct = direct  # accepts DIRECT kicks (the vvu extension)
        self.direct_kick_fds: dict[int, EventFd] = {}  # BAR2 0x6000 + 4·i, after SET_VRING_KICK i
        self.vvu_status = 0
        self.select = 0
        self.kick_vector = [NO_VECTOR] * N
        self.refuse_kicks = set(refuse_kicks)
        self.doorbells: dict[int, EventFd] = {}
        self.doorbell_writes: list[int] = []
        self.areas: list[MmapArea] = []
        self.sent: list[bytes] = []
        self.sent_event = asyncio.Event()
        self.hold_tx = False
        self.rx_avail_at_up: list[int] = []
        self._rx: list[DescriptorChain] = []
        self._forwarded: list[EventFd] = []
        super().__init__(
            virtio_id=63, features=0, queue_max_sizes=[64, txq_size], msix_vectors=3 + N
        )

    def add_extra_capabilities(self) -> None:
        self.config.add_bar(2, 0x8000)
        self.config.add_bar(4, 1 << 30, is_64bit=True, prefetchable=True)
        self.add_virtio_cap(6, 2, 0, 4 * (2 * N + 1), extra=struct.pack("<I", 4))
        self.add_virtio_cap(7, 2, 0x4000, 4)
        self.add_virtio_cap(8, 4, 0, 1 << 29, cap_id=1, extra=struct.pack("<II", 0, 0))

    def extra_regions(self) -> dict[int, RegionSpec]:
        return {2: RegionSpec(0x8000), 4: RegionSpec(1 << 30, areas=tuple(self.areas))}

    def extra_ioeventfds(self, index: int) -> tuple[IoEventFd, ...]:
        if index != 2:
            return ()
        doorbells = tuple(IoEventFd(4 * i, 0, efd) for i, efd in self.doorbells.items())
        kicks = tuple(
            IoEventFd(KICK_FDS_OFFSET + 4 * i, 0, e) for i, e in self.direct_kick_fds.items()
        )
        return doorbells + kicks

    def extra_region_read(self, index: int, offset: int, size: int) -> bytes:
        value = 0
        if index == 2 and offset == 0x4000:
            value = self.select
        elif index == 2 and offset == 0x4002:
            value = self.kick_vector[self.select] if self.select < N else NO_VECTOR
        return value.to_bytes(size, "little")

    def extra_region_write(self, index: int, offset: int, data: bytes) -> None:
        value = int.from_bytes(data, "little")
        if index == 2 and offset == 0x4000:
            self.select = value
        elif index == 2 and offset == 0x4002:
            if self.select < N:
                ok = value < self.msix_vector_count or (self.direct and value == DIRECT_KICK)
                ok = ok and self.select not in self.refuse_kicks
                self.kick_vector[self.select] = value if ok else NO_VECTOR
        elif index == 2 and offset < 0x4000:
            self.doorbell_writes.append(offset // 4)
            efd = self.doorbells.get(offset // 4)
            if efd is not None:
                efd.signal()

    def device_config(self) -> bytes:
        return struct.pack("<II", self.vvu_status, N) + UUID

    def device_config_write(self, offset: int, data: bytes) -> None:
        assert offset == 0 and len(data) == 4
        value = int.from_bytes(data, "little")
        if value & BACKEND_UP and not self.vvu_status & BACKEND_UP:
            q = self.queues[0]
            assert self._dma is not None
            self.rx_avail_at_up.append(self._dma.memory.load_u16(q.driver + 2))
        self.vvu_status = (self.vvu_status & FRONTEND_UP) | (value & BACKEND_UP)
        if not value & BACKEND_UP and self.vvu_status & FRONTEND_UP:
            self.disconnect()

    def queue_notify(self, index: int, queue: SplitQueue) -> None:
        if index == 1 and not self.hold_tx:
            self.drain_tx()

    def drain_tx(self) -> None:
        queue = self.queues[1].queue
        assert queue is not None
        while True:
            queue.disable_notifications()
            chains = queue.pop()
            for chain in chains:
                self.sent.append(chain.read())
                queue.push_used(chain.head, 0)
            if chains:
                self.signal_used(1)
                self.sent_event.set()
            if not queue.enable_notifications():
                return

    def on_reset(self) -> None:
        self._rx = []
        self.kick_vector = [NO_VECTOR] * N
        self.vvu_status = 0

    # -- the front-end side --------------------------------------------------------------------

    def inject(self, data: bytes) -> None:
        queue = self.queues[0].queue
        assert queue is not None
        if not self._rx:
            self._rx = queue.pop()
        assert self._rx, "the driver posted no rx buffer"
        chain = self._rx.pop(0)
        assert chain.writable_len >= 4096 + 12
        chain.write(data)
        queue.push_used(chain.head, len(data))
        self.signal_used(0)

    def connect(self) -> None:
        assert self.vvu_status & BACKEND_UP
        self.vvu_status |= FRONTEND_UP
        self.config_changed()

    def disconnect(self) -> None:
        self.vvu_status = 0
        self.doorbells.clear()
        self.direct_kick_fds.clear()
        self.areas = []
        loop = asyncio.get_running_loop()
        for efd in self._forwarded:
            loop.remove_reader(efd.fileno())
        self._forwarded = []
        self.config_changed()

    def forward_kick(self, i: int, efd: EventFd) -> None:
        asyncio.get_running_loop().add_reader(efd.fileno(), self._forward, i, efd)
        self._forwarded.append(efd)

    def _forward(self, i: int, efd: EventFd) -> None:
        if efd.consume() and self.kick_vector[i] != NO_VECTOR:
            self.raise_irq(self.kick_vector[i])

    async def next_sent(self) -> bytes:
        async with asyncio.timeout(TIMEOUT):
            while not self.sent:
                self.sent_event.clear()
                await self.sent_event.wait()
        return self.sent.pop(0)


@dataclass
class Rig:
    device: FakeVvu
    listener: VvuListener

    async def accept(self) -> VvuChannel:
        task = asyncio.ensure_future(self.listener.accept())
        await until(lambda: bool(self.device.vvu_status & BACKEND_UP), "BACKEND_UP")
        await asyncio.sleep(0.01)
        self.device.connect()
        return await asyncio.wait_for(task, TIMEOUT)

    def send(
        self, request: int, payload: Payload | bytes = EMPTY, *, need_reply: bool = False
    ) -> None:
        body = payload if isinstance(payload, bytes) else payload.pack()
        flags = VERSION | (NEED_REPLY if need_reply else 0)
        self.device.inject(Header(request, flags, len(body)).pack() + body)

    async def reply(self, request: int) -> bytes:
        data = await self.device.next_sent()
        hdr = Header.unpack(data[:12])
        assert hdr.request == request and hdr.flags == REPLY_FLAGS, hdr
        assert len(data) == 12 + hdr.size
        return data[12:]

    async def u64(self, request: int, payload: Payload | bytes = EMPTY) -> int:
        self.send(request, payload)
        return int(struct.unpack("<Q", await self.reply(request))[0])

    async def do(self, request: int, payload: Payload | bytes = EMPTY) -> None:
        self.send(request, payload, need_reply=True)
        assert struct.unpack("<Q", await self.reply(request)) == (0,), F(request).name


async def until(cond: object, what: str) -> None:
    for _ in range(500):
        if callable(cond) and cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(what)


@contextlib.asynccontextmanager
async def rig(
    tmp_path: Path, device: FakeVvu, kick_mode: KickMode = "direct"
) -> AsyncIterator[Rig]:
    path = str(tmp_path / "vvu.sock")
    server = VfioUserServer(device, VfioUserListener(path))
    task = asyncio.ensure_future(server.serve_forever())
    pci = await VfioUserPciAccess.open(path, timeout=2)
    listener = VvuListener(pci, kick_mode=kick_mode)
    try:
        yield Rig(device, listener)
    finally:
        await listener.aclose()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        server.close()
        device.close()


@pytest_asyncio.fixture
async def vvu(tmp_path: Path) -> AsyncIterator[Rig]:
    async with rig(tmp_path, FakeVvu()) as r:
        yield r


# --- tests --------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_init_posts_rx_buffers_before_backend_up(vvu: Rig) -> None:
    channel = await vvu.accept()
    drv = vvu.listener.driver
    assert drv is not None
    assert drv.max_queues == N and drv.uuid == UUID
    assert vvu.device.rx_avail_at_up == [64]  # every rx buffer was posted before BACKEND_UP
    assert drv.kick_vectors == [3, 4, 5, 6] == vvu.device.kick_vector
    assert vvu.device.vvu_status == BACKEND_UP | FRONTEND_UP
    channel.close()


@pytest.mark.asyncio
async def test_blk_over_vvu_with_synthesised_fds(vvu: Rig) -> None:
    dev = vvu.device
    channel = await vvu.accept()
    engine = BackendEngine(BlkBackend(size=DISK))
    before = open_fds()
    serving = asyncio.ensure_future(engine.serve(channel))
    guest = Guest()
    ring = Ring(guest, 0, 64)
    try:
        offered = await vvu.u64(F.GET_FEATURES)  # flags 0x5 checked by reply()
        assert offered == engine.offered_features()
        protocol = await vvu.u64(F.GET_PROTOCOL_FEATURES) & QEMU_PROTOCOL
        vvu.send(F.SET_PROTOCOL_FEATURES, U64(protocol))
        await vvu.do(F.SET_OWNER)
        acked = without_viommu(offered) & ~VirtioFeature.EVENT_IDX.mask & SPLIT_RINGS
        await vvu.do(F.SET_FEATURES, U64(acked))
        # The region lives at shmid-1 offset SHM_AREA: a BAR4 area from the guest's memfd.
        ((region, fd, _),) = guest.regions
        dev.areas = [MmapArea(SHM_AREA, region.memory_size, fd, 0)]
        rewritten = MemoryRegion(
            region.guest_phys_addr, region.memory_size, region.userspace_addr, SHM_AREA
        )
        await vvu.do(F.SET_MEM_TABLE, MemoryTable((rewritten,)))
        assert engine.session is not None and engine.session.memory is not None
        engine.session.memory.write(GPA, b"via the area")
        assert guest.memory.read(GPA, 12) == b"via the area"
        await vvu.do(F.SET_VRING_NUM, VringState(0, ring.size))
        await vvu.do(F.SET_VRING_BASE, VringState(0, 0))
        await vvu.do(F.SET_VRING_ADDR, ring.addr)
        dev.doorbells[0] = ring.call  # after SET_VRING_CALL 0: the front-end's own eventfd
        await vvu.do(F.SET_VRING_CALL, U64.vring(0))
        await vvu.do(F.SET_VRING_ERR, U64.vring(0))  # no doorbell: a relayed eventfd
        dev.forward_kick(0, ring.kick)
        await vvu.do(F.SET_VRING_KICK, U64.vring(0))
        await vvu.do(F.SET_VRING_ENABLE, VringState(0, 1))
        for sector in (8, 100, 2000):
            await check_io(ring, sector)
        # The err doorbell has no ioeventfd: a signal becomes a BAR2 write at N+0.
        assert engine.session.vrings[0].err is not None
        engine.session.vrings[0].err.signal()
        await until(lambda: N in dev.doorbell_writes, "err doorbell write")
        # The front-end goes away: recv() returns None and the engine releases the session.
        dev.disconnect()
        await asyncio.wait_for(serving, TIMEOUT)
    finally:
        serving.cancel()
        ring.close()
        guest.close()
    assert_no_fd_leak(before)


@pytest.mark.asyncio
async def test_kick_without_vector_is_nofd(tmp_path: Path) -> None:
    async with rig(tmp_path, FakeVvu(refuse_kicks=(1,))) as vvu:
        channel = await vvu.accept()
        drv = vvu.listener.driver
        assert drv is not None and drv.kick_vectors == [3, NO_VECTOR, 5, 6]
        vvu.send(F.SET_VRING_KICK, U64.vring(1))
        msg = await asyncio.wait_for(channel.recv(), TIMEOUT)
        assert msg is not None and msg.fds == []
        assert struct.unpack("<Q", msg.payload)[0] == 1 | VRING_NOFD
        vvu.send(F.SET_VRING_KICK, U64.vring(2))
        msg = await asyncio.wait_for(channel.recv(), TIMEOUT)
        assert msg is not None and len(msg.fds) == 1 and msg.payload == U64.vring(2).pack()
        efd = EventFd.from_fd(msg.fds[0])
        msg.close_fds()
        vvu.device.raise_irq(5)
        assert efd.wait(TIMEOUT)
        efd.close()
        channel.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("kick_mode", ["direct", "msix"])
async def test_direct_kick_fd_is_the_front_ends_eventfd(
    tmp_path: Path, kick_mode: KickMode
) -> None:
    """A device with direct kicks: the driver asks for DIRECT (unless kick_mode is msix), and
    SET_VRING_KICK's fd is BAR2's kick-eventfd ioeventfd, the front-end's own eventfd: a signal
    on it runs the engine's ring with no relay (the fake forwards nothing)."""
    dev = FakeVvu(refuse_kicks=(3,), direct=True)
    async with rig(tmp_path, dev, kick_mode) as vvu:
        channel = await vvu.accept()
        drv = vvu.listener.driver
        assert drv is not None
        if kick_mode == "msix":
            assert drv.kick_vectors == dev.kick_vector == [3, 4, 5, NO_VECTOR]
            channel.close()
            return
        assert drv.kick_vectors == dev.kick_vector == [DIRECT_KICK] * 3 + [NO_VECTOR]
        engine = BackendEngine(BlkBackend(size=DISK))
        serving = asyncio.ensure_future(engine.serve(channel))
        guest = Guest()
        ring = Ring(guest, 0, 64)
        try:
            offered = await vvu.u64(F.GET_FEATURES)
            protocol = await vvu.u64(F.GET_PROTOCOL_FEATURES) & QEMU_PROTOCOL
            vvu.send(F.SET_PROTOCOL_FEATURES, U64(protocol))
            await vvu.do(F.SET_OWNER)
            acked = without_viommu(offered) & ~VirtioFeature.EVENT_IDX.mask & SPLIT_RINGS
            await vvu.do(F.SET_FEATURES, U64(acked))
            ((region, fd, _),) = guest.regions
            dev.areas = [MmapArea(SHM_AREA, region.memory_size, fd, 0)]
            rewritten = MemoryRegion(
                region.guest_phys_addr, region.memory_size, region.userspace_addr, SHM_AREA
            )
            await vvu.do(F.SET_MEM_TABLE, MemoryTable((rewritten,)))
            await vvu.do(F.SET_VRING_NUM, VringState(0, ring.size))
            await vvu.do(F.SET_VRING_BASE, VringState(0, 0))
            await vvu.do(F.SET_VRING_ADDR, ring.addr)
            dev.doorbells[0] = ring.call
            await vvu.do(F.SET_VRING_CALL, U64.vring(0))
            dev.direct_kick_fds[0] = ring.kick  # bound before the message, as the device does
            await vvu.do(F.SET_VRING_KICK, U64.vring(0))
            await vvu.do(F.SET_VRING_ENABLE, VringState(0, 1))
            assert engine.session is not None
            kick = engine.session.vrings[0].kick
            assert kick is not None  # not NOFD (polling): the engine waits on that eventfd...
            for sector in (8, 100, 2000):
                await check_io(ring, sector)  # ...and ring.kick (the front-end's) wakes it
            assert dev._forwarded == []  # nothing relayed the kicks
            dev.disconnect()
            await asyncio.wait_for(serving, TIMEOUT)
        finally:
            serving.cancel()
            ring.close()
            guest.close()


@pytest.mark.asyncio
async def test_backend_channel_relay(vvu: Rig) -> None:
    channel = await vvu.accept()
    engine = BackendEngine(BlkBackend(size=DISK))
    serving = asyncio.ensure_future(engine.serve(channel))
    try:
        protocol = await vvu.u64(F.GET_PROTOCOL_FEATURES) & QEMU_PROTOCOL
        vvu.send(F.SET_PROTOCOL_FEATURES, U64(protocol))
        await vvu.do(F.SET_BACKEND_REQ_FD)
        # A started ring (no memory, so nothing runs): the device is not suspended.
        await vvu.do(F.SET_VRING_KICK, U64.vring(0, nofd=True))
        notified = asyncio.ensure_future(engine.notify_config_change())
        data = await vvu.device.next_sent()
        hdr = Header.unpack(data[:12])
        assert hdr.request == BackendRequest.BACKEND_CONFIG_CHANGE_MSG and not hdr.flags & REPLY
        assert hdr.flags & NEED_REPLY  # REPLY_ACK is negotiated: the engine waits for the ack
        # A front-end reply (REPLY flag) on rxq goes to the back-end channel, not the engine's
        # main loop: it completes the waiting back-end request.
        reply = Header(BackendRequest.BACKEND_CONFIG_CHANGE_MSG, REPLY_FLAGS, 8).pack()
        vvu.device.inject(reply + struct.pack("<Q", 0))
        assert await asyncio.wait_for(notified, TIMEOUT) is True
        assert await vvu.u64(F.GET_FEATURES) == engine.offered_features()
        vvu.device.disconnect()
        await asyncio.wait_for(serving, TIMEOUT)
    finally:
        serving.cancel()


@pytest.mark.asyncio
async def test_send_waits_when_txq_is_full_and_rejects_fds(tmp_path: Path) -> None:
    async with rig(tmp_path, FakeVvu(txq_size=8)) as vvu:
        channel = await vvu.accept()
        dev = vvu.device
        dev.hold_tx = True
        messages = [Header(1, REPLY_FLAGS, 8).pack() + struct.pack("<Q", i) for i in range(12)]
        sender = asyncio.ensure_future(_send_all(channel, messages))
        drv = vvu.listener.driver
        assert drv is not None
        await until(lambda: drv.tx_in_flight == 8, "the txq fills up")
        assert not sender.done()
        dev.hold_tx = False
        dev.drain_tx()
        await asyncio.wait_for(sender, TIMEOUT)
        got = [await dev.next_sent() for _ in messages]
        assert got == messages
        efd = EventFd()
        with pytest.raises(Exception, match="fds"):
            await channel.send(messages[0], [efd.fileno()])
        efd.close()
        channel.close()


async def _send_all(channel: VvuChannel, messages: list[bytes]) -> None:
    for m in messages:
        await channel.send(m)


@pytest.mark.asyncio
async def test_disconnect_ends_the_session_and_no_stale_message_crosses(vvu: Rig) -> None:
    dev = vvu.device
    channel = await vvu.accept()
    vvu.send(F.GET_FEATURES)
    msg = await asyncio.wait_for(channel.recv(), TIMEOUT)
    assert msg is not None and msg.request == F.GET_FEATURES
    vvu.send(F.GET_QUEUE_NUM)  # never read by the first session
    dev.disconnect()
    drv = vvu.listener.driver
    assert drv is not None
    await asyncio.wait_for(drv.config_event.wait(), TIMEOUT)  # the device said FRONTEND_UP went
    # The message the session never read is dropped with it, not delivered late.
    assert await asyncio.wait_for(channel.recv(), TIMEOUT) is None
    channel.close()
    assert dev.vvu_status == 0
    channel2 = await vvu.accept()
    assert dev.rx_avail_at_up[-1] - dev.rx_avail_at_up[0] == 2  # both buffers re-posted
    vvu.send(F.GET_PROTOCOL_FEATURES)
    msg = await asyncio.wait_for(channel2.recv(), TIMEOUT)
    assert msg is not None and msg.request == F.GET_PROTOCOL_FEATURES
    channel2.close()
