"""`VirtioPciDriver`: a userspace modern virtio-pci driver on top of `PciAccess` only.

It walks the capability list for the virtio structures, resets the device, negotiates
features (VERSION_1 is required), sets up split queues in DMA memory it allocates itself (an
fd from `PciAccess.dma_fd`, a memfd unless the access knows better, mapped at `dma_iova` through
`PciAccess.map_dma`), binds one MSI-X vector to the config interrupt (vector 0) and one per
queue (vector i+1, shared vector 0 when the device has too few),
notifies through the device's ioeventfd when it offers one (else a BAR write), and reads the
device config with the config_generation retry loop.

Typical use::

    drv = await VirtioPciDriver.open(pci)
    await drv.init(features=WANTED, queues=2)
    q = drv.queues[0]
    head = q.add(readable=[(iova, n)], writable=[(iova2, m)])
    await drv.kick(0)
    used = await drv.wait_used(0)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from vvu._core import EventFd, GuestMemory, SplitQueueDriver
from vvu.pci.virtio_device import (
    F_EVENT_IDX,
    F_VERSION_1,
    NO_VECTOR,
    VIRTIO_PCI_DEVICE_BASE,
    VIRTIO_PCI_VENDOR,
    CfgType,
    Common,
    Status,
    queue_ring_sizes,
)
from vvu.vfio_user.access import PciAccess
from vvu.vfio_user.device import CAP_ID_VENDOR, CFG_CAP_PTR, CFG_STATUS, STATUS_CAP_LIST

__all__ = ["DriverQueue", "VirtioCap", "VirtioPciDriver", "VirtioPciError"]

log = logging.getLogger(__name__)

DEFAULT_DMA_IOVA: Final = 0x1000_0000
DEFAULT_DMA_SIZE: Final = 4 << 20
RESET_POLL: Final = 0.001
RESET_TIMEOUT: Final = 5.0
GENERATION_RETRIES: Final = 100


class VirtioPciError(Exception):
    """The device is not a usable modern virtio-pci device, or refused the driver."""


@dataclass(frozen=True, slots=True)
class VirtioCap:
    """One `virtio_pci_cap` found in config space (`extra`: bytes after the 16-byte head)."""

    at: int
    cfg_type: int
    bar: int
    cap_id: int
    offset: int
    length: int
    extra: bytes = b""


@dataclass(slots=True)
class DriverQueue:
    """A queue the driver set up: the ring, its vector and how to notify it."""

    index: int
    size: int
    ring: SplitQueueDriver
    vector: int
    interrupt: EventFd | None
    notify_offset: int
    doorbell: EventFd | None
    desc: int
    avail: int
    used: int

    def add(
        self, readable: list[tuple[int, int]], writable: list[tuple[int, int]] | None = None
    ) -> int:
        """Add a chain (lists of (iova, length)); returns its head. Publish with kick()."""
        return self.ring.add_chain(readable, writable or [])


@dataclass(slots=True)
class _Arena:
    """A bump allocator over the driver's DMA window."""

    iova: int
    size: int
    next: int = 0
    marks: list[int] = field(default_factory=list)

    def alloc(self, size: int, align: int = 64) -> int:
        start = (self.next + align - 1) & ~(align - 1)
        if start + size > self.size:
            raise MemoryError(f"DMA arena of {self.size:#x} bytes is full")
        self.next = start + size
        return self.iova + start


def _bit(value: int) -> str:
    return f"{value:#x}"


class VirtioPciDriver:
    """See the module docstring. Build with `open()`; `close()` resets and releases."""

    def __init__(self, pci: PciAccess, caps: Sequence[VirtioCap], device_id: int) -> None:
        self.pci = pci
        self.caps = list(caps)
        self.virtio_id = device_id - VIRTIO_PCI_DEVICE_BASE
        self.common = self._required(CfgType.COMMON)
        self.notify = self._required(CfgType.NOTIFY)
        self.isr = self._required(CfgType.ISR)
        self.device_cfg = self._first(CfgType.DEVICE)
        self.notify_multiplier = int(struct.unpack_from("<I", self.notify.extra)[0])
        self.features = 0
        self.queues: list[DriverQueue] = []
        self.vectors: list[EventFd] = []
        self.config_vector = NO_VECTOR
        self.config_interrupts = 0
        self.config_event = asyncio.Event()
        self.on_config_change: Callable[[], None] | None = None
        self._dma_fd: int | None = None
        self._arena: _Arena | None = None
        self.interrupts: list[int] = []  # per vector, as they arrived
        self._vector_events: list[asyncio.Event] = []
        self._watched: list[int] = []

    # -- discovery -----------------------------------------------------------------------------

    @classmethod
    async def open(cls, pci: PciAccess) -> VirtioPciDriver:
        vendor = await pci.config_read_u16(0)
        device = await pci.config_read_u16(2)
        if vendor != VIRTIO_PCI_VENDOR or not 0x1040 <= device <= 0x107F:
            raise VirtioPciError(f"{vendor:04x}:{device:04x} is not a modern virtio-pci device")
        caps = await cls.find_caps(pci)
        return cls(pci, caps, device)

    @staticmethod
    async def find_caps(pci: PciAccess) -> list[VirtioCap]:
        """Every virtio vendor capability, in list order (loops and bad pointers cut off)."""
        found: list[VirtioCap] = []
        if not await pci.config_read_u16(CFG_STATUS) & STATUS_CAP_LIST:
            return found
        at = await pci.config_read_u8(CFG_CAP_PTR) & ~3
        seen: set[int] = set()
        while 0x40 <= at <= 0xFC and at not in seen:
            seen.add(at)
            head = await pci.config_read(at, 3)
            if head[0] == CAP_ID_VENDOR and head[2] >= 16 and at + head[2] <= 0x100:
                raw = await pci.config_read(at, head[2])
                cfg_type, bar, cap_id = raw[3], raw[4], raw[5]
                offset, length = struct.unpack_from("<II", raw, 8)
                if bar <= 5:
                    found.append(VirtioCap(at, cfg_type, bar, cap_id, offset, length, raw[16:]))
            at = head[1] & ~3
        return found

    def _first(self, cfg_type: int) -> VirtioCap | None:
        for cap in self.caps:
            if cap.cfg_type != cfg_type:
                continue
            if cfg_type == CfgType.NOTIFY and len(cap.extra) < 4:
                continue
            bar = self.pci.bar_info(cap.bar)
            if cap.offset + cap.length <= bar.size:
                return cap
        return None

    def _required(self, cfg_type: int) -> VirtioCap:
        cap = self._first(cfg_type)
        if cap is None:
            raise VirtioPciError(f"no usable virtio capability of type {cfg_type}")
        return cap

    # -- registers -----------------------------------------------------------------------------

    async def _read(self, offset: int, size: int) -> int:
        data = await self.pci.bar_read(self.common.bar, self.common.offset + offset, size)
        return int.from_bytes(data, "little")

    async def _write(self, offset: int, size: int, value: int) -> None:
        await self.pci.bar_write(
            self.common.bar, self.common.offset + offset, value.to_bytes(size, "little")
        )

    async def _write64(self, offset: int, value: int) -> None:
        await self._write(offset, 4, value & 0xFFFFFFFF)
        await self._write(offset + 4, 4, value >> 32)

    async def status(self) -> int:
        return await self._read(Common.DEVICE_STATUS, 1)

    async def set_status(self, bits: int) -> None:
        """OR `bits` into device_status."""
        await self._write(Common.DEVICE_STATUS, 1, await self.status() | bits)

    async def device_features(self) -> int:
        words = []
        for select in (0, 1):
            await self._write(Common.DEVICE_FEATURE_SELECT, 4, select)
            words.append(await self._read(Common.DEVICE_FEATURE, 4))
        return words[0] | words[1] << 32

    async def num_queues(self) -> int:
        return await self._read(Common.NUM_QUEUES, 2)

    async def config_generation(self) -> int:
        return await self._read(Common.CONFIG_GENERATION, 1)

    async def read_isr(self) -> int:
        """Read (and so clear) the ISR status byte."""
        return (await self.pci.bar_read(self.isr.bar, self.isr.offset, 1))[0]

    # -- life cycle ----------------------------------------------------------------------------

    async def reset(self) -> None:
        """Write status 0 and wait until it reads 0; drop every queue (DMA memory stays)."""
        await self._write(Common.DEVICE_STATUS, 1, 0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RESET_TIMEOUT
        while await self.status() != 0:
            if loop.time() > deadline:
                raise VirtioPciError("the device does not complete its reset")
            await asyncio.sleep(RESET_POLL)
        self.queues = []
        self.features = 0
        self.config_vector = NO_VECTOR
        if self._arena is not None:
            self._arena.next = 0

    async def negotiate(self, wanted: int) -> int:
        """Reset, ACKNOWLEDGE, DRIVER, accept `wanted` ∩ offered (VERSION_1 required),
        FEATURES_OK and check it stuck. Returns the accepted features."""
        await self.reset()
        await self.set_status(Status.ACKNOWLEDGE)
        await self.set_status(Status.DRIVER)
        offered = await self.device_features()
        if not offered & F_VERSION_1:
            await self.set_status(Status.FAILED)
            raise VirtioPciError("the device does not offer VERSION_1")
        accepted = (wanted | F_VERSION_1) & offered
        await self.write_features(accepted)
        await self.set_status(Status.FEATURES_OK)
        if not await self.status() & Status.FEATURES_OK:
            await self.set_status(Status.FAILED)
            raise VirtioPciError(f"the device refused features {_bit(accepted)}")
        self.features = accepted
        return accepted

    async def write_features(self, features: int) -> None:
        for select in (0, 1):
            await self._write(Common.DRIVER_FEATURE_SELECT, 4, select)
            await self._write(Common.DRIVER_FEATURE, 4, (features >> (32 * select)) & 0xFFFFFFFF)

    async def setup_dma(
        self, *, iova: int = DEFAULT_DMA_IOVA, size: int = DEFAULT_DMA_SIZE
    ) -> GuestMemory:
        """Allocate and map the driver's DMA window of at least `size` bytes (once); returns the
        driver's view."""
        if self._arena is None:
            fd, size = self.pci.dma_fd(size, "vvu-virtio-dma")
            try:
                await self.pci.map_dma(fd, iova, size)
            except BaseException:
                os.close(fd)
                raise
            self._dma_fd = fd
            self._arena = _Arena(iova, size)
        return self.pci.dma_memory

    @property
    def dma_size(self) -> int:
        """Bytes in the DMA window (0 before setup_dma())."""
        return 0 if self._arena is None else self._arena.size

    async def queue_max_size(self, index: int) -> int:
        """The largest size queue `index` takes (0: no such queue)."""
        await self._write(Common.QUEUE_SELECT, 2, index)
        return await self._read(Common.QUEUE_SIZE, 2)

    def alloc(self, size: int, align: int = 64) -> int:
        """DMA memory for buffers (freed all at once by reset())."""
        if self._arena is None:
            raise VirtioPciError("setup_dma() first")
        return self._arena.alloc(size, align)

    @property
    def memory(self) -> GuestMemory:
        return self.pci.dma_memory

    async def setup_interrupts(self, count: int) -> list[EventFd]:
        """Enable `count` MSI-X vectors (capped at what the device has) and watch vector 0 for
        config changes."""
        available = await self.pci.msix_vectors()
        if available < 1:
            raise VirtioPciError("the device has no MSI-X vectors")
        self._unwatch()
        self.vectors = await self.pci.enable_msix(min(count, available))
        loop = asyncio.get_running_loop()
        self.interrupts = [0] * len(self.vectors)
        self._vector_events = [asyncio.Event() for _ in self.vectors]
        for vector, efd in enumerate(self.vectors):
            loop.add_reader(efd.fileno(), self._on_vector, vector)
            self._watched.append(efd.fileno())
        return self.vectors

    def _unwatch(self) -> None:
        with contextlib.suppress(RuntimeError):
            loop = asyncio.get_running_loop()
            for fd in self._watched:
                loop.remove_reader(fd)
        self._watched = []

    def _on_vector(self, vector: int) -> None:
        """One reader per vector: wake the queues on it; on the config vector, report a
        config change (when queues share it, every interrupt there counts as one)."""
        if not self.vectors[vector].consume():
            return
        self.interrupts[vector] += 1
        self._vector_events[vector].set()
        if vector == self.config_vector:
            self.config_interrupts += 1
            self.config_event.set()
            if self.on_config_change is not None:
                self.on_config_change()

    async def setup_queue(self, index: int, size: int | None = None) -> DriverQueue:
        """Configure queue `index` (rings in the driver's DMA memory) and enable it."""
        if self._arena is None:
            raise VirtioPciError("setup_dma() first")
        max_size = await self.queue_max_size(index)
        if not max_size:
            raise VirtioPciError(f"queue {index} does not exist")
        qsize = min(size or max_size, max_size)
        if qsize != max_size:
            await self._write(Common.QUEUE_SIZE, 2, qsize)
        event_idx = bool(self.features & F_EVENT_IDX)
        desc_len, avail_len, used_len = queue_ring_sizes(qsize, event_idx=event_idx)
        desc = self.alloc(desc_len, 4096)
        avail = self.alloc(avail_len, 4096)
        used = self.alloc(used_len, 4096)
        self.memory.write(desc, bytes(desc_len))
        self.memory.write(avail, bytes(avail_len))
        self.memory.write(used, bytes(used_len))
        await self._write64(Common.QUEUE_DESC, desc)
        await self._write64(Common.QUEUE_DRIVER, avail)
        await self._write64(Common.QUEUE_DEVICE, used)
        vector = NO_VECTOR
        interrupt: EventFd | None = None
        if self.vectors:
            wanted = index + 1 if index + 1 < len(self.vectors) else 0
            await self._write(Common.QUEUE_MSIX_VECTOR, 2, wanted)
            vector = await self._read(Common.QUEUE_MSIX_VECTOR, 2)
            if vector != wanted:
                raise VirtioPciError(f"queue {index}: the device refused MSI-X vector {wanted}")
            interrupt = self.vectors[vector]
        notify_off = await self._read(Common.QUEUE_NOTIFY_OFF, 2)
        notify_offset = self.notify.offset + notify_off * self.notify_multiplier
        if notify_offset + 2 > self.notify.offset + self.notify.length:
            raise VirtioPciError(f"queue {index}: notify offset {notify_off} is outside the cap")
        await self._write(Common.QUEUE_ENABLE, 2, 1)
        if await self._read(Common.QUEUE_ENABLE, 2) != 1:
            raise VirtioPciError(f"queue {index}: the device refused to enable it")
        ring = SplitQueueDriver(self.memory, qsize, desc, avail, used, event_idx=event_idx)
        doorbell = self.pci.doorbell(self.notify.bar, notify_offset, 2, index)
        queue = DriverQueue(
            index, qsize, ring, vector, interrupt, notify_offset, doorbell, desc, avail, used
        )
        self.queues.append(queue)
        return queue

    async def function_reset(self) -> None:
        """A PCI function-level reset (vfio-user DEVICE_RESET): the device resets and MSI-X is
        disabled in its config space, so the next init() takes vectors again."""
        self._unwatch()
        await self.pci.reset()
        await self.pci.disable_msix()
        self.vectors = []
        self.queues = []
        self.features = 0
        self.config_vector = NO_VECTOR
        if self._arena is not None:
            self._arena.next = 0

    async def set_config_vector(self, vector: int = 0) -> None:
        await self._write(Common.MSIX_CONFIG, 2, vector)
        got = await self._read(Common.MSIX_CONFIG, 2)
        if got != vector:
            raise VirtioPciError(f"the device refused config MSI-X vector {vector}")
        self.config_vector = vector

    async def driver_ok(self) -> None:
        await self.set_status(Status.DRIVER_OK)
        if not await self.status() & Status.DRIVER_OK:
            raise VirtioPciError("the device refused DRIVER_OK")

    async def init(
        self,
        features: int = 0,
        queues: int | Sequence[int | None] = 1,
        *,
        dma_iova: int = DEFAULT_DMA_IOVA,
        dma_size: int = DEFAULT_DMA_SIZE,
    ) -> int:
        """The whole sequence: negotiate, DMA, MSI-X (config + one per queue), queues,
        DRIVER_OK. `queues`: a count (max sizes) or a size per queue (None = max)."""
        sizes: list[int | None] = [None] * queues if isinstance(queues, int) else list(queues)
        accepted = await self.negotiate(features)
        await self.setup_dma(iova=dma_iova, size=dma_size)
        if len(sizes) > await self.num_queues():
            await self.set_status(Status.FAILED)
            raise VirtioPciError(f"the device has fewer than {len(sizes)} queues")
        if not self.vectors:
            await self.setup_interrupts(len(sizes) + 1)
        await self.set_config_vector(0)
        for index, size in enumerate(sizes):
            await self.setup_queue(index, size)
        await self.driver_ok()
        return accepted

    # -- queues --------------------------------------------------------------------------------

    async def kick(self, index: int, *, force: bool = False) -> bool:
        """Publish queue `index`'s new chains and notify the device if it wants it (or
        `force`). True when a notification was sent."""
        queue = self.queues[index]
        if not queue.ring.publish() and not force:
            return False
        await self.notify_queue(index)
        return True

    async def notify_queue(self, index: int) -> None:
        """Notify the device: its ioeventfd when it offers one, else a write in the BAR."""
        queue = self.queues[index]
        if queue.doorbell is not None:
            queue.doorbell.signal()
        else:
            await self.pci.bar_write(
                self.notify.bar, queue.notify_offset, struct.pack("<H", index), posted=True
            )

    async def wait_used(self, index: int, timeout: float | None = 5.0) -> list[tuple[int, int]]:
        """Used (head, length) entries of queue `index`, waiting for its interrupt if none."""
        queue = self.queues[index]
        event = self._vector_events[queue.vector] if queue.interrupt is not None else None
        while True:
            if event is not None:
                event.clear()  # no await until the wait: a later interrupt sets it again
            used = queue.ring.reap_all()
            if used:
                return used
            if queue.ring.enable_call_notifications():  # re-armed; entries came meanwhile
                continue
            if event is None:
                await asyncio.sleep(0.001)
                continue
            await asyncio.wait_for(event.wait(), timeout)

    # -- device config -------------------------------------------------------------------------

    def _device_cfg(self) -> VirtioCap:
        if self.device_cfg is None:
            raise VirtioPciError("the device has no device-specific configuration")
        return self.device_cfg

    async def read_config(self, offset: int, size: int) -> bytes:
        """Read the device config consistently (generation before == after; retried)."""
        cap = self._device_cfg()
        if offset < 0 or offset + size > cap.length:
            raise ValueError(f"device config {offset:#x}+{size} is outside {cap.length:#x}")
        for _ in range(GENERATION_RETRIES):
            before = await self.config_generation()
            data = bytearray()
            pos = 0
            while pos < size:  # naturally aligned accesses of at most 4 bytes
                width = 4
                while width > 1 and ((offset + pos) % width or pos + width > size):
                    width //= 2
                data += await self.pci.bar_read(cap.bar, cap.offset + offset + pos, width)
                pos += width
            if await self.config_generation() == before:
                return bytes(data)
        raise VirtioPciError("the device config keeps changing")

    async def write_config(self, offset: int, data: bytes) -> None:
        cap = self._device_cfg()
        if offset < 0 or offset + len(data) > cap.length:
            raise ValueError(f"device config {offset:#x}+{len(data)} is outside {cap.length:#x}")
        await self.pci.bar_write(cap.bar, cap.offset + offset, data)

    async def wait_config_change(self, timeout: float | None = 5.0) -> None:
        """Wait for the next config-change interrupt (and clear the event)."""
        await asyncio.wait_for(self.config_event.wait(), timeout)
        self.config_event.clear()

    # -- teardown ------------------------------------------------------------------------------

    async def close(self) -> None:
        """Reset the device, disable MSI-X, unmap and free the DMA window. The `PciAccess`
        stays open (its owner closes it)."""
        self._unwatch()
        with contextlib.suppress(Exception):
            await self.reset()
        with contextlib.suppress(Exception):
            await self.pci.disable_msix()
        self.vectors = []
        if self._arena is not None:
            with contextlib.suppress(Exception):
                await self.pci.unmap_dma(self._arena.iova, self._arena.size)
            self._arena = None
        if self._dma_fd is not None:
            os.close(self._dma_fd)
            self._dma_fd = None
