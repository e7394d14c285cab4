"""virtio-pci over vfio-user: `VirtioPciDevice` (a reversing "echo" device) served by
`VfioUserServer`, driven by `VirtioPciDriver` over `VfioUserPciAccess` on a real unix socket:
layout, init, traffic with MSI-X interrupts, both notification paths, config generation and
change interrupts, resets, a second session, and hostile driver writes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from vvu._core import SplitQueue, memfd
from vvu.pci import CfgType, Common, Status, VirtioPciDevice, VirtioPciDriver, VirtioPciError
from vvu.pci.virtio_device import (
    F_EVENT_IDX,
    F_INDIRECT_DESC,
    F_VERSION_1,
    NO_VECTOR,
    NOTIFY_OFFSET,
)
from vvu.vfio_user import EchoDevice, VfioUserListener, VfioUserPciAccess, VfioUserServer
from vvu_harness import running_server

TIMEOUT = 10.0
VIRTIO_ID = 0x3F  # private: device id 0x107F
NAME = b"reverse\0"


class ReverseDevice(VirtioPciDevice):
    """Queues 0 and 1: each chain's readable bytes come back reversed in its writable part.
    Config: u32 counter (RO, bumped by `bump()`), u32 scratch (RW), 8-byte name.
    Queue 0 has an ioeventfd, queue 1 does not (its kicks come as region writes)."""

    def __init__(self, msix_vectors: int | None = None) -> None:
        self.counter = 0
        self.scratch = 0
        self.bump_on_read = False
        self.handled = [0, 0]
        super().__init__(
            virtio_id=VIRTIO_ID,
            features=F_EVENT_IDX | F_INDIRECT_DESC,
            queue_max_sizes=[256, 64],
            ioeventfds=[0],
            msix_vectors=msix_vectors,
        )

    def device_config(self) -> bytes:
        if self.bump_on_read:
            self.bump_on_read = False
            self.bump()
        return struct.pack("<II", self.counter, self.scratch) + NAME

    def device_config_write(self, offset: int, data: bytes) -> None:
        if offset == 4 and len(data) == 4:
            self.scratch = int.from_bytes(data, "little")
        else:
            super().device_config_write(offset, data)

    def bump(self) -> bool:
        self.counter += 1
        return self.config_changed()

    def queue_notify(self, index: int, queue: SplitQueue) -> None:
        while True:
            queue.disable_notifications()
            chains = queue.pop()
            for chain in chains:
                written = chain.write(chain.read()[::-1])
                queue.push_used(chain.head, written)
                self.handled[index] += 1
            if chains:
                self.signal_used(index)
            if not queue.enable_notifications():
                return

    def on_reset(self) -> None:
        self.scratch = 0


@dataclass
class Served:
    path: str
    device: ReverseDevice
    server: VfioUserServer

    async def open(self) -> VfioUserPciAccess:
        return await asyncio.wait_for(VfioUserPciAccess.open(self.path, timeout=2), TIMEOUT)

    async def idle(self) -> None:
        for _ in range(500):
            if not self.server.connected:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the server still serves a client")


@contextlib.asynccontextmanager
async def serve(tmp_path: Path, device: ReverseDevice) -> AsyncIterator[Served]:
    path = str(tmp_path / "virtio.sock")
    async with running_server(device, path) as server:
        yield Served(path, device, server)


@pytest_asyncio.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    async with serve(tmp_path, ReverseDevice()) as s:
        yield s


@contextlib.asynccontextmanager
async def driven(served: Served) -> AsyncIterator[VirtioPciDriver]:
    pci = await served.open()
    drv = await VirtioPciDriver.open(pci)
    try:
        yield drv
    finally:
        await drv.close()
        await pci.close()


async def round_trip(drv: VirtioPciDriver, q: int, payload: bytes) -> bytes:
    src = drv.alloc(len(payload))
    dst = drv.alloc(len(payload))
    drv.memory.write(src, payload)
    head = drv.queues[q].add([(src, len(payload))], [(dst, len(payload))])
    assert await drv.kick(q)  # the device wants every notification (it re-arms each time)
    used = await drv.wait_used(q)
    assert used == [(head, len(payload))]
    return drv.memory.read(dst, len(payload))


async def until(cond: object, what: str) -> None:
    for _ in range(500):
        if callable(cond) and cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(what)


# --- layout -------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_config_space_and_capability_layout(served: Served) -> None:
    pci = await served.open()
    try:
        assert await pci.config_read_u16(0) == 0x1AF4
        assert await pci.config_read_u16(2) == 0x1040 + VIRTIO_ID
        assert await pci.config_read_u8(8) == 1  # revision
        assert await pci.config_read_u16(0x2C) == 0x1AF4
        assert await pci.config_read_u16(0x2E) >= 0x40
        assert [pci.bar_info(i).size for i in range(6)] == [0x4000, 0x1000, 0, 0, 0, 0]
        assert not any(pci.bar_info(i).mappable for i in range(6))
        assert await pci.find_capability(0x11) == 0x40
        assert await pci.msix_vectors() == 3
        caps = await VirtioPciDriver.find_caps(pci)
        assert [(c.cfg_type, c.bar, c.offset, c.length) for c in caps] == [
            (CfgType.COMMON, 0, 0x0000, 0x1000),
            (CfgType.ISR, 0, 0x1000, 0x1000),
            (CfgType.DEVICE, 0, 0x2000, 0x1000),
            (CfgType.NOTIFY, 0, 0x3000, 0x1000),
            (CfgType.PCI_CFG, 0, 0, 0),
        ]
        assert [c.at for c in caps] == [0x4C, 0x5C, 0x6C, 0x7C, 0x90]
        assert struct.unpack("<I", caps[3].extra) == (4,)
        # BAR sizing through config space.
        await pci.config_write(0x10, b"\xff\xff\xff\xff")
        assert await pci.config_read_u32(0x10) == 0xFFFFC000
        drv = VirtioPciDriver(pci, caps, 0x1040 + VIRTIO_ID)
        assert drv.virtio_id == VIRTIO_ID and drv.notify_multiplier == 4
    finally:
        await pci.close()


# --- traffic ------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_init_and_many_requests_round_trip_with_msix(served: Served) -> None:
    dev = served.device
    async with driven(served) as drv:
        accepted = await drv.init(F_EVENT_IDX | F_INDIRECT_DESC, queues=[None, 32])
        assert accepted == F_VERSION_1 | F_EVENT_IDX | F_INDIRECT_DESC
        assert dev.status == Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | (
            Status.DRIVER_OK
        )
        assert dev.driver_features == accepted
        assert [q.size for q in drv.queues] == [256, 32]
        assert [q.vector for q in drv.queues] == [1, 2]
        assert drv.queues[0].doorbell is not None  # ioeventfd
        assert drv.queues[1].doorbell is None  # BAR write
        assert [q.enabled for q in dev.queues] == [True, True]
        for i in range(150):
            payload = os.urandom(1 + (i * 37) % 3000)
            assert await round_trip(drv, i % 2, payload) == payload[::-1]
        assert dev.handled == [75, 75]
        assert dev.refused_writes == 0
        # Several chains in flight at once, one kick.
        q = drv.queues[0]
        heads = {}
        for i in range(20):
            src, dst = drv.alloc(64), drv.alloc(64)
            drv.memory.write(src, bytes([i]) * 63 + b"!")
            heads[q.add([(src, 64)], [(dst, 64)])] = dst
        await drv.kick(0, force=True)
        got: list[tuple[int, int]] = []
        while len(got) < 20:
            got += await drv.wait_used(0)
        assert sorted(h for h, _ in got) == sorted(heads)
        for i, dst in enumerate(heads.values()):
            assert drv.memory.read(dst, 64) == b"!" + bytes([i]) * 63


@pytest.mark.asyncio
async def test_ioeventfd_and_region_write_reach_the_same_handler(served: Served) -> None:
    dev = served.device
    pci = await served.open()
    drv = await VirtioPciDriver.open(pci)
    try:
        await drv.init(queues=2)
        # Queue 0 by the ioeventfd, then by a REGION_WRITE in the notify area (no eventfd).
        assert await round_trip(drv, 0, b"abc") == b"cba"
        kicks = dev.queues[0].kicks
        src, dst = drv.alloc(4), drv.alloc(4)
        drv.memory.write(src, b"wxyz")
        head = drv.queues[0].add([(src, 4)], [(dst, 4)])
        drv.queues[0].ring.publish()
        await pci.client.region_write(0, NOTIFY_OFFSET, struct.pack("<H", 0))
        assert await drv.wait_used(0) == [(head, 4)]
        assert drv.memory.read(dst, 4) == b"zyxw"
        assert dev.queues[0].kicks == kicks + 1
        # Queue 1 has no ioeventfd: the driver falls back to a BAR write.
        assert await round_trip(drv, 1, b"12345") == b"54321"
        assert dev.queues[1].kicks >= 1
        # A notify through the PCI_CFG access window works too.
        cap = dev.pci_cfg_offset
        assert cap is not None
        drv.memory.write(src, b"pcic")
        head = drv.queues[1].add([(src, 4)], [(dst, 4)])
        drv.queues[1].ring.publish()
        await pci.config_write(cap + 4, b"\0")
        await pci.config_write(cap + 8, struct.pack("<II", NOTIFY_OFFSET + 4, 2))
        await pci.config_write(cap + 16, struct.pack("<H", 1))
        assert await drv.wait_used(1) == [(head, 4)]
        assert drv.memory.read(dst, 4) == b"cicp"
        # ...and reads through it see the common cfg.
        await pci.config_write(cap + 8, struct.pack("<II", Common.NUM_QUEUES, 2))
        assert await pci.config_read(cap + 16, 2) == b"\x02\x00"
    finally:
        await drv.close()
        await pci.close()


@pytest.mark.asyncio
async def test_queues_and_config_sharing_one_vector(tmp_path: Path) -> None:
    async with serve(tmp_path, ReverseDevice(msix_vectors=1)) as served, driven(served) as drv:
        await drv.init(queues=2)
        assert [q.vector for q in drv.queues] == [0, 0] and drv.config_vector == 0
        for i in range(40):
            payload = bytes(range(i % 200 + 1))
            assert await round_trip(drv, i % 2, payload) == payload[::-1]
        assert served.device.bump()
        await drv.wait_config_change()
        assert await drv.read_config(0, 4) == struct.pack("<I", 1)


@pytest.mark.asyncio
async def test_a_kick_before_driver_ok_runs_at_driver_ok(served: Served) -> None:
    dev = served.device
    async with driven(served) as drv:
        await drv.negotiate(0)
        await drv.setup_dma()
        await drv.setup_interrupts(3)
        await drv.set_config_vector(0)
        q = await drv.setup_queue(0)
        src, dst = drv.alloc(3), drv.alloc(3)
        drv.memory.write(src, b"ear")
        head = q.add([(src, 3)], [(dst, 3)])
        await drv.kick(0, force=True)
        await until(lambda: dev.queues[0].kicks == 1, "the kick did not arrive")
        assert dev.handled == [0, 0]  # no buffers are used before DRIVER_OK
        await drv.driver_ok()
        assert await drv.wait_used(0) == [(head, 3)]
        assert drv.memory.read(dst, 3) == b"rae" and drv.interrupts[1] == 1
        assert await drv.read_isr() == 0x1  # the queue bit, cleared by the read
        assert await drv.read_isr() == 0


# --- config -------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_device_config_generation_and_change_interrupt(served: Served) -> None:
    dev = served.device
    async with driven(served) as drv:
        await drv.init(queues=1)
        assert await drv.read_config(0, 16) == struct.pack("<II", 0, 0) + NAME
        await drv.write_config(4, struct.pack("<I", 0xDEADBEEF))
        assert await drv.read_config(4, 4) == struct.pack("<I", 0xDEADBEEF)
        # A change between the two generation reads: the driver retries and sees the new value.
        gen = await drv.config_generation()
        dev.bump_on_read = True
        assert await drv.read_config(0, 4) == struct.pack("<I", 1)
        assert await drv.config_generation() == (gen + 1) & 0xFF
        await drv.wait_config_change()
        # A change by the device: interrupt on the config vector, callback, new generation.
        seen: list[int] = []
        drv.on_config_change = lambda: seen.append(1)
        before = drv.config_interrupts
        assert dev.bump()
        await drv.wait_config_change()
        assert drv.config_interrupts == before + 1 and seen == [1]
        assert await drv.read_config(0, 4) == struct.pack("<I", 2)
        # ISR: the config bit was set, a read returns it and clears it.
        assert await drv.read_isr() & 0x2
        assert await drv.read_isr() == 0
        # Writing the read-only counter is refused.
        refused = dev.refused_writes
        await drv.write_config(0, struct.pack("<I", 7))
        assert dev.refused_writes == refused + 1 and dev.counter == 2


# --- resets and sessions ------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_reset_by_status_zero_and_reinit(served: Served) -> None:
    dev = served.device
    async with driven(served) as drv:
        await drv.init(F_EVENT_IDX, queues=2)
        assert await round_trip(drv, 0, b"first") == b"tsrif"
        await drv.write_config(4, struct.pack("<I", 5))
        await drv.reset()
        assert dev.status == 0 and dev.driver_features == 0
        assert all(not q.enabled and q.queue is None for q in dev.queues)
        assert [q.size for q in dev.queues] == [256, 64]
        assert all(q.msix_vector == NO_VECTOR for q in dev.queues)
        assert dev.scratch == 0
        await drv.init(queues=[16])  # no EVENT_IDX this time
        assert dev.driver_features == F_VERSION_1
        for i in range(20):
            payload = bytes([i]) * (i + 1) + b"x"
            assert await round_trip(drv, 0, payload) == payload[::-1]
        # A vfio-user DEVICE_RESET (FLR) does the same.
        await drv.function_reset()
        assert dev.status == 0 and not dev.queues[0].enabled
        assert not dev.config.msix_enabled
        await drv.init(queues=1)
        assert dev.config.msix_enabled
        assert await round_trip(drv, 0, b"after flr") == b"rlf retfa"


@pytest.mark.asyncio
async def test_a_second_session_after_the_first_disconnects(served: Served) -> None:
    dev = served.device
    pci = await served.open()
    drv = await VirtioPciDriver.open(pci)
    await drv.init(queues=2)
    assert await round_trip(drv, 1, b"one") == b"eno"
    # The first driver vanishes without resetting (socket closed).
    await pci.close()
    await served.idle()
    assert dev.status == 0 and not any(q.enabled for q in dev.queues)
    async with driven(served) as drv2:
        await drv2.init(queues=2)
        for q in (0, 1):
            assert await round_trip(drv2, q, b"two") == b"owt"
    await served.idle()
    assert served.server.clients_served == 2


# --- hostile drivers ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_hostile_feature_and_status_writes_are_refused(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vvu.pci")
    dev = served.device
    async with driven(served) as drv:
        # Features without VERSION_1: FEATURES_OK does not stick.
        await drv.reset()
        await drv.set_status(Status.ACKNOWLEDGE | Status.DRIVER)
        await drv.write_features(F_EVENT_IDX)
        await drv.set_status(Status.FEATURES_OK)
        assert not await drv.status() & Status.FEATURES_OK
        # Features the device did not offer: refused too.
        await drv.write_features(F_VERSION_1 | (1 << 40))
        await drv.set_status(Status.FEATURES_OK)
        assert not await drv.status() & Status.FEATURES_OK
        assert "VERSION_1" in caplog.text and "not offered" in caplog.text
        # DRIVER_OK without FEATURES_OK: refused.
        await drv.set_status(Status.DRIVER_OK)
        assert not await drv.status() & Status.DRIVER_OK
        # Clearing status bits needs a reset.
        await drv._write(Common.DEVICE_STATUS, 1, Status.ACKNOWLEDGE)
        assert await drv.status() & Status.DRIVER
        # The device still works after all that.
        await drv.init(queues=2)
        assert await round_trip(drv, 0, b"still alive") == b"evila llits"
        assert dev.refused_writes >= 4


@pytest.mark.asyncio
async def test_hostile_queue_writes_are_refused_and_the_device_keeps_serving(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vvu.pci")
    dev = served.device
    async with driven(served) as drv:
        w = drv._write
        r = drv._read
        await drv.reset()
        await drv.set_status(Status.ACKNOWLEDGE | Status.DRIVER)
        # Enabling a queue before FEATURES_OK.
        await drv.setup_dma()
        ring = drv.alloc(0x4000, 4096)
        await w(Common.QUEUE_SELECT, 2, 0)
        await drv._write64(Common.QUEUE_DESC, ring)
        await drv._write64(Common.QUEUE_DRIVER, ring + 0x1000)
        await drv._write64(Common.QUEUE_DEVICE, ring + 0x2000)
        await w(Common.QUEUE_ENABLE, 2, 1)
        assert await r(Common.QUEUE_ENABLE, 2) == 0 and "before FEATURES_OK" in caplog.text
        # A proper negotiation now.
        await drv.negotiate(0)
        await w(Common.QUEUE_SELECT, 2, 0)
        # Queue size not a power of two, or above the maximum: kept at the old value.
        await w(Common.QUEUE_SIZE, 2, 100)
        assert await r(Common.QUEUE_SIZE, 2) == 256
        await w(Common.QUEUE_SIZE, 2, 512)
        assert await r(Common.QUEUE_SIZE, 2) == 256
        # A vector that does not exist reads back NO_VECTOR.
        await w(Common.QUEUE_MSIX_VECTOR, 2, 9)
        assert await r(Common.QUEUE_MSIX_VECTOR, 2) == NO_VECTOR
        await w(Common.MSIX_CONFIG, 2, 3)
        assert await r(Common.MSIX_CONFIG, 2) == NO_VECTOR
        # Ring addresses outside DMA memory, or misaligned: enable refused.
        await drv._write64(Common.QUEUE_DESC, 0x7000_0000)
        await w(Common.QUEUE_ENABLE, 2, 1)
        assert await r(Common.QUEUE_ENABLE, 2) == 0
        assert "not in mapped DMA memory" in caplog.text
        await drv._write64(Common.QUEUE_DESC, ring + 8)
        await w(Common.QUEUE_ENABLE, 2, 1)
        assert await r(Common.QUEUE_ENABLE, 2) == 0 and "aligned" in caplog.text
        end = drv._arena.iova + drv._arena.size if drv._arena else 0
        await drv._write64(Common.QUEUE_DESC, end - 16)  # runs off the end of the window
        await w(Common.QUEUE_ENABLE, 2, 1)
        assert await r(Common.QUEUE_ENABLE, 2) == 0
        # queue_select out of range: reads 0, writes dropped.
        await w(Common.QUEUE_SELECT, 2, 7)
        assert await r(Common.QUEUE_SIZE, 2) == 0
        assert await r(Common.QUEUE_DESC, 8) == 0
        await w(Common.QUEUE_SIZE, 2, 4)
        await w(Common.QUEUE_ENABLE, 2, 1)
        assert "out of range" in caplog.text
        assert not any(q.enabled for q in dev.queues)
        await drv.init(queues=2)
        assert await round_trip(drv, 0, b"still alive") == b"evila llits"


@pytest.mark.asyncio
async def test_hostile_register_writes_are_refused(served: Served) -> None:
    dev = served.device
    async with driven(served) as drv:
        w = drv._write
        r = drv._read
        await drv.negotiate(0)
        refused = dev.refused_writes
        # Read-only registers, odd widths, clearing status bits, notifying unknown queues.
        await w(Common.NUM_QUEUES, 2, 9)
        assert await drv.num_queues() == 2
        await drv.pci.bar_write(0, Common.QUEUE_SELECT + 1, b"\x01")
        await w(Common.DEVICE_STATUS, 1, Status.ACKNOWLEDGE)
        assert await drv.status() & Status.FEATURES_OK
        await drv.pci.bar_write(0, NOTIFY_OFFSET + 4 * 50, b"\x32\x00")
        await drv.pci.bar_write(0, NOTIFY_OFFSET + 1, b"\x00\x00")
        await drv.pci.bar_write(0, 0x1000, b"\x01")  # ISR is read-only
        assert dev.refused_writes == refused + 6
        # The device still works after all that.
        await drv.init(queues=2)
        assert await round_trip(drv, 0, b"still alive") == b"evila llits"
        # Writes to an enabled queue's fields are ignored.
        await w(Common.QUEUE_SELECT, 2, 0)
        await drv._write64(Common.QUEUE_DESC, 0)
        assert await r(Common.QUEUE_DESC, 8) == drv.queues[0].desc
        assert dev.refused_writes == refused + 8
        assert await round_trip(drv, 1, b"ok") == b"ko"


@pytest.mark.asyncio
async def test_unmapping_a_ring_detaches_the_queue(served: Served) -> None:
    dev = served.device
    pci = await served.open()
    drv = await VirtioPciDriver.open(pci)
    extra = memfd(0x10000)
    try:
        await drv.init(queues=1)
        await pci.map_dma(extra, 0x2000_0000, 0x10000)
        await drv._write(Common.QUEUE_SELECT, 2, 1)
        for reg, addr in ((Common.QUEUE_DESC, 0), (Common.QUEUE_DRIVER, 0x1000)):
            await drv._write64(reg, 0x2000_0000 + addr)
        await drv._write64(Common.QUEUE_DEVICE, 0x2000_2000)
        await drv._write(Common.QUEUE_ENABLE, 2, 1)
        assert dev.queues[1].enabled
        await pci.unmap_dma(0x2000_0000, 0x10000)
        assert dev.queues[1].queue is None and not dev.queues[1].enabled
        assert dev.status & Status.DEVICE_NEEDS_RESET
        await drv.wait_config_change()
        await drv.reset()
        await drv.init(queues=1)
        assert await round_trip(drv, 0, b"fresh") == b"hserf"
    finally:
        await drv.close()
        await pci.close()
        os.close(extra)


@pytest.mark.asyncio
async def test_driver_refuses_a_device_that_is_not_virtio(tmp_path: Path) -> None:
    device = EchoDevice()
    path = str(tmp_path / "echo.sock")
    server = VfioUserServer(device, VfioUserListener(path))
    task = asyncio.ensure_future(server.serve_forever())
    try:
        pci = await VfioUserPciAccess.open(path, timeout=2)
        try:
            with pytest.raises(VirtioPciError):
                await VirtioPciDriver.open(pci)
        finally:
            await pci.close()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        server.close()
        device.close()
