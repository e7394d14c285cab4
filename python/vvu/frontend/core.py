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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from vvu._core import EventFd, GuestMemory, SplitQueueDriver, memfd
from vvu.errors import ProtocolError, VvuError
from vvu.protocol import (
    EMPTY,
    U64,
    BackendRequest,
    Config,
    FrontendRequest,
    Iotlb,
    IotlbPerm,
    IotlbType,
    MemoryRegion,
    MemoryTable,
    Payload,
    ProtocolFeature,
    VhostFeature,
    VirtioFeature,
    VringAddr,
    VringState,
    decode_message,
    describe,
    encode_ack,
    encode_message,
)
from vvu.protocol.codec import Header
from vvu.protocol.table import ReplyKind, spec_for
from vvu.transport.base import Channel, close_fds
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
)


#: The protocol features an IOMMU needs (QEMU refuses ACCESS_PLATFORM without them).
IOMMU_PROTOCOL_FEATURES = ProtocolFeature.BACKEND_REQ.mask | ProtocolFeature.REPLY_ACK.mask

#: Offered bits this front-end must not ack: it drives split rings with plain guest-physical
#: addresses, polls nothing, and keeps no dirty log (LOG_ALL only means something with a log).
UNSUPPORTED_FEATURES = (
    VhostFeature.LOG_ALL.mask
    | VirtioFeature.ACCESS_PLATFORM.mask
    | VirtioFeature.RING_PACKED.mask
    | VirtioFeature.IN_ORDER.mask
    | VirtioFeature.NOTIFICATION_DATA.mask
    | VirtioFeature.NOTIF_CONFIG_DATA.mask
    | VirtioFeature.RING_RESET.mask
)


class FrontendError(VvuError):
    """The back-end refused a request or answered something the front-end cannot use."""


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
    driver: SplitQueueDriver
    kick: EventFd
    call: EventFd
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
        self, channel: Channel, *, memory_size: int = 64 * MiB, iommu: Iommu | None = None
    ) -> None:
        self.channel = channel
        self.iommu = iommu
        self._backend_channel: Channel | None = None
        self._backend_task: asyncio.Task[None] | None = None
        self.memory_size = memory_size
        self._memfd = memfd(memory_size, "vvu-frontend")
        self.memory = GuestMemory()
        self.memory.add_region(self._memfd, 0, memory_size, userspace_addr=UVA_BASE)
        self.allocator = Allocator(0x1000, memory_size)
        self.features = 0
        self.protocol_features = 0
        self.num_queues = 1
        self.queues: dict[int, FrontendQueue] = {}
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(
        cls,
        path: str,
        *,
        memory_size: int = 64 * MiB,
        timeout: float = 5.0,
        iommu: Iommu | None = None,
    ) -> Frontend:
        """Connect to a back-end listening on `path` (retrying up to `timeout` seconds)."""
        channel = await connect_unix(path, timeout=timeout)
        return cls(channel, memory_size=memory_size, iommu=iommu)

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
    ) -> Payload | None:
        """Send one request and wait for its answer when one is due.

        Requests that always reply return their payload. Others ask for an ack when REPLY_ACK
        is negotiated (unless `need_reply` is False) and raise FrontendError on a failure ack.
        """
        spec = spec_for(request, "frontend")
        always = spec is not None and spec.replies is ReplyKind.ALWAYS
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
                raise FrontendError(f"bad reply to {request.name}: {err}") from err
            finally:
                close_fds(raw.fds)
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
        self, features: int | None = None, protocol_features: int = WANTED_PROTOCOL_FEATURES
    ) -> int:
        """The handshake QEMU does: features, protocol features, owner, queue count. Acks the
        offered features (or `features` of them); returns the acked mask."""
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
        if self.iommu is not None:
            if self.protocol_features & IOMMU_PROTOCOL_FEATURES != IOMMU_PROTOCOL_FEATURES:
                raise FrontendError("an IOMMU needs the BACKEND_REQ and REPLY_ACK features")
            await self._open_backend_channel()
        await self.request(_F.SET_OWNER)
        wanted = offered if features is None else features & offered
        unsupported = UNSUPPORTED_FEATURES
        if self.iommu is not None:
            unsupported &= ~VirtioFeature.ACCESS_PLATFORM.mask
        wanted &= ~unsupported
        self.features = wanted
        await self.request(_F.SET_FEATURES, U64(wanted))
        return wanted

    # --- the IOMMU -----------------------------------------------------------------------------

    def dma(self, gpa: int, size: int, perm: IotlbPerm = IotlbPerm.RW) -> int:
        """The address the device uses for `size` bytes at `gpa`: the guest-physical address,
        or with an IOMMU a new mapping's IOVA (device access limited to `perm`)."""
        return gpa if self.iommu is None else self.iommu.map(gpa, size, perm)

    async def _open_backend_channel(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await self.request(_F.SET_BACKEND_REQ_FD, EMPTY, [theirs.fileno()])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._backend_channel = UnixChannel(ours, peer="backend-channel")
        self._backend_task = asyncio.ensure_future(self._serve_backend_channel())

    async def _serve_backend_channel(self) -> None:
        """Answer the back-end's IOTLB misses with updates, as QEMU does."""
        channel = self._backend_channel
        assert channel is not None
        while (raw := await channel.recv()) is not None:
            try:
                msg = decode_message(
                    Header(raw.request, raw.flags, len(raw.payload)),
                    raw.payload,
                    raw.fds,
                    channel="backend",
                )
            finally:
                close_fds(raw.fds)
            log.debug("<- backend %s", describe(msg))
            ok = False
            if (
                msg.request == BackendRequest.BACKEND_IOTLB_MSG
                and isinstance(msg.payload, Iotlb)
                and msg.payload.type == IotlbType.MISS
            ):
                ok = await self._answer_miss(msg.payload.iova, msg.payload.perm)
            if msg.need_reply and self.reply_ack:
                await channel.send(encode_ack(msg.request, ok=ok))

    async def _answer_miss(self, iova: int, perm: int) -> bool:
        assert self.iommu is not None
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
        region = MemoryRegion(0, self.memory_size, UVA_BASE, 0)
        await self.request(_F.SET_MEM_TABLE, MemoryTable((region,)), [self._memfd])

    async def start_queue(self, index: int, size: int = 256) -> FrontendQueue:
        """Lay out ring `index` in guest memory and hand it to the back-end, QEMU's order:
        NUM, BASE, ADDR, KICK, CALL, ENABLE."""
        event_idx = bool(self.features & VirtioFeature.EVENT_IDX.mask)
        desc = self.allocator.alloc(16 * size, 4096)
        avail = self.allocator.alloc(6 + 2 * size, 64)
        used = self.allocator.alloc(6 + 8 * size, 64)
        driver = SplitQueueDriver(self.memory, size, desc, avail, used, event_idx=event_idx)
        kick, call = EventFd(), EventFd()
        queue = FrontendQueue(index, size, driver, kick, call)
        await self.request(_F.SET_VRING_NUM, VringState(index, size))
        await self.request(_F.SET_VRING_BASE, VringState(index, 0))
        if self.iommu is None:
            rings = (UVA_BASE + desc, UVA_BASE + used, UVA_BASE + avail)
        else:  # the device only reads the descriptors and the available ring
            rings = (
                self.dma(desc, 16 * size, IotlbPerm.RO),
                self.dma(used, 6 + 8 * size, IotlbPerm.RW),
                self.dma(avail, 6 + 2 * size, IotlbPerm.RO),
            )
        await self.request(_F.SET_VRING_ADDR, VringAddr(index, 0, *rings, 0))
        await self.request(_F.SET_VRING_KICK, U64.vring(index), [kick.fileno()])
        await self.request(_F.SET_VRING_CALL, U64.vring(index), [call.fileno()])
        if self.features & VhostFeature.PROTOCOL_FEATURES.mask:
            await self.request(_F.SET_VRING_ENABLE, VringState(index, 1))
        self.queues[index] = queue
        return queue

    async def stop_queue(self, index: int) -> int:
        """GET_VRING_BASE: the back-end stops the ring and reports its next avail index."""
        reply = await self.request(_F.GET_VRING_BASE, VringState(index, 0))
        if not isinstance(reply, VringState):
            raise FrontendError(f"GET_VRING_BASE answered {reply!r}")
        queue = self.queues.pop(index, None)
        if queue is not None:
            queue.close()
        return reply.num

    async def get_config(self, offset: int, size: int) -> bytes:
        reply = await self.request(_F.GET_CONFIG, Config(offset, 0, bytes(size)))
        if not isinstance(reply, Config) or reply.size != size:
            raise FrontendError(f"GET_CONFIG answered {reply!r}")
        return reply.data

    async def close(self) -> None:
        for queue in self.queues.values():
            queue.close()
        self.queues.clear()
        if self._backend_task is not None:
            self._backend_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, VvuError, OSError):
                await self._backend_task
            self._backend_task = None
        if self._backend_channel is not None:
            self._backend_channel.close()
            self._backend_channel = None
        self.channel.close()
        if self._memfd >= 0:
            os.close(self._memfd)
            self._memfd = -1
