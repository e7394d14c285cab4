"""A vhost-user front-end you can script: the part QEMU plays, for any back-end.

It owns memfd guest memory, negotiates features, lays out split rings with the driver-side queue
from `_core`, kicks, and waits for calls on the event loop. The device drivers in this package
(`BlkDriver`, `RngDriver`) sit on top of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from vvu._core import DirtyLog, EventFd, GuestMemory, PackedQueueDriver, SplitQueueDriver, memfd
from vvu.aio import read_to_eof, write_all
from vvu.errors import ProtocolError, VvuError
from vvu.protocol import (
    DEVICE_STATE_ERROR_MASK,
    DEVICE_STATE_NOFD,
    EMPTY,
    U64,
    VRING_F_LOG,
    BackendRequest,
    Config,
    DeviceStateTransfer,
    FrontendRequest,
    Inflight,
    Iotlb,
    IotlbPerm,
    IotlbType,
    Log,
    MemoryRegion,
    MemoryTable,
    Payload,
    ProtocolFeature,
    TransferDirection,
    TransferPhase,
    VhostFeature,
    VirtioFeature,
    VringAddr,
    VringState,
    decode_message,
    describe,
    encode_ack,
    encode_message,
)
from vvu.protocol.codec import Header, Message
from vvu.protocol.table import Answer, spec_for
from vvu.transport.base import Channel, TransportError, close_fds
from vvu.transport.unix import UnixChannel, connect_unix

log = logging.getLogger(__name__)

__all__ = ["Frontend", "FrontendError", "FrontendQueue", "Iommu"]

_F = FrontendRequest
MiB = 1 << 20
#: Where guest memory appears in the (pretend) front-end address space: distinct from guest
#: physical addresses so that a back-end mixing up the two fails loudly.
UVA_BASE = 0x7F00_0000_0000
#: The protocol features the front-end uses when the back-end offers them.
WANTED_PROTOCOL_FEATURES = (
    ProtocolFeature.MQ.mask
    | ProtocolFeature.REPLY_ACK.mask
    | ProtocolFeature.CONFIG.mask
    | ProtocolFeature.CONFIGURE_MEM_SLOTS.mask
    | ProtocolFeature.STATUS.mask
    | ProtocolFeature.LOG_SHMFD.mask
    | ProtocolFeature.DEVICE_STATE.mask
    | ProtocolFeature.INFLIGHT_SHMFD.mask
)
#: Bytes of guest memory per dirty-log bit.
LOG_PAGE = 4096


#: The protocol features an IOMMU needs (QEMU refuses ACCESS_PLATFORM without them).
IOMMU_PROTOCOL_FEATURES = ProtocolFeature.BACKEND_REQ.mask | ProtocolFeature.REPLY_ACK.mask

#: Offered bits this front-end must not ack at negotiation: it uses plain guest-physical
#: addresses and polls nothing. LOG_ALL is acked only while a dirty log is on
#: (`start_dirty_log`), as QEMU does during a migration; RING_PACKED only when the front-end was
#: opened with `packed=True`; ACCESS_PLATFORM only with an `iommu`.
UNSUPPORTED_FEATURES = (
    VhostFeature.LOG_ALL.mask
    | VirtioFeature.ACCESS_PLATFORM.mask
    | VirtioFeature.IN_ORDER.mask
    | VirtioFeature.NOTIFICATION_DATA.mask
    | VirtioFeature.NOTIF_CONFIG_DATA.mask
    | VirtioFeature.RING_RESET.mask
)


class FrontendError(VvuError):
    """The back-end refused a request or answered something the front-end cannot use."""


def _open_memory_file(path: str, size: int) -> int:
    """Open (or create) `path` read-write, grown to at least `size` bytes; the fd."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as err:
        raise FrontendError(f"guest memory file {path}: {err.strerror}") from err
    try:
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
    except OSError as err:
        os.close(fd)
        raise FrontendError(f"guest memory file {path}: {err.strerror}") from err
    return fd


PAGE = 4096
#: Where the shuffled IOMMU hands out IOVAs (downwards): far from every guest-physical address.
IOVA_TOP = 0x4000_0000_0000


@dataclass(frozen=True)
class DmaMapping:
    """One buffer the IOMMU maps: `size` bytes at `iova` are guest memory at `gpa`."""

    iova: int
    size: int
    gpa: int
    perm: IotlbPerm

    def __contains__(self, iova: int) -> bool:
        return self.iova <= iova < self.iova + self.size


class Iommu:
    """The front-end playing the IOMMU of a back-end with VIRTIO_F_ACCESS_PLATFORM.

    Each DMA buffer gets an IOVA and a permission: "identity" uses its guest-physical address,
    "shuffled" hands out IOVAs from the top down, so that a back-end using guest addresses (or
    one buffer's translation for its neighbour) fails. The back-end learns translations only by
    asking (BACKEND_IOTLB_MSG MISS); `misses` records what it asked for.
    """

    def __init__(self, mode: Literal["identity", "shuffled"] = "shuffled") -> None:
        self.mode = mode
        self.mappings: list[DmaMapping] = []
        self.misses: list[tuple[int, int]] = []  # (iova, perm) as asked
        self._next_iova = IOVA_TOP

    def map(self, gpa: int, size: int, perm: IotlbPerm) -> int:
        """Map `size` bytes at `gpa`; returns the IOVA the device must use."""
        if self.mode == "identity":
            iova = gpa
        else:
            # Same offset within a page as the buffer: alignment the driver asked for is kept.
            span = (gpa % PAGE + size + PAGE - 1) // PAGE * PAGE
            self._next_iova -= span + PAGE  # and a hole between buffers
            iova = self._next_iova + gpa % PAGE
        self.mappings.append(DmaMapping(iova, size, gpa, perm))
        return iova

    def lookup(self, iova: int) -> DmaMapping | None:
        return next((m for m in self.mappings if iova in m), None)


class Allocator:
    """Hands out aligned pieces of guest memory, never returning them (rings and buffers)."""

    def __init__(self, start: int, end: int) -> None:
        self._next = start
        self._end = end

    def alloc(self, size: int, align: int = 64) -> int:
        gpa = (self._next + align - 1) & ~(align - 1)
        if gpa + size > self._end:
            raise FrontendError(
                f"guest memory exhausted: {size} bytes wanted, {self._end - gpa} left"
            )
        self._next = gpa + size
        return gpa


@dataclass
class FrontendQueue:
    """One running ring as the front-end drives it."""

    index: int
    size: int
    driver: SplitQueueDriver | PackedQueueDriver
    kick: EventFd
    call: EventFd
    # Guest-physical addresses of the ring parts (handed over again after a reconnect).
    desc: int = 0
    avail: int = 0
    used: int = 0
    _waiters: dict[int, asyncio.Future[int]] = field(default_factory=dict)
    _reaper_registered: bool = False

    def submit(
        self, readable: Sequence[tuple[int, int]], writable: Sequence[tuple[int, int]]
    ) -> int:
        """Add one chain (not yet published); returns its head."""
        return self.driver.add_chain(list(readable), list(writable))

    def notify(self) -> None:
        """Publish everything submitted; kick the back-end if it asked for kicks."""
        if self.driver.publish():
            self.kick.signal()

    def completion(self, head: int) -> asyncio.Future[int]:
        """A future resolved with the used length when chain `head` comes back."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        self._waiters[head] = fut
        if not self._reaper_registered:
            loop.add_reader(self.call.fileno(), self._reap)
            self._reaper_registered = True
        return fut

    def _reap(self) -> None:
        self.call.consume()
        self.reap()

    def reap(self) -> None:
        """Resolve the waiters of every used entry there is now (also without a call: a
        back-end killed between publishing and signalling never sends it)."""
        while True:
            try:
                used = self.driver.reap_all()
            except VvuError as err:  # the back-end wrote garbage into the used ring
                for fut in self._waiters.values():
                    if not fut.done():
                        fut.set_exception(err)
                self._waiters.clear()
                return
            for head, length in used:
                if head in self._waiters:
                    fut = self._waiters.pop(head)
                    if not fut.done():
                        fut.set_result(length)
            # Re-arm, then look once more so a completion racing with the re-arm is not lost.
            if not self.driver.enable_call_notifications():
                return

    async def request(
        self, readable: Sequence[tuple[int, int]], writable: Sequence[tuple[int, int]]
    ) -> int:
        """Submit one chain, kick, and wait for it; returns the used length."""
        head = self.submit(readable, writable)
        fut = self.completion(head)
        self.notify()
        return await fut

    def close(self) -> None:
        if self._reaper_registered:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.call.fileno())
            self._reaper_registered = False
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(FrontendError(f"queue {self.index} stopped"))
        self._waiters.clear()
        self.kick.close()
        self.call.close()


class Frontend:
    """One session with a vhost-user back-end."""

    def __init__(
        self,
        channel: Channel,
        *,
        memory_size: int = 64 * MiB,
        packed: bool = False,
        iommu: Iommu | None = None,
        memory_path: str | None = None,
        memory_offset: int = 0,
    ) -> None:
        """Guest memory is a fresh memfd of `memory_size` bytes, or with `memory_path` the
        `memory_size` bytes at `memory_offset` of that file (mapped shared; the file is created
        or grown to hold them), as a VM's `memory-backend-file,mem-path=PATH,share=on`
        would give it: e.g. the file a VVU device serves with `--frontend-memory`."""
        self.channel = channel
        self.packed = packed  # ack VIRTIO_F_RING_PACKED and drive packed rings
        self.iommu = iommu
        self.memory_size = memory_size
        self.memory_offset = memory_offset if memory_path is not None else 0
        if memory_path is None:
            self._memfd = memfd(memory_size, "vvu-frontend")
        else:
            self._memfd = _open_memory_file(memory_path, memory_offset + memory_size)
        self.memory = GuestMemory()
        try:
            self.memory.add_region(
                self._memfd,
                0,
                memory_size,
                userspace_addr=UVA_BASE,
                mmap_offset=self.memory_offset,
            )
        except BaseException:
            os.close(self._memfd)
            raise
        self.allocator = Allocator(0x1000, memory_size)
        self.features = 0
        self.protocol_features = 0
        self.num_queues = 1
        self.queues: dict[int, FrontendQueue] = {}
        self.dirty_log: DirtyLog | None = None  # our view of the log while it is on
        self._log_fd = -1
        self._lock = asyncio.Lock()
        #: Called (on the event loop) for each BACKEND_CONFIG_CHANGE_MSG, after it was acked.
        self.config_listeners: list[Callable[[], None]] = []
        #: How many back-end requests of each kind arrived on the back-end channel.
        self.backend_requests: dict[BackendRequest, int] = {}
        self._backend_channel: UnixChannel | None = None
        self._backend_task: asyncio.Task[None] | None = None
        # INBAND_NOTIFICATIONS: queue index -> the VRING_KICK being sent (None: idle).
        self._inband_kicks: dict[int, asyncio.Task[None] | None] = {}
        self.path: str | None = None
        # INFLIGHT_SHMFD: the back-end's inflight region, kept across back-end restarts.
        self.inflight: Inflight | None = None
        self._inflight_fd = -1

    @classmethod
    async def connect(
        cls,
        path: str,
        *,
        memory_size: int = 64 * MiB,
        timeout: float = 5.0,
        packed: bool = False,
        iommu: Iommu | None = None,
        memory_path: str | None = None,
        memory_offset: int = 0,
    ) -> Frontend:
        """Connect to a back-end listening on `path` (retrying up to `timeout` seconds).
        `packed`: use packed rings (the back-end must offer VIRTIO_F_RING_PACKED); `iommu`:
        play the IOMMU of a back-end with VIRTIO_F_ACCESS_PLATFORM; `memory_path` and
        `memory_offset`: guest memory in that file (see `Frontend`)."""
        channel = await connect_unix(path, timeout=timeout)
        try:
            frontend = cls(
                channel,
                memory_size=memory_size,
                packed=packed,
                iommu=iommu,
                memory_path=memory_path,
                memory_offset=memory_offset,
            )
        except BaseException:
            channel.close()
            raise
        frontend.path = path
        return frontend

    async def __aenter__(self) -> Frontend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def reply_ack(self) -> bool:
        # Protocol features exist only because VHOST_USER_F_PROTOCOL_FEATURES was offered, so the
        # protocol bit alone decides, from SET_PROTOCOL_FEATURES on (QEMU and cloud-hypervisor
        # may ask for an ack of the very SET_FEATURES that acks bit 30).
        return bool(self.protocol_features & ProtocolFeature.REPLY_ACK.mask)

    # --- messages ----------------------------------------------------------------------------

    async def request(
        self,
        request: FrontendRequest,
        payload: Payload = EMPTY,
        fds: Sequence[int] = (),
        *,
        need_reply: bool | None = None,
        reply_fds: list[int] | None = None,
    ) -> Payload | None:
        """Send one request and wait for its answer when one is due.

        Requests that always reply return their payload. Others ask for an ack when REPLY_ACK
        is negotiated (unless `need_reply` is False) and raise FrontendError on a failure ack.
        Fds that come with the reply are closed, or handed to the caller in `reply_fds`.
        """
        spec = spec_for(request, "frontend")
        # Typed replies: GET_*, and SET_LOG_BASE with LOG_SHMFD.
        always = (
            spec is not None
            and spec.answer(need_reply=False, protocol_features=self.protocol_features)
            is Answer.REPLY
        )
        # Never NEED_REPLY on a request that replies anyway (GET_*): it changes nothing by the
        # spec, QEMU never sends it, and libvhost-user (qemu-storage-daemon) then echoes the bit
        # in its reply (flags 0xd), which strict front-ends (QEMU's, ours) refuse.
        want_ack = not always and self.reply_ack and need_reply is not False
        async with self._lock:
            data = encode_message(request, payload, need_reply=want_ack, nfds=len(fds))
            await self.channel.send(data, fds)
            if not (always or want_ack):
                return None
            raw = await self.channel.recv()
            if raw is None:
                raise FrontendError(f"back-end closed the connection during {request.name}")
            try:
                reply = decode_message(
                    Header(raw.request, raw.flags, len(raw.payload)),
                    raw.payload,
                    raw.fds,
                    is_reply=True,
                )
            except ProtocolError as err:
                close_fds(raw.fds)
                raise FrontendError(f"bad reply to {request.name}: {err}") from err
            if reply_fds is None:
                close_fds(raw.fds)
            else:
                reply_fds.extend(raw.fds)
        if log.isEnabledFor(logging.DEBUG):  # describe() costs more than most requests
            log.debug("-> %s", describe(reply))
        if reply.request != request:
            raise FrontendError(f"reply to {reply.name} while waiting for {request.name}")
        if not always:
            assert isinstance(reply.payload, U64)
            if reply.payload.value != 0:
                raise FrontendError(f"back-end refused {request.name}")
            return None
        return reply.payload

    async def request_u64(self, request: FrontendRequest) -> int:
        reply = await self.request(request)
        if not isinstance(reply, U64):
            raise FrontendError(f"{request.name} answered {reply!r}, not a u64")
        return reply.value

    # --- set-up ------------------------------------------------------------------------------

    async def negotiate(
        self,
        features: int | None = None,
        protocol_features: int = WANTED_PROTOCOL_FEATURES,
        *,
        backend_channel: bool = False,
        inband: bool = False,
    ) -> int:
        """The handshake QEMU does: features, protocol features, owner, queue count. Acks the
        offered features (or `features` of them); returns the acked mask. `backend_channel`
        also asks for BACKEND_REQ and opens the channel when the back-end offers it; `inband`
        (implies it) asks for INBAND_NOTIFICATIONS too (see `inband`)."""
        if backend_channel or inband:
            protocol_features |= ProtocolFeature.BACKEND_REQ.mask
        if inband:
            protocol_features |= ProtocolFeature.INBAND_NOTIFICATIONS.mask
        offered = await self.request_u64(_F.GET_FEATURES)
        if self.iommu is not None:
            # QEMU's rule: an IOMMU needs the back-end channel for misses and REPLY_ACK.
            protocol_features |= IOMMU_PROTOCOL_FEATURES
            if not offered & VirtioFeature.ACCESS_PLATFORM.mask:
                raise FrontendError("the back-end does not offer VIRTIO_F_ACCESS_PLATFORM")
        if offered & VhostFeature.PROTOCOL_FEATURES.mask:
            offered_protocol = await self.request_u64(_F.GET_PROTOCOL_FEATURES)
            acked = offered_protocol & protocol_features
            await self.request(_F.SET_PROTOCOL_FEATURES, U64(acked))
            self.protocol_features = acked  # REPLY_ACK applies from the next request on
            if self.protocol_features & ProtocolFeature.MQ.mask:
                self.num_queues = await self.request_u64(_F.GET_QUEUE_NUM)
        needs = IOMMU_PROTOCOL_FEATURES
        if self.iommu is not None and self.protocol_features & needs != needs:
            raise FrontendError("an IOMMU needs the BACKEND_REQ and REPLY_ACK features")
        await self.request(_F.SET_OWNER)
        wanted = offered if features is None else features & offered
        unsupported = UNSUPPORTED_FEATURES
        if self.iommu is not None:
            unsupported &= ~VirtioFeature.ACCESS_PLATFORM.mask
        wanted &= ~unsupported
        if not self.packed:
            wanted &= ~VirtioFeature.RING_PACKED.mask
        elif not wanted & VirtioFeature.RING_PACKED.mask:
            raise FrontendError("packed rings wanted, but the back-end does not offer them")
        self.features = wanted
        await self.request(_F.SET_FEATURES, U64(wanted))
        if (
            backend_channel or inband or self.iommu is not None
        ) and self.protocol_features & ProtocolFeature.BACKEND_REQ.mask:
            await self.open_backend_channel()
        return wanted

    # --- the IOMMU -----------------------------------------------------------------------------

    def dma(self, gpa: int, size: int, perm: IotlbPerm = IotlbPerm.RW) -> int:
        """The address the device uses for `size` bytes at `gpa`: the guest-physical address,
        or with an IOMMU a new mapping's IOVA (device access limited to `perm`)."""
        return gpa if self.iommu is None else self.iommu.map(gpa, size, perm)

    async def _answer_miss(self, msg: Message) -> bool:
        """BACKEND_IOTLB_MSG: answer a MISS with an UPDATE on the front-end channel, as QEMU
        does; anything else (or no IOMMU here) is refused."""
        payload = msg.payload
        if self.iommu is None or not isinstance(payload, Iotlb) or payload.type != IotlbType.MISS:
            log.warning("back-end channel: %s refused (no IOMMU here, or not a miss)", msg.name)
            return False
        miss = BackendRequest.BACKEND_IOTLB_MSG
        self.backend_requests[miss] = self.backend_requests.get(miss, 0) + 1
        iova, perm = payload.iova, payload.perm
        self.iommu.misses.append((iova, perm))
        mapping = self.iommu.lookup(iova)
        if mapping is None:
            log.warning("IOTLB miss at unmapped iova %#x", iova)
            return False
        await self.iotlb_update(mapping)
        return True

    async def iotlb_update(self, mapping: DmaMapping) -> None:
        """Send the back-end the translation of `mapping` (IOTLB_MSG UPDATE)."""
        uaddr = UVA_BASE + mapping.gpa
        entry = Iotlb(mapping.iova, mapping.size, uaddr, mapping.perm, IotlbType.UPDATE)
        await self._iotlb_msg(entry)

    async def iotlb_invalidate(self, iova: int, size: int) -> None:
        """Withdraw the translations of `[iova, iova + size)` (IOTLB_MSG INVALIDATE); returns
        once the back-end no longer uses them."""
        await self._iotlb_msg(Iotlb(iova, size, 0, IotlbPerm.NONE, IotlbType.INVALIDATE))

    async def _iotlb_msg(self, entry: Iotlb) -> None:
        reply = await self.request(_F.IOTLB_MSG, entry)
        if not isinstance(reply, U64) or reply.value != 0:
            raise FrontendError(f"back-end refused IOTLB_MSG {entry.describe()}: {reply!r}")

    # --- memory and rings --------------------------------------------------------------------

    async def set_mem_table(self) -> None:
        """Share all of this front-end's guest memory with the back-end (one region)."""
        region = MemoryRegion(0, self.memory_size, UVA_BASE, self.memory_offset)
        await self.request(_F.SET_MEM_TABLE, MemoryTable((region,)), [self._memfd])

    async def setup_inflight(self, num_queues: int, queue_size: int) -> bool:
        """QEMU's vhost-user-blk start: GET_INFLIGHT_FD, keep the region, SET_INFLIGHT_FD.
        False when INFLIGHT_SHMFD was not negotiated."""
        if not self.protocol_features & ProtocolFeature.INFLIGHT_SHMFD.mask:
            return False
        fds: list[int] = []
        reply = await self.request(
            _F.GET_INFLIGHT_FD, Inflight(0, 0, num_queues, queue_size), reply_fds=fds
        )
        if not isinstance(reply, Inflight) or len(fds) != 1 or reply.mmap_size == 0:
            close_fds(fds)
            raise FrontendError(f"GET_INFLIGHT_FD answered {reply!r} with {len(fds)} fd(s)")
        self._close_inflight()
        self.inflight, self._inflight_fd = reply, fds[0]
        await self._send_inflight()
        return True

    async def _send_inflight(self) -> None:
        if self.inflight is not None:
            await self.request(_F.SET_INFLIGHT_FD, self.inflight, [self._inflight_fd])

    def _close_inflight(self) -> None:
        if self._inflight_fd >= 0:
            os.close(self._inflight_fd)
        self._inflight_fd = -1
        self.inflight = None

    async def start_queue(self, index: int, size: int = 256) -> FrontendQueue:
        """Lay out ring `index` in guest memory and hand it to the back-end, QEMU's order:
        NUM, BASE, ADDR, KICK, CALL, ENABLE. With RING_PACKED acked the ring is packed: avail
        and used below are the driver and device event suppression areas."""
        event_idx = bool(self.features & VirtioFeature.EVENT_IDX.mask)
        driver: SplitQueueDriver | PackedQueueDriver
        if self.features & VirtioFeature.RING_PACKED.mask:
            desc = self.allocator.alloc(16 * size, 4096)
            avail = self.allocator.alloc(4, 64)
            used = self.allocator.alloc(4, 64)
            driver = PackedQueueDriver(self.memory, size, desc, avail, used, event_idx=event_idx)
            base = driver.vring_base
        else:
            desc = self.allocator.alloc(16 * size, 4096)
            avail = self.allocator.alloc(6 + 2 * size, 64)
            used = self.allocator.alloc(6 + 8 * size, 64)
            driver = SplitQueueDriver(self.memory, size, desc, avail, used, event_idx=event_idx)
            base = 0
        kick, call = EventFd(), EventFd()
        queue = FrontendQueue(index, size, driver, kick, call, desc, avail, used)
        await self._hand_over(queue, base=base)
        self.queues[index] = queue
        return queue

    def _ring_addresses(self, queue: FrontendQueue) -> tuple[int, int, int]:
        """SET_VRING_ADDR's desc, used and avail: user addresses, or IOVAs behind an IOMMU (the
        device only reads the split ring's descriptors and available ring, and the driver's
        event area of a packed ring; it writes used descriptors into the packed ring)."""
        if self.iommu is None:
            return (UVA_BASE + queue.desc, UVA_BASE + queue.used, UVA_BASE + queue.avail)
        size = queue.size
        if self.features & VirtioFeature.RING_PACKED.mask:
            return (
                self.dma(queue.desc, 16 * size, IotlbPerm.RW),
                self.dma(queue.used, 4, IotlbPerm.RW),
                self.dma(queue.avail, 4, IotlbPerm.RO),
            )
        return (
            self.dma(queue.desc, 16 * size, IotlbPerm.RO),
            self.dma(queue.used, 6 + 8 * size, IotlbPerm.RW),
            self.dma(queue.avail, 6 + 2 * size, IotlbPerm.RO),
        )

    async def _hand_over(self, queue: FrontendQueue, base: int) -> None:
        """Give the back-end a ring in QEMU's order: NUM, BASE, ADDR, KICK, CALL, ENABLE."""
        index = queue.index
        await self.request(_F.SET_VRING_NUM, VringState(index, queue.size))
        await self.request(_F.SET_VRING_BASE, VringState(index, base))
        await self.request(_F.SET_VRING_ADDR, self._vring_addr(queue))
        if self.inband:  # the back-end gets no fds; our own kick/call become messages
            await self.request(_F.SET_VRING_KICK, U64.vring(index, nofd=True))
            await self.request(_F.SET_VRING_CALL, U64.vring(index, nofd=True))
            self._inband_kicks[index] = None
            asyncio.get_running_loop().add_reader(queue.kick.fileno(), self._on_inband_kick, queue)
        else:
            await self.request(_F.SET_VRING_KICK, U64.vring(index), [queue.kick.fileno()])
            await self.request(_F.SET_VRING_CALL, U64.vring(index), [queue.call.fileno()])
        if self.features & VhostFeature.PROTOCOL_FEATURES.mask:
            await self.request(_F.SET_VRING_ENABLE, VringState(index, 1))

    def _vring_addr(self, queue: FrontendQueue, *, log: int | None = None) -> VringAddr:
        """SET_VRING_ADDR for `queue`; with `log`, the used ring is logged there."""
        flags, log_addr = (0, 0) if log is None else (VRING_F_LOG, log)
        desc, used, avail = self._ring_addresses(queue)
        return VringAddr(queue.index, flags, desc, used, avail, log_addr)

    async def reconnect(self, *, timeout: float = 5.0) -> None:
        """The back-end went away (killed, restarted): connect to its socket again and restore
        the session as QEMU does with `reconnect=`: the whole handshake with the features acked
        before, the memory table, the inflight region it allocated (SET_INFLIGHT_FD), and every
        running ring. The ring's base is its avail index when the back-end keeps an inflight
        region (cloud-hypervisor's choice: the region says what to resubmit), its used index
        otherwise (QEMU's fallback, right only for a back-end that completes in order).

        A packed ring has no used index in memory: its used position is where this driver
        expects the next used descriptor, once it reaped everything the old back-end wrote.
        The base carries both positions (QEMU's form): next avail (or, without a region, the
        used position again) and next used. A back-end whose region held state takes both
        from the region instead, as it does for a split ring.

        The rings, their buffers and the waiters of requests in flight live in this front-end's
        memory and survive: requests the old back-end took but did not finish complete when the
        new one resubmits them, requests queued meanwhile when it starts."""
        if self.path is None:
            raise FrontendError("reconnect needs a front-end made by Frontend.connect")
        self.channel.close()
        self.channel = await connect_unix(self.path, timeout=timeout)
        features, protocol_features = self.features, self.protocol_features
        self.protocol_features = 0
        acked = await self.negotiate(features, protocol_features)
        if acked != features or self.protocol_features != protocol_features:
            raise FrontendError(
                f"the restarted back-end offers less: features {acked:#x} "
                f"(had {features:#x}), protocol features {self.protocol_features:#x} "
                f"(had {protocol_features:#x})"
            )
        await self.set_mem_table()
        await self._send_inflight()
        for queue in self.queues.values():
            if isinstance(queue.driver, PackedQueueDriver):
                queue.reap()
                base = queue.driver.vring_base  # next avail | next used << 16
                if not self.inflight:
                    base = (base >> 16) | (base & 0xFFFF0000)
            else:
                # avail->idx or used->idx as published in the ring (both at offset 2).
                base = self.memory.load_u16((queue.avail if self.inflight else queue.used) + 2)
            await self._hand_over(queue, base=base)
            queue.reap()

    async def stop_queue(self, index: int) -> int:
        """GET_VRING_BASE: the back-end stops the ring and reports its next avail index (for a
        packed ring: next avail and next used position, 16 bits each)."""
        reply = await self.request(_F.GET_VRING_BASE, VringState(index, 0))
        if not isinstance(reply, VringState):
            raise FrontendError(f"GET_VRING_BASE answered {reply!r}")
        queue = self.queues.pop(index, None)
        if queue is not None:
            self._stop_inband_kicks(queue)
            queue.close()
        return reply.num

    async def start_dirty_log(self, *, used_ring_log: dict[int, int] | None = None) -> DirtyLog:
        """Turn dirty logging on, QEMU's migration order: SET_LOG_BASE with a fresh memfd log
        covering all guest memory, SET_FEATURES with LOG_ALL, then SET_VRING_ADDR with
        VHOST_VRING_F_LOG for every running ring. The used ring is logged at its own guest
        address unless `used_ring_log` maps the ring's index to another log address.
        Returns our own view of the bitmap."""
        if not self.protocol_features & ProtocolFeature.LOG_SHMFD.mask:
            raise FrontendError("the back-end does not offer LOG_SHMFD")
        if self.dirty_log is not None:
            raise FrontendError("dirty logging is already on")
        size = -(-self.memory_size // (8 * LOG_PAGE))
        self._log_fd = memfd(size, "vvu-frontend-log")
        self.dirty_log = DirtyLog(self._log_fd, size)
        await self.request(_F.SET_LOG_BASE, Log(size, 0), [self._log_fd])
        self.features |= VhostFeature.LOG_ALL.mask
        await self.request(_F.SET_FEATURES, U64(self.features))
        for index, queue in self.queues.items():
            log_addr = (used_ring_log or {}).get(index, queue.used)
            await self.request(_F.SET_VRING_ADDR, self._vring_addr(queue, log=log_addr))
        return self.dirty_log

    async def stop_dirty_log(self) -> None:
        """Turn dirty logging off again (LOG_ALL cleared, rings without the log flag)."""
        self.features &= ~VhostFeature.LOG_ALL.mask
        await self.request(_F.SET_FEATURES, U64(self.features))
        for queue in self.queues.values():
            await self.request(_F.SET_VRING_ADDR, self._vring_addr(queue))
        self._release_log()

    def _release_log(self) -> None:
        self.dirty_log = None
        if self._log_fd >= 0:
            os.close(self._log_fd)
            self._log_fd = -1

    async def get_config(self, offset: int, size: int) -> bytes:
        reply = await self.request(_F.GET_CONFIG, Config(offset, 0, bytes(size)))
        if not isinstance(reply, Config) or reply.size != size:
            raise FrontendError(f"GET_CONFIG answered {reply!r}")
        return reply.data

    # --- device state transfer (DEVICE_STATE) -------------------------------------------------
    # The rings must be stopped first (stop_queue); on the destination, start them again with
    # the source's bases after the load.

    async def save_device_state(self, *, limit: int = 1 << 20) -> bytes:
        """SET_DEVICE_STATE_FD (save) through a pipe, read it to EOF, CHECK_DEVICE_STATE: the
        back-end's internal state. Raises FrontendError when the back-end refuses or fails."""
        read_end, write_end = os.pipe()
        try:
            fd = await self._start_state_transfer(TransferDirection.SAVE, write_end)
            if fd is not None:  # the back-end's own fd replaces our pipe
                os.close(read_end)
                read_end = fd
            os.close(write_end)  # the back-end's EOF must not wait for our copy
            write_end = -1
            state = await read_to_eof(read_end, limit)
        except ValueError as err:
            raise FrontendError(f"device state: {err}") from err
        finally:
            close_fds([fd for fd in (read_end, write_end) if fd >= 0])
        await self._check_device_state()
        return state

    async def load_device_state(self, state: bytes) -> None:
        """SET_DEVICE_STATE_FD (load) through a pipe, write `state` and close it,
        CHECK_DEVICE_STATE. Raises FrontendError when the back-end refuses or fails."""
        read_end, write_end = os.pipe()
        try:
            fd = await self._start_state_transfer(TransferDirection.LOAD, read_end)
            if fd is not None:
                os.close(write_end)
                write_end = fd
            os.close(read_end)
            read_end = -1
            await write_all(write_end, state)
        finally:
            close_fds([fd for fd in (read_end, write_end) if fd >= 0])
        await self._check_device_state()

    async def _start_state_transfer(self, direction: TransferDirection, fd: int) -> int | None:
        """SET_DEVICE_STATE_FD with our end of the pipe; the back-end's own fd, if it sent one."""
        returned: list[int] = []
        reply = await self.request(
            _F.SET_DEVICE_STATE_FD,
            DeviceStateTransfer(direction, TransferPhase.STOPPED),
            [fd],
            reply_fds=returned,
        )
        if not isinstance(reply, U64) or reply.value & DEVICE_STATE_ERROR_MASK:
            close_fds(returned)
            raise FrontendError(f"back-end refused to {direction.name.lower()} its state")
        if reply.value & DEVICE_STATE_NOFD:
            close_fds(returned)
            return None
        if len(returned) != 1:
            close_fds(returned)
            raise FrontendError("SET_DEVICE_STATE_FD reply promised an fd and carried none")
        return returned[0]

    async def _check_device_state(self) -> None:
        if await self.request_u64(_F.CHECK_DEVICE_STATE) != 0:
            raise FrontendError("CHECK_DEVICE_STATE: the back-end reports the transfer failed")

    # --- in-band notifications (INBAND_NOTIFICATIONS) -----------------------------------------

    @property
    def inband(self) -> bool:
        """Kicks and calls travel as VRING_KICK / BACKEND_VRING_CALL messages (negotiate
        INBAND_NOTIFICATIONS with REPLY_ACK and BACKEND_REQ, and open the back-end channel before
        starting queues)."""
        return bool(self.protocol_features & ProtocolFeature.INBAND_NOTIFICATIONS.mask)

    def _on_inband_kick(self, queue: FrontendQueue) -> None:
        if queue.index not in self._inband_kicks:  # stopped
            return
        if self._inband_kicks[queue.index] is not None:  # being sent: coalesce, as an eventfd
            return
        if not queue.kick.consume():  # spurious
            return
        task = asyncio.ensure_future(self._send_inband_kick(queue))
        self._inband_kicks[queue.index] = task

    async def _send_inband_kick(self, queue: FrontendQueue) -> None:
        try:
            await self.request(_F.VRING_KICK, VringState(queue.index, 0), need_reply=False)
        except (FrontendError, TransportError, OSError) as err:
            log.warning("in-band kick of queue %d lost: %s", queue.index, err)
        finally:
            if queue.index in self._inband_kicks:
                self._inband_kicks[queue.index] = None
                if not queue.kick.closed:
                    self._on_inband_kick(queue)  # kicked again while sending

    def _stop_inband_kicks(self, queue: FrontendQueue) -> None:
        if queue.index not in self._inband_kicks:
            return
        task = self._inband_kicks.pop(queue.index)
        if task is not None:
            task.cancel()
        asyncio.get_running_loop().remove_reader(queue.kick.fileno())

    # --- back-end channel --------------------------------------------------------------------

    async def open_backend_channel(self) -> None:
        """SET_BACKEND_REQ_FD (needs BACKEND_REQ negotiated): a socket on which the back-end
        sends its requests; a task answers them until `close`."""
        if not self.protocol_features & ProtocolFeature.BACKEND_REQ.mask:
            raise FrontendError("BACKEND_REQ was not negotiated: no back-end channel")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await self.request(_F.SET_BACKEND_REQ_FD, EMPTY, [theirs.fileno()])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # the back-end has its own duplicate
        channel = UnixChannel(ours, peer="back-end channel")
        self._backend_channel = channel
        self._backend_task = asyncio.ensure_future(self._serve_backend_channel(channel))

    async def _serve_backend_channel(self, channel: UnixChannel) -> None:
        try:
            while True:
                raw = await channel.recv()
                if raw is None:
                    return
                try:
                    msg = decode_message(
                        Header(raw.request, raw.flags, len(raw.payload)),
                        raw.payload,
                        raw.fds,
                        channel="backend",
                    )
                except ProtocolError as err:  # the spec's answer to garbage: close the channel
                    log.warning("back-end channel: %s; closing it", err)
                    return
                finally:
                    raw.close_fds()  # no back-end request we handle keeps an fd
                log.debug("<= %s", describe(msg))
                if msg.request == BackendRequest.BACKEND_IOTLB_MSG:
                    ok = await self._answer_miss(msg)
                else:
                    ok = self._on_backend_request(msg)
                spec = msg.spec
                answer = (
                    spec.answer(need_reply=msg.need_reply, protocol_features=self.protocol_features)
                    if spec is not None
                    else (Answer.ACK if msg.need_reply and self.reply_ack else Answer.NOTHING)
                )
                if answer is not Answer.NOTHING:  # every request we handle is answered by an ack
                    await channel.send(encode_ack(msg.request, ok, channel="backend"))
                if ok and msg.request == BackendRequest.BACKEND_CONFIG_CHANGE_MSG:
                    for listener in list(self.config_listeners):
                        listener()
        except (TransportError, OSError) as err:
            log.info("back-end channel ended: %s", err)
        finally:
            channel.close()

    def _on_backend_request(self, msg: Message) -> bool:
        """Carry out one back-end request; False refuses it (a failure ack when asked)."""
        if not isinstance(msg.request, BackendRequest):
            log.warning("back-end channel: unknown request %d refused", msg.request)
            return False
        spec = msg.spec
        feature = spec.feature if spec is not None else None
        if feature is not None and not self.protocol_features & feature.mask:
            log.warning("back-end channel: %s without %s refused", msg.name, feature.name)
            return False
        self.backend_requests[msg.request] = self.backend_requests.get(msg.request, 0) + 1
        if msg.request == BackendRequest.BACKEND_CONFIG_CHANGE_MSG:
            return True
        if msg.request in (BackendRequest.BACKEND_VRING_CALL, BackendRequest.BACKEND_VRING_ERR):
            assert isinstance(msg.payload, VringState)
            queue = self.queues.get(msg.payload.index)
            if queue is None:
                log.warning(
                    "back-end channel: %s for unknown queue %d", msg.name, msg.payload.index
                )
                return False
            if msg.request == BackendRequest.BACKEND_VRING_CALL:
                queue.call.signal()  # the queue reaps as on a call eventfd
            else:
                log.error("back-end reports queue %d broken (in-band VRING_ERR)", queue.index)
            return True
        log.warning("back-end channel: %s is not supported by this front-end", msg.name)
        return False

    async def close(self) -> None:
        self.config_listeners.clear()  # they usually point back at a driver holding us
        if self._backend_task is not None:
            self._backend_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._backend_task
            self._backend_task = None
        if self._backend_channel is not None:
            self._backend_channel.close()
            self._backend_channel = None
        for queue in self.queues.values():
            self._stop_inband_kicks(queue)
            queue.close()
        self.queues.clear()
        self.channel.close()
        self._release_log()
        self._close_inflight()
        if self._memfd >= 0:
            os.close(self._memfd)
            self._memfd = -1
