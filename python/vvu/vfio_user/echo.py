"""`EchoDevice`: a tiny PCI device for tests and conformance runs of the vfio-user layer.

Config space: vendor 0x1B36 (Red Hat, QEMU test devices), device 0x10F0, class 0xFF (other),
capability list = MSI-X (4 vectors, table and PBA in BAR1) then one vendor capability.

| region | what |
|---|---|
| BAR0 | 4 KiB, 32-bit, registers (below) |
| BAR1 | 4 KiB, 32-bit, MSI-X table at 0x000 (stored, not interpreted) and PBA at 0x800 |
| BAR2 | 16 KiB, 64-bit prefetchable (BAR3 is its high dword), memfd-backed (below) |
| config | 256 bytes |

BAR2: mmap-able areas at 0x0000 (4 KiB) and 0x2000 (8 KiB) of one memfd; the hole at 0x1000 is
plain emulated memory. With `split_bar2` the second area comes from a second memfd, which takes
the per-area-fds extension to be mapped (see docs/vfio-user.md).

BAR0 registers (little-endian):

| offset | size | name | access |
|---|---|---|---|
| 0x00 | 4 | MAGIC = "ECHO" | RO |
| 0x04 | 4 | SCRATCH0 | RW |
| 0x08 | 4 | SCRATCH1 | RW |
| 0x0C | 4 | IRQ | W: raise MSI-X vector `value`; reads back the last value |
| 0x10 | 4 | DOORBELL | W (any value, any width): count a doorbell. Also an ioeventfd |
| 0x14 | 4 | DOORBELL_COUNT | RO: doorbells seen, by message or by ioeventfd |
| 0x18 | 4 | IRQ_COUNT | RO: interrupts raised |
| 0x20 | 8 | DMA_ADDR | RW |
| 0x28 | 4 | DMA_LEN | RW, at most 256 |
| 0x2C | 4 | DMA_CMD | W: 1 copy DMA_ADDR → BUFFER, 2 copy BUFFER → DMA_ADDR |
| 0x30 | 4 | DMA_STATUS | RO: 0 idle, 1 busy, 2 done, 3 error |
| 0x100 | 256 | BUFFER | RW |

Every other byte of BAR0 is plain RW memory. A copy through an fd-mapped DMA window completes
before the REGION_WRITE reply; through a message-only window it runs as a task (poll DMA_STATUS).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import struct
from collections.abc import Sequence
from typing import Final

from vvu._core import EventFd, GuestMemory, memfd
from vvu.errors import GuestMemoryError
from vvu.vfio_user.device import (
    UNUSED_REGION,
    DmaSpace,
    IoEventFd,
    IrqSpec,
    MmapArea,
    PciDeviceBase,
    RegionSpec,
)
from vvu.vfio_user.protocol import IrqIndex, IrqInfoFlag, VfioUserError

__all__ = ["EchoDevice"]

log = logging.getLogger(__name__)

VENDOR_ID: Final = 0x1B36
DEVICE_ID: Final = 0x10F0
MSIX_VECTORS: Final = 4

MAGIC: Final = 0x4F484345  # b"ECHO" little-endian
REG_MAGIC: Final = 0x00
REG_SCRATCH0: Final = 0x04
REG_SCRATCH1: Final = 0x08
REG_IRQ: Final = 0x0C
REG_DOORBELL: Final = 0x10
REG_DOORBELL_COUNT: Final = 0x14
REG_IRQ_COUNT: Final = 0x18
REG_DMA_ADDR: Final = 0x20
REG_DMA_LEN: Final = 0x28
REG_DMA_CMD: Final = 0x2C
REG_DMA_STATUS: Final = 0x30
BUFFER: Final = 0x100
BUFFER_SIZE: Final = 256

DMA_TO_BUFFER: Final = 1
DMA_FROM_BUFFER: Final = 2
DMA_IDLE, DMA_BUSY, DMA_DONE, DMA_ERROR = 0, 1, 2, 3

BAR0_SIZE: Final = 0x1000
BAR1_SIZE: Final = 0x1000
BAR2_SIZE: Final = 0x4000
PBA_OFFSET: Final = 0x800
BAR2_AREAS: Final = ((0x0000, 0x1000), (0x2000, 0x2000))


def _overlaps(offset: int, size: int, reg: int, reg_size: int = 4) -> bool:
    return offset < reg + reg_size and reg < offset + size


class EchoDevice(PciDeviceBase):
    """See the module docstring. `split_bar2`: back BAR2's second area by its own memfd."""

    def __init__(self, *, split_bar2: bool = False) -> None:
        super().__init__(
            [
                IrqSpec(0, IrqInfoFlag(0)),  # INTx: none (pin 0)
                IrqSpec(0, IrqInfoFlag(0)),  # MSI: none
                IrqSpec(MSIX_VECTORS, IrqInfoFlag.EVENTFD),
                IrqSpec(1, IrqInfoFlag.EVENTFD),  # ERR
                IrqSpec(1, IrqInfoFlag.EVENTFD),  # REQ
            ]
        )
        cfg = self.config
        cfg.header(
            vendor_id=VENDOR_ID,
            device_id=DEVICE_ID,
            revision=1,
            class_code=0xFF0000,
            subsystem_vendor_id=VENDOR_ID,
            subsystem_id=0x0001,
        )
        cfg.add_bar(0, BAR0_SIZE)
        cfg.add_bar(1, BAR1_SIZE)
        cfg.add_bar(2, BAR2_SIZE, is_64bit=True, prefetchable=True)
        cfg.add_msix(MSIX_VECTORS, table_bar=1, table_offset=0, pba_bar=1, pba_offset=PBA_OFFSET)
        cfg.add_capability(0x09, bytes([8]) + b"vvu\0\0")  # vendor cap: len 8
        cfg.freeze()

        self._bar0 = bytearray(BAR0_SIZE)
        self._msix_table = bytearray(PBA_OFFSET)
        self._bar2_hole = bytearray(0x1000)
        self.doorbells = 0
        self.irqs_raised = 0
        self._dma: DmaSpace | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._watching = False

        # BAR2 memory: one memfd (or two with split_bar2), which the device maps for itself.
        self._bar2_fds = [memfd(BAR2_SIZE, "vvu-echo-bar2")]
        if split_bar2:
            self._bar2_fds.append(memfd(BAR2_SIZE, "vvu-echo-bar2b"))
        self.bar2 = GuestMemory()  # BAR2 offset = "address"
        self._areas: list[MmapArea] = []
        for i, (offset, size) in enumerate(BAR2_AREAS):
            fd = self._bar2_fds[-1] if i == 1 else self._bar2_fds[0]
            self.bar2.add_region(fd, offset, size, mmap_offset=offset)
            self._areas.append(MmapArea(offset, size, fd, fd_offset=offset))
        self.doorbell_fd = EventFd()
        self._regions = self._build_regions()

    def _build_regions(self) -> list[RegionSpec]:
        regions = [UNUSED_REGION] * 9
        regions[0] = RegionSpec(BAR0_SIZE)
        regions[1] = RegionSpec(BAR1_SIZE)
        regions[2] = RegionSpec(BAR2_SIZE, areas=tuple(self._areas))
        regions[7] = RegionSpec(self.config.size)
        return regions

    # -- description ---------------------------------------------------------------------------

    def regions(self) -> Sequence[RegionSpec]:
        return self._regions

    def ioeventfds(self, index: int) -> Sequence[IoEventFd]:
        if index == 0:
            return (IoEventFd(REG_DOORBELL, 4, self.doorbell_fd),)
        return ()

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        if not self._watching:
            asyncio.get_running_loop().add_reader(self.doorbell_fd.fileno(), self._on_doorbell_fd)
            self._watching = True

    def stop(self) -> None:
        if self._watching:
            asyncio.get_running_loop().remove_reader(self.doorbell_fd.fileno())
            self._watching = False
        for task in list(self._tasks):
            task.cancel()

    def close(self) -> None:
        """Release the device's own fds (after the server stopped)."""
        self.doorbell_fd.close()
        for fd in self._bar2_fds:
            os.close(fd)
        self._bar2_fds = []

    def client_connected(self, dma: DmaSpace) -> None:
        self._dma = dma

    def client_disconnected(self) -> None:
        super().client_disconnected()
        self._dma = None
        for task in list(self._tasks):
            task.cancel()

    def reset(self) -> None:
        super().reset()
        self._bar0[:] = bytes(BAR0_SIZE)
        self._msix_table[:] = bytes(len(self._msix_table))
        self._bar2_hole[:] = bytes(len(self._bar2_hole))
        self.bar2.write(0, bytes(0x1000))
        self.bar2.write(0x2000, bytes(0x2000))
        self.doorbells = 0
        self.irqs_raised = 0

    # -- doorbells and interrupts --------------------------------------------------------------

    def _on_doorbell_fd(self) -> None:
        self.doorbells += self.doorbell_fd.consume()

    def raise_irq(self, vector: int, index: int = IrqIndex.MSIX) -> bool:
        self.irqs_raised += 1
        return super().raise_irq(vector, index)

    # -- accesses ------------------------------------------------------------------------------

    def _u32(self, offset: int) -> int:
        return int.from_bytes(self._bar0[offset : offset + 4], "little")

    def _bar0_read(self, offset: int, size: int) -> bytes:
        view = bytearray(self._bar0)
        struct.pack_into("<I", view, REG_MAGIC, MAGIC)
        struct.pack_into("<I", view, REG_DOORBELL, 0)
        struct.pack_into("<I", view, REG_DOORBELL_COUNT, self.doorbells & 0xFFFFFFFF)
        struct.pack_into("<I", view, REG_IRQ_COUNT, self.irqs_raised & 0xFFFFFFFF)
        return bytes(view[offset : offset + size])

    def _bar0_write(self, offset: int, data: bytes) -> None:
        readonly = {REG_MAGIC, REG_DOORBELL_COUNT, REG_IRQ_COUNT, REG_DMA_STATUS}
        for i, byte in enumerate(data):
            if (offset + i) & ~3 not in readonly:
                self._bar0[offset + i] = byte
        size = len(data)
        if _overlaps(offset, size, REG_DOORBELL):
            self.doorbells += 1
        if _overlaps(offset, size, REG_IRQ):
            vector = self._u32(REG_IRQ)
            if vector >= MSIX_VECTORS:
                raise VfioUserError(errno.EINVAL, f"no MSI-X vector {vector}")
            self.raise_irq(vector)
        if _overlaps(offset, size, REG_DMA_CMD):
            self._dma_command(self._u32(REG_DMA_CMD))

    def _set_status(self, status: int) -> None:
        struct.pack_into("<I", self._bar0, REG_DMA_STATUS, status)

    def _dma_command(self, command: int) -> None:
        addr = int.from_bytes(self._bar0[REG_DMA_ADDR : REG_DMA_ADDR + 8], "little")
        length = self._u32(REG_DMA_LEN)
        if command not in (DMA_TO_BUFFER, DMA_FROM_BUFFER) or not 0 < length <= BUFFER_SIZE:
            self._set_status(DMA_ERROR)
            return
        dma = self._dma
        if dma is None:
            self._set_status(DMA_ERROR)
            return
        try:  # fd-backed windows: synchronous, done before the write is acknowledged
            if command == DMA_TO_BUFFER:
                self._bar0[BUFFER : BUFFER + length] = dma.memory.read(addr, length)
            else:
                dma.memory.write(addr, bytes(self._bar0[BUFFER : BUFFER + length]))
            self._set_status(DMA_DONE)
            return
        except GuestMemoryError:
            pass
        self._set_status(DMA_BUSY)  # message-only window (or none): DMA_READ/DMA_WRITE
        task = asyncio.get_running_loop().create_task(self._dma_by_message(command, addr, length))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _dma_by_message(self, command: int, addr: int, length: int) -> None:
        dma = self._dma
        try:
            if dma is None:
                raise VfioUserError(errno.ENOTCONN, "no client")
            if command == DMA_TO_BUFFER:
                self._bar0[BUFFER : BUFFER + length] = await dma.read(addr, length)
            else:
                await dma.write(addr, bytes(self._bar0[BUFFER : BUFFER + length]))
        except (VfioUserError, GuestMemoryError) as err:
            log.info("echo: DMA %#x+%d failed: %s", addr, length, err)
            self._set_status(DMA_ERROR)
            return
        self._set_status(DMA_DONE)

    def region_read(self, index: int, offset: int, size: int) -> bytes:
        if index == 0:
            return self._bar0_read(offset, size)
        if index == 1:
            if offset >= PBA_OFFSET:
                pending = self.irq.pending(IrqIndex.MSIX)
                bits = sum(1 << v for v, p in enumerate(pending) if p)
                pba = bits.to_bytes(8, "little").ljust(BAR1_SIZE - PBA_OFFSET, b"\0")
                return pba[offset - PBA_OFFSET : offset - PBA_OFFSET + size]
            if offset + size > PBA_OFFSET:
                return self.region_read(1, offset, PBA_OFFSET - offset) + self.region_read(
                    1, PBA_OFFSET, offset + size - PBA_OFFSET
                )
            return bytes(self._msix_table[offset : offset + size])
        if index == 2:
            return b"".join(self._bar2_piece(offset, size, None))
        raise VfioUserError(errno.EINVAL, f"region {index} is not readable")

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        if index == 0:
            self._bar0_write(offset, data)
        elif index == 1:
            if offset < PBA_OFFSET:  # the PBA is read-only
                end = min(offset + len(data), PBA_OFFSET)
                self._msix_table[offset:end] = data[: end - offset]
        elif index == 2:
            list(self._bar2_piece(offset, len(data), data))
        else:
            raise VfioUserError(errno.EINVAL, f"region {index} is not writable")

    def _bar2_piece(self, offset: int, size: int, data: bytes | None) -> list[bytes]:
        """Split a BAR2 access into areas (the memfds) and the hole; read or write each part."""
        out: list[bytes] = []
        pos = offset
        end = offset + size
        while pos < end:
            area = next((a for a in self._areas if a.offset <= pos < a.offset + a.size), None)
            if area is not None:
                stop = min(end, area.offset + area.size)
                if data is None:
                    out.append(self.bar2.read(pos, stop - pos))
                else:
                    self.bar2.write(pos, data[pos - offset : stop - offset])
            else:
                stop = min(end, 0x2000)
                hole = slice(pos - 0x1000, stop - 0x1000)
                if data is None:
                    out.append(bytes(self._bar2_hole[hole]))
                else:
                    self._bar2_hole[hole] = data[pos - offset : stop - offset]
            pos = stop
        return out
