"""`VirtioPciDevice`: a modern (VERSION_1-only) virtio-pci device model served over vfio-user.

Layout (reference §3.7, QEMU-like, nothing mmapped; see docs/virtio-pci.md):

| BAR | size | contents |
|---|---|---|
| BAR0 | 16 KiB, 32-bit | common cfg 0x0000, ISR 0x1000, device cfg 0x2000, notify 0x3000 |
| BAR1 | 4 KiB, 32-bit | MSI-X table 0x000, PBA 0x800 |
| BAR2-5 | subclass | `extra_regions()` (e.g. VVU shared memory, aux notifications) |

Capability chain from 0x40: MSI-X, COMMON, ISR, DEVICE, NOTIFY (multiplier 4, queue i at
0x3000 + 4·i), PCI_CFG (unless the subclass sets `PCI_CFG_CAP = False`), then whatever
`add_extra_capabilities()` adds.

Subclasses give the virtio id, features, queue maximum sizes and device config, and implement
`queue_notify()` (the driver kicked a queue). They complete buffers with `queue.push_used()`
then `self.signal_used(index)`. Everything the driver writes is validated; bad writes are
dropped with a log line and the device keeps serving.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import struct
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from vvu._core import EventFd, SplitQueue
from vvu.vfio_user.device import (
    CAP_ID_VENDOR,
    UNUSED_REGION,
    DmaMapping,
    DmaSpace,
    IoEventFd,
    IrqSpec,
    PciDeviceBase,
    RegionSpec,
)
from vvu.vfio_user.protocol import IrqIndex, IrqInfoFlag, VfioUserError

__all__ = [
    "BAR0_SIZE",
    "BAR1_SIZE",
    "COMMON_OFFSET",
    "DEVICE_CFG_OFFSET",
    "ISR_OFFSET",
    "NOTIFY_MULTIPLIER",
    "NOTIFY_OFFSET",
    "NO_VECTOR",
    "PBA_OFFSET",
    "VIRTIO_PCI_VENDOR",
    "CfgType",
    "Common",
    "Status",
    "VirtQueueState",
    "VirtioPciDevice",
    "queue_ring_sizes",
]

log = logging.getLogger(__name__)

VIRTIO_PCI_VENDOR: Final = 0x1AF4
VIRTIO_PCI_DEVICE_BASE: Final = 0x1040
SUBSYSTEM_ID: Final = 0x1100

F_INDIRECT_DESC: Final = 1 << 28
F_EVENT_IDX: Final = 1 << 29
F_VERSION_1: Final = 1 << 32

NO_VECTOR: Final = 0xFFFF

BAR0_SIZE: Final = 0x4000
BAR1_SIZE: Final = 0x1000
COMMON_OFFSET: Final = 0x0000
COMMON_LENGTH: Final = 0x1000
ISR_OFFSET: Final = 0x1000
ISR_LENGTH: Final = 0x1000
DEVICE_CFG_OFFSET: Final = 0x2000
DEVICE_CFG_LENGTH: Final = 0x1000
NOTIFY_OFFSET: Final = 0x3000
NOTIFY_LENGTH: Final = 0x1000
NOTIFY_MULTIPLIER: Final = 4
PBA_OFFSET: Final = 0x800


class CfgType:
    COMMON: Final = 1
    NOTIFY: Final = 2
    ISR: Final = 3
    DEVICE: Final = 4
    PCI_CFG: Final = 5
    SHARED_MEMORY: Final = 8
    VENDOR: Final = 9


class Status:
    ACKNOWLEDGE: Final = 1
    DRIVER: Final = 2
    DRIVER_OK: Final = 4
    FEATURES_OK: Final = 8
    DEVICE_NEEDS_RESET: Final = 64
    FAILED: Final = 128


class Common:
    """Offsets in the common configuration structure."""

    DEVICE_FEATURE_SELECT: Final = 0x00
    DEVICE_FEATURE: Final = 0x04
    DRIVER_FEATURE_SELECT: Final = 0x08
    DRIVER_FEATURE: Final = 0x0C
    MSIX_CONFIG: Final = 0x10
    NUM_QUEUES: Final = 0x12
    DEVICE_STATUS: Final = 0x14
    CONFIG_GENERATION: Final = 0x15
    QUEUE_SELECT: Final = 0x16
    QUEUE_SIZE: Final = 0x18
    QUEUE_MSIX_VECTOR: Final = 0x1A
    QUEUE_ENABLE: Final = 0x1C
    QUEUE_NOTIFY_OFF: Final = 0x1E
    QUEUE_DESC: Final = 0x20
    QUEUE_DRIVER: Final = 0x28
    QUEUE_DEVICE: Final = 0x30
    SIZE: Final = 0x38  # virtio 1.1 layout; the rest of the 4 KiB reads as 0


# (offset, size) of every register; an access must hit one exactly (64-bit ones also by half).
_COMMON_REGS: Final = {
    0x00: 4,
    0x04: 4,
    0x08: 4,
    0x0C: 4,
    0x10: 2,
    0x12: 2,
    0x14: 1,
    0x15: 1,
    0x16: 2,
    0x18: 2,
    0x1A: 2,
    0x1C: 2,
    0x1E: 2,
    0x20: 8,
    0x24: 4,
    0x28: 8,
    0x2C: 4,
    0x30: 8,
    0x34: 4,
}


def _common_access_ok(offset: int, size: int) -> bool:
    width = _COMMON_REGS.get(offset)
    return width is not None and (size == width or (width == 8 and size == 4))


def queue_ring_sizes(size: int, *, event_idx: bool) -> tuple[int, int, int]:
    """Bytes of the descriptor table, avail ring and used ring of a split queue."""
    extra = 2 if event_idx else 0
    return 16 * size, 6 + 2 * size + extra, 6 + 8 * size + extra


@dataclass(slots=True)
class VirtQueueState:
    """One queue as the driver configured it (reset values = power-on)."""

    max_size: int
    size: int = 0
    msix_vector: int = NO_VECTOR
    enabled: bool = False
    desc: int = 0
    driver: int = 0
    device: int = 0
    queue: SplitQueue | None = None
    kicks: int = 0

    def reset(self) -> None:
        if self.queue is not None:
            self.queue.detach()
        self.size = self.max_size
        self.msix_vector = NO_VECTOR
        self.enabled = False
        self.desc = self.driver = self.device = 0
        self.queue = None


def _set64(old: int, offset: int, data: bytes) -> int:
    """Apply a 4- or 8-byte write at byte `offset` (0 or 4) of a 64-bit register."""
    raw = bytearray(old.to_bytes(8, "little"))
    raw[offset : offset + len(data)] = data
    return int.from_bytes(raw, "little")


class VirtioPciDevice(PciDeviceBase):
    """A modern virtio-pci device (see the module docstring).

    Subclasses that override `add_extra_capabilities()` must set the attributes it needs
    before calling `super().__init__()`.
    """

    #: Whether config space has the PCI_CFG access window. A subclass may drop it (against the
    #: virtio spec's MUST) when it needs those 20 bytes of the 256 for its own capabilities;
    #: an instance may decide before `__init__` runs (it is read there).
    PCI_CFG_CAP: bool = True

    def __init__(
        self,
        *,
        virtio_id: int,
        features: int,
        queue_max_sizes: Sequence[int],
        msix_vectors: int | None = None,
        ioeventfds: bool | Sequence[int] = True,
        subsystem_id: int = SUBSYSTEM_ID,
        class_code: int = 0xFF0000,
    ) -> None:
        if not queue_max_sizes or any(not 1 <= s <= 32768 or s & (s - 1) for s in queue_max_sizes):
            raise ValueError("queue sizes are powers of two from 1 to 32768, at least one queue")
        if len(queue_max_sizes) > NOTIFY_LENGTH // NOTIFY_MULTIPLIER:
            raise ValueError("too many queues for the notify area")
        vectors = msix_vectors if msix_vectors is not None else len(queue_max_sizes) + 1
        super().__init__(
            [
                IrqSpec(0, IrqInfoFlag(0)),  # INTx: none (pin 0)
                IrqSpec(0, IrqInfoFlag(0)),  # MSI: none
                IrqSpec(vectors, IrqInfoFlag.EVENTFD),
                IrqSpec(0, IrqInfoFlag(0)),
                IrqSpec(0, IrqInfoFlag(0)),
            ]
        )
        self.virtio_id = virtio_id
        self.device_features = features | F_VERSION_1
        self.msix_vector_count = vectors
        self.queues = [VirtQueueState(m, size=m) for m in queue_max_sizes]
        cfg = self.config
        cfg.header(
            vendor_id=VIRTIO_PCI_VENDOR,
            device_id=VIRTIO_PCI_DEVICE_BASE + virtio_id,
            revision=1,
            class_code=class_code,
            subsystem_vendor_id=VIRTIO_PCI_VENDOR,
            subsystem_id=subsystem_id,
        )
        cfg.add_bar(0, BAR0_SIZE)
        cfg.add_bar(1, BAR1_SIZE)
        cfg.add_msix(vectors, table_bar=1, table_offset=0, pba_bar=1, pba_offset=PBA_OFFSET)
        self.add_virtio_cap(CfgType.COMMON, 0, COMMON_OFFSET, COMMON_LENGTH)
        self.add_virtio_cap(CfgType.ISR, 0, ISR_OFFSET, ISR_LENGTH)
        self.add_virtio_cap(CfgType.DEVICE, 0, DEVICE_CFG_OFFSET, DEVICE_CFG_LENGTH)
        self.add_virtio_cap(
            CfgType.NOTIFY,
            0,
            NOTIFY_OFFSET,
            NOTIFY_LENGTH,
            extra=struct.pack("<I", NOTIFY_MULTIPLIER),
        )
        # PCI_CFG: bar (+4), offset (+8), length (+12) and data (+16) are writable.
        self.pci_cfg_offset: int | None = None
        if self.PCI_CFG_CAP:
            self.pci_cfg_offset = self.add_virtio_cap(
                CfgType.PCI_CFG, 0, 0, 0, extra=bytes(4), wmask=b"\0\0\xff\0\0\0" + b"\xff" * 12
            )
        self.add_extra_capabilities()
        cfg.freeze()

        self._msix_table = bytearray(PBA_OFFSET)
        self._init_msix_table()
        self._ioeventfd_queues = (
            set(range(len(self.queues)))
            if ioeventfds is True
            else set()
            if ioeventfds is False
            else set(ioeventfds)
        )
        self.kick_fds: dict[int, EventFd] = {q: EventFd() for q in sorted(self._ioeventfd_queues)}
        self._watching = False
        self._dma: DmaSpace | None = None
        self.refused_writes = 0
        self._virtio_reset_state()

    # -- hooks for subclasses ------------------------------------------------------------------

    @abstractmethod
    def device_config(self) -> bytes:
        """The current device-specific configuration (reads past its end return 0)."""

    def device_config_write(self, offset: int, data: bytes) -> None:
        """The driver wrote the device config (default: ignored, logged)."""
        self._refuse(f"device config write at {offset:#x} ignored (read-only)")

    @abstractmethod
    def queue_notify(self, index: int, queue: SplitQueue) -> None:
        """The driver kicked enabled queue `index` (after DRIVER_OK). Pop chains, push used
        entries, then call `signal_used(index)`."""

    def add_extra_capabilities(self) -> None:
        """Add BARs and capabilities beyond the standard ones (`self.config.add_bar`,
        `self.add_virtio_cap`, `self.config.add_capability`). Called before freeze()."""
        return None

    def extra_regions(self) -> dict[int, RegionSpec]:
        """Regions for BAR2-5 (and device-specific ones) described by the subclass."""
        return {}

    def extra_region_read(self, index: int, offset: int, size: int) -> bytes:
        raise VfioUserError(errno.EINVAL, f"region {index} is not readable")

    def extra_region_write(self, index: int, offset: int, data: bytes) -> None:
        raise VfioUserError(errno.EINVAL, f"region {index} is not writable")

    def extra_ioeventfds(self, index: int) -> Sequence[IoEventFd]:
        return ()

    def on_reset(self) -> None:
        """Device-specific state back to power-on (status 0, DEVICE_RESET, disconnect)."""
        return None

    def on_driver_ok(self) -> None:
        """The driver set DRIVER_OK."""
        return None

    # -- building ------------------------------------------------------------------------------

    def add_virtio_cap(
        self,
        cfg_type: int,
        bar: int,
        offset: int,
        length: int,
        *,
        cap_id: int = 0,
        extra: bytes = b"",
        wmask: bytes = b"",
    ) -> int:
        """Append a `virtio_pci_cap` (plus `extra` bytes: notify multiplier, cap64 high
        halves, ...); returns its config-space offset."""
        cap_len = 16 + len(extra)
        body = struct.pack("<BBBBHII", cap_len, cfg_type, bar, cap_id, 0, offset, length)
        return self.config.add_capability(CAP_ID_VENDOR, body + extra, wmask)

    def _init_msix_table(self) -> None:
        self._msix_table[:] = bytes(len(self._msix_table))
        for v in range(self.msix_vector_count):
            struct.pack_into("<I", self._msix_table, 16 * v + 12, 1)  # masked after reset

    # -- state ---------------------------------------------------------------------------------

    @property
    def status(self) -> int:
        return self._status

    @property
    def driver_features(self) -> int:
        return self._driver_features

    @property
    def config_generation(self) -> int:
        return self._generation

    def _virtio_reset_state(self) -> None:
        self._device_feature_select = 0
        self._driver_feature_select = 0
        self._driver_features = 0
        self._msix_config = NO_VECTOR
        self._status = 0
        self._queue_select = 0
        self._isr = 0
        self._generation = 0
        for q in self.queues:
            q.reset()
            q.kicks = 0

    def virtio_reset(self) -> None:
        """Status 0: detach every queue, clear features, selects, vectors, ISR."""
        self._virtio_reset_state()
        self.on_reset()

    def _refuse(self, what: str) -> None:
        self.refused_writes += 1
        log.warning("virtio-pci %d: %s", self.virtio_id, what)

    def _negotiated(self, bit: int) -> bool:
        return bool(self._driver_features & bit)

    # -- PciDevice -----------------------------------------------------------------------------

    def regions(self) -> Sequence[RegionSpec]:
        regions = [UNUSED_REGION] * 9
        regions[0] = RegionSpec(BAR0_SIZE)
        regions[1] = RegionSpec(BAR1_SIZE)
        regions[7] = RegionSpec(self.config.size)
        for index, spec in self.extra_regions().items():
            while len(regions) <= index:
                regions.append(UNUSED_REGION)
            regions[index] = spec
        return regions

    def ioeventfds(self, index: int) -> Sequence[IoEventFd]:
        if index == 0:
            return tuple(
                IoEventFd(NOTIFY_OFFSET + NOTIFY_MULTIPLIER * q, 2, efd)
                for q, efd in self.kick_fds.items()
            )
        return self.extra_ioeventfds(index)

    def start(self) -> None:
        if not self._watching:
            loop = asyncio.get_running_loop()
            for q, efd in self.kick_fds.items():
                loop.add_reader(efd.fileno(), self._on_kick_fd, q)
            self._watching = True

    def stop(self) -> None:
        if self._watching:
            loop = asyncio.get_running_loop()
            for efd in self.kick_fds.values():
                loop.remove_reader(efd.fileno())
            self._watching = False

    def close(self) -> None:
        """Release the device's own fds (after the server stopped)."""
        for efd in self.kick_fds.values():
            efd.close()
        self.kick_fds = {}

    def client_connected(self, dma: DmaSpace) -> None:
        self._dma = dma

    def client_disconnected(self) -> None:
        self.virtio_reset()
        super().client_disconnected()
        self._dma = None

    def reset(self) -> None:
        super().reset()
        self._init_msix_table()
        self.virtio_reset()

    def dma_unmap(self, mapping: DmaMapping, dma: DmaSpace) -> None:
        for index, q in enumerate(self.queues):
            if q.queue is None:
                continue
            sizes = queue_ring_sizes(q.size, event_idx=self._negotiated(F_EVENT_IDX))
            spans = zip((q.desc, q.driver, q.device), sizes, strict=True)
            if any(
                addr < mapping.iova + mapping.size and mapping.iova < addr + n for addr, n in spans
            ):
                q.queue.detach()
                q.queue = None
                q.enabled = False
                self._refuse(f"queue {index}: its rings were unmapped; device needs reset")
                self._needs_reset()

    def _needs_reset(self) -> None:
        self._status |= Status.DEVICE_NEEDS_RESET
        if self._status & Status.DRIVER_OK:
            self._raise_config_irq()

    # -- config space (PCI_CFG access window) --------------------------------------------------

    def config_read(self, offset: int, size: int) -> bytes:
        # Only a targeted access of pci_cfg_data performs the BAR access (a bulk read of the
        # whole config space must not, e.g., clear the ISR).
        if self.pci_cfg_offset is not None and offset == self.pci_cfg_offset + 16 and size <= 4:
            return self._pci_cfg_access(None)[:size]
        return self.config.read(offset, size)

    def config_write(self, offset: int, data: bytes) -> None:
        self.config.write(offset, data)
        cap = self.pci_cfg_offset
        if cap is not None and offset == cap + 16 and len(data) <= 4:
            self._pci_cfg_access(data.ljust(4, b"\0"))

    def _pci_cfg_access(self, data: bytes | None) -> bytes:
        cap = self.pci_cfg_offset
        assert cap is not None  # only called for an access of the window
        bar = self.config.u8(cap + 4)
        offset = self.config.u32(cap + 8)
        length = self.config.u32(cap + 12)
        if length not in (1, 2, 4) or bar > 5:
            if data is not None:
                self._refuse(f"PCI_CFG access: bad bar {bar} or length {length}")
            return bytes(4)
        size = self.regions()[bar].size
        if offset % length or offset + length > size:
            self._refuse(f"PCI_CFG access: BAR{bar} {offset:#x}+{length} is outside it")
            return bytes(4)
        try:
            if data is None:
                return self.region_read(bar, offset, length).ljust(4, b"\0")
            self.region_write(bar, offset, data[:length])
        except VfioUserError as err:
            self._refuse(f"PCI_CFG access failed: {err}")
        return bytes(4)

    # -- regions -------------------------------------------------------------------------------

    def region_read(self, index: int, offset: int, size: int) -> bytes:
        if index == 0:
            return self._bar0_read(offset, size)
        if index == 1:
            return self._msix_read(offset, size)
        return self.extra_region_read(index, offset, size)

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        if index == 0:
            self._bar0_write(offset, data)
        elif index == 1:
            if offset < PBA_OFFSET:  # the table is stored, the PBA is read-only
                end = min(offset + len(data), PBA_OFFSET)
                self._msix_table[offset:end] = data[: end - offset]
        else:
            self.extra_region_write(index, offset, data)

    def _msix_read(self, offset: int, size: int) -> bytes:
        pending = self.irq.pending(IrqIndex.MSIX)
        bits = sum(1 << v for v, p in enumerate(pending) if p)
        pba = bits.to_bytes((len(pending) + 63) // 64 * 8, "little")
        whole = bytes(self._msix_table) + pba.ljust(BAR1_SIZE - PBA_OFFSET, b"\0")
        return whole[offset : offset + size]

    def _bar0_read(self, offset: int, size: int) -> bytes:
        if COMMON_OFFSET <= offset < COMMON_OFFSET + COMMON_LENGTH:
            return self._common_read(offset - COMMON_OFFSET, size)
        if ISR_OFFSET <= offset < ISR_OFFSET + ISR_LENGTH:
            if offset != ISR_OFFSET:
                return bytes(size)
            value, self._isr = self._isr, 0  # read-to-clear
            return bytes([value]) + bytes(size - 1)
        if DEVICE_CFG_OFFSET <= offset < DEVICE_CFG_OFFSET + DEVICE_CFG_LENGTH:
            rel = offset - DEVICE_CFG_OFFSET
            return self.device_config()[rel : rel + size].ljust(size, b"\0")
        return bytes(size)  # notify area and gaps read 0

    def _bar0_write(self, offset: int, data: bytes) -> None:
        if COMMON_OFFSET <= offset < COMMON_OFFSET + COMMON_LENGTH:
            self._common_write(offset - COMMON_OFFSET, data)
        elif DEVICE_CFG_OFFSET <= offset < DEVICE_CFG_OFFSET + DEVICE_CFG_LENGTH:
            rel = offset - DEVICE_CFG_OFFSET
            if rel + len(data) > len(self.device_config()):
                self._refuse(f"device config write {rel:#x}+{len(data)} is past its end")
                return
            self.device_config_write(rel, data)
        elif NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + NOTIFY_LENGTH:
            rel = offset - NOTIFY_OFFSET
            if rel % NOTIFY_MULTIPLIER or len(data) != 2:
                self._refuse(f"notify write {rel:#x}+{len(data)} is not a 16-bit queue slot")
                return
            self.kick(rel // NOTIFY_MULTIPLIER)
        else:
            self._refuse(f"BAR0 write at {offset:#x} ignored (read-only)")

    # -- common configuration ------------------------------------------------------------------

    def _selected(self) -> VirtQueueState | None:
        if self._queue_select < len(self.queues):
            return self.queues[self._queue_select]
        return None

    def _common_value(self, reg: int) -> int:
        def word(features: int, select: int) -> int:
            return (features >> (32 * select)) & 0xFFFFFFFF if select <= 1 else 0

        values = {
            Common.DEVICE_FEATURE_SELECT: self._device_feature_select,
            Common.DEVICE_FEATURE: word(self.device_features, self._device_feature_select),
            Common.DRIVER_FEATURE_SELECT: self._driver_feature_select,
            Common.DRIVER_FEATURE: word(self._driver_features, self._driver_feature_select),
            Common.MSIX_CONFIG: self._msix_config,
            Common.NUM_QUEUES: len(self.queues),
            Common.DEVICE_STATUS: self._status,
            Common.CONFIG_GENERATION: self._generation,
            Common.QUEUE_SELECT: self._queue_select,
        }
        q = self._selected()
        if q is not None:  # a select out of range reads every queue field as 0
            values |= {
                Common.QUEUE_SIZE: q.size,
                Common.QUEUE_MSIX_VECTOR: q.msix_vector,
                Common.QUEUE_ENABLE: int(q.enabled),
                Common.QUEUE_NOTIFY_OFF: self._queue_select,
                Common.QUEUE_DESC: q.desc,
                Common.QUEUE_DESC + 4: q.desc >> 32,
                Common.QUEUE_DRIVER: q.driver,
                Common.QUEUE_DRIVER + 4: q.driver >> 32,
                Common.QUEUE_DEVICE: q.device,
                Common.QUEUE_DEVICE + 4: q.device >> 32,
            }
        return values.get(reg, 0)

    def _common_read(self, offset: int, size: int) -> bytes:
        if not _common_access_ok(offset, size):
            if offset < Common.SIZE:
                log.info("virtio-pci: common cfg read %#x+%d is not a register", offset, size)
            return bytes(size)
        value = self._common_value(offset) & ((1 << (8 * size)) - 1)
        return value.to_bytes(size, "little")

    def _common_write(self, offset: int, data: bytes) -> None:
        size = len(data)
        if not _common_access_ok(offset, size):
            self._refuse(f"common cfg write {offset:#x}+{size} is not a register")
            return
        value = int.from_bytes(data, "little")
        if offset == Common.DEVICE_FEATURE_SELECT:
            self._device_feature_select = value
        elif offset == Common.DRIVER_FEATURE_SELECT:
            self._driver_feature_select = value
        elif offset == Common.DRIVER_FEATURE:
            self._write_driver_feature(value)
        elif offset == Common.MSIX_CONFIG:
            self._msix_config = self._vector(value, "config")
        elif offset == Common.DEVICE_STATUS:
            self._write_status(value)
        elif offset == Common.QUEUE_SELECT:
            self._queue_select = value
            if value >= len(self.queues):
                log.info("virtio-pci: queue_select %d is out of range (reads 0)", value)
        elif offset in (
            Common.NUM_QUEUES,
            Common.CONFIG_GENERATION,
            Common.DEVICE_FEATURE,
            Common.QUEUE_NOTIFY_OFF,
        ):
            self._refuse(f"common cfg write to read-only {offset:#x} ignored")
        else:
            self._write_queue_field(offset, data, value)

    def _write_driver_feature(self, value: int) -> None:
        if self._status & Status.FEATURES_OK or not self._status & Status.DRIVER:
            self._refuse(f"driver_feature write in status {self._status:#x} ignored")
            return
        select = self._driver_feature_select
        if select > 1:
            if value:
                self._refuse(f"driver_feature word {select} does not exist")
            return
        mask = 0xFFFFFFFF << (32 * select)
        self._driver_features = (self._driver_features & ~mask) | (value << (32 * select))

    def _vector(self, value: int, what: str) -> int:
        if value == NO_VECTOR or value < self.msix_vector_count:
            return value
        self._refuse(f"{what} MSI-X vector {value} does not exist (NO_VECTOR)")
        return NO_VECTOR

    def _features_acceptable(self) -> str | None:
        unknown = self._driver_features & ~self.device_features
        if unknown:
            return f"driver features {unknown:#x} were not offered"
        if not self._driver_features & F_VERSION_1:
            return "the driver did not accept VERSION_1"
        return None

    def _write_status(self, value: int) -> None:
        if value == 0:
            log.info("virtio-pci %d: reset by the driver", self.virtio_id)
            self.virtio_reset()
            return
        value &= 0xFF
        old = self._status
        if old & ~value & ~Status.DEVICE_NEEDS_RESET:
            self._refuse(f"status {old:#x} -> {value:#x} clears bits; only a reset does")
            value |= old
        value |= old & Status.DEVICE_NEEDS_RESET
        new_bits = value & ~old
        if new_bits & Status.FEATURES_OK:
            problem = self._features_acceptable()
            if not old & Status.DRIVER:
                problem = "FEATURES_OK before DRIVER"
            if problem:
                self._refuse(f"FEATURES_OK refused: {problem}")
                value &= ~Status.FEATURES_OK
        if new_bits & Status.DRIVER_OK and not value & Status.FEATURES_OK:
            self._refuse("DRIVER_OK without FEATURES_OK refused")
            value &= ~Status.DRIVER_OK
        self._status = value
        if value & Status.DRIVER_OK and not old & Status.DRIVER_OK:
            self.on_driver_ok()
            for index, q in enumerate(self.queues):  # kicks that came early
                if q.enabled and q.kicks:
                    self._run(index)

    def _write_queue_field(self, offset: int, data: bytes, value: int) -> None:
        q = self._selected()
        if q is None:
            self._refuse(f"write to queue {self._queue_select} (out of range) dropped")
            return
        index = self._queue_select
        if offset == Common.QUEUE_ENABLE:
            if value == 1:
                self._enable_queue(index, q)
            else:
                self._refuse(f"queue {index}: queue_enable {value} ignored (only 1 is allowed)")
            return
        if q.enabled:
            self._refuse(f"queue {index}: write {offset:#x} while the queue is enabled ignored")
            return
        if offset == Common.QUEUE_SIZE:
            if not value or value & (value - 1) or value > q.max_size:
                self._refuse(f"queue {index}: size {value} refused (power of two ≤ {q.max_size})")
                return
            q.size = value
        elif offset == Common.QUEUE_MSIX_VECTOR:
            q.msix_vector = self._vector(value, f"queue {index}")
        elif Common.QUEUE_DESC <= offset < Common.QUEUE_DESC + 8:
            q.desc = _set64(q.desc, offset - Common.QUEUE_DESC, data)
        elif Common.QUEUE_DRIVER <= offset < Common.QUEUE_DRIVER + 8:
            q.driver = _set64(q.driver, offset - Common.QUEUE_DRIVER, data)
        elif Common.QUEUE_DEVICE <= offset < Common.QUEUE_DEVICE + 8:
            q.device = _set64(q.device, offset - Common.QUEUE_DEVICE, data)

    def _ring_problem(self, q: VirtQueueState) -> str | None:
        event_idx = self._negotiated(F_EVENT_IDX)
        sizes = queue_ring_sizes(q.size, event_idx=event_idx)
        dma = self._dma
        for name, addr, length, align in zip(
            ("descriptor table", "driver area", "device area"),
            (q.desc, q.driver, q.device),
            sizes,
            (16, 2, 4),
            strict=True,
        ):
            if addr % align:
                return f"{name} {addr:#x} is not {align}-byte aligned"
            if dma is None or not any(m.mapped and m.contains(addr, length) for m in dma.mappings):
                return f"{name} {addr:#x}+{length} is not in mapped DMA memory"
        return None

    def _enable_queue(self, index: int, q: VirtQueueState) -> None:
        if q.enabled:
            return
        if not self._status & Status.FEATURES_OK:
            self._refuse(f"queue {index}: enable before FEATURES_OK refused")
            return
        problem = self._ring_problem(q)
        if problem is not None or self._dma is None:
            self._refuse(f"queue {index}: enable refused: {problem}")
            return
        queue = SplitQueue(
            q.size,
            q.desc,
            q.driver,
            q.device,
            event_idx=self._negotiated(F_EVENT_IDX),
            indirect=self._negotiated(F_INDIRECT_DESC),
        )
        try:
            queue.attach(self._dma.memory)
        except Exception as err:  # the Rust side's own checks
            self._refuse(f"queue {index}: attach failed: {err}")
            return
        q.queue = queue
        q.enabled = True
        q.kicks = 0
        log.info("virtio-pci %d: queue %d enabled, size %d", self.virtio_id, index, q.size)

    # -- notifications and interrupts ----------------------------------------------------------

    def _on_kick_fd(self, index: int) -> None:
        efd = self.kick_fds.get(index)
        if efd is not None and efd.consume():
            self.kick(index)

    def kick(self, index: int) -> None:
        """A notification for queue `index` (by ioeventfd or by a notify-area write)."""
        if not 0 <= index < len(self.queues):
            self._refuse(f"notification for queue {index} (out of range) dropped")
            return
        q = self.queues[index]
        if not q.enabled:
            log.info("virtio-pci %d: kick of disabled queue %d dropped", self.virtio_id, index)
            return
        q.kicks += 1
        if self._status & Status.DRIVER_OK:
            self._run(index)

    def _run(self, index: int) -> None:
        q = self.queues[index]
        if q.queue is None or self._status & Status.DEVICE_NEEDS_RESET:
            return
        try:
            self.queue_notify(index, q.queue)
        except Exception:
            log.exception("virtio-pci %d: queue %d handler failed", self.virtio_id, index)
            self._needs_reset()
            return
        if q.queue.broken_reason is not None:
            self._refuse(f"queue {index} is broken: {q.queue.broken_reason}")
            self._needs_reset()

    def signal_used(self, index: int) -> bool:
        """Publish queue `index`'s used entries; interrupt the driver when it wants one.
        True when an interrupt was raised."""
        q = self.queues[index]
        if q.queue is None or not q.queue.publish_used():
            return False
        return self._raise(q.msix_vector, 0x1)

    def _raise(self, vector: int, isr_bit: int) -> bool:
        if not self._status & Status.DRIVER_OK:
            return False
        self._isr |= isr_bit
        if vector == NO_VECTOR:
            return False
        return self.raise_irq(vector)

    def _raise_config_irq(self) -> bool:
        return self._raise(self._msix_config, 0x2)

    def config_changed(self, *, interrupt: bool = True) -> bool:
        """The device config changed: new generation, and a config interrupt (after DRIVER_OK)
        unless the driver caused the change itself (`interrupt=False`)."""
        self._generation = (self._generation + 1) & 0xFF
        return self._raise_config_irq() if interrupt else False
