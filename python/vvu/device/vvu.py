"""`VvuDevice`: the virtio-vhost-user device, a `VirtioPciDevice` served over vfio-user.

The contract is docs/vvu-device.md. In short: a vhost-user front-end connects to a unix socket
the device listens on; every message it sends becomes one rxq buffer for the driver (header +
payload, no fds), after the device has bound the message's resources (memory regions become
BAR4 areas whose fds are the front-end's, call/err/log eventfds become BAR2 ioeventfds, kick
eventfds are forwarded natively to MSI-X eventfds). The driver answers through txq.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import stat
import struct
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Final

from vvu._core import EventFd, EventForwarder, GuestMemory, SplitQueue, memfd
from vvu.errors import GuestMemoryError
from vvu.pci.virtio_device import NO_VECTOR, CfgType, Status, VirtioPciDevice
from vvu.protocol.constants import (
    HEADER_SIZE,
    KNOWN_FLAGS,
    MAX_PAYLOAD,
    NEED_REPLY,
    REPLY,
    VERSION,
    VERSION_MASK,
    VRING_IDX_MASK,
    FrontendRequest,
    ProtocolFeature,
    VhostFeature,
)
from vvu.protocol.payloads import Inflight, Log, MemoryRegion, MemoryTable, SingleRegion
from vvu.protocol.table import Answer, spec_for
from vvu.transport.base import Channel, RawMessage, TransportError, close_fds, is_eventfd
from vvu.transport.unix import UnixListener
from vvu.vfio_user.device import DmaSpace, IoEventFd, IrqRequest, MmapArea, RegionSpec
from vvu.vfio_user.protocol import IrqIndex

__all__ = [
    "BACKEND_UP",
    "DIRECT_KICK",
    "FEATURES_FILTERED",
    "FILE_MODE_FEATURES_FILTERED",
    "FILE_MODE_PROTOCOL_FEATURES_FILTERED",
    "FRONTEND_UP",
    "INFLIGHT_BAR",
    "KICK_FDS_OFFSET",
    "MAX_AREAS",
    "PROTOCOL_FEATURES_ALLOWED",
    "VVU_VIRTIO_ID",
    "VvuDevice",
]

log = logging.getLogger(__name__)

VVU_VIRTIO_ID: Final = 63
BACKEND_UP: Final = 1 << 0
FRONTEND_UP: Final = 1 << 1
RXQ: Final = 0
TXQ: Final = 1
QUEUE_SIZE: Final = 256

DEVICE_AUX_NOTIFY: Final = 6
DRIVER_AUX_NOTIFY: Final = 7
AUX_MULTIPLIER: Final = 4
BAR2_SIZE: Final = 0x8000
DRIVER_AUX_OFFSET: Final = 0x4000
#: vvu extension: BAR2 range whose ioeventfd i is the front-end's kick eventfd i.
KICK_FDS_OFFSET: Final = 0x6000
#: vvu extension: the msix_vector value that makes a kick "direct" (the driver reads the kick
#: eventfd itself, from the KICK_FDS_OFFSET ioeventfds; the device does not touch it).
DIRECT_KICK: Final = 0xFFFE
BAR4_SIZE: Final = 32 << 30
SHM_FRONTEND: Final = 1
SHM_LOG: Final = 2
SHM_INFLIGHT: Final = 3
#: (shmid, offset in BAR4, length)
SHM_LAYOUT: Final = (
    (SHM_FRONTEND, 0, 16 << 30),
    (SHM_LOG, 16 << 30, 1 << 30),
    (SHM_INFLIGHT, 17 << 30, 1 << 30),
)
REGION_ALIGN: Final = 2 << 20
PAGE: Final = 4096
#: --frontend-memory: the BAR holding the device's inflight memory (shmid 3), a 32-bit memory
#: BAR of its own (one region, one fd: a standard client maps one fd per region).
INFLIGHT_BAR: Final = 3
#: The largest queue an inflight region is sized for: QEMU's VIRTQUEUE_MAX_SIZE (1024), also
#: `Backend.max_queue_size`'s default.
INFLIGHT_MAX_QUEUE_SIZE: Final = 1024
#: One queue's part of an inflight region, the larger (packed) layout of the vhost-user spec:
#: a 32-byte header and a 32-byte DescStatePacked per descriptor, 64-byte aligned
#: (rust/core/src/inflight.rs, `RingLayout::queue_region_size`).
INFLIGHT_QUEUE_REGION: Final = -(-(32 + 32 * INFLIGHT_MAX_QUEUE_SIZE) // 64) * 64
#: Messages waiting for rxq buffers before the device stops reading the front-end.
RX_BACKLOG: Final = 16
#: Messages waiting to be sent to the front-end (socket and back-end channel) before the
#: device gives up on a front-end that does not read them.
OUT_BACKLOG: Final = 64
#: BAR4 areas at most (shmid 1 regions + the log + the inflight region). In the per-area-fds
#: mode each area is one fd of BAR4's region-info reply, and a reply carries at most
#: `max_msg_fds` fds (16: what our server advertises and our client proposes; fewer when the
#: client proposed fewer). A region that would exceed it is refused; GET_MAX_MEM_SLOTS is
#: clamped to leave room for the log and the inflight region.
MAX_AREAS: Final = 16

_P = ProtocolFeature
PROTOCOL_FEATURES_ALLOWED: Final = (
    (1 << _P.MQ)
    | (1 << _P.REPLY_ACK)
    | (1 << _P.RARP)
    | (1 << _P.MTU)
    | (1 << _P.BACKEND_REQ)
    | (1 << _P.CONFIG)
    | (1 << _P.RESET_DEVICE)
    | (1 << _P.CONFIGURE_MEM_SLOTS)
    | (1 << _P.STATUS)
    # Kicks and calls as messages: VRING_KICK passes through rxq, BACKEND_VRING_CALL/ERR come
    # back through txq like any back-end request; no fd is involved.
    | (1 << _P.INBAND_NOTIFICATIONS)
    # The dirty log is shmid 2 (SET_LOG_BASE's fd), its doorbell device aux notification 2N.
    | (1 << _P.LOG_SHMFD)
    # The inflight region is shmid 3: the device allocates it on GET_INFLIGHT_FD's reply.
    | (1 << _P.INFLIGHT_SHMFD)
)
#: Virtio feature bits the device never lets through (none: LOG_ALL works through shmid 2).
FEATURES_FILTERED: Final = 0
#: With --frontend-memory BAR4 is the front-end's file alone: no shmid 2 (log) a standard
#: vfio-user client could map, so neither LOG_SHMFD nor LOG_ALL is let through. Inflight
#: tracking stays: shmid 3 is the device's own memfd in BAR3, there from the start.
FILE_MODE_PROTOCOL_FEATURES_FILTERED: Final = 1 << _P.LOG_SHMFD
FILE_MODE_FEATURES_FILTERED: Final = VhostFeature.LOG_ALL.mask
_F = FrontendRequest
_HDR = struct.Struct("<III")
_U64 = struct.Struct("<Q")


@dataclass
class ShmArea:
    """One fd range published as a BAR4 area: a front-end memory region (shmid 1), the dirty
    log (shmid 2) or the inflight region (shmid 3)."""

    offset: int  # in BAR4 (= in shmid 1, which starts at 0)
    size: int  # page multiple
    fd: int  # owned
    fd_offset: int  # page-aligned
    start: int  # the front-end's `mmap_offset`: where the first byte lies in the fd
    region: MemoryRegion | None = None  # as the front-end sent it (shmid 1 only)

    @property
    def region_offset(self) -> int:
        """Where the first byte lies in BAR4 (in shmid 1: the rewritten `mmap_offset`)."""
        return self.offset + (self.start - self.fd_offset)


class _Refused(Exception):
    """A front-end message the device cannot bind (its memory cannot be published, an fd that
    should be an eventfd is not): the front-end gets a failure ack (NEED_REPLY) or is
    disconnected; the message never reaches the driver."""


def _fd_kind(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError as err:
        return err.strerror or "unknown"


def _page_span(start: int, length: int) -> tuple[int, int]:
    """The page-aligned fd offset and the page-multiple size covering `start`+`length`."""
    fd_offset = start & ~(PAGE - 1)
    return fd_offset, -(-(start - fd_offset + length) // PAGE) * PAGE


def _bar_size(length: int) -> int:
    """The smallest power-of-two BAR (at least a page) holding `length` bytes."""
    return max(PAGE, 1 << (length - 1).bit_length())


def inflight_memory_size(max_queues: int) -> int:
    """--frontend-memory: the size of the device's inflight memfd (= BAR3): room for a region
    of `max_queues` queues of INFLIGHT_MAX_QUEUE_SIZE descriptors in either ring layout,
    rounded up to a power of two (a BAR's size)."""
    return _bar_size(max_queues * INFLIGHT_QUEUE_REGION)


def _sealed_memfd(size: int, name: str) -> int:
    """A zeroed memfd of `size` bytes whose size nobody (the front-end holds a duplicate) can
    change: a shrunk file would make every mapping of it fault."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_frontend_memory(path: str) -> tuple[int, os.stat_result]:
    """Open the file backing the front-end's RAM (read-write); ValueError when it cannot be
    shared memory for BAR4 (not a regular file, empty, not whole pages)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        raise ValueError(f"--frontend-memory {path}: {err.strerror}") from err
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = "not a regular file"
    elif st.st_size <= 0 or st.st_size % PAGE:
        problem = f"its size {st.st_size:#x} is not a positive multiple of {PAGE}"
    if problem is not None:
        os.close(fd)
        raise ValueError(f"--frontend-memory {path}: {problem}")
    return fd, st


class VvuDevice(VirtioPciDevice):
    """The VVU device. `listener` is where front-ends connect (FRONTEND_SOCK)."""

    # Its 20 bytes make room for shmid 3's capability (docs/vvu-device.md): a VVU driver maps
    # BAR4 anyway, so it never needs the config-space access window. With --frontend-memory
    # there are two shared-memory capabilities (shmid 1, shmid 3 in BAR3), and the window is back.
    PCI_CFG_CAP = False

    def __init__(
        self,
        listener: UnixListener,
        *,
        uuid: bytes | None = None,
        max_queues: int = 64,
        device_id: int = VVU_VIRTIO_ID,
        frontend_memory: str | None = None,
    ) -> None:
        """`frontend_memory`: the file backing the front-end's RAM (docs/vvu-device.md,
        "Front-end memory from a file"): BAR4 is then that file, mappable with standard
        vfio-user, and only regions inside it are accepted."""
        if not 1 <= max_queues <= 125:  # 3 + N MSI-X vectors fit BAR1's 2 KiB table
            raise ValueError("max_queues is 1 to 125")
        if uuid is not None and len(uuid) != 16:
            raise ValueError("uuid is 16 bytes")
        self.listener = listener
        self.max_queues = max_queues
        self.uuid = uuid if uuid is not None else os.urandom(16)
        self._vvu_status = 0
        self._aux_select = 0
        self._aux_vectors = [NO_VECTOR] * max_queues
        self._doorbells: dict[int, EventFd] = {}
        self._kicks: dict[int, EventFd] = {}
        self._areas: list[ShmArea] = []
        self._fixed: dict[int, ShmArea] = {}  # shmid 2 (log), 3 (inflight): one area each
        self._log_request = b""  # SET_LOG_BASE's payload as the front-end sent it (its reply)
        self._shm = GuestMemory()  # the areas, for message (REGION_READ/WRITE) access
        self._extensions = False  # the vfio-user client asked for vvu's extensions
        self.max_areas = MAX_AREAS  # BAR4 areas the client takes in one region-info reply
        #: shmid -> (offset in BAR4, length)
        self.shm_layout: dict[int, tuple[int, int]] = {s: (o, n) for s, o, n in SHM_LAYOUT}
        self.bar4_size = BAR4_SIZE
        self.protocol_features_allowed = PROTOCOL_FEATURES_ALLOWED
        self.features_filtered = FEATURES_FILTERED
        #: --frontend-memory: the file (one fixed BAR4 area at 0) and its (st_dev, st_ino)
        self.frontend_memory = frontend_memory
        self._file: ShmArea | None = None
        self._file_id: tuple[int, int] | None = None
        #: --frontend-memory: the device's inflight memfd (BAR3 = shmid 3) and its identity
        self._inflight: ShmArea | None = None
        self._inflight_id: tuple[int, int] | None = None
        if frontend_memory is not None:
            self._use_frontend_memory(frontend_memory)
            self.PCI_CFG_CAP = True
        self._forwarder: EventForwarder | None = None
        self._unmapped_kick = EventFd()  # kicks without a vector land here: ISR bit 2
        self._frontend: Channel | None = None
        self._backend_channel: Channel | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._accept_task: asyncio.Task[None] | None = None
        self._can_accept: asyncio.Event | None = None
        self._rx_pending: deque[bytes] = deque()
        self._rx_space: asyncio.Event | None = None
        self._out: asyncio.Queue[tuple[Channel, bytes, list[int]]] | None = None
        self._release_after_reply: set[int] = set()
        self._awaiting: Counter[int] = Counter()  # front-end requests the driver is to answer
        self._protocol_features = 0  # as the front-end set them (which replies are due)
        self.sessions = 0
        self.dropped_tx = 0
        #: Doorbells rung by REGION_WRITE (the device signalled the front-end itself): a client
        #: that uses the ioeventfds rings them without the device.
        self.doorbell_writes = 0
        self._kicks_forwarded_before = 0
        super().__init__(
            virtio_id=device_id,
            features=0,
            queue_max_sizes=[QUEUE_SIZE, QUEUE_SIZE],
            msix_vectors=3 + max_queues,
            ioeventfds=True,
        )

    def _use_frontend_memory(self, path: str) -> None:
        """BAR4 = shmid 1 = the file, one fixed area at offset 0 = file offset 0."""
        fd, st = _open_frontend_memory(path)
        try:
            self._shm.add_region(fd, 0, st.st_size)
        except Exception:
            os.close(fd)
            raise
        self._file = ShmArea(0, st.st_size, fd, 0, 0)
        self._file_id = (st.st_dev, st.st_ino)
        self.shm_layout = {SHM_FRONTEND: (0, st.st_size)}
        # Inflight regions: the device's own memfd, BAR3 offset X = memfd offset X = shmid 3
        # offset X, there from realize on (a standard client maps it then).
        size = inflight_memory_size(self.max_queues)
        ifd = _sealed_memfd(size, "vvu-inflight")
        ist = os.fstat(ifd)
        self._inflight = ShmArea(0, size, ifd, 0, 0)
        self._inflight_id = (ist.st_dev, ist.st_ino)
        self.bar4_size = _bar_size(st.st_size)
        self.protocol_features_allowed &= ~FILE_MODE_PROTOCOL_FEATURES_FILTERED
        self.features_filtered |= FILE_MODE_FEATURES_FILTERED

    # -- state ---------------------------------------------------------------------------------

    @property
    def vvu_status(self) -> int:
        return self._vvu_status

    @property
    def frontend_connected(self) -> bool:
        return self._frontend is not None

    @property
    def areas(self) -> list[ShmArea]:
        return list(self._areas)

    def shm_area(self, shmid: int) -> ShmArea | None:
        """The area of shmid 2 (dirty log) or 3 (inflight region), if published (with
        --frontend-memory, shmid 3 is the device's inflight memfd: always there, in BAR3)."""
        if shmid == SHM_INFLIGHT and self._inflight is not None:
            return self._inflight
        return self._fixed.get(shmid)

    def _all_areas(self) -> list[ShmArea]:
        fixed = [self._file] if self._file is not None else []
        return fixed + self._areas + list(self._fixed.values())

    @property
    def doorbells(self) -> dict[int, EventFd]:
        return dict(self._doorbells)

    @property
    def forwarder(self) -> EventForwarder | None:
        return self._forwarder

    def aux_vector(self, index: int) -> int:
        return self._aux_vectors[index]

    # -- layout --------------------------------------------------------------------------------

    def add_extra_capabilities(self) -> None:
        n = self.max_queues
        self.config.add_bar(2, BAR2_SIZE)
        self.config.add_bar(4, self.bar4_size, is_64bit=True, prefetchable=True)
        self.add_virtio_cap(
            DEVICE_AUX_NOTIFY,
            2,
            0,
            AUX_MULTIPLIER * (2 * n + 1),
            extra=struct.pack("<I", AUX_MULTIPLIER),
        )
        self.add_virtio_cap(DRIVER_AUX_NOTIFY, 2, DRIVER_AUX_OFFSET, 4)
        # Three 24-byte cap64s fit the 256-byte space only without PCI_CFG (PCI_CFG_CAP below).
        for shmid, (offset, length) in sorted(self.shm_layout.items()):
            self.add_virtio_cap(
                CfgType.SHARED_MEMORY,
                4,
                offset & 0xFFFFFFFF,
                length & 0xFFFFFFFF,
                cap_id=shmid,
                extra=struct.pack("<II", offset >> 32, length >> 32),
            )
        if self._inflight is not None:  # --frontend-memory: shmid 3 is BAR3, all of it
            size = self._inflight.size
            self.config.add_bar(INFLIGHT_BAR, size, prefetchable=True)
            self.add_virtio_cap(
                CfgType.SHARED_MEMORY,
                INFLIGHT_BAR,
                0,
                size,
                cap_id=SHM_INFLIGHT,
                extra=struct.pack("<II", 0, 0),
            )

    def extra_regions(self) -> dict[int, RegionSpec]:
        areas = tuple(MmapArea(a.offset, a.size, a.fd, a.fd_offset) for a in self._all_areas())
        regions = {2: RegionSpec(BAR2_SIZE), 4: RegionSpec(self.bar4_size, areas=areas)}
        if self._inflight is not None:
            fd, size = self._inflight.fd, self._inflight.size
            regions[INFLIGHT_BAR] = RegionSpec(size, areas=(MmapArea(0, size, fd, 0),))
        return regions

    def extra_ioeventfds(self, index: int) -> Sequence[IoEventFd]:
        if index != 2:
            return ()
        doorbells = tuple(
            IoEventFd(AUX_MULTIPLIER * i, 0, efd) for i, efd in sorted(self._doorbells.items())
        )
        if not self._extensions:  # direct kicks are vvu's extension
            return doorbells
        kicks = tuple(
            IoEventFd(KICK_FDS_OFFSET + AUX_MULTIPLIER * i, 0, efd)
            for i, efd in sorted(self._kicks.items())
        )
        return doorbells + kicks

    # -- config space --------------------------------------------------------------------------

    def device_config(self) -> bytes:
        return struct.pack("<II", self._vvu_status, self.max_queues) + self.uuid

    def device_config_write(self, offset: int, data: bytes) -> None:
        if offset >= 4:
            self._refuse(f"VVU config write at {offset:#x} ignored (only status is writable)")
            return
        old = self._vvu_status
        cur = old.to_bytes(4, "little")
        new = int.from_bytes(cur[:offset] + data + cur[offset + len(data) :], "little")
        # FRONTEND_UP is the device's: a driver writing it back as it reads it, or as 0 (a plain
        # `status = BACKEND_UP`), changes nothing and is fine; setting it, or any other bit, is not.
        forged = new & FRONTEND_UP and not old & FRONTEND_UP
        if new & ~(BACKEND_UP | FRONTEND_UP) or forged:
            self._refuse(f"VVU status write {new:#x}: only BACKEND_UP is the driver's")
        backend_up = new & BACKEND_UP
        if backend_up and not old & BACKEND_UP:
            self._vvu_status |= BACKEND_UP
            log.info("vvu: driver set BACKEND_UP")
            self._update_accepting()
        elif not backend_up and old & BACKEND_UP:
            log.info("vvu: driver cleared BACKEND_UP")
            had = self._frontend is not None
            self._disconnect_frontend("the driver cleared BACKEND_UP", notify=False)
            self._vvu_status = 0
            self._update_accepting()
            if had:  # FRONTEND_UP changed, but the driver did it: no config interrupt
                self.config_changed(interrupt=False)

    # -- BAR2 and BAR4 -------------------------------------------------------------------------

    def extra_region_read(self, index: int, offset: int, size: int) -> bytes:
        if index == 2:
            regs = struct.pack("<HH", self._aux_select, self._selected_vector())
            if DRIVER_AUX_OFFSET <= offset < DRIVER_AUX_OFFSET + 4:
                rel = offset - DRIVER_AUX_OFFSET
                return regs[rel : rel + size].ljust(size, b"\0")
            return bytes(size)
        if index == 4:
            for area in self._all_areas():
                if area.offset <= offset and offset + size <= area.offset + area.size:
                    return self._shm.read(offset, size)
            return bytes(size)
        if index == INFLIGHT_BAR and self._inflight is not None:  # the server checked bounds
            return os.pread(self._inflight.fd, size, offset).ljust(size, b"\0")
        return super().extra_region_read(index, offset, size)

    def extra_region_write(self, index: int, offset: int, data: bytes) -> None:
        if index == 2:
            self._bar2_write(offset, data)
        elif index == 4:
            for area in self._all_areas():
                if area.offset <= offset and offset + len(data) <= area.offset + area.size:
                    self._shm.write(offset, data)
                    return
            self._refuse(f"BAR4 write {offset:#x}+{len(data)} outside the areas dropped")
        elif index == INFLIGHT_BAR and self._inflight is not None:
            os.pwrite(self._inflight.fd, data, offset)
        else:
            super().extra_region_write(index, offset, data)

    def _selected_vector(self) -> int:
        if self._aux_select < self.max_queues:
            return self._aux_vectors[self._aux_select]
        return NO_VECTOR

    def _bar2_write(self, offset: int, data: bytes) -> None:
        if offset < DRIVER_AUX_OFFSET:
            index, rest = divmod(offset, AUX_MULTIPLIER)
            if rest or len(data) not in (2, 4):
                self._refuse(f"doorbell write {offset:#x}+{len(data)} is not a 16/32-bit slot")
                return
            self.ring_doorbell(index)
            return
        if KICK_FDS_OFFSET <= offset < KICK_FDS_OFFSET + AUX_MULTIPLIER * self.max_queues:
            # What the ioeventfd there would do: signal the front-end's kick eventfd.
            index, rest = divmod(offset - KICK_FDS_OFFSET, AUX_MULTIPLIER)
            if rest or len(data) not in (2, 4):
                self._refuse(f"kick fd write {offset:#x}+{len(data)} is not a 16/32-bit slot")
            elif index in self._kicks:
                self._kicks[index].signal()
            return
        rel = offset - DRIVER_AUX_OFFSET
        if rel == 0 and len(data) == 4:  # select and vector at once
            self._bar2_write(offset, data[:2])
            self._bar2_write(offset + 2, data[2:])
        elif rel == 0 and len(data) == 2:
            self._aux_select = int.from_bytes(data, "little")
            if self._aux_select >= self.max_queues:
                log.info("vvu: driver aux select %d is out of range", self._aux_select)
        elif rel == 2 and len(data) == 2:
            self._set_aux_vector(int.from_bytes(data, "little"))
        else:
            self._refuse(f"BAR2 write {offset:#x}+{len(data)} ignored")

    def _set_aux_vector(self, vector: int) -> None:
        """The driver writes the selected notification's msix_vector."""
        if self._aux_select >= self.max_queues:
            self._refuse(f"msix_vector of notification {self._aux_select} (out of range)")
            return
        if vector not in (NO_VECTOR, DIRECT_KICK) and vector >= self.msix_vector_count:
            self._refuse(f"notification vector {vector} does not exist (NO_VECTOR)")
            vector = NO_VECTOR
        elif vector == DIRECT_KICK and not self._extensions:
            # The driver could never read the kick eventfd (no GET_REGION_IO_FDS entry).
            self._refuse("DIRECT kicks need a client with vvu's extensions (NO_VECTOR)")
            vector = NO_VECTOR
        self._aux_vectors[self._aux_select] = vector
        self._route_kick(self._aux_select)

    def ring_doorbell(self, index: int) -> None:
        """Device aux notification `index` (a REGION_WRITE; the ioeventfd does this itself)."""
        if not 0 <= index <= 2 * self.max_queues:
            self._refuse(f"doorbell {index} is out of range")
            return
        efd = self._doorbells.get(index)
        if efd is None:
            log.info("vvu: doorbell %d has no front-end eventfd; ignored", index)
            return
        self.doorbell_writes += 1
        efd.signal()

    # -- kicks ---------------------------------------------------------------------------------

    def _kick_dst(self, index: int) -> EventFd:
        vector = self._aux_vectors[index]
        if vector != NO_VECTOR:
            efd = self.irq.bound(IrqIndex.MSIX, vector)
            if efd is not None:
                return efd
        return self._unmapped_kick

    def _route_kick(self, index: int) -> None:
        if self._forwarder is None or index not in self._kicks:
            return
        if self._aux_vectors[index] == DIRECT_KICK:  # the driver reads the eventfd itself
            self._unroute_kick(index)
        elif not self._forwarder.set_dst(index, self._kick_dst(index)):
            self._forwarder.add(self._kicks[index], self._kick_dst(index), index)

    def set_irqs(self, request: IrqRequest) -> None:
        super().set_irqs(request)
        for index in self._kicks:  # the MSI-X eventfds may have changed
            self._route_kick(index)

    def _on_unmapped_kick(self) -> None:
        if self._unmapped_kick.consume() and self.status & Status.DRIVER_OK:
            self._isr |= 0x4

    def _bind_kick(self, index: int, fd: int | None) -> None:
        self._release_kick(index)
        if fd is None:
            return
        efd = EventFd.from_fd(fd)
        self._kicks[index] = efd  # also BAR2's ioeventfd at KICK_FDS_OFFSET + 4·index
        self._route_kick(index)

    def _release_kick(self, index: int) -> None:
        efd = self._kicks.pop(index, None)
        if efd is not None:
            self._unroute_kick(index)
            efd.close()

    def _unroute_kick(self, index: int) -> None:
        """Stop forwarding kick `index`, keeping its count in `kicks_forwarded`."""
        if self._forwarder is None:
            return
        self._kicks_forwarded_before += self._forwarder.forwarded(index) or 0
        self._forwarder.remove(index)

    @property
    def kicks_forwarded(self) -> int:
        """Front-end kicks relayed to MSI-X eventfds so far (every ring, every session)."""
        live = 0
        if self._forwarder is not None:
            live = sum(self._forwarder.forwarded(t) or 0 for t in self._forwarder.tokens())
        return self._kicks_forwarded_before + live

    def _bind_doorbell(self, index: int, fd: int | None) -> None:
        old = self._doorbells.pop(index, None)
        if old is not None:
            old.close()
        if fd is not None:
            self._doorbells[index] = EventFd.from_fd(fd)

    # -- shared memory -------------------------------------------------------------------------

    def _place(self, size: int) -> int | None:
        base, length = self.shm_layout[SHM_FRONTEND]
        candidate = base
        for area in sorted(self._areas, key=lambda a: a.offset):
            if candidate + size <= area.offset:
                break
            candidate = max(candidate, -(-(area.offset + area.size) // REGION_ALIGN) * REGION_ALIGN)
        if candidate + size > base + length:
            return None
        return candidate

    def _accept_region(self, region: MemoryRegion, fd: int) -> MemoryRegion:
        """Publish one region (takes `fd`); the region as forwarded (`mmap_offset` = its offset
        in shmid 1). Raises _Refused (fd closed) when it cannot be published: then it must
        not reach the driver, whose lookup by offset would find another region's memory."""
        where = f"region {region.guest_phys_addr:#x}+{region.memory_size:#x}"
        if self._file is not None:
            return self._match_file(region, fd, where)
        if len(self._all_areas()) >= self.max_areas:
            os.close(fd)
            raise _Refused(f"{where}: BAR4 has {self.max_areas} areas already (max_msg_fds)")
        _, size = _page_span(region.mmap_offset, region.memory_size)
        offset = self._place(size) if region.memory_size else None
        if offset is None:
            os.close(fd)
            raise _Refused(f"{where} does not fit in shmid 1")
        area = self._map_area(offset, fd, region.mmap_offset, region.memory_size, region)
        self._areas.append(area)
        return self._rewritten(region, area)

    def _match_file(self, region: MemoryRegion, fd: int, where: str) -> MemoryRegion:
        """--frontend-memory: the region must lie inside the file (same st_dev and st_ino);
        its `mmap_offset` is then its offset in the file, which is its offset in shmid 1."""
        assert self._file is not None
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if (st.st_dev, st.st_ino) != self._file_id:
            raise _Refused(f"{where}: its fd is not the --frontend-memory file")
        end = region.mmap_offset + region.memory_size
        if not region.memory_size or end > self._file.size:
            raise _Refused(
                f"{where} at file offset {region.mmap_offset:#x} leaves the "
                f"{self._file.size:#x}-byte --frontend-memory file"
            )
        return region

    def _map_area(
        self, offset: int, fd: int, start: int, length: int, region: MemoryRegion | None = None
    ) -> ShmArea:
        """`fd`'s `start`+`length` as the BAR4 area at `offset`; takes `fd`. Raises _Refused
        (fd closed) when it cannot be mapped."""
        fd_offset, size = _page_span(start, length)
        try:
            # The area is whole pages (vfio-user mmaps pages), but the file may end inside the
            # last one (a memfd sized to the region): map for ourselves only what it has.
            wanted = start - fd_offset + length
            mapped = min(size, max(os.fstat(fd).st_size - fd_offset, wanted))
            self._shm.add_region(fd, offset, mapped, mmap_offset=fd_offset)
        except Exception as err:  # the fd cannot be mapped (too short, not a memfd, ...)
            os.close(fd)
            raise _Refused(f"{length:#x} bytes at {start:#x} cannot be mapped: {err}") from err
        return ShmArea(offset, size, fd, fd_offset, start, region)

    def _drop_fixed(self, shmid: int) -> None:
        area = self._fixed.pop(shmid, None)
        if area is not None:
            with contextlib.suppress(Exception):
                self._shm.remove_region(area.offset)
            os.close(area.fd)

    def _publish_fixed(self, shmid: int, fd: int, start: int, length: int) -> int | None:
        """`fd`'s `start`+`length` as shmid `shmid`'s one area (replacing the previous one);
        takes `fd`. Returns the first byte's offset in the shmid (the rewritten `mmap_offset`),
        None (fd closed) when it is empty, too big or cannot be mapped."""
        self._drop_fixed(shmid)
        if shmid not in self.shm_layout:
            log.warning("vvu: shmid %d does not exist here; not published", shmid)
            os.close(fd)
            return None
        if len(self._all_areas()) >= self.max_areas:
            log.warning(
                "vvu: BAR4 has %d areas already; shmid %d not published", self.max_areas, shmid
            )
            os.close(fd)
            return None
        base, limit = self.shm_layout[shmid]
        if not 0 < length <= limit - PAGE:
            log.warning("vvu: %#x bytes do not fit in shmid %d; not published", length, shmid)
            os.close(fd)
            return None
        try:
            area = self._map_area(base, fd, start, length)
        except _Refused as err:
            log.warning("vvu: shmid %d not published: %s", shmid, err)
            return None
        self._fixed[shmid] = area
        return area.region_offset - base

    def _remove_area(self, area: ShmArea) -> None:
        self._areas.remove(area)
        with contextlib.suppress(Exception):
            self._shm.remove_region(area.offset)
        os.close(area.fd)

    def _drop_areas(self) -> None:
        for area in list(self._areas):
            self._remove_area(area)

    def _bind_log_base(self, req: int, payload: bytes, fds: list[int]) -> bytes:
        """The log becomes shmid 2 (replacing the previous one), `mmap_offset` its offset there.
        Unpublished (no fd, too big, unmappable): forwarded as is, so the driver finds no area
        and the back-end refuses the log. With --frontend-memory there is no shmid 2."""
        if SHM_LOG not in self.shm_layout:
            raise _Refused("SET_LOG_BASE: no shmid 2 with --frontend-memory (LOG_SHMFD is off)")
        request = Log.unpack(payload)
        self._drop_fixed(SHM_LOG)
        self._log_request = payload
        if len(fds) != 1:
            log.warning("vvu: SET_LOG_BASE with %d fds", len(fds))
            return payload
        offset = self._publish_fixed(SHM_LOG, fds.pop(), request.mmap_offset, request.mmap_size)
        return payload if offset is None else Log(request.mmap_size, offset).pack()

    def _bind_inflight(self, req: int, payload: bytes, fds: list[int]) -> bytes:
        """SET_INFLIGHT_FD: the front-end's region becomes shmid 3, as the log becomes shmid 2.
        With --frontend-memory shmid 3 is the device's memfd: the region must be in it."""
        request = Inflight.unpack(payload)
        if self._inflight is not None:
            return self._match_inflight(request, payload, fds)
        self._drop_fixed(SHM_INFLIGHT)
        if len(fds) != 1:
            log.warning("vvu: SET_INFLIGHT_FD with %d fds", len(fds))
            return payload
        start, size = request.mmap_offset, request.mmap_size
        offset = self._publish_fixed(SHM_INFLIGHT, fds.pop(), start, size)
        if offset is None:
            return payload
        return Inflight(size, offset, request.num_queues, request.queue_size).pack()

    def _match_inflight(self, request: Inflight, payload: bytes, fds: list[int]) -> bytes:
        """--frontend-memory: the front-end hands back the device's inflight memfd (what its
        GET_INFLIGHT_FD gave it, on every reconnect): forwarded unchanged, its `mmap_offset`
        being the memfd offset = the shmid 3 offset. Any other fd, or a region leaving the
        memfd, is refused like a region outside the --frontend-memory file."""
        assert self._inflight is not None
        if len(fds) != 1:
            raise _Refused(f"SET_INFLIGHT_FD with {len(fds)} fds")
        st = os.fstat(fds[0])  # _bind closes it: the memfd is the device's own
        if (st.st_dev, st.st_ino) != self._inflight_id:
            raise _Refused(
                "SET_INFLIGHT_FD: its fd is not the device's inflight memory "
                f"({_fd_kind(fds[0])}; with --frontend-memory it is the fd GET_INFLIGHT_FD gave)"
            )
        end = request.mmap_offset + request.mmap_size
        if not request.mmap_size or end > self._inflight.size:
            raise _Refused(
                f"SET_INFLIGHT_FD: {request.mmap_size:#x} bytes at {request.mmap_offset:#x} "
                f"leave the {self._inflight.size:#x}-byte inflight memory"
            )
        return payload

    def _reuse_inflight(self, reply: Inflight) -> tuple[bytes, list[int]]:
        """--frontend-memory: GET_INFLIGHT_FD's reply names the device's own inflight memfd
        (shmid 3, mapped by the VMM at realize): its first `mmap_size` bytes are zeroed (a
        fresh region), the front-end gets a duplicate, the back-end a SET_INFLIGHT_FD of the
        device's naming shmid 3 offset 0. A size beyond the memfd: the "no region" form."""
        assert self._inflight is not None
        failed: tuple[bytes, list[int]] = (
            Inflight(0, 0, reply.num_queues, reply.queue_size).pack(),
            [],
        )
        if not 0 < reply.mmap_size <= self._inflight.size:
            if reply.mmap_size:
                log.warning(
                    "vvu: a %#x-byte inflight region does not fit the %#x-byte inflight memory",
                    reply.mmap_size,
                    self._inflight.size,
                )
            return failed
        try:
            zeros = bytes(min(reply.mmap_size, 1 << 20))
            for at in range(0, reply.mmap_size, len(zeros)):
                os.pwrite(self._inflight.fd, zeros[: reply.mmap_size - at], at)
            frontend_fd = os.dup(self._inflight.fd)
        except OSError as err:
            log.warning("vvu: inflight region of %#x bytes: %s", reply.mmap_size, err)
            return failed
        region = Inflight(reply.mmap_size, 0, reply.num_queues, reply.queue_size).pack()
        self._enqueue_rx(_HDR.pack(_F.SET_INFLIGHT_FD, VERSION, len(region)) + region)
        return region, [frontend_fd]

    def _allocate_inflight(self, reply: Inflight) -> tuple[bytes, list[int]]:
        """GET_INFLIGHT_FD's reply: the back-end cannot pass its region, so the device allocates
        a zeroed one of the size the back-end asks (as fresh as the back-end's), publishes it
        as shmid 3 and gives the front-end the fd; the back-end is told with a SET_INFLIGHT_FD
        of its own on rxq. Returns the reply payload and fds for the front-end."""
        if self._inflight is not None:
            return self._reuse_inflight(reply)
        _, limit = self.shm_layout.get(SHM_INFLIGHT, (0, 0))
        if not 0 < reply.mmap_size <= limit - PAGE:
            if reply.mmap_size:
                log.warning("vvu: a %#x-byte inflight region does not fit", reply.mmap_size)
            self._drop_fixed(SHM_INFLIGHT)
            return Inflight(0, 0, reply.num_queues, reply.queue_size).pack(), []
        try:
            fd = memfd(reply.mmap_size, "vvu-inflight")
            frontend_fd = os.dup(fd)
        except (OSError, GuestMemoryError) as err:
            log.warning("vvu: inflight region of %#x bytes: %s", reply.mmap_size, err)
            return Inflight(0, 0, reply.num_queues, reply.queue_size).pack(), []
        offset = self._publish_fixed(SHM_INFLIGHT, fd, 0, reply.mmap_size)
        if offset is None:
            os.close(frontend_fd)
            return Inflight(0, 0, reply.num_queues, reply.queue_size).pack(), []
        told = Inflight(reply.mmap_size, offset, reply.num_queues, reply.queue_size).pack()
        self._enqueue_rx(_HDR.pack(_F.SET_INFLIGHT_FD, VERSION, len(told)) + told)
        return Inflight(reply.mmap_size, 0, reply.num_queues, reply.queue_size).pack(), [
            frontend_fd
        ]

    def _rewritten(self, region: MemoryRegion, area: ShmArea) -> MemoryRegion:
        return MemoryRegion(
            region.guest_phys_addr, region.memory_size, region.userspace_addr, area.region_offset
        )

    # -- front-end messages: bind, then forward ------------------------------------------------

    def _bind(self, raw: RawMessage) -> bytes:
        """Bind the message's resources (taking its fds); return the payload to forward."""
        fds, raw.fds = raw.fds, []
        binders: dict[int, Callable[[int, bytes, list[int]], bytes]] = {
            _F.SET_MEM_TABLE: self._bind_mem_table,
            _F.ADD_MEM_REG: self._bind_add_mem_reg,
            _F.REM_MEM_REG: self._bind_rem_mem_reg,
            _F.SET_VRING_KICK: self._bind_vring_fd,
            _F.SET_VRING_CALL: self._bind_vring_fd,
            _F.SET_VRING_ERR: self._bind_vring_fd,
            _F.SET_LOG_FD: self._bind_log_fd,
            _F.SET_LOG_BASE: self._bind_log_base,
            _F.SET_INFLIGHT_FD: self._bind_inflight,
            _F.SET_BACKEND_REQ_FD: self._bind_backend_req,
        }
        try:
            if raw.request == _F.GET_VRING_BASE and len(raw.payload) >= 4:
                self._release_after_reply.add(int.from_bytes(raw.payload[:4], "little"))
            binder = binders.get(raw.request)
            return raw.payload if binder is None else binder(raw.request, raw.payload, fds)
        except _Refused:
            raise
        except Exception as err:  # malformed payload: forward as is, the back-end refuses it
            log.warning("vvu: front-end message %d not bound: %s", raw.request, err)
            return raw.payload
        finally:
            close_fds(fds)  # binders take (pop) the fds they keep

    def _bind_mem_table(self, req: int, payload: bytes, fds: list[int]) -> bytes:
        table = MemoryTable.unpack(payload)
        self._drop_areas()
        if len(fds) != table.nregions:
            raise _Refused(f"SET_MEM_TABLE: {len(fds)} fds for {table.nregions} regions")
        regions: list[MemoryRegion] = []
        try:
            while fds:
                regions.append(self._accept_region(table.regions[len(regions)], fds.pop(0)))
        except _Refused:
            self._drop_areas()  # all or nothing
            raise
        return MemoryTable(tuple(regions)).pack()

    def _bind_add_mem_reg(self, req: int, payload: bytes, fds: list[int]) -> bytes:
        region = SingleRegion.unpack(payload).region
        if len(fds) != 1:
            raise _Refused(f"ADD_MEM_REG with {len(fds)} fds")
        return SingleRegion(self._accept_region(region, fds.pop())).pack()

    def _bind_rem_mem_reg(self, req: int, payload: bytes, fds: list[int]) -> bytes:
        region = SingleRegion.unpack(payload).region
        for area in self._areas:
            if area.region is not None and (
                (area.region.guest_phys_addr, area.region.memory_size)
                == (region.guest_phys_addr, region.memory_size)
            ):
                rewritten = self._rewritten(region, area)
                self._remove_area(area)
                return SingleRegion(rewritten).pack()
        return payload

    def _bind_vring_fd(self, req: int, payload: bytes, fds: list[int]) -> bytes:
        (value,) = _U64.unpack(payload)
        index = value & VRING_IDX_MASK
        n = self.max_queues
        fd = fds[-1] if fds else None  # closed by _bind: the bindings keep duplicates
        self._check_eventfd(req, fd)
        if index >= n:
            log.warning("vvu: request %d for ring %d (max %d) not bound", req, index, n)
        elif req == _F.SET_VRING_KICK:
            self._bind_kick(index, fd)
        else:
            self._bind_doorbell(index if req == _F.SET_VRING_CALL else n + index, fd)
        return payload

    def _bind_log_fd(self, req: int, payload: bytes, fds: list[int]) -> bytes:
        fd = fds[-1] if fds else None
        self._check_eventfd(req, fd)
        self._bind_doorbell(2 * self.max_queues, fd)
        return payload

    @staticmethod
    def _check_eventfd(req: int, fd: int | None) -> None:
        """Kick, call, err and log fds become doorbells, forwarder sources and ioeventfds a
        client may hand to KVM: anything but an eventfd (a pipe, a socket, a file) is refused."""
        if fd is not None and not is_eventfd(fd):
            raise _Refused(f"request {req}: its fd is not an eventfd ({_fd_kind(fd)})")

    def _bind_backend_req(self, req: int, payload: bytes, fds: list[int]) -> bytes:
        if fds and self._frontend is not None:
            self._set_backend_channel(self._frontend.open_backend_channel(fds.pop()))
        return payload

    def _release_ring(self, index: int) -> None:
        n = self.max_queues
        if 0 <= index < n:
            self._release_kick(index)
            self._bind_doorbell(index, None)
            self._bind_doorbell(n + index, None)

    # -- rxq -----------------------------------------------------------------------------------

    def _enqueue_rx(self, message: bytes) -> None:
        self._rx_pending.append(message)
        self._pump_rx()

    def _pump_rx(self) -> None:
        q = self.queues[RXQ]
        while self._rx_pending:
            if (
                q.queue is None
                or not self.status & Status.DRIVER_OK
                or self.status & Status.DEVICE_NEEDS_RESET
            ):
                break
            queue = q.queue
            chains = queue.pop(1)
            if not chains:
                if queue.enable_notifications():
                    continue
                break
            chain = chains[0]
            message = self._rx_pending[0]
            if chain.writable_len < len(message):
                queue.push_used(chain.head, 0)
                self.signal_used(RXQ)
                self._refuse(
                    f"rxq buffer of {chain.writable_len} bytes is too small for a "
                    f"{len(message)}-byte message; device needs reset"
                )
                self._needs_reset()
                break
            self._rx_pending.popleft()
            written = chain.write(message)
            queue.push_used(chain.head, written)
            self.signal_used(RXQ)
        if self._rx_space is not None and len(self._rx_pending) < RX_BACKLOG:
            self._rx_space.set()

    # -- txq -----------------------------------------------------------------------------------

    def queue_notify(self, index: int, queue: SplitQueue) -> None:
        if index == RXQ:
            self._pump_rx()
            return
        while True:
            queue.disable_notifications()
            chains = queue.pop()
            for chain in chains:
                if chain.readable_len > HEADER_SIZE + MAX_PAYLOAD:  # not read at all
                    queue.push_used(chain.head, 0)
                    self.dropped_tx += 1
                    log.warning("vvu: txq buffer of %d bytes dropped: too long", chain.readable_len)
                    continue
                data = chain.read()
                queue.push_used(chain.head, 0)
                self._handle_tx(data)
            if chains:
                self.signal_used(TXQ)
            if not queue.enable_notifications():
                return

    @staticmethod
    def _tx_problem(data: bytes) -> str | None:
        if len(data) < HEADER_SIZE:
            return f"{len(data)} bytes is shorter than a header"
        _request, flags, size = _HDR.unpack_from(data)
        if len(data) != HEADER_SIZE + size:
            return f"{len(data)} bytes for a header announcing {size}"
        if flags & VERSION_MASK != VERSION:
            return f"version {flags & VERSION_MASK}"
        if flags & ~KNOWN_FLAGS:
            return f"unknown flags {flags & ~KNOWN_FLAGS:#x}"
        return None

    def _handle_tx(self, data: bytes) -> None:
        problem = self._tx_problem(data)
        if problem is not None:
            self.dropped_tx += 1
            log.warning("vvu: txq buffer dropped: %s", problem)
            return
        request, flags, size = _HDR.unpack_from(data)
        if self._frontend is None or self._out is None:
            self.dropped_tx += 1
            log.info("vvu: txq message %d dropped: no front-end", request)
            return
        if flags & REPLY:
            self._handle_reply(request, flags, size, data)
        elif self._backend_channel is None:
            self.dropped_tx += 1
            log.warning("vvu: back-end request %d before SET_BACKEND_REQ_FD dropped", request)
        else:
            self._queue_out(self._backend_channel, data, [])

    def _handle_reply(self, request: int, flags: int, size: int, data: bytes) -> None:
        """A reply from the driver to a front-end request: filtered, then to the front-end.
        A reply to no outstanding request is dropped (it would answer the next one)."""
        if self._awaiting[request] <= 0:
            self.dropped_tx += 1
            log.warning("vvu: txq reply %d dropped: the front-end asked for none", request)
            return
        self._awaiting[request] -= 1
        fds: list[int] = []
        if request == _F.GET_PROTOCOL_FEATURES and size == 8:
            (value,) = _U64.unpack_from(data, HEADER_SIZE)
            allowed = self.protocol_features_allowed
            if value & ~allowed:
                log.info("vvu: protocol features %#x filtered out", value & ~allowed)
            data = data[:HEADER_SIZE] + _U64.pack(value & allowed)
        elif request == _F.GET_FEATURES and size == 8:
            (value,) = _U64.unpack_from(data, HEADER_SIZE)
            data = data[:HEADER_SIZE] + _U64.pack(value & ~self.features_filtered)
        elif request == _F.GET_MAX_MEM_SLOTS and size == 8 and self._file is None:
            # Each region is a BAR4 area (one fd each); leave room for the log and inflight.
            (value,) = _U64.unpack_from(data, HEADER_SIZE)
            data = data[:HEADER_SIZE] + _U64.pack(min(value, max(self.max_areas - 2, 1)))
        elif request == _F.SET_LOG_BASE and Log.fits(size) and self._log_request:
            # The back-end echoes the log it got: the front-end gets back what it sent, not
            # the shmid 2 offset.
            data = _HDR.pack(request, flags, len(self._log_request)) + self._log_request
        elif request == _F.GET_INFLIGHT_FD and Inflight.fits(size):
            payload, fds = self._allocate_inflight(Inflight.unpack(data[HEADER_SIZE:]))
            data = _HDR.pack(request, flags, len(payload)) + payload
        self._send_frontend(data, fds)
        if request == _F.GET_VRING_BASE and size >= 4:
            index = int.from_bytes(data[HEADER_SIZE : HEADER_SIZE + 4], "little")
            if index in self._release_after_reply:
                self._release_after_reply.discard(index)
                self._release_ring(index)

    def _send_frontend(self, data: bytes, fds: list[int] | None = None) -> None:
        """Queue `data` (and `fds`, which the send loop closes) for the front-end."""
        if self._frontend is None or self._out is None:
            close_fds(fds or [])
            return
        self._queue_out(self._frontend, data, fds or [])

    def _queue_out(self, channel: Channel, data: bytes, fds: list[int]) -> None:
        """Queue a message for the front-end's socket or its back-end channel. A front-end that
        stops reading fills the socket and then this queue: its session ends."""
        assert self._out is not None
        try:
            self._out.put_nowait((channel, data, fds))
        except asyncio.QueueFull:
            close_fds(fds)
            self._disconnect_frontend(
                f"{OUT_BACKLOG} messages wait for the front-end, which reads none", notify=True
            )

    def _expect_reply(self, raw: RawMessage) -> None:
        """Note a front-end request the driver is to answer (its reply is let through once)."""
        if raw.request == _F.SET_PROTOCOL_FEATURES and len(raw.payload) == 8:
            (self._protocol_features,) = _U64.unpack(raw.payload)
        # Any NEED_REPLY may be acked (the front-end asked), whatever was negotiated; an
        # unknown request too (the back-end refuses it with a failure ack).
        need_reply = bool(raw.flags & NEED_REPLY)
        spec = spec_for(raw.request, "frontend")
        if spec is None:
            due = need_reply
        else:
            answer = spec.answer(
                need_reply=need_reply,
                protocol_features=self._protocol_features | (1 << _P.REPLY_ACK),
            )
            due = answer is not Answer.NOTHING
        if due:
            self._awaiting[raw.request] += 1

    # -- sessions ------------------------------------------------------------------------------

    def _update_accepting(self) -> None:
        if self._can_accept is None:
            return
        if self._vvu_status & BACKEND_UP and self._frontend is None:
            self._can_accept.set()
        else:
            self._can_accept.clear()

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.append(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("vvu: session task failed", exc_info=task.exception())

    async def _accept_loop(self) -> None:
        assert self._can_accept is not None
        while True:
            await self._can_accept.wait()
            channel = await self.listener.accept()
            # Accepting may have been allowed when accept() began and not any more (the driver
            # went away meanwhile): hold the front-end, as the listen backlog would, until a
            # driver is up again, instead of refusing it.
            try:
                await self._can_accept.wait()
            except BaseException:
                channel.close()
                raise
            self._start_session(channel)

    def _start_session(self, channel: Channel) -> None:
        self.sessions += 1
        self._frontend = channel
        self._out = asyncio.Queue(maxsize=OUT_BACKLOG)
        self._awaiting.clear()
        self._protocol_features = 0
        self._rx_space = asyncio.Event()
        self._rx_space.set()
        self._vvu_status |= FRONTEND_UP
        self._update_accepting()
        log.info("vvu: front-end %s connected (session %d)", channel.peer, self.sessions)
        self.config_changed()
        self._spawn(self._read_frontend(channel))
        self._spawn(self._send_loop(self._out))

    async def _read_frontend(self, channel: Channel) -> None:
        try:
            while True:
                assert self._rx_space is not None
                await self._rx_space.wait()
                raw = await channel.recv()
                if raw is None:
                    break
                try:
                    payload = self._bind(raw)
                except _Refused as err:
                    log.warning("vvu: front-end message %d refused: %s", raw.request, err)
                    if not raw.flags & NEED_REPLY:
                        self._disconnect_frontend(f"refused message: {err}", notify=True)
                        return
                    self._send_frontend(_HDR.pack(raw.request, VERSION | REPLY, 8) + _U64.pack(1))
                    if self._frontend is not channel:  # its queue was full: the session ended
                        return
                    continue
                self._expect_reply(raw)
                header = _HDR.pack(raw.request, raw.flags, len(payload))
                self._enqueue_rx(header + payload)
                if len(self._rx_pending) >= RX_BACKLOG:
                    self._rx_space.clear()
        except TransportError as err:
            log.warning("vvu: front-end connection broke: %s", err)
        if self._frontend is channel:
            self._disconnect_frontend("the front-end disconnected", notify=True)

    async def _read_backend(self, channel: Channel) -> None:
        try:
            while True:
                raw = await channel.recv()
                if raw is None:
                    break
                raw.close_fds()
                self._enqueue_rx(_HDR.pack(raw.request, raw.flags, len(raw.payload)) + raw.payload)
        except TransportError as err:
            log.warning("vvu: back-end channel broke: %s", err)
        if self._backend_channel is channel:
            self._backend_channel = None
            channel.close()

    async def _send_loop(self, out: asyncio.Queue[tuple[Channel, bytes, list[int]]]) -> None:
        while True:
            channel, data, fds = await out.get()
            try:
                await channel.send(data, fds)
            except (TransportError, OSError) as err:
                log.warning("vvu: send to %s failed: %s", channel.peer, err)
            finally:
                close_fds(fds)

    def _set_backend_channel(self, channel: Channel) -> None:
        if self._backend_channel is not None:
            self._backend_channel.close()
        self._backend_channel = channel
        self._spawn(self._read_backend(channel))

    def _drop_bindings(self) -> None:
        """Release what the session's messages bound: kicks, doorbells, BAR4 areas."""
        for index in list(self._kicks):
            self._release_kick(index)
        for index in list(self._doorbells):
            self._bind_doorbell(index, None)
        self._drop_areas()
        for shmid in list(self._fixed):
            self._drop_fixed(shmid)
        self._log_request = b""

    def _disconnect_frontend(self, why: str, *, notify: bool) -> None:
        """Tear a session down (sync): channels, tasks, bindings, pending messages, txq."""
        had = self._frontend is not None
        for task in list(self._tasks):
            task.cancel()
        self._tasks.clear()
        if self._frontend is not None:
            self._frontend.close()
            self._frontend = None
        if self._backend_channel is not None:
            self._backend_channel.close()
            self._backend_channel = None
        while self._out is not None and not self._out.empty():  # unsent: close their fds
            close_fds(self._out.get_nowait()[2])
        self._out = None
        self._rx_space = None
        self._rx_pending.clear()
        self._release_after_reply.clear()
        self._drop_bindings()
        # Complete and discard what the driver queued on txq.
        q = self.queues[TXQ]
        if q.queue is not None and not self.status & Status.DEVICE_NEEDS_RESET:
            chains = q.queue.pop(QUEUE_SIZE)
            for chain in chains:
                q.queue.push_used(chain.head, 0)
            if chains:
                self.signal_used(TXQ)
        if had:
            log.info("vvu: session ended: %s", why)
        if notify and had:
            self._vvu_status = 0
            self.config_changed()
        else:
            self._vvu_status &= ~FRONTEND_UP
        self._update_accepting()

    # -- lifecycle -----------------------------------------------------------------------------

    def client_connected(self, dma: DmaSpace) -> None:
        super().client_connected(dma)
        # vvu's extensions (per-area fds, DIRECT kicks) for a client that asked for them.
        caps = dma.client_capabilities
        self._extensions = bool(caps.sparse_mmap_fds)
        self.max_areas = min(MAX_AREAS, caps.msg_fds) if self._extensions else MAX_AREAS

    def client_disconnected(self) -> None:
        super().client_disconnected()
        self._extensions = False
        self.max_areas = MAX_AREAS

    def on_reset(self) -> None:
        self._disconnect_frontend("device reset", notify=False)
        self._vvu_status = 0
        self._aux_select = 0
        self._aux_vectors = [NO_VECTOR] * self.max_queues
        self._update_accepting()

    def start(self) -> None:
        super().start()
        loop = asyncio.get_running_loop()
        if self._forwarder is None:
            self._forwarder = EventForwarder()
            loop.add_reader(self._unmapped_kick.fileno(), self._on_unmapped_kick)
        if self._accept_task is None:
            self._can_accept = asyncio.Event()
            self._update_accepting()
            self._accept_task = asyncio.ensure_future(self._accept_loop())

    def stop(self) -> None:
        self._disconnect_frontend("the device stops", notify=False)
        if self._accept_task is not None:
            self._accept_task.cancel()
            self._accept_task = None
        if self._forwarder is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._unmapped_kick.fileno())
            self._forwarder.close()
            self._forwarder = None
        super().stop()

    def close(self) -> None:
        """Release everything (after the server stopped)."""
        self._disconnect_frontend("the device closes", notify=False)
        if self._forwarder is not None:
            self._forwarder.close()
            self._forwarder = None
        self._unmapped_kick.close()
        self.listener.close()
        if self._file is not None:
            with contextlib.suppress(Exception):
                self._shm.remove_region(0)
            os.close(self._file.fd)
            self._file = None
        if self._inflight is not None:
            os.close(self._inflight.fd)
            self._inflight = None
        super().close()
