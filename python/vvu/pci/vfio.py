"""`VfioPciAccess`: the `PciAccess` seam over Linux VFIO, so the VVU driver runs inside a guest.

In the back-end VM the VVU device is a PCI function the VMM (QEMU `vfio-user-pci`) emulates.
The driver takes it from Linux through VFIO with the type1 IOMMU — the guest needs a vIOMMU, see
docs/vvu-device.md "Run a back-end in a VM" for why — and maps the seam one to one:

- config space: pread/pwrite on the device fd at the config region's offset (vfio-pci
  virtualises the parts it owns);
- BAR registers: an mmap of the device fd where the region is mmap-able, with exact 1/2/4/8-byte
  accesses (one load or store of that width each); elsewhere pread/pwrite, which vfio-pci turns
  into aligned accesses of at most 4 bytes;
- BAR memory (the VVU device's BAR4, the front-end's RAM that the VMM maps, and with
  `--frontend-memory` its BAR3, the inflight memory): `bar_areas()` and
  `map_bar()` hand out the sysfs `resourceN` file, a regular file the native core can map (it
  refuses the VFIO device fd, an anonymous inode without a size), offset = offset in the BAR.
  Such a BAR is never touched through VFIO: a vfio-pci access claims it, and with
  CONFIG_IO_STRICT_DEVMEM (Debian) sysfs then refuses it;
- doorbells: VFIO_DEVICE_IOEVENTFD, the kernel writes the register when the eventfd is
  signalled, so a native worker rings the VVU call doorbells and virtqueue notifications without
  Python; created on demand by `doorbell()` (vfio-pci allows 1000 per device);
- MSI-X: VFIO_DEVICE_SET_IRQS binds eventfds (the kernel enables MSI-X itself);
- DMA: the caller's fd mmapped MAP_SHARED, pinned with VFIO_IOMMU_MAP_DMA at the IOVA, and the
  same fd in `dma_memory` by IOVA; `dma_fd()` prefers hugetlb pages (each one mapping through
  the vIOMMU instead of 512);
- reset: VFIO_DEVICE_RESET when vfio-pci has a reset method for the function.

Layouts and numbers follow include/uapi/linux/vfio.h; tests/test_linux_vfio.py checks every
struct against the installed header. Everything the kernel reports is checked before use.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
import sys
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from pathlib import Path
from typing import Final, Literal

from vvu._core import EventFd, GuestMemory, memfd
from vvu.errors import GuestMemoryError, VvuError
from vvu.pci.sysfs import PciFunction, PciSetupError, bind_vfio, check_vfio, pci_function
from vvu.vfio_user.access import NUM_BARS, BarInfo, BarMaps, PciAccess, release_bar_maps
from vvu.vfio_user.client import IoRegionFd, MappableArea

__all__ = ["LAYOUTS", "BarFds", "Ioctl", "VfioError", "VfioPciAccess"]

log = logging.getLogger(__name__)

# --- include/uapi/linux/vfio.h ---------------------------------------------------------------

VFIO_API_VERSION: Final = 0
VFIO_TYPE1_IOMMU: Final = 1
VFIO_TYPE1V2_IOMMU: Final = 3
_VFIO_TYPE: Final = ord(";")
_VFIO_BASE: Final = 100


def _io(nr: int) -> int:
    """_IO(VFIO_TYPE, VFIO_BASE + nr): VFIO ioctls carry no size; `argsz` says it."""
    return _VFIO_TYPE << 8 | (_VFIO_BASE + nr)


class Ioctl(IntEnum):
    GET_API_VERSION = _io(0)
    CHECK_EXTENSION = _io(1)
    SET_IOMMU = _io(2)
    GROUP_GET_STATUS = _io(3)
    GROUP_SET_CONTAINER = _io(4)
    GROUP_UNSET_CONTAINER = _io(5)
    GROUP_GET_DEVICE_FD = _io(6)
    DEVICE_GET_INFO = _io(7)
    DEVICE_GET_REGION_INFO = _io(8)
    DEVICE_GET_IRQ_INFO = _io(9)
    DEVICE_SET_IRQS = _io(10)
    DEVICE_RESET = _io(11)
    IOMMU_GET_INFO = _io(12)  # on the container fd (12 is PCI_HOT_RESET_INFO on a device fd)
    IOMMU_MAP_DMA = _io(13)
    IOMMU_UNMAP_DMA = _io(14)
    DEVICE_IOEVENTFD = _io(16)


GROUP_FLAGS_VIABLE: Final = 1 << 0
DEVICE_FLAGS_RESET: Final = 1 << 0
DEVICE_FLAGS_PCI: Final = 1 << 1


class RegionFlag(IntFlag):
    READ = 1 << 0
    WRITE = 1 << 1
    MMAP = 1 << 2
    CAPS = 1 << 3


REGION_INFO_CAP_SPARSE_MMAP: Final = 1
IOMMU_INFO_CAPS: Final = 1 << 1
IOMMU_TYPE1_INFO_CAP_IOVA_RANGE: Final = 1
PCI_CONFIG_REGION_INDEX: Final = 7
PCI_MSIX_IRQ_INDEX: Final = 2
IRQ_INFO_EVENTFD: Final = 1 << 0
IRQ_SET_DATA_NONE: Final = 1 << 0
IRQ_SET_DATA_EVENTFD: Final = 1 << 2
IRQ_SET_ACTION_TRIGGER: Final = 1 << 5
DMA_MAP_FLAG_READ: Final = 1 << 0
DMA_MAP_FLAG_WRITE: Final = 1 << 1
#: VFIO_DEVICE_IOEVENTFD_8/16/32/64 by access width
IOEVENTFD_SIZE_FLAGS: Final = {1: 1 << 0, 2: 1 << 1, 4: 1 << 2, 8: 1 << 3}

# Native byte order, standard sizes, padding spelled out (`x`) where the C compiler puts it.
GROUP_STATUS: Final = struct.Struct("=II")  # argsz flags
DEVICE_INFO: Final = struct.Struct("=IIIII")  # argsz flags num_regions num_irqs cap_offset
REGION_INFO: Final = struct.Struct("=IIIIQQ")  # argsz flags index cap_offset size offset
INFO_CAP_HEADER: Final = struct.Struct("=HHI")  # id version next
SPARSE_MMAP_CAP: Final = struct.Struct("=HHIII")  # header, nr_areas reserved
SPARSE_MMAP_AREA: Final = struct.Struct("=QQ")  # offset size
IRQ_INFO: Final = struct.Struct("=IIII")  # argsz flags index count
IRQ_SET: Final = struct.Struct("=IIIII")  # argsz flags index start count, then data[]
IOMMU_INFO: Final = struct.Struct("=IIQI4x")  # argsz flags iova_pgsizes cap_offset
IOVA_RANGE_CAP: Final = struct.Struct("=HHIII")  # header, nr_iovas reserved
IOVA_RANGE: Final = struct.Struct("=QQ")  # start end (inclusive)
DMA_MAP: Final = struct.Struct("=IIQQQ")  # argsz flags vaddr iova size
DMA_UNMAP: Final = struct.Struct("=IIQQ")  # argsz flags iova size
IOEVENTFD: Final = struct.Struct("=IIQQi4x")  # argsz flags offset data fd

#: C struct name -> (our layout, its field names in order): what the layout test compares.
LAYOUTS: Final[dict[str, tuple[struct.Struct, tuple[str, ...]]]] = {
    "vfio_group_status": (GROUP_STATUS, ("argsz", "flags")),
    "vfio_device_info": (
        DEVICE_INFO,
        ("argsz", "flags", "num_regions", "num_irqs", "cap_offset"),
    ),
    "vfio_region_info": (
        REGION_INFO,
        ("argsz", "flags", "index", "cap_offset", "size", "offset"),
    ),
    "vfio_info_cap_header": (INFO_CAP_HEADER, ("id", "version", "next")),
    "vfio_region_info_cap_sparse_mmap": (
        SPARSE_MMAP_CAP,
        ("header.id", "header.version", "header.next", "nr_areas", "reserved"),
    ),
    "vfio_region_sparse_mmap_area": (SPARSE_MMAP_AREA, ("offset", "size")),
    "vfio_irq_info": (IRQ_INFO, ("argsz", "flags", "index", "count")),
    "vfio_irq_set": (IRQ_SET, ("argsz", "flags", "index", "start", "count")),
    "vfio_iommu_type1_info": (IOMMU_INFO, ("argsz", "flags", "iova_pgsizes", "cap_offset")),
    "vfio_iommu_type1_info_cap_iova_range": (
        IOVA_RANGE_CAP,
        ("header.id", "header.version", "header.next", "nr_iovas", "reserved"),
    ),
    "vfio_iova_range": (IOVA_RANGE, ("start", "end")),
    "vfio_iommu_type1_dma_map": (DMA_MAP, ("argsz", "flags", "vaddr", "iova", "size")),
    "vfio_iommu_type1_dma_unmap": (DMA_UNMAP, ("argsz", "flags", "iova", "size")),
    "vfio_device_ioeventfd": (IOEVENTFD, ("argsz", "flags", "offset", "data", "fd")),
}

# --- limits for what the kernel reports ------------------------------------------------------

MAX_INFO_SIZE: Final = 64 << 10  # an info reply with capabilities larger than this is refused
MAX_CAPS: Final = 64
MAX_MSIX: Final = 2048  # the PCI spec's table size limit
PCI_COMMAND: Final = 0x04
PCI_COMMAND_MEMORY: Final = 0x2
PCI_COMMAND_MASTER: Final = 0x4
HUGE_PAGE: Final = 2 << 20
_WIDTHS: Final = {1: ctypes.c_uint8, 2: ctypes.c_uint16, 4: ctypes.c_uint32, 8: ctypes.c_uint64}

#: Where `bar_areas()`/`map_bar()` fds come from: the sysfs resource file (mappable by the
#: native core today) or a duplicate of the VFIO device fd (offset = region offset + area).
BarFds = Literal["sysfs", "vfio"]


class VfioError(VvuError):
    """A VFIO call failed, or the kernel reported something vvu cannot use."""


def _ioctl(fd: int, request: Ioctl, arg: bytearray | int, what: str) -> int:
    """One ioctl; a mutable `arg` is updated in place. Failures become `VfioError`."""
    try:
        if isinstance(arg, int):
            return fcntl.ioctl(fd, request, arg)
        return int(fcntl.ioctl(fd, request, arg, True))
    except OSError as err:
        raise VfioError(f"{request.name} ({what}): {err.strerror}") from err


def _address(mapping: mmap.mmap) -> int:
    """The address of an mmap (the temporary ctypes view is released at once, so the mapping
    can still be closed)."""
    view = ctypes.c_char.from_buffer(mapping)
    try:
        return int(ctypes.addressof(view))
    finally:
        del view


def _walk_caps(buf: bytes | bytearray, first: int, fixed: int) -> list[tuple[int, int]]:
    """(id, offset) of each capability in an info reply; offsets must stay inside the reply,
    past its fixed part, and never repeat."""
    out: list[tuple[int, int]] = []
    seen: set[int] = set()
    offset = first
    while offset:
        if offset < fixed or offset + INFO_CAP_HEADER.size > len(buf) or offset in seen:
            raise VfioError(f"capability chain points to {offset:#x} (reply {len(buf)} bytes)")
        if len(out) >= MAX_CAPS:
            raise VfioError(f"capability chain longer than {MAX_CAPS}")
        seen.add(offset)
        cap_id, _version, nxt = INFO_CAP_HEADER.unpack_from(buf, offset)
        out.append((cap_id, offset))
        offset = nxt
    return out


@dataclass(frozen=True, slots=True)
class _Region:
    index: int
    flags: int
    size: int
    offset: int  # in the device fd
    areas: tuple[tuple[int, int], ...]  # mmap-able (offset, size) inside the region


class _Registers:
    """An mmap of a BAR area through the device fd, accessed with exact widths."""

    def __init__(self, fd: int, fd_offset: int, start: int, size: int) -> None:
        self.start = start
        self.end = start + size
        self.map = mmap.mmap(
            fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=fd_offset
        )
        self.address = _address(self.map)

    def covers(self, offset: int, size: int) -> bool:
        return self.start <= offset and offset + size <= self.end

    def read(self, offset: int, size: int) -> bytes:
        value = _WIDTHS[size].from_address(self.address + offset - self.start).value
        return int(value).to_bytes(size, sys.byteorder)

    def write(self, offset: int, data: bytes) -> None:
        cell = _WIDTHS[len(data)].from_address(self.address + offset - self.start)
        cell.value = int.from_bytes(data, sys.byteorder)


@dataclass(slots=True)
class _DmaWindow:
    iova: int
    size: int
    mapping: mmap.mmap  # keeps the pinned pages mapped in this process


class VfioPciAccess(PciAccess):
    """`PciAccess` over Linux VFIO (type1 IOMMU). Build it with `open()`; `close()` releases
    interrupts, ioeventfds, DMA windows, mappings and fds in that order."""

    def __init__(self, fn: PciFunction, *, bar_fds: BarFds = "sysfs") -> None:
        self.fn = fn
        self.bar_fds: BarFds = bar_fds
        self.container = -1
        self.group = -1
        self.device = -1
        self.device_flags = 0
        self._regions: dict[int, _Region] = {}
        self._bars: list[BarInfo] = []
        self._iova_ranges: list[tuple[int, int]] | None = None  # None: unknown, anything goes
        self._registers: dict[int, list[_Registers]] = {}  # BAR -> its register mappings
        self._memory_bars: set[int] = set()  # handed out as memory: never through VFIO
        self._maps: BarMaps = {}
        self._ioeventfds: dict[tuple[int, int, int, int], EventFd] = {}
        self._no_ioeventfd: set[tuple[int, int, int, int]] = set()
        self._msix: list[EventFd] = []
        self._dma = GuestMemory()
        self._windows: dict[int, _DmaWindow] = {}

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        bdf: str,
        *,
        bind: bool = False,
        bar_fds: BarFds = "sysfs",
        sysfs: str | None = None,
        devfs: str | None = None,
    ) -> VfioPciAccess:
        """Open PCI function `bdf` through VFIO (`bind`: hand it to vfio-pci first). Errors
        name the missing piece (`PciSetupError`) or the failing VFIO call (`VfioError`)."""
        fn = bind_vfio(bdf, sysfs=sysfs) if bind else pci_function(bdf, sysfs=sysfs)
        group = check_vfio(fn, sysfs=sysfs, devfs=devfs)
        access = cls(fn, bar_fds=bar_fds)
        try:
            access._open_fds(group)
            access._discover()
        except BaseException:
            await access.close()
            raise
        return access

    def _open_fds(self, group: Path) -> None:
        container = group.parent / "vfio"
        self.container = _open_dev(container)
        version = _ioctl(self.container, Ioctl.GET_API_VERSION, 0, str(container))
        if version != VFIO_API_VERSION:
            raise VfioError(
                f"{container}: VFIO API version {version}, vvu knows {VFIO_API_VERSION}"
            )
        iommu = VFIO_TYPE1V2_IOMMU
        if not _ioctl(self.container, Ioctl.CHECK_EXTENSION, iommu, "type1v2"):
            iommu = VFIO_TYPE1_IOMMU
            if not _ioctl(self.container, Ioctl.CHECK_EXTENSION, iommu, "type1"):
                raise VfioError(f"{container}: no type1 IOMMU support (modprobe vfio_iommu_type1)")
        self.group = _open_dev(group)
        status = bytearray(GROUP_STATUS.pack(GROUP_STATUS.size, 0))
        _ioctl(self.group, Ioctl.GROUP_GET_STATUS, status, str(group))
        if not GROUP_STATUS.unpack(status)[1] & GROUP_FLAGS_VIABLE:
            raise VfioError(
                f"{group} is not viable: every device of IOMMU group {self.fn.iommu_group} "
                "must be bound to vfio-pci or to no driver"
            )
        fd = bytearray(struct.pack("=i", self.container))
        _ioctl(self.group, Ioctl.GROUP_SET_CONTAINER, fd, str(group))
        _ioctl(self.container, Ioctl.SET_IOMMU, iommu, f"type {iommu}")
        name = bytearray(self.fn.bdf.encode() + b"\0")
        self.device = _ioctl(self.group, Ioctl.GROUP_GET_DEVICE_FD, name, self.fn.bdf)

    def _discover(self) -> None:
        info = bytearray(DEVICE_INFO.pack(DEVICE_INFO.size, 0, 0, 0, 0))
        _ioctl(self.device, Ioctl.DEVICE_GET_INFO, info, self.fn.bdf)
        _argsz, flags, num_regions, num_irqs, _cap = DEVICE_INFO.unpack(info)
        if not flags & DEVICE_FLAGS_PCI:
            raise VfioError(f"{self.fn.bdf}: VFIO does not describe it as a PCI device")
        if num_regions <= PCI_CONFIG_REGION_INDEX or num_irqs <= PCI_MSIX_IRQ_INDEX:
            raise VfioError(f"{self.fn.bdf}: {num_regions} regions, {num_irqs} irq types")
        self.device_flags = flags
        for index in (*range(NUM_BARS), PCI_CONFIG_REGION_INDEX):
            self._regions[index] = self._region_info(index)
        for bar in range(NUM_BARS):
            r = self._regions[bar]
            self._bars.append(
                BarInfo(
                    bar,
                    r.size,
                    bool(r.flags & RegionFlag.READ),
                    bool(r.flags & RegionFlag.WRITE),
                    bool(r.areas),
                )
            )
        if self._regions[PCI_CONFIG_REGION_INDEX].size < 0x40:
            raise VfioError(f"{self.fn.bdf}: config region is too small")
        self._iova_ranges = self._iommu_iova_ranges()
        self._enable_command_bits()
        log.info(
            "%s: VFIO device open (IOMMU group %s, %s; BARs %s; reset %s)",
            self.fn.bdf,
            self.fn.iommu_group,
            self.fn.pci_id,
            ", ".join(
                f"{b.index}:{b.size:#x}{'/mmap' if b.mappable else ''}"
                for b in self._bars
                if b.size
            ),
            "yes" if flags & DEVICE_FLAGS_RESET else "no",
        )

    def _region_info(self, index: int) -> _Region:
        buf = bytearray(REGION_INFO.pack(REGION_INFO.size, 0, index, 0, 0, 0))
        _ioctl(self.device, Ioctl.DEVICE_GET_REGION_INFO, buf, f"region {index}")
        argsz = REGION_INFO.unpack_from(buf)[0]
        if argsz > REGION_INFO.size:  # capabilities follow: ask again with room for them
            if argsz > MAX_INFO_SIZE:
                raise VfioError(f"region {index}: info of {argsz} bytes")
            buf = bytearray(argsz)
            REGION_INFO.pack_into(buf, 0, argsz, 0, index, 0, 0, 0)
            _ioctl(self.device, Ioctl.DEVICE_GET_REGION_INFO, buf, f"region {index}")
        _argsz, flags, _index, cap_offset, size, offset = REGION_INFO.unpack_from(buf)
        if offset + size >= 1 << 63:
            raise VfioError(f"region {index}: offset {offset:#x} + size {size:#x} overflows")
        areas: tuple[tuple[int, int], ...] = ()
        if flags & RegionFlag.MMAP and size:
            areas = ((0, size),)
            caps = _walk_caps(buf, cap_offset, REGION_INFO.size) if flags & RegionFlag.CAPS else []
            for cap_id, at in caps:
                if cap_id == REGION_INFO_CAP_SPARSE_MMAP:
                    areas = self._sparse_areas(buf, at, index, size)
        return _Region(index, flags, size, offset, areas)

    @staticmethod
    def _sparse_areas(
        buf: bytearray, at: int, index: int, size: int
    ) -> tuple[tuple[int, int], ...]:
        nr_areas = SPARSE_MMAP_CAP.unpack_from(buf, at)[3]
        start = at + SPARSE_MMAP_CAP.size
        if nr_areas > MAX_CAPS or start + nr_areas * SPARSE_MMAP_AREA.size > len(buf):
            raise VfioError(f"region {index}: sparse mmap capability with {nr_areas} areas")
        areas = []
        for i in range(nr_areas):
            offset, length = SPARSE_MMAP_AREA.unpack_from(buf, start + i * SPARSE_MMAP_AREA.size)
            if not length:
                continue
            if offset + length > size or (offset | length) % mmap.PAGESIZE:
                log.warning("region %d: sparse area %#x+%#x ignored", index, offset, length)
                continue
            areas.append((offset, length))
        return tuple(sorted(areas))

    def _iommu_iova_ranges(self) -> list[tuple[int, int]] | None:
        """The IOVA ranges DMA may use ([start, end] inclusive), or None when not reported."""
        buf = bytearray(IOMMU_INFO.pack(IOMMU_INFO.size, 0, 0, 0))
        _ioctl(self.container, Ioctl.IOMMU_GET_INFO, buf, "container")
        argsz, flags = IOMMU_INFO.unpack_from(buf)[:2]
        if not flags & IOMMU_INFO_CAPS or argsz <= IOMMU_INFO.size:
            return None
        if argsz > MAX_INFO_SIZE:
            raise VfioError(f"IOMMU info of {argsz} bytes")
        buf = bytearray(argsz)
        IOMMU_INFO.pack_into(buf, 0, argsz, 0, 0, 0)
        _ioctl(self.container, Ioctl.IOMMU_GET_INFO, buf, "container")
        for cap_id, at in _walk_caps(buf, IOMMU_INFO.unpack_from(buf)[3], IOMMU_INFO.size):
            if cap_id != IOMMU_TYPE1_INFO_CAP_IOVA_RANGE:
                continue
            count = IOVA_RANGE_CAP.unpack_from(buf, at)[3]
            start = at + IOVA_RANGE_CAP.size
            if count > MAX_INFO_SIZE // IOVA_RANGE.size or start + count * IOVA_RANGE.size > len(
                buf
            ):
                raise VfioError(f"IOVA range capability with {count} ranges")
            return [IOVA_RANGE.unpack_from(buf, start + i * IOVA_RANGE.size) for i in range(count)]
        return None

    def _enable_command_bits(self) -> None:
        """Memory decoding and bus mastering on: the device cannot DMA without the latter."""
        config = self._regions[PCI_CONFIG_REGION_INDEX]
        at = config.offset + PCI_COMMAND
        command = int.from_bytes(self._pread("PCI command", at, 2), "little")
        wanted = command | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER
        if wanted != command:
            self._pwrite("PCI command", at, wanted.to_bytes(2, "little"))
            log.info("%s: PCI command %#06x -> %#06x (bus master)", self.fn.bdf, command, wanted)

    # -- config space --------------------------------------------------------------------------

    def _pread(self, what: str, at: int, size: int) -> bytes:
        try:
            data = os.pread(self.device, size, at)
        except OSError as err:
            raise VfioError(f"{what}+{size}: {err.strerror}") from err
        if len(data) != size:
            raise VfioError(f"{what}+{size}: short read ({len(data)})")
        return data

    def _pwrite(self, what: str, at: int, data: bytes) -> None:
        try:
            done = os.pwrite(self.device, data, at)
        except OSError as err:
            raise VfioError(f"{what}+{len(data)}: {err.strerror}") from err
        if done != len(data):
            raise VfioError(f"{what}+{len(data)}: short write ({done})")

    def _rw(self, what: str, region: _Region, offset: int, size: int) -> int:
        if offset < 0 or size <= 0 or offset + size > region.size:
            raise VfioError(f"{what} {offset:#x}+{size} is outside its {region.size:#x} bytes")
        return region.offset + offset

    async def config_read(self, offset: int, size: int) -> bytes:
        config = self._regions[PCI_CONFIG_REGION_INDEX]
        at = self._rw("config", config, offset, size)
        return self._pread(f"config read {offset:#x}", at, size)

    async def config_write(self, offset: int, data: bytes) -> None:
        config = self._regions[PCI_CONFIG_REGION_INDEX]
        at = self._rw("config", config, offset, len(data))
        self._pwrite(f"config write {offset:#x}", at, data)

    # -- BARs ----------------------------------------------------------------------------------

    def bar_info(self, bar: int) -> BarInfo:
        if not 0 <= bar < NUM_BARS:
            raise ValueError(f"BAR{bar} does not exist")
        return self._bars[bar]

    def _register_map(self, bar: int, offset: int, size: int) -> _Registers | None:
        """The register mapping covering an exact-width, aligned access (made on first use)."""
        if size not in _WIDTHS or offset % size or bar in self._memory_bars:
            return None
        region = self._regions[bar]
        if bar not in self._registers:
            maps = []
            for start, length in region.areas:
                try:
                    maps.append(_Registers(self.device, region.offset + start, start, length))
                except (OSError, ValueError) as err:
                    log.warning("%s: BAR%d area %#x: no mmap (%s)", self.fn.bdf, bar, start, err)
            self._registers[bar] = maps
        return next((m for m in self._registers[bar] if m.covers(offset, size)), None)

    async def bar_read(self, bar: int, offset: int, size: int) -> bytes:
        self.bar_info(bar)
        at = self._rw(f"BAR{bar}", self._regions[bar], offset, size)
        if bar in self._memory_bars:
            return self._memory_read(bar, offset, size)
        regs = self._register_map(bar, offset, size)
        if regs is not None:
            return regs.read(offset, size)
        return self._pread(f"BAR{bar} read {offset:#x}", at, size)

    async def bar_write(self, bar: int, offset: int, data: bytes, *, posted: bool = False) -> None:
        self.bar_info(bar)
        at = self._rw(f"BAR{bar}", self._regions[bar], offset, len(data))
        if bar in self._memory_bars:
            self._memory_write(bar, offset, data)
            return
        regs = self._register_map(bar, offset, len(data))
        if regs is not None:
            regs.write(offset, data)  # MMIO stores are posted anyway
            return
        self._pwrite(f"BAR{bar} write {offset:#x}", at, data)

    def _memory_read(self, bar: int, offset: int, size: int) -> bytes:
        memory = self._bar_memory(bar)
        loads = {2: memory.load_u16, 4: memory.load_u32, 8: memory.load_u64}
        if size in loads and not offset % size:
            return int(loads[size](offset)).to_bytes(size, "little")
        return memory.read(offset, size)

    def _memory_write(self, bar: int, offset: int, data: bytes) -> None:
        memory = self._bar_memory(bar)
        stores = {2: memory.store_u16, 4: memory.store_u32, 8: memory.store_u64}
        if len(data) in stores and not offset % len(data):
            stores[len(data)](offset, int.from_bytes(data, "little"))
        else:
            memory.write(offset, data)

    def _bar_memory(self, bar: int) -> GuestMemory:
        entry = self._maps.get(bar)
        if entry is None:
            raise VfioError(f"BAR{bar} is handed out as memory but not mapped (map_bar first)")
        return entry[0]

    def _area_fds(self, bar: int) -> list[MappableArea]:
        """One `MappableArea` per mmap-able area of `bar`, each with its own fd."""
        region = self._regions[bar]
        if not region.areas:
            return []
        if bar in self._registers or any(k[0] == bar for k in self._ioeventfds):
            log.warning(
                "%s: BAR%d was accessed through VFIO, which claimed it: with "
                "CONFIG_IO_STRICT_DEVMEM its sysfs resource cannot be mapped (boot with "
                "iomem=relaxed, or never touch a memory BAR's registers)",
                self.fn.bdf,
                bar,
            )
        self._memory_bars.add(bar)
        out: list[MappableArea] = []
        try:
            for start, length in region.areas:
                if self.bar_fds == "sysfs":
                    out.append(MappableArea(start, length, self._sysfs_resource(bar), start))
                else:
                    fd = os.dup(self.device)
                    out.append(MappableArea(start, length, fd, region.offset + start))
        except BaseException:
            for area in out:
                area.close()
            raise
        return out

    def _sysfs_resource(self, bar: int) -> int:
        path = self.fn.path / f"resource{bar}"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as err:
            raise VfioError(f"{path}: {err.strerror} (BAR{bar} memory is mapped from it)") from err
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size < self._regions[bar].size:
            os.close(fd)
            raise VfioError(f"{path} is not a {self._regions[bar].size:#x}-byte file")
        return fd

    async def map_bar(self, bar: int) -> GuestMemory | None:
        if bar in self._maps:
            return self._maps[bar][0]
        self.bar_info(bar)
        areas = self._area_fds(bar)
        if not areas:
            return None
        memory = GuestMemory()
        try:
            for area in areas:
                memory.add_region(area.fd, area.offset, area.size, mmap_offset=area.fd_offset)
        except GuestMemoryError as err:
            raise VfioError(f"BAR{bar}: {err}") from err
        finally:
            for area in areas:
                area.close()  # the mapping keeps its own duplicate
        self._maps[bar] = (memory, [(a.offset, a.offset + a.size) for a in areas])
        return memory

    async def bar_areas(self, bar: int) -> list[MappableArea]:
        self.bar_info(bar)
        return self._area_fds(bar)

    async def bar_ioeventfds(self, bar: int) -> list[IoRegionFd]:
        """None over Linux VFIO: the device hands the driver no eventfds. The driver makes its
        own with `doorbell()`."""
        self.bar_info(bar)
        return []

    def doorbell(self, bar: int, offset: int, size: int, value: int) -> EventFd | None:
        """A VFIO ioeventfd: signalling it makes the kernel write `value` (`size` bytes) at BAR
        `offset`. Made on first request and kept until close(); None where vfio-pci refuses."""
        key = (bar, offset, size, value)
        known = self._ioeventfds.get(key)
        if known is not None or key in self._no_ioeventfd:
            return known
        region = self._regions.get(bar) if 0 <= bar < NUM_BARS else None
        if (
            region is None
            or size not in IOEVENTFD_SIZE_FLAGS
            or offset < 0
            or offset + size > region.size
            or bar in self._memory_bars
        ):
            return None
        efd = EventFd()
        arg = bytearray(
            IOEVENTFD.pack(
                IOEVENTFD.size,
                IOEVENTFD_SIZE_FLAGS[size],
                region.offset + offset,
                value,
                efd.fileno(),
            )
        )
        try:
            _ioctl(self.device, Ioctl.DEVICE_IOEVENTFD, arg, f"BAR{bar} {offset:#x}")
        except VfioError as err:
            efd.close()
            self._no_ioeventfd.add(key)
            log.warning("%s: %s; that register is written by Python instead", self.fn.bdf, err)
            return None
        self._ioeventfds[key] = efd
        log.debug("%s: ioeventfd BAR%d %#x/%d = %#x", self.fn.bdf, bar, offset, size, value)
        return efd

    # -- interrupts ----------------------------------------------------------------------------

    async def msix_vectors(self) -> int:
        buf = bytearray(IRQ_INFO.pack(IRQ_INFO.size, 0, PCI_MSIX_IRQ_INDEX, 0))
        _ioctl(self.device, Ioctl.DEVICE_GET_IRQ_INFO, buf, "MSI-X")
        _argsz, flags, _index, count = IRQ_INFO.unpack(buf)
        if count and not flags & IRQ_INFO_EVENTFD:
            raise VfioError("MSI-X without eventfd signalling")
        if count > MAX_MSIX:
            raise VfioError(f"{count} MSI-X vectors reported")
        return int(count)

    async def enable_msix(self, count: int) -> list[EventFd]:
        await self.disable_msix()
        available = await self.msix_vectors()
        if not 0 < count <= available:
            raise ValueError(f"{count} MSI-X vectors asked, the function has {available}")
        efds = [EventFd() for _ in range(count)]
        data = struct.pack(f"={count}i", *(e.fileno() for e in efds))
        arg = bytearray(
            IRQ_SET.pack(
                IRQ_SET.size + len(data),
                IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
                PCI_MSIX_IRQ_INDEX,
                0,
                count,
            )
            + data
        )
        try:
            _ioctl(self.device, Ioctl.DEVICE_SET_IRQS, arg, f"MSI-X x{count}")
        except VfioError as err:
            for efd in efds:
                efd.close()
            raise VfioError(
                f"{err} (the guest kernel could not give {count} MSI-X vectors: fewer vCPUs' "
                "vectors free? start the device with a smaller --max-queues)"
            ) from err
        self._msix = efds
        log.info("%s: MSI-X enabled, %d vectors as eventfds", self.fn.bdf, count)
        return list(efds)

    async def disable_msix(self) -> None:
        if not self._msix:
            return
        arg = bytearray(
            IRQ_SET.pack(
                IRQ_SET.size, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER, PCI_MSIX_IRQ_INDEX, 0, 0
            )
        )
        try:
            _ioctl(self.device, Ioctl.DEVICE_SET_IRQS, arg, "MSI-X off")
        except VfioError as err:
            log.warning("%s: %s", self.fn.bdf, err)
        for efd in self._msix:
            efd.close()
        self._msix = []

    # -- DMA -----------------------------------------------------------------------------------

    @property
    def dma_memory(self) -> GuestMemory:
        return self._dma

    def dma_fd(self, size: int, name: str) -> tuple[int, int]:
        """A hugetlb memfd (`size` rounded up to 2 MiB) when the guest has free 2 MiB pages: one
        vIOMMU mapping, hence one vfio-user DMA_MAP, per 2 MiB instead of per 4 KiB. Else a
        normal memfd, with a warning."""
        huge = -(-size // HUGE_PAGE) * HUGE_PAGE
        try:
            fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_HUGETLB)
        except OSError as err:
            _warn_small_pages(name, size, f"hugetlb memfd: {err.strerror}")
            return memfd(size, name), size
        try:
            os.ftruncate(fd, huge)
            mmap.mmap(fd, huge).close()  # reserves the pages now, or fails without them
        except OSError as err:
            os.close(fd)
            _warn_small_pages(name, size, f"{huge >> 21} free 2 MiB hugepages: {err.strerror}")
            return memfd(size, name), size
        log.info("%s: %d KiB of DMA memory in 2 MiB hugepages", name, huge >> 10)
        return fd, huge

    def _check_iova(self, iova: int, size: int) -> None:
        end = iova + size - 1
        for window in self._windows.values():
            if iova <= window.iova + window.size - 1 and window.iova <= end:
                raise VfioError(f"IOVA {iova:#x}+{size:#x} overlaps the window at {window.iova:#x}")
        ranges = self._iova_ranges
        if ranges is not None and not any(lo <= iova and end <= hi for lo, hi in ranges):
            usable = ", ".join(f"{lo:#x}-{hi:#x}" for lo, hi in ranges)
            raise VfioError(f"IOVA {iova:#x}+{size:#x} is outside the IOMMU's ranges {usable}")

    async def map_dma(self, fd: int, iova: int, size: int, *, offset: int = 0) -> None:
        if size <= 0 or (iova | size | offset) % mmap.PAGESIZE or iova < 0 or offset < 0:
            raise ValueError(f"DMA window {iova:#x}+{size:#x} (fd offset {offset:#x}) unaligned")
        self._check_iova(iova, size)
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        try:
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, prot, offset=offset)
        except (OSError, ValueError) as err:
            raise VfioError(f"DMA window {iova:#x}+{size:#x}: cannot map the fd: {err}") from err
        try:
            arg = bytearray(
                DMA_MAP.pack(
                    DMA_MAP.size,
                    DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
                    _address(mapping),
                    iova,
                    size,
                )
            )
            try:
                _ioctl(self.container, Ioctl.IOMMU_MAP_DMA, arg, f"{iova:#x}+{size:#x}")
            except VfioError as err:
                hint = ""
                if isinstance(err.__cause__, OSError) and err.__cause__.errno == errno.ENOMEM:
                    hint = " (pinned pages count against RLIMIT_MEMLOCK: run as root, or ulimit -l)"
                raise VfioError(f"{err}{hint}") from err
            try:
                self._dma.add_region(fd, iova, size, mmap_offset=offset)
            except BaseException:
                self._unmap_ioctl(iova, size)
                raise
        except BaseException:
            mapping.close()
            raise
        self._windows[iova] = _DmaWindow(iova, size, mapping)
        log.info("%s: DMA window %#x+%#x mapped through the IOMMU", self.fn.bdf, iova, size)

    def _unmap_ioctl(self, iova: int, size: int) -> None:
        arg = bytearray(DMA_UNMAP.pack(DMA_UNMAP.size, 0, iova, size))
        _ioctl(self.container, Ioctl.IOMMU_UNMAP_DMA, arg, f"{iova:#x}+{size:#x}")

    async def unmap_dma(self, iova: int, size: int) -> None:
        window = self._windows.get(iova)
        if window is None or window.size != size:
            raise VfioError(f"no DMA window {iova:#x}+{size:#x}")
        self._unmap_ioctl(iova, size)  # the device loses it first
        del self._windows[iova]
        with contextlib.suppress(GuestMemoryError):
            self._dma.remove_region(iova)
        window.mapping.close()

    # -- life cycle ----------------------------------------------------------------------------

    async def reset(self) -> None:
        if not self.device_flags & DEVICE_FLAGS_RESET:
            raise VfioError(
                f"{self.fn.bdf}: vfio-pci has no reset method for it (no FLR or PM reset, and "
                "no bus reset on the root bus); reset the device with virtio status 0"
            )
        _ioctl(self.device, Ioctl.DEVICE_RESET, 0, self.fn.bdf)
        log.info("%s: function reset", self.fn.bdf)

    async def close(self) -> None:
        """Interrupts, ioeventfds, DMA windows (device side first), BAR mappings, then the
        device, group and container fds."""
        if self.device >= 0:
            await self.disable_msix()
            for (bar, offset, size, value), efd in self._ioeventfds.items():
                arg = bytearray(
                    IOEVENTFD.pack(
                        IOEVENTFD.size,
                        IOEVENTFD_SIZE_FLAGS[size],
                        self._regions[bar].offset + offset,
                        value,
                        -1,
                    )
                )
                with contextlib.suppress(VfioError):
                    _ioctl(self.device, Ioctl.DEVICE_IOEVENTFD, arg, "remove")
                efd.close()
        self._ioeventfds.clear()
        for window in list(self._windows.values()):
            with contextlib.suppress(VfioError):
                self._unmap_ioctl(window.iova, window.size)
            with contextlib.suppress(GuestMemoryError):
                self._dma.remove_region(window.iova)
            window.mapping.close()
        self._windows.clear()
        release_bar_maps(self._maps)
        for maps in self._registers.values():
            for regs in maps:
                regs.map.close()
        self._registers.clear()
        if self.device >= 0:
            os.close(self.device)
            self.device = -1
        if self.group >= 0:
            with contextlib.suppress(VfioError):
                _ioctl(self.group, Ioctl.GROUP_UNSET_CONTAINER, 0, "close")
            os.close(self.group)
            self.group = -1
        if self.container >= 0:
            os.close(self.container)
            self.container = -1


def _warn_small_pages(name: str, size: int, why: str) -> None:
    log.warning(
        "%s: DMA memory in 4 KiB pages (no %s): the vIOMMU maps it page by page, %d vfio-user "
        "DMA_MAPs instead of %d; reserve 2 MiB hugepages (e.g. echo %d > "
        "/proc/sys/vm/nr_hugepages)",
        name,
        why,
        -(-size // mmap.PAGESIZE),
        -(-size // HUGE_PAGE),
        2 * -(-size // HUGE_PAGE) + 2,
    )


def _open_dev(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError as err:
        raise PciSetupError(f"{path} does not exist (modprobe vfio-pci)") from err
    except PermissionError as err:
        raise PciSetupError(f"{path}: {err.strerror} (run as root)") from err
    except OSError as err:
        if err.errno == errno.EBUSY:
            raise PciSetupError(
                f"{path} is busy: another process (a running `vvu serve --vvu-pci`?) has it"
            ) from err
        raise PciSetupError(f"{path}: {err.strerror}") from err
