"""What a PCI device served over vfio-user implements, and helpers to build one.

`PciDevice` is the whole contract between `VfioUserServer` and a device model: a description
(regions, mmap-able areas, ioeventfds, irq counts), synchronous access handlers (config space,
regions), interrupts (`set_irqs`), DMA notifications and reset. The server validates everything
the client sends before a handler sees it: a region index is in range, an access lies inside the
region and within `max_data_xfer_size`, an irq range lies inside the declared count, eventfds are
eventfds. Handlers refuse what their device does not support by raising
`VfioUserError(errno, ...)`; the client then gets that errno.

Helpers: `ConfigSpace` (a type-0 header with per-byte write masks, so BAR sizing, the ROM BAR and
RO fields behave without code), `IrqBindings` (the eventfd table behind SET_IRQS, with masks and
pending bits), `PciDeviceBase` (both wired to the contract).
"""

from __future__ import annotations

import errno
import logging
import struct
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from vvu._core import EventFd, GuestMemory
from vvu.vfio_user.protocol import (
    NUM_IRQS,
    NUM_REGIONS,
    Capabilities,
    DmaMapFlag,
    IrqIndex,
    IrqInfoFlag,
    IrqSetFlag,
    RegionFlag,
    VfioUserError,
)

__all__ = [
    "UNUSED_REGION",
    "ConfigSpace",
    "DmaMapping",
    "DmaSpace",
    "IoEventFd",
    "IrqAction",
    "IrqBindings",
    "IrqRequest",
    "IrqSpec",
    "MmapArea",
    "PciDevice",
    "PciDeviceBase",
    "RegionSpec",
]

log = logging.getLogger(__name__)

PAGE_SIZE: Final = 4096


# ---------------------------------------------------------------------------------------------
# Description


@dataclass(frozen=True, slots=True)
class MmapArea:
    """`size` bytes at region offset `offset` that a client may mmap from `fd` at `fd_offset`.

    The device owns `fd` (the server only passes copies on). Offsets and sizes are page
    multiples. Areas of one region that share one fd with one constant `fd_offset - offset`
    travel in the merged spec's SPARSE_MMAP capability; others need the per-area-fds extension
    (see docs/vfio-user.md), and without it the region is offered without MMAP.
    """

    offset: int
    size: int
    fd: int
    fd_offset: int = 0


@dataclass(frozen=True, slots=True)
class RegionSpec:
    """One region (BAR0-5, ROM, config, VGA, or a device-specific one from index 9)."""

    size: int
    readable: bool = True
    writable: bool = True
    areas: tuple[MmapArea, ...] = ()

    @property
    def flags(self) -> RegionFlag:
        flags = RegionFlag(0)
        if self.size:
            if self.readable:
                flags |= RegionFlag.READ
            if self.writable:
                flags |= RegionFlag.WRITE
            if self.areas:
                flags |= RegionFlag.MMAP
        return flags

    def validate(self, index: int) -> None:
        """Raise ValueError when the description is inconsistent (a device bug)."""
        end = 0
        for area in sorted(self.areas, key=lambda a: a.offset):
            if area.size <= 0 or area.offset % PAGE_SIZE or area.size % PAGE_SIZE:
                raise ValueError(f"region {index}: area {area} is not page-aligned")
            if area.fd_offset % PAGE_SIZE or area.fd_offset < 0:
                raise ValueError(f"region {index}: area {area} has a bad fd offset")
            if area.offset < end or area.offset + area.size > self.size:
                raise ValueError(f"region {index}: area {area} overlaps or leaves the region")
            end = area.offset + area.size


UNUSED_REGION: Final = RegionSpec(0, readable=False, writable=False)


@dataclass(frozen=True, slots=True)
class IrqSpec:
    """How many vectors an irq type has (0 = unsupported) and its VFIO_IRQ_INFO flags."""

    count: int
    flags: IrqInfoFlag = IrqInfoFlag.EVENTFD


@dataclass(frozen=True, slots=True)
class IoEventFd:
    """A sub-range of a region whose writes the client may turn into a signal on `eventfd`
    (KVM ioeventfd semantics): `size` 0 = any width, `datamatch` None = any value. The device
    owns the eventfd and watches it."""

    offset: int
    size: int
    eventfd: EventFd
    datamatch: int | None = None


class IrqAction:
    MASK: Final = int(IrqSetFlag.ACTION_MASK)
    UNMASK: Final = int(IrqSetFlag.ACTION_UNMASK)
    TRIGGER: Final = int(IrqSetFlag.ACTION_TRIGGER)


@dataclass(slots=True)
class IrqRequest:
    """A validated SET_IRQS: `action` on vectors start..start+count-1 of irq type `index`.

    Exactly one of: `eventfds` (DATA_EVENTFD; empty = unbind those vectors), `bools`
    (DATA_BOOL, one per vector), neither (DATA_NONE; count 0 with TRIGGER = disable the type).
    The device owns `eventfds` from the call on (the server closes them if the call raises).
    """

    index: int
    action: int
    start: int
    count: int
    data: int  # IrqSetFlag.DATA_*
    eventfds: list[EventFd] = field(default_factory=list)
    bools: tuple[bool, ...] = ()


@dataclass(frozen=True, slots=True)
class DmaMapping:
    """One DMA_MAP window: `size` bytes at IOVA `iova`, `flags` READ/WRITE. `mapped`: an fd came
    and the window is in `DmaSpace.memory`; otherwise it is reached by DMA_READ/DMA_WRITE."""

    iova: int
    size: int
    flags: DmaMapFlag
    offset: int = 0
    mapped: bool = True

    def contains(self, iova: int, size: int) -> bool:
        return self.iova <= iova and iova + size <= self.iova + self.size


class DmaSpace(ABC):
    """The client's memory as the device sees it, for one session."""

    @property
    @abstractmethod
    def memory(self) -> GuestMemory:
        """fd-backed windows, mapped by IOVA (zero-copy, synchronous; queues attach to it)."""

    @property
    @abstractmethod
    def mappings(self) -> Sequence[DmaMapping]: ...

    @property
    def client_capabilities(self) -> Capabilities:
        """What the client proposed in VERSION (absent members None): a device may offer its
        extensions only to a client that asked for them (e.g. `sparse_mmap_fds`)."""
        return Capabilities()

    @abstractmethod
    async def read(self, iova: int, size: int) -> bytes:
        """Copy from client memory: from `memory` when mapped, else by DMA_READ messages."""

    @abstractmethod
    async def write(self, iova: int, data: bytes) -> None:
        """Copy into client memory: to `memory` when mapped, else by DMA_WRITE messages."""


# ---------------------------------------------------------------------------------------------
# The contract


class PciDevice(ABC):
    """A PCI device model the server serves. Handlers run on the event loop, one at a time, in
    the order the client's commands arrived; they must not block."""

    resettable: bool = True

    @abstractmethod
    def regions(self) -> Sequence[RegionSpec]:
        """At least NUM_REGIONS (9) entries: BAR0-5, ROM, config (index 7, ≥ 256 bytes), VGA.
        Asked on every query, so a region's areas may change (e.g. shared memory appears)."""

    @abstractmethod
    def irqs(self) -> Sequence[IrqSpec]:
        """Exactly NUM_IRQS (5) entries: INTx, MSI, MSI-X, ERR, REQ."""

    def ioeventfds(self, index: int) -> Sequence[IoEventFd]:
        """The ioeventfds of region `index` (GET_REGION_IO_FDS)."""
        return ()

    @abstractmethod
    def config_read(self, offset: int, size: int) -> bytes: ...

    @abstractmethod
    def config_write(self, offset: int, data: bytes) -> None: ...

    @abstractmethod
    def region_read(self, index: int, offset: int, size: int) -> bytes:
        """Read from any region but config; the range is inside the region."""

    @abstractmethod
    def region_write(self, index: int, offset: int, data: bytes) -> None: ...

    @abstractmethod
    def set_irqs(self, request: IrqRequest) -> None: ...

    def dma_map(self, mapping: DmaMapping, dma: DmaSpace) -> None:
        """A window was added (already in `dma.memory` when `mapping.mapped`)."""
        return None

    def dma_unmap(self, mapping: DmaMapping, dma: DmaSpace) -> None:
        """A window goes away: drop every use of it before returning (queues, views)."""
        return None

    def reset(self) -> None:
        """DEVICE_RESET, and between clients: back to power-on state. DMA windows and irq
        eventfds stay (the server drops those itself when the client goes)."""
        return None

    def start(self) -> None:
        """The server starts serving (the event loop runs): start watching ioeventfds."""
        return None

    def stop(self) -> None:
        """The server stops: stop watching, release what start() took."""
        return None

    def client_connected(self, dma: DmaSpace) -> None:
        """A client negotiated VERSION; `dma` stays valid until client_disconnected()."""
        return None

    def client_disconnected(self) -> None:
        """The client went; its windows were unmapped and its irq eventfds unbound already."""
        return None


# ---------------------------------------------------------------------------------------------
# Config space

CFG_VENDOR_ID: Final = 0x00
CFG_DEVICE_ID: Final = 0x02
CFG_COMMAND: Final = 0x04
CFG_STATUS: Final = 0x06
CFG_REVISION: Final = 0x08
CFG_CLASS: Final = 0x09
CFG_CACHE_LINE: Final = 0x0C
CFG_BAR0: Final = 0x10
CFG_SUBSYS_VENDOR: Final = 0x2C
CFG_SUBSYS_ID: Final = 0x2E
CFG_ROM: Final = 0x30
CFG_CAP_PTR: Final = 0x34
CFG_INT_LINE: Final = 0x3C
CFG_INT_PIN: Final = 0x3D

STATUS_CAP_LIST: Final = 0x10
# Command bits a guest may set: I/O, memory, bus master, parity, SERR, INTx disable.
COMMAND_WMASK: Final = 0x0547

CAP_ID_VENDOR: Final = 0x09
CAP_ID_MSIX: Final = 0x11
MSIX_CTRL_ENABLE: Final = 0x8000
MSIX_CTRL_MASKALL: Final = 0x4000


class ConfigSpace:
    """A type-0 config space with a per-byte write mask: a write changes only masked bits, so
    RO fields, BAR sizing (`(written & ~(size-1)) | flags`), the absent ROM BAR (reads back 0)
    and MSI-X control come out right without per-register code. `reset()` restores the state
    at `freeze()`."""

    def __init__(self, size: int = 256) -> None:
        if size not in (256, 4096):
            raise ValueError("config space is 256 or 4096 bytes")
        self._data = bytearray(size)
        self._wmask = bytearray(size)
        self._initial = bytes(size)
        self._cap_end = 0x40
        self._last_cap = 0
        self.msix_offset: int | None = None

    @property
    def size(self) -> int:
        return len(self._data)

    def _put(self, offset: int, size: int, value: int, wmask: int) -> None:
        self._data[offset : offset + size] = value.to_bytes(size, "little")
        self._wmask[offset : offset + size] = wmask.to_bytes(size, "little")

    def set_u8(self, offset: int, value: int, wmask: int = 0) -> None:
        self._put(offset, 1, value, wmask)

    def set_u16(self, offset: int, value: int, wmask: int = 0) -> None:
        self._put(offset, 2, value, wmask)

    def set_u32(self, offset: int, value: int, wmask: int = 0) -> None:
        self._put(offset, 4, value, wmask)

    def u8(self, offset: int) -> int:
        return self._data[offset]

    def u16(self, offset: int) -> int:
        return int.from_bytes(self._data[offset : offset + 2], "little")

    def u32(self, offset: int) -> int:
        return int.from_bytes(self._data[offset : offset + 4], "little")

    def header(
        self,
        *,
        vendor_id: int,
        device_id: int,
        revision: int = 1,
        class_code: int = 0xFF0000,
        subsystem_vendor_id: int = 0,
        subsystem_id: int = 0,
    ) -> None:
        self.set_u16(CFG_VENDOR_ID, vendor_id)
        self.set_u16(CFG_DEVICE_ID, device_id)
        self.set_u16(CFG_COMMAND, 0, COMMAND_WMASK)
        self.set_u16(CFG_STATUS, 0)
        self.set_u8(CFG_REVISION, revision)
        self._put(CFG_CLASS, 3, class_code, 0)
        self.set_u8(CFG_CACHE_LINE, 0, 0xFF)
        self.set_u16(CFG_SUBSYS_VENDOR, subsystem_vendor_id)
        self.set_u16(CFG_SUBSYS_ID, subsystem_id)
        self.set_u32(CFG_ROM, 0)  # no ROM: sizing writes read back 0
        self.set_u8(CFG_INT_LINE, 0, 0xFF)
        self.set_u8(CFG_INT_PIN, 0)  # no INTx

    def add_bar(
        self, index: int, size: int, *, is_64bit: bool = False, prefetchable: bool = False
    ) -> None:
        """A memory BAR of `size` bytes (a power of two ≥ 16); a 64-bit one takes BAR index+1
        as its high dword."""
        if size < 16 or size & (size - 1):
            raise ValueError(f"BAR{index}: size {size:#x} is not a power of two ≥ 16")
        if not 0 <= index < (5 if is_64bit else 6):
            raise ValueError(f"BAR{index}: no such BAR register")
        flags = (0x4 if is_64bit else 0) | (0x8 if prefetchable else 0)
        low_mask = ~(size - 1) & 0xFFFFFFF0
        self.set_u32(CFG_BAR0 + 4 * index, flags, low_mask)
        if is_64bit:
            self.set_u32(CFG_BAR0 + 4 * (index + 1), 0, ~((size - 1) >> 32) & 0xFFFFFFFF)

    def add_capability(self, cap_id: int, body: bytes, wmask: bytes = b"") -> int:
        """Append a capability (`body` follows the id and next bytes); returns its offset."""
        length = 2 + len(body)
        offset = self._cap_end
        if offset + length > min(self.size, 0x100):
            raise ValueError("capabilities do not fit in the first 256 bytes")
        self._data[offset] = cap_id
        self._data[offset + 1] = 0
        self._data[offset + 2 : offset + length] = body
        mask = wmask.ljust(len(body), b"\0")
        self._wmask[offset + 2 : offset + length] = mask
        if self._last_cap:
            self._data[self._last_cap + 1] = offset
        else:
            self.set_u8(CFG_CAP_PTR, offset)
            self.set_u16(CFG_STATUS, self.u16(CFG_STATUS) | STATUS_CAP_LIST)
        self._last_cap = offset
        self._cap_end = (offset + length + 3) & ~3
        return offset

    def add_msix(
        self, vectors: int, *, table_bar: int, table_offset: int, pba_bar: int, pba_offset: int
    ) -> int:
        """An MSI-X capability: control (table size RO; mask-all and enable RW), table, PBA."""
        if not 1 <= vectors <= 2048:
            raise ValueError("MSI-X has 1 to 2048 vectors")
        body = struct.pack("<HII", vectors - 1, table_offset | table_bar, pba_offset | pba_bar)
        wmask = struct.pack("<HII", MSIX_CTRL_ENABLE | MSIX_CTRL_MASKALL, 0, 0)
        self.msix_offset = self.add_capability(CAP_ID_MSIX, body, wmask)
        return self.msix_offset

    @property
    def msix_enabled(self) -> bool:
        return self.msix_offset is not None and bool(
            self.u16(self.msix_offset + 2) & MSIX_CTRL_ENABLE
        )

    def freeze(self) -> None:
        """Take the current contents as the power-on state."""
        self._initial = bytes(self._data)

    def reset(self) -> None:
        self._data[:] = self._initial

    def read(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0 or offset + size > self.size:
            raise VfioUserError(errno.EINVAL, f"config read {offset:#x}+{size} is out of range")
        return bytes(self._data[offset : offset + size])

    def write(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > self.size:
            raise VfioUserError(
                errno.EINVAL, f"config write {offset:#x}+{len(data)} is out of range"
            )
        for i, byte in enumerate(data):
            mask = self._wmask[offset + i]
            if mask:
                old = self._data[offset + i]
                self._data[offset + i] = (old & ~mask) | (byte & mask)


# ---------------------------------------------------------------------------------------------
# Interrupts


class IrqBindings:
    """The eventfds bound to each vector of each irq type, with mask and pending bits.

    `trigger()` signals a bound, unmasked vector; otherwise it sets the pending bit, and the
    interrupt is delivered when an eventfd is bound or the vector unmasked.
    """

    def __init__(self, specs: Sequence[IrqSpec]) -> None:
        self._specs = list(specs)
        self._fds: list[list[EventFd | None]] = [[None] * s.count for s in specs]
        self._masked: list[list[bool]] = [[False] * s.count for s in specs]
        self._pending: list[list[bool]] = [[False] * s.count for s in specs]

    def bound(self, index: int, vector: int) -> EventFd | None:
        return self._fds[index][vector]

    def pending(self, index: int) -> list[bool]:
        return list(self._pending[index])

    def _deliver(self, index: int, vector: int) -> bool:
        fd = self._fds[index][vector]
        if fd is None or self._masked[index][vector]:
            self._pending[index][vector] = True
            return False
        self._pending[index][vector] = False
        fd.signal()
        return True

    def trigger(self, index: int, vector: int) -> bool:
        """Raise a vector; True when an eventfd was signalled now."""
        if not 0 <= vector < len(self._fds[index]):
            raise ValueError(f"irq type {index} has no vector {vector}")
        return self._deliver(index, vector)

    def _unbind(self, index: int, vector: int) -> None:
        old = self._fds[index][vector]
        self._fds[index][vector] = None
        if old is not None:
            old.close()

    def apply(self, req: IrqRequest) -> None:
        if req.action == IrqAction.TRIGGER:
            self._apply_trigger(req)
        else:
            self._apply_mask(req)

    def _apply_trigger(self, req: IrqRequest) -> None:
        vectors = range(req.start, req.start + req.count)
        if req.data == IrqSetFlag.DATA_EVENTFD:
            for i, vector in enumerate(vectors):
                self._unbind(req.index, vector)
                if req.eventfds:
                    self._fds[req.index][vector] = req.eventfds[i]
                    if self._pending[req.index][vector]:
                        self._deliver(req.index, vector)
        elif req.data == IrqSetFlag.DATA_NONE and req.count == 0:
            for vector in range(len(self._fds[req.index])):
                self._unbind(req.index, vector)
                self._pending[req.index][vector] = False
        else:  # the client fires vectors itself
            for i, vector in enumerate(vectors):
                if req.data == IrqSetFlag.DATA_NONE or req.bools[i]:
                    self._deliver(req.index, vector)

    def _apply_mask(self, req: IrqRequest) -> None:
        if req.data == IrqSetFlag.DATA_EVENTFD:
            for fd in req.eventfds:
                fd.close()
            raise VfioUserError(errno.ENOTSUP, "mask/unmask notifier eventfds are not supported")
        masked = req.action == IrqAction.MASK
        for i, vector in enumerate(range(req.start, req.start + req.count)):
            if req.data == IrqSetFlag.DATA_NONE or req.bools[i]:
                self._masked[req.index][vector] = masked
                if not masked and self._pending[req.index][vector]:
                    self._deliver(req.index, vector)

    def unmask_all(self) -> None:
        for masks in self._masked:
            masks[:] = [False] * len(masks)
        for pend in self._pending:
            pend[:] = [False] * len(pend)

    def clear(self) -> None:
        """Close every eventfd (the client went)."""
        for index, fds in enumerate(self._fds):
            for vector in range(len(fds)):
                self._unbind(index, vector)
        self.unmask_all()


# ---------------------------------------------------------------------------------------------
# A base with the helpers wired in


class PciDeviceBase(PciDevice):
    """A `PciDevice` with a `ConfigSpace` (`self.config`) and `IrqBindings` (`self.irq`).

    Subclasses fill the config space in `__init__` (then call `self.config.freeze()`), and
    implement `regions()`, `region_read()` and `region_write()`. Interrupts: `self.raise_irq()`.
    """

    def __init__(self, irqs: Sequence[IrqSpec], config_size: int = 256) -> None:
        if len(irqs) != NUM_IRQS:
            raise ValueError(f"a PCI device describes {NUM_IRQS} irq types")
        self._irq_specs = tuple(irqs)
        self.config = ConfigSpace(config_size)
        self.irq = IrqBindings(self._irq_specs)

    def irqs(self) -> Sequence[IrqSpec]:
        return self._irq_specs

    def config_read(self, offset: int, size: int) -> bytes:
        return self.config.read(offset, size)

    def config_write(self, offset: int, data: bytes) -> None:
        self.config.write(offset, data)

    def set_irqs(self, request: IrqRequest) -> None:
        self.irq.apply(request)

    def raise_irq(self, vector: int, index: int = IrqIndex.MSIX) -> bool:
        """Raise MSI-X (by default) vector `vector`; True when an eventfd was signalled."""
        return self.irq.trigger(index, vector)

    def reset(self) -> None:
        self.config.reset()
        self.irq.unmask_all()

    def client_disconnected(self) -> None:
        self.irq.clear()


def check_regions(regions: Sequence[RegionSpec]) -> None:
    """Raise ValueError when a device's region list breaks the contract."""
    if len(regions) < NUM_REGIONS:
        raise ValueError(f"a PCI device describes at least {NUM_REGIONS} regions")
    if regions[7].size < 256:
        raise ValueError("the config region (7) must be at least 256 bytes")
    for index, region in enumerate(regions):
        region.validate(index)
