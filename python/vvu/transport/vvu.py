"""vhost-user over a virtio-vhost-user (VVU) device: the driver as a `Transport`.

`VvuDriver` drives the VVU device (docs/vvu-device.md) with `VirtioPciDriver` over `PciAccess`
only: rxq (queue 0) brings front-end messages, txq (queue 1) takes back-end messages, the
device's config space carries BACKEND_UP / FRONTEND_UP. `VvuChannel` turns rxq messages into
`RawMessage`s with *synthesised* fds, so `BackendEngine` handles them exactly as over AF_UNIX:

- SET_MEM_TABLE / ADD_MEM_REG: each region's fd is a duplicate of the BAR4 area fd that covers
  the (device-rewritten) `mmap_offset`, and `mmap_offset` becomes an offset in that fd;
- SET_VRING_KICK i: with a DIRECT kick (the vvu extension, the default: `kick_mode="direct"`),
  a duplicate of BAR2's kick-eventfd ioeventfd i, which is the front-end's own kick eventfd, so
  the device process relays nothing; otherwise a duplicate of the MSI-X eventfd of kick i's
  vector (NOFD when the device refused both, so the engine polls);
- SET_LOG_BASE / SET_INFLIGHT_FD: a duplicate of the shmid 2 / 3 area's fd (the front-end's
  log / inflight region), `mmap_offset` an offset in it; the GET_INFLIGHT_FD reply leaves
  without the engine's fd (the device allocates the region the front-end keeps, and sends a
  SET_INFLIGHT_FD for it next);
- SET_VRING_CALL / ERR i, SET_LOG_FD: a duplicate of the BAR2 doorbell's ioeventfd, or an
  eventfd the transport turns into BAR2 writes;
- SET_BACKEND_REQ_FD: one end of a socketpair; the transport relays requests read from the other
  end to txq, and rxq messages with the REPLY flag back into it.

`VvuListener` waits for FRONTEND_UP and hands out one `VvuChannel` per front-end session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from vvu._core import EventFd, memfd
from vvu.pci.virtio_device import NO_VECTOR, queue_ring_sizes
from vvu.pci.virtio_driver import VirtioCap, VirtioPciDriver, VirtioPciError
from vvu.protocol.codec import Header
from vvu.protocol.constants import REPLY, VRING_IDX_MASK, VRING_NOFD, FrontendRequest
from vvu.protocol.payloads import Inflight, Log
from vvu.transport.base import (
    HEADER_SIZE,
    MAX_PAYLOAD,
    Channel,
    Listener,
    RawMessage,
    TransportError,
    close_fds,
)
from vvu.transport.unix import UnixChannel
from vvu.vfio_user.access import PciAccess

__all__ = [
    "BACKEND_UP",
    "DIRECT_KICK",
    "FRONTEND_UP",
    "KICK_FDS_OFFSET",
    "RXQ",
    "TXQ",
    "VvuChannel",
    "VvuDriver",
    "VvuListener",
]

log = logging.getLogger(__name__)

_F = FrontendRequest

RXQ: Final = 0
TXQ: Final = 1
BACKEND_UP: Final = 0x1
FRONTEND_UP: Final = 0x2

CFG_DEVICE_AUX_NOTIFY: Final = 6
CFG_DRIVER_AUX_NOTIFY: Final = 7
CFG_SHARED_MEMORY: Final = 8
SHMID_MEMORY: Final = 1
SHMID_LOG: Final = 2
SHMID_INFLIGHT: Final = 3

CONFIG_VECTOR: Final = 0
RXQ_VECTOR: Final = 1
TXQ_VECTOR: Final = 2
FIRST_KICK_VECTOR: Final = 3
#: vvu extension (docs/vvu-device.md, "Direct kicks"): the msix_vector value asking for direct
#: kicks, and the BAR2 (driver aux notification BAR) range whose ioeventfd i is kick eventfd i.
DIRECT_KICK: Final = 0xFFFE
KICK_FDS_OFFSET: Final = 0x6000
KICK_FDS_STRIDE: Final = 4

#: What the driver writes to ring a doorbell (the device takes any 16/32-bit write).
DOORBELL_SIZE: Final = 4
DOORBELL_VALUE: Final = 1

KickMode = Literal["direct", "msix"]
KICK_MODES: Final = ("direct", "msix")

BUFFER_SIZE: Final = HEADER_SIZE + MAX_PAYLOAD  # one whole message per buffer
BUFFER_STRIDE: Final = (BUFFER_SIZE + 63) & ~63
REGION: Final = struct.Struct("<QQQQ")  # guest_phys_addr, memory_size, userspace_addr, mmap_off


def dma_area_size(rxq_size: int, txq_size: int) -> int:
    """DMA bytes the driver uses at most: both rings (each part page aligned) and one buffer
    per descriptor (rxq: all posted; txq: allocated on demand, reused once completed). Kept
    tight: behind a vIOMMU each page of it may be one DMA mapping the VMM sends the device."""
    page = 4096
    rings = sum(
        -(-part // page) * page
        for qsize in (rxq_size, txq_size)
        for part in queue_ring_sizes(qsize, event_idx=True)
    )
    return -(-(rings + (rxq_size + txq_size) * BUFFER_STRIDE) // page) * page


@dataclass(frozen=True, slots=True)
class ShmRegion:
    """A shared-memory capability: shmid `shmid` is BAR `bar` at `offset`, `length` bytes."""

    shmid: int
    bar: int
    offset: int
    length: int


@dataclass(slots=True)
class _Area:
    offset: int
    size: int
    fd: int
    fd_offset: int


class VvuDriver:
    """The VVU device's driver: init, rx/tx buffers, status bits, kicks and doorbells."""

    def __init__(self, virtio: VirtioPciDriver, *, kick_mode: KickMode = "direct") -> None:
        if kick_mode not in KICK_MODES:
            raise ValueError(f"kick_mode is one of {KICK_MODES}, not {kick_mode!r}")
        #: "direct": ask for DIRECT kicks first (MSI-X vector when refused); "msix": vectors only.
        self.kick_mode: KickMode = kick_mode
        self.virtio = virtio
        self.pci: PciAccess = virtio.pci
        dev_aux = self._cap(CFG_DEVICE_AUX_NOTIFY)
        drv_aux = self._cap(CFG_DRIVER_AUX_NOTIFY)
        if len(dev_aux.extra) < 4:
            raise VirtioPciError("the device aux notification capability has no multiplier")
        self.doorbell_cap = dev_aux
        self.doorbell_multiplier = int(struct.unpack_from("<I", dev_aux.extra)[0])
        self.kick_cfg = drv_aux
        self.shm: dict[int, ShmRegion] = {}
        for cap in virtio.caps:
            if cap.cfg_type == CFG_SHARED_MEMORY and len(cap.extra) >= 8:
                hi_off, hi_len = struct.unpack_from("<II", cap.extra)
                self.shm[cap.cap_id] = ShmRegion(
                    cap.cap_id, cap.bar, cap.offset | hi_off << 32, cap.length | hi_len << 32
                )
        self.max_queues = 0
        self.uuid = b""
        #: per kick i: its MSI-X vector, DIRECT_KICK, or NO_VECTOR (polling)
        self.kick_vectors: list[int] = []
        self.rx_event = asyncio.Event()
        self.tx_event = asyncio.Event()
        self.config_event = asyncio.Event()
        self._rx_buffers: dict[int, int] = {}  # head -> iova
        self._tx_free: list[int] = []
        self._tx_busy: dict[int, int] = {}  # head -> iova
        self._tx_lock = asyncio.Lock()
        self._watched: list[int] = []
        #: How often the driver cleared BACKEND_UP: a session opened before that is over.
        self.backend_downs = 0

    def _cap(self, cfg_type: int) -> VirtioCap:
        for cap in self.virtio.caps:
            if cap.cfg_type == cfg_type:
                return cap
        raise VirtioPciError(f"not a VVU device: no virtio capability of type {cfg_type}")

    @classmethod
    async def open(cls, pci: PciAccess, *, kick_mode: KickMode = "direct") -> VvuDriver:
        return cls(await VirtioPciDriver.open(pci), kick_mode=kick_mode)

    # -- init ----------------------------------------------------------------------------------

    async def init(self) -> None:
        """VERSION_1, config, rxq/txq, MSI-X (config, rxq, txq, one per kick), kick vectors,
        rx buffers posted, BACKEND_UP."""
        v = self.virtio
        self._unwatch()
        await v.negotiate(0)
        if await v.num_queues() < 2:
            await v.set_status(0x80)
            raise VirtioPciError("the VVU device has fewer than 2 queues")
        sizes = [await v.queue_max_size(q) for q in (RXQ, TXQ)]
        await v.setup_dma(size=dma_area_size(*sizes))
        cfg = await v.read_config(0, 24)
        self.max_queues = int(struct.unpack_from("<I", cfg, 4)[0])
        self.uuid = bytes(cfg[8:24])
        if not v.vectors:
            await v.setup_interrupts(FIRST_KICK_VECTOR + self.max_queues)
        if len(v.vectors) < FIRST_KICK_VECTOR:
            raise VirtioPciError("the VVU device has fewer than 3 MSI-X vectors")
        self._watch()
        await v.set_config_vector(CONFIG_VECTOR)
        await v.setup_queue(RXQ)
        await v.setup_queue(TXQ)
        await v.driver_ok()
        await self._map_kicks()
        self._tx_free = []
        self._tx_busy = {}
        self._rx_buffers = {}
        rxq = v.queues[RXQ]
        for _ in range(rxq.size):
            self._post_rx(v.alloc(BUFFER_STRIDE))
        await v.kick(RXQ)
        await self.set_backend_up(True)

    def _watch(self) -> None:
        """Own readers for config/rxq/txq vectors; none on kick vectors (the engine reads
        those through its duplicates)."""
        loop = asyncio.get_running_loop()
        for vector, efd in enumerate(self.virtio.vectors):
            loop.remove_reader(efd.fileno())
            if vector < FIRST_KICK_VECTOR:
                loop.add_reader(efd.fileno(), self._on_vector, vector)
                self._watched.append(efd.fileno())

    def _unwatch(self) -> None:
        with contextlib.suppress(RuntimeError):
            loop = asyncio.get_running_loop()
            for fd in self._watched:
                loop.remove_reader(fd)
        self._watched = []

    def _on_vector(self, vector: int) -> None:
        if not self.virtio.vectors[vector].consume():
            return
        if vector == CONFIG_VECTOR:
            self.config_event.set()
            self.rx_event.set()  # a waiting recv() re-reads the status
        elif vector == RXQ_VECTOR:
            self.rx_event.set()
        else:
            self.tx_event.set()

    async def _set_kick_vector(self, index: int, vector: int) -> int:
        """Write notification `index`'s msix_vector; what the device kept (read back)."""
        bar, base = self.kick_cfg.bar, self.kick_cfg.offset
        await self.pci.bar_write(bar, base, struct.pack("<H", index))
        await self.pci.bar_write(bar, base + 2, struct.pack("<H", vector))
        await self.pci.bar_write(bar, base, struct.pack("<H", index))
        return int.from_bytes(await self.pci.bar_read(bar, base + 2, 2), "little")

    async def _map_kicks(self) -> None:
        vectors = self.virtio.vectors
        self.kick_vectors = []
        refused = 0
        for i in range(self.max_queues):
            if self.kick_mode == "direct":
                if await self._set_kick_vector(i, DIRECT_KICK) == DIRECT_KICK:
                    self.kick_vectors.append(DIRECT_KICK)
                    continue
                refused += 1
            wanted = FIRST_KICK_VECTOR + i
            got = NO_VECTOR
            if wanted < len(vectors):
                got = await self._set_kick_vector(i, wanted)
                if got != wanted:
                    log.warning("vvu: kick %d has no MSI-X vector; that ring is polled", i)
                    got = NO_VECTOR
            self.kick_vectors.append(got)
        if refused:
            log.info(
                "vvu: the device refused direct kicks for %d of %d rings", refused, self.max_queues
            )

    # -- status --------------------------------------------------------------------------------

    async def status(self) -> int:
        return int(struct.unpack("<I", await self.virtio.read_config(0, 4))[0])

    async def set_backend_up(self, up: bool) -> None:
        if not up:
            self.backend_downs += 1
            self.config_event.set()
            self.rx_event.set()  # a waiting recv() ends its session
        await self.virtio.write_config(0, struct.pack("<I", BACKEND_UP if up else 0))

    # -- rxq -----------------------------------------------------------------------------------

    def _post_rx(self, iova: int) -> None:
        head = self.virtio.queues[RXQ].add([], [(iova, BUFFER_SIZE)])
        self._rx_buffers[head] = iova

    def take_rx(self) -> list[bytes]:
        """Every message the device put in rxq since the last call; buffers are re-posted."""
        rxq = self.virtio.queues[RXQ]
        used = [(self._rx_buffers.pop(head), length) for head, length in rxq.ring.reap_all()]
        out = []
        for iova, length in used:  # every head is freed before any is reused
            out.append(self.virtio.memory.read(iova, min(length, BUFFER_SIZE)))
            self._post_rx(iova)
        return out

    async def repost_rx(self) -> None:
        await self.virtio.kick(RXQ)

    def rx_rearm(self) -> bool:
        """Re-enable rxq interrupts; True when entries arrived meanwhile."""
        return bool(self.virtio.queues[RXQ].ring.enable_call_notifications())

    # -- txq -----------------------------------------------------------------------------------

    def reclaim_tx(self) -> None:
        for head, _ in self.virtio.queues[TXQ].ring.reap_all():
            self._tx_free.append(self._tx_busy.pop(head))

    async def send(self, data: bytes) -> None:
        """Put one whole message in a txq buffer, waiting for a free one when the ring is full."""
        if len(data) > BUFFER_SIZE:
            raise TransportError(f"a {len(data)}-byte message does not fit a txq buffer")
        v = self.virtio
        txq = v.queues[TXQ]
        async with self._tx_lock:
            while True:
                self.tx_event.clear()
                self.reclaim_tx()
                if len(self._tx_busy) < txq.size:
                    break
                if txq.ring.enable_call_notifications():
                    continue
                await self.tx_event.wait()
            iova = self._tx_free.pop() if self._tx_free else v.alloc(BUFFER_STRIDE)
            v.memory.write(iova, data)
            head = txq.add([(iova, len(data))])
            self._tx_busy[head] = iova
            await v.kick(TXQ)

    @property
    def tx_in_flight(self) -> int:
        return len(self._tx_busy)

    # -- resources -----------------------------------------------------------------------------

    async def memory_areas(self, shmid: int = SHMID_MEMORY) -> list[_Area]:
        """BAR4's areas in shmid `shmid` (1: front-end memory, 2: dirty log) with their fds (the
        caller closes them), offsets in the shmid."""
        shm = self.shm.get(shmid)
        if shm is None:
            raise TransportError(f"the VVU device has no shared memory {shmid}")
        areas = await self.pci.bar_areas(shm.bar)
        out = []
        for a in areas:
            # An area may cover more than the shmid (Linux VFIO offers a whole BAR as one area):
            # keep the part inside it.
            start = max(a.offset, shm.offset)
            end = min(a.offset + a.size, shm.offset + shm.length)
            if start < end:
                fd_offset = a.fd_offset + (start - a.offset)
                out.append(_Area(start - shm.offset, end - start, a.fd, fd_offset))
            else:
                a.close()
        return out

    async def doorbell_fd(self, index: int) -> int | None:
        """A fresh duplicate of doorbell `index`'s eventfd: the device's ioeventfd there (over
        vfio-user, the front-end's own call eventfd), else one the access makes that writes the
        doorbell when signalled (a Linux VFIO ioeventfd); None when there is neither."""
        bar = self.doorbell_cap.bar
        offset = self.doorbell_cap.offset + self.doorbell_multiplier * index
        ioes = await self.pci.bar_ioeventfds(bar)
        found: int | None = None
        for ioe in ioes:
            if found is None and ioe.offset == offset and ioe.datamatch is None:
                found = os.dup(ioe.eventfd.fileno())
            ioe.eventfd.close()
        if found is None:
            writer = self.pci.doorbell(bar, offset, DOORBELL_SIZE, DOORBELL_VALUE)
            if writer is not None:
                found = os.dup(writer.fileno())
        return found

    async def ring_doorbell(self, index: int) -> None:
        offset = self.doorbell_cap.offset + self.doorbell_multiplier * index
        data = DOORBELL_VALUE.to_bytes(DOORBELL_SIZE, "little")
        await self.pci.bar_write(self.doorbell_cap.bar, offset, data, posted=True)

    async def kick_fd(self, index: int) -> int | None:
        """For SET_VRING_KICK `index` (just received): a duplicate of the front-end's kick
        eventfd (BAR2's kick-eventfd ioeventfd) when the kick is DIRECT, else of its MSI-X
        eventfd; None: no vector (or no ioeventfd), poll."""
        if not 0 <= index < len(self.kick_vectors) or self.kick_vectors[index] == NO_VECTOR:
            return None
        if self.kick_vectors[index] != DIRECT_KICK:
            return os.dup(self.virtio.vectors[self.kick_vectors[index]].fileno())
        offset = KICK_FDS_OFFSET + KICK_FDS_STRIDE * index
        found: int | None = None
        for ioe in await self.pci.bar_ioeventfds(self.kick_cfg.bar):
            if found is None and ioe.offset == offset:
                found = os.dup(ioe.eventfd.fileno())
            ioe.eventfd.close()
        if found is None:
            log.warning(
                "vvu: direct kick %d has no kick eventfd in BAR2; that ring is polled", index
            )
        return found

    # -- sessions ------------------------------------------------------------------------------

    async def resync(self) -> None:
        """Between sessions: discard rxq contents, reclaim txq, re-post, BACKEND_UP again."""
        self.take_rx()
        await self.repost_rx()
        self.reclaim_tx()
        self.config_event.clear()
        await self.set_backend_up(True)

    async def close(self) -> None:
        self._unwatch()
        with contextlib.suppress(Exception):
            await self.set_backend_up(False)
        await self.virtio.close()


class VvuChannel(Channel):
    """One front-end session over the VVU device."""

    def __init__(self, driver: VvuDriver, peer: str = "vvu front-end") -> None:
        self.driver = driver
        self._peer = peer
        self._ready: list[bytes] = []
        self._closed = False
        self.disconnected = False
        self._fallback: dict[int, EventFd] = {}  # doorbell index -> our eventfd
        self._relay: UnixChannel | None = None
        self._relay_task: asyncio.Task[None] | None = None
        self._backend_downs = driver.backend_downs

    @property
    def peer(self) -> str:
        return self._peer

    @property
    def closed(self) -> bool:
        return self._closed

    async def recv(self) -> RawMessage | None:
        drv = self.driver
        while True:
            if self._closed:
                raise TransportError(f"{self.peer}: channel closed")
            if drv.backend_downs != self._backend_downs:
                self.disconnected = True  # the driver let this session's front-end go
            elif drv.config_event.is_set():
                drv.config_event.clear()
                if not await drv.status() & FRONTEND_UP:
                    self.disconnected = True
            if self.disconnected:
                self._end_session()
                return None
            while self._ready:
                data = self._ready.pop(0)
                msg = await self._deliver(data)
                if msg is not None:
                    return msg
            drv.rx_event.clear()
            got = drv.take_rx()
            if got:
                await drv.repost_rx()
                self._ready.extend(got)
                continue
            if drv.rx_rearm():
                continue
            await drv.rx_event.wait()

    async def _deliver(self, data: bytes) -> RawMessage | None:
        if len(data) < HEADER_SIZE:
            raise TransportError(f"{self.peer}: a {len(data)}-byte rxq message has no header")
        hdr = Header.unpack(data[:HEADER_SIZE])
        if hdr.size > MAX_PAYLOAD or HEADER_SIZE + hdr.size != len(data):
            raise TransportError(
                f"{self.peer}: rxq buffer of {len(data)} bytes for a {hdr.size}-byte payload"
            )
        payload = data[HEADER_SIZE:]
        if hdr.flags & REPLY:  # a front-end reply to a back-end request
            if self._relay is None:
                log.warning(
                    "%s: reply %d without a back-end channel dropped", self.peer, hdr.request
                )
                return None
            with contextlib.suppress(TransportError, OSError):
                await self._relay.send(data)
            return None
        payload, fds = await self._synthesise(hdr.request, payload)
        return RawMessage(hdr.request, hdr.flags, payload, fds)

    async def _synthesise(self, request: int, payload: bytes) -> tuple[bytes, list[int]]:
        """The payload (NOFD set when no fd can be made) and the fds AF_UNIX would carry."""
        if request == _F.SET_MEM_TABLE and len(payload) >= 8:
            n = int(struct.unpack_from("<I", payload)[0])
            return await self._regions(payload, 8, n)
        if request == _F.ADD_MEM_REG and len(payload) >= 8:
            return await self._regions(payload, 8, 1)
        if request == _F.SET_LOG_BASE and Log.fits(len(payload)):
            log_base = Log.unpack(payload)
            offset, fd = await self._shm_fd(SHMID_LOG, log_base.mmap_offset, log_base.mmap_size)
            return Log(log_base.mmap_size, offset).pack(), [fd]
        if request == _F.SET_INFLIGHT_FD and Inflight.fits(len(payload)):
            inflight = Inflight.unpack(payload)
            offset, fd = await self._shm_fd(
                SHMID_INFLIGHT, inflight.mmap_offset, inflight.mmap_size
            )
            rewritten = Inflight(
                inflight.mmap_size, offset, inflight.num_queues, inflight.queue_size
            )
            return rewritten.pack(), [fd]
        if request in (_F.SET_VRING_KICK, _F.SET_VRING_CALL, _F.SET_VRING_ERR):
            return await self._vring_fd(request, payload)
        fds: list[int] = []
        if request == _F.SET_LOG_FD:
            fds = [await self._doorbell(2 * self.driver.max_queues)]
        elif request == _F.SET_BACKEND_REQ_FD:
            fds = [self._open_relay()]
        # REM_MEM_REG: the fd is optional (the region is known by its addresses); others: none.
        return payload, fds

    async def _vring_fd(self, request: int, payload: bytes) -> tuple[bytes, list[int]]:
        drv = self.driver
        if len(payload) != 8:
            return payload, []  # malformed: the engine's decoder says so
        value = int(struct.unpack("<Q", payload)[0])
        if value & VRING_NOFD:
            return payload, []
        index = value & VRING_IDX_MASK
        fd: int | None = None
        if request == _F.SET_VRING_KICK:
            fd = await drv.kick_fd(index)
        elif index < drv.max_queues:
            base = 0 if request == _F.SET_VRING_CALL else drv.max_queues
            fd = await self._doorbell(base + index)
        if fd is None:  # no vector / out of range: the engine polls (or never signals)
            return struct.pack("<Q", value | VRING_NOFD), []
        return payload, [fd]

    async def _regions(self, payload: bytes, start: int, count: int) -> tuple[bytes, list[int]]:
        if count < 0 or start + REGION.size * count > len(payload):
            return payload, []  # malformed: the engine's decoder says so
        areas = await self.driver.memory_areas()
        out = bytearray(payload)
        fds: list[int] = []
        try:
            for r in range(count):
                at = start + REGION.size * r
                gpa, size, uva, offset = REGION.unpack_from(payload, at)
                area = next(
                    (a for a in areas if a.offset <= offset and offset + size <= a.offset + a.size),
                    None,
                )
                if area is None:
                    # The device could not publish it (it says why in its log). Hand the engine
                    # an empty file for it, so the engine refuses the table the way it refuses
                    # any unmappable region: a failure ack, or a drop without NEED_REPLY.
                    log.warning(
                        "%s: region at shm offset %#x+%#x has no BAR area", self.peer, offset, size
                    )
                    fds.append(memfd(0, "vvu-unpublished-region"))
                    continue
                fds.append(os.dup(area.fd))
                REGION.pack_into(out, at, gpa, size, uva, area.fd_offset + (offset - area.offset))
        except BaseException:
            close_fds(fds)
            raise
        finally:
            close_fds([a.fd for a in areas])
        return bytes(out), fds

    async def _shm_fd(self, shmid: int, offset: int, size: int) -> tuple[int, int]:
        """For shmid `shmid`'s `offset`+`size`: the offset in the fd, and a duplicate of the fd
        (an empty memfd when the device published no such area, so the engine refuses it)."""
        areas = await self.driver.memory_areas(shmid)
        try:
            area = next(
                (a for a in areas if a.offset <= offset and offset + size <= a.offset + a.size),
                None,
            )
            if area is None:  # not published (the device says why)
                log.warning("%s: shmid %d %#x+%#x has no BAR area", self.peer, shmid, offset, size)
                return offset, memfd(0, "vvu-unpublished")
            return area.fd_offset + (offset - area.offset), os.dup(area.fd)
        finally:
            close_fds([a.fd for a in areas])

    async def _doorbell(self, index: int) -> int:
        fd = await self.driver.doorbell_fd(index)
        old = self._fallback.pop(index, None)
        if old is not None:
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().remove_reader(old.fileno())
            old.close()
        if fd is not None:
            return fd
        efd = EventFd()
        self._fallback[index] = efd
        asyncio.get_running_loop().add_reader(efd.fileno(), self._on_fallback, index)
        return os.dup(efd.fileno())

    def _on_fallback(self, index: int) -> None:
        efd = self._fallback.get(index)
        if efd is None or not efd.consume():
            return
        task = asyncio.ensure_future(self.driver.ring_doorbell(index))
        task.add_done_callback(_log_failure)

    def _open_relay(self) -> int:
        self._close_relay()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._relay = UnixChannel(ours, peer=f"{self.peer} (back-end relay)")
        self._relay_task = asyncio.ensure_future(self._pump_relay(self._relay))
        return theirs.detach()

    async def _pump_relay(self, relay: UnixChannel) -> None:
        """Back-end requests the engine writes into the socketpair → txq."""
        try:
            while True:
                msg = await relay.recv()
                if msg is None:
                    return
                msg.close_fds()  # the device cannot pass fds; the features never allow them
                header = Header(msg.request, msg.flags, len(msg.payload)).pack()
                await self.driver.send(header + msg.payload)
        except (TransportError, OSError) as err:
            log.info("%s: back-end relay ended: %s", self.peer, err)

    def _close_relay(self) -> None:
        if self._relay_task is not None:
            self._relay_task.cancel()
            self._relay_task = None
        if self._relay is not None:
            self._relay.close()
            self._relay = None

    async def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        if fds and not _is_inflight_reply(data):  # that one the device allocates itself
            raise TransportError("a VVU back-end cannot send fds")
        if self._closed or self.disconnected:
            raise TransportError(f"{self.peer}: channel closed")
        await self.driver.send(bytes(data))

    def open_backend_channel(self, fd: int | None) -> Channel:
        if fd is None:
            raise TransportError("SET_BACKEND_REQ_FD needs a socket fd")
        try:
            sock = socket.socket(fileno=fd)
        except OSError as err:
            os.close(fd)
            raise TransportError(f"back-end channel fd {fd} is not a socket: {err}") from err
        return UnixChannel(sock, peer=f"{self.peer} (back-end channel)")

    def _end_session(self) -> None:
        self._close_relay()
        loop = None
        with contextlib.suppress(RuntimeError):
            loop = asyncio.get_running_loop()
        for efd in self._fallback.values():
            if loop is not None:
                loop.remove_reader(efd.fileno())
            efd.close()
        self._fallback = {}

    def close(self) -> None:
        self._closed = True
        self._end_session()


def _is_inflight_reply(data: bytes) -> bool:
    if len(data) < HEADER_SIZE:
        return False
    header = Header.unpack(data[:HEADER_SIZE])
    return header.request == _F.GET_INFLIGHT_FD and bool(header.flags & REPLY)


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("vvu: doorbell write failed: %s", task.exception())


class VvuListener(Listener):
    """One VVU device; accept() returns a channel per front-end session."""

    def __init__(self, pci: PciAccess, *, kick_mode: KickMode = "direct") -> None:
        if kick_mode not in KICK_MODES:
            raise ValueError(f"kick_mode is one of {KICK_MODES}, not {kick_mode!r}")
        self.pci = pci
        self.kick_mode: KickMode = kick_mode
        self.driver: VvuDriver | None = None
        self._channel: VvuChannel | None = None
        self._count = 0
        self._closing: asyncio.Task[None] | None = None

    async def _ensure_driver(self) -> VvuDriver:
        if self.driver is None:
            driver = await VvuDriver.open(self.pci, kick_mode=self.kick_mode)
            await driver.init()
            self.driver = driver
        return self.driver

    async def accept(self) -> VvuChannel:
        drv = await self._ensure_driver()
        old, self._channel = self._channel, None
        if old is not None:
            old.close()
            if not old.disconnected and await drv.status() & FRONTEND_UP:
                # The engine dropped a front-end that is still there: make the device let it go.
                await drv.set_backend_up(False)
                while await drv.status() & FRONTEND_UP:
                    drv.config_event.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(drv.config_event.wait(), 1.0)
            if not await drv.virtio.status() & 0x04:  # DRIVER_OK gone: the device reset
                await drv.init()
            else:
                await drv.resync()
        while True:
            drv.config_event.clear()
            status = await drv.status()
            if status & FRONTEND_UP:
                break
            if not status & BACKEND_UP:
                # A front-end came and went before we took it (it hung up at once, or sent
                # something the device refused): the device ended that session and cleared
                # BACKEND_UP with it. Drop whatever it left on rxq and set BACKEND_UP again,
                # or no front-end is ever accepted.
                await drv.resync()
                continue
            await drv.config_event.wait()
        self._count += 1
        channel = VvuChannel(drv, peer=f"vvu front-end #{self._count}")
        self._channel = channel
        return channel

    async def aclose(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.driver is not None:
            await self.driver.close()
            self.driver = None
        await self.pci.close()

    def close(self) -> None:
        """Clear BACKEND_UP and close the vfio-user connection (in the background when called
        from inside a running loop; prefer `await aclose()`)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            asyncio.run(self.aclose())
            return
        self._closing = loop.create_task(self.aclose())
