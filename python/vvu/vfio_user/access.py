"""`PciAccess`: everything a userspace PCI driver needs from "its" device, behind one small
interface, so that the virtio-pci driver (and the VVU driver on top) works the same over
vfio-user (`VfioUserPciAccess`, here) and, later, over Linux VFIO.

- config space: read/write bytes (and little-endian helpers);
- BARs: size, read/write (through a mapping when the range is mapped, else by message), map the
  mmap-able parts into a `GuestMemory` addressed by BAR offset, doorbells (an eventfd that rings
  a register without a message, when the device offers one);
- interrupts: MSI-X vectors as eventfds;
- DMA memory: windows of the driver's own fds at IOVAs the device can reach, and the driver's
  view of them (`dma_memory`, by IOVA);
- reset, close.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import struct
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Final

from vvu._core import EventFd, GuestMemory, memfd
from vvu.errors import GuestMemoryError
from vvu.vfio_user.client import ClientOptions, IoRegionFd, MappableArea, VfioUserClient
from vvu.vfio_user.device import CAP_ID_MSIX, CFG_CAP_PTR, CFG_STATUS, MSIX_CTRL_ENABLE
from vvu.vfio_user.protocol import IrqIndex, RegionFlag, VfioUserError

__all__ = ["BarInfo", "PciAccess", "VfioUserPciAccess"]

log = logging.getLogger(__name__)

NUM_BARS: Final = 6
STATUS_CAP_LIST: Final = 0x10


@dataclass(frozen=True, slots=True)
class BarInfo:
    """A BAR as the driver sees it: size 0 = absent (or the high half of a 64-bit BAR)."""

    index: int
    size: int
    readable: bool
    writable: bool
    mappable: bool


class PciAccess(ABC):
    """A PCI function a userspace driver owns. All I/O methods are coroutines."""

    # -- config space --------------------------------------------------------------------------

    @abstractmethod
    async def config_read(self, offset: int, size: int) -> bytes: ...

    @abstractmethod
    async def config_write(self, offset: int, data: bytes) -> None: ...

    async def config_read_u8(self, offset: int) -> int:
        return (await self.config_read(offset, 1))[0]

    async def config_read_u16(self, offset: int) -> int:
        return int(struct.unpack("<H", await self.config_read(offset, 2))[0])

    async def config_read_u32(self, offset: int) -> int:
        return int(struct.unpack("<I", await self.config_read(offset, 4))[0])

    async def config_write_u16(self, offset: int, value: int) -> None:
        await self.config_write(offset, struct.pack("<H", value))

    async def find_capability(self, cap_id: int) -> int | None:
        """Offset of the first standard capability `cap_id`, or None (loops are cut off)."""
        if not await self.config_read_u16(CFG_STATUS) & STATUS_CAP_LIST:
            return None
        offset = await self.config_read_u8(CFG_CAP_PTR) & ~3
        seen: set[int] = set()
        while offset >= 0x40 and offset not in seen:
            seen.add(offset)
            head = await self.config_read(offset, 2)
            if head[0] == cap_id:
                return offset
            offset = head[1] & ~3
        return None

    # -- BARs ----------------------------------------------------------------------------------

    @abstractmethod
    def bar_info(self, bar: int) -> BarInfo: ...

    @abstractmethod
    async def bar_read(self, bar: int, offset: int, size: int) -> bytes: ...

    @abstractmethod
    async def bar_write(self, bar: int, offset: int, data: bytes, *, posted: bool = False) -> None:
        """Write `data`; `posted`: do not wait for the device to acknowledge (still ordered)."""

    @abstractmethod
    async def map_bar(self, bar: int) -> GuestMemory | None:
        """Map the BAR's mmap-able parts into a GuestMemory addressed by BAR offset (None when
        nothing is mappable). Later bar_read/bar_write inside those parts go through it."""

    @abstractmethod
    async def bar_areas(self, bar: int) -> list[MappableArea]:
        """The BAR's mmap-able areas as they are now, each with its own fd (the caller closes
        them): for BARs whose backing changes at run time, like a VVU device's shared memory."""

    @abstractmethod
    async def bar_ioeventfds(self, bar: int) -> list[IoRegionFd]:
        """The BAR's ioeventfds as they are now (the caller owns their eventfds): for doorbells
        that are rebound at run time, like a VVU device's call doorbells."""

    @abstractmethod
    def doorbell(self, bar: int, offset: int, size: int, value: int) -> EventFd | None:
        """An eventfd whose signal equals writing `value` (`size` bytes) at BAR `offset`, when
        the device offers one (ioeventfd). Hand it to a native worker to notify without Python.
        """

    # -- interrupts ----------------------------------------------------------------------------

    @abstractmethod
    async def msix_vectors(self) -> int:
        """How many MSI-X vectors the function has (0: none)."""

    @abstractmethod
    async def enable_msix(self, count: int) -> list[EventFd]:
        """Bind `count` vectors to new eventfds and enable MSI-X; the device raises vector i by
        signalling eventfd i. The eventfds stay valid until disable_msix() or close()."""

    @abstractmethod
    async def disable_msix(self) -> None: ...

    # -- DMA -----------------------------------------------------------------------------------

    @property
    @abstractmethod
    def dma_memory(self) -> GuestMemory:
        """The driver's own view of its DMA windows, addressed by IOVA."""

    def dma_fd(self, size: int, name: str) -> tuple[int, int]:
        """A new fd for at least `size` bytes of DMA memory, and its size (the caller owns the
        fd, then map_dma()s it): a memfd here; an implementation may pick memory its IOMMU maps
        more cheaply, rounded up to its page size."""
        return memfd(size, name), size

    @abstractmethod
    async def map_dma(self, fd: int, iova: int, size: int, *, offset: int = 0) -> None:
        """Let the device reach `size` bytes of `fd` (from `offset`) at IOVA `iova`."""

    @abstractmethod
    async def unmap_dma(self, iova: int, size: int) -> None: ...

    # -- life cycle ----------------------------------------------------------------------------

    @abstractmethod
    async def reset(self) -> None:
        """Function-level reset (DMA windows and interrupt bindings stay)."""

    @abstractmethod
    async def close(self) -> None: ...


#: BAR -> (its mapping, the (start, end) spans mapped in it), as `map_bar()` implementations keep.
BarMaps = dict[int, tuple[GuestMemory, list[tuple[int, int]]]]


def release_bar_maps(maps: BarMaps) -> None:
    """Unmap every span of every BAR mapping and forget them (at close)."""
    for memory, spans in maps.values():
        for start, _end in spans:
            with contextlib.suppress(GuestMemoryError):
                memory.remove_region(start)
    maps.clear()


class VfioUserPciAccess(PciAccess):
    """`PciAccess` over a vfio-user connection. Build it with `open()`."""

    def __init__(self, client: VfioUserClient) -> None:
        self.client = client
        self._bars: list[BarInfo] = []
        self._maps: BarMaps = {}
        self._doorbells: dict[int, list[IoRegionFd]] = {}
        self._msix: list[EventFd] = []

    @classmethod
    async def open(
        cls, path: str, *, timeout: float = 0.0, options: ClientOptions | None = None
    ) -> VfioUserPciAccess:
        client = await VfioUserClient.connect(path, timeout=timeout, options=options)
        access = cls(client)
        try:
            await access._discover()
        except BaseException:
            await access.close()
            raise
        return access

    async def _discover(self) -> None:
        info = await self.client.device_info()
        for bar in range(NUM_BARS):
            if bar >= info.num_regions:
                self._bars.append(BarInfo(bar, 0, False, False, False))
                continue
            region = await self.client.region_info(bar)
            self._bars.append(
                BarInfo(
                    bar,
                    region.size,
                    bool(region.flags & RegionFlag.READ),
                    bool(region.flags & RegionFlag.WRITE),
                    bool(region.flags & RegionFlag.MMAP),
                )
            )
            if region.size:
                self._doorbells[bar] = await self.client.region_io_fds(bar)

    # -- config --------------------------------------------------------------------------------

    async def config_read(self, offset: int, size: int) -> bytes:
        return await self.client.config_read(offset, size)

    async def config_write(self, offset: int, data: bytes) -> None:
        await self.client.config_write(offset, data)

    # -- BARs ----------------------------------------------------------------------------------

    def bar_info(self, bar: int) -> BarInfo:
        if not 0 <= bar < NUM_BARS:
            raise ValueError(f"BAR{bar} does not exist")
        return self._bars[bar]

    def _check(self, bar: int, offset: int, size: int) -> None:
        info = self.bar_info(bar)
        if offset < 0 or size <= 0 or offset + size > info.size:
            raise VfioUserError(errno.EINVAL, f"BAR{bar} access {offset:#x}+{size} is outside it")

    def _mapped(self, bar: int, offset: int, size: int) -> GuestMemory | None:
        entry = self._maps.get(bar)
        if entry is None:
            return None
        memory, spans = entry
        if any(start <= offset and offset + size <= end for start, end in spans):
            return memory
        return None

    async def bar_read(self, bar: int, offset: int, size: int) -> bytes:
        self._check(bar, offset, size)
        memory = self._mapped(bar, offset, size)
        if memory is not None:
            return memory.read(offset, size)
        return await self.client.region_read(bar, offset, size)

    async def bar_write(self, bar: int, offset: int, data: bytes, *, posted: bool = False) -> None:
        self._check(bar, offset, len(data))
        memory = self._mapped(bar, offset, len(data))
        if memory is not None:
            memory.write(offset, data)
            return
        for ioe in self._doorbells.get(bar, ()):
            if ioe.matches(offset, data):
                ioe.eventfd.signal()
                return
        await self.client.region_write(bar, offset, data, posted=posted)

    async def map_bar(self, bar: int) -> GuestMemory | None:
        if bar in self._maps:
            return self._maps[bar][0]
        if not self.bar_info(bar).mappable:
            return None
        areas: list[MappableArea] = await self.client.mmap_region(bar)
        memory = GuestMemory()
        try:
            for area in areas:
                memory.add_region(area.fd, area.offset, area.size, mmap_offset=area.fd_offset)
        finally:
            for area in areas:
                area.close()  # the mapping keeps its own duplicate
        if not areas:
            return None
        self._maps[bar] = (memory, [(a.offset, a.offset + a.size) for a in areas])
        return memory

    async def bar_areas(self, bar: int) -> list[MappableArea]:
        self.bar_info(bar)  # validates the index
        return await self.client.mmap_region(bar)

    async def bar_ioeventfds(self, bar: int) -> list[IoRegionFd]:
        self.bar_info(bar)
        return await self.client.region_io_fds(bar)

    def doorbell(self, bar: int, offset: int, size: int, value: int) -> EventFd | None:
        data = value.to_bytes(size, "little")
        for ioe in self._doorbells.get(bar, ()):
            if ioe.matches(offset, data):
                return ioe.eventfd
        return None

    # -- interrupts ----------------------------------------------------------------------------

    async def msix_vectors(self) -> int:
        return (await self.client.irq_info(IrqIndex.MSIX)).count

    async def enable_msix(self, count: int) -> list[EventFd]:
        await self.disable_msix()
        self._msix = await self.client.enable_irqs(IrqIndex.MSIX, count)
        cap = await self.find_capability(CAP_ID_MSIX)
        if cap is not None:
            ctrl = await self.config_read_u16(cap + 2)
            await self.config_write_u16(cap + 2, ctrl | MSIX_CTRL_ENABLE)
        return list(self._msix)

    async def disable_msix(self) -> None:
        if not self._msix:
            return
        cap = await self.find_capability(CAP_ID_MSIX)
        if cap is not None:
            ctrl = await self.config_read_u16(cap + 2)
            await self.config_write_u16(cap + 2, ctrl & ~MSIX_CTRL_ENABLE)
        await self.client.disable_irqs(IrqIndex.MSIX)
        for efd in self._msix:
            efd.close()
        self._msix = []

    # -- DMA -----------------------------------------------------------------------------------

    @property
    def dma_memory(self) -> GuestMemory:
        return self.client.memory

    async def map_dma(self, fd: int, iova: int, size: int, *, offset: int = 0) -> None:
        await self.client.dma_map(fd, iova, size, offset=offset)

    async def unmap_dma(self, iova: int, size: int) -> None:
        await self.client.dma_unmap(iova, size)

    # -- life cycle ----------------------------------------------------------------------------

    async def reset(self) -> None:
        await self.client.reset()

    async def close(self) -> None:
        await self.client.close()
        for efd in self._msix:
            efd.close()
        self._msix = []
        for doorbells in self._doorbells.values():
            for ioe in doorbells:
                ioe.eventfd.close()
        self._doorbells.clear()
        release_bar_maps(self._maps)
