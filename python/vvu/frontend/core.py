"""A vhost-user front-end you can script: the part QEMU plays, for any back-end.

It owns memfd guest memory, negotiates features, lays out split rings with the driver-side queue
from `_core`, kicks, and waits for calls on the event loop. The device drivers in this package
(`BlkDriver`, `RngDriver`) sit on top of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from vvu._core import DirtyLog, EventFd, GuestMemory, SplitQueueDriver, memfd
from vvu.errors import ProtocolError, VvuError
from vvu.protocol import (
    EMPTY,
    U64,
    VRING_F_LOG,
    Config,
    FrontendRequest,
    Log,
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
    encode_message,
)
from vvu.protocol.codec import Header
from vvu.protocol.table import Answer, spec_for
from vvu.transport.base import Channel, close_fds
from vvu.transport.unix import connect_unix

log = logging.getLogger(__name__)

__all__ = ["Frontend", "FrontendError", "FrontendQueue"]

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
)
#: Bytes of guest memory per dirty-log bit.
LOG_PAGE = 4096


#: Offered bits this front-end must not ack at negotiation: it drives split rings with plain
#: guest-physical addresses and polls nothing; LOG_ALL is acked only while a dirty log is on
#: (`start_dirty_log`), as QEMU does during a migration.
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

    def __init__(self, channel: Channel, *, memory_size: int = 64 * MiB) -> None:
        self.channel = channel
        self.memory_size = memory_size
        self._memfd = memfd(memory_size, "vvu-frontend")
        self.memory = GuestMemory()
        self.memory.add_region(self._memfd, 0, memory_size, userspace_addr=UVA_BASE)
        self.allocator = Allocator(0x1000, memory_size)
        self.features = 0
        self.protocol_features = 0
        self.num_queues = 1
        self.queues: dict[int, FrontendQueue] = {}
        self.dirty_log: DirtyLog | None = None  # our view of the log while it is on
        self._log_fd = -1
        self._ring_addrs: dict[int, VringAddr] = {}  # as last set without the log flag
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(
        cls, path: str, *, memory_size: int = 64 * MiB, timeout: float = 5.0
    ) -> Frontend:
        """Connect to a back-end listening on `path` (retrying up to `timeout` seconds)."""
        return cls(await connect_unix(path, timeout=timeout), memory_size=memory_size)

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
        if offered & VhostFeature.PROTOCOL_FEATURES.mask:
            offered_protocol = await self.request_u64(_F.GET_PROTOCOL_FEATURES)
            acked = offered_protocol & protocol_features
            await self.request(_F.SET_PROTOCOL_FEATURES, U64(acked))
            self.protocol_features = acked  # REPLY_ACK applies from the next request on
            if self.protocol_features & ProtocolFeature.MQ.mask:
                self.num_queues = await self.request_u64(_F.GET_QUEUE_NUM)
        await self.request(_F.SET_OWNER)
        wanted = offered if features is None else features & offered
        wanted &= ~UNSUPPORTED_FEATURES
        self.features = wanted
        await self.request(_F.SET_FEATURES, U64(wanted))
        return wanted

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
        addr = VringAddr(index, 0, UVA_BASE + desc, UVA_BASE + used, UVA_BASE + avail, 0)
        queue = FrontendQueue(index, size, driver, kick, call)
        await self.request(_F.SET_VRING_NUM, VringState(index, size))
        await self.request(_F.SET_VRING_BASE, VringState(index, 0))
        await self.request(_F.SET_VRING_ADDR, addr)
        self._ring_addrs[index] = addr
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
        for index in self.queues:
            addr = self._ring_addrs[index]
            log_addr = (used_ring_log or {}).get(index, addr.used - UVA_BASE)
            await self.request(
                _F.SET_VRING_ADDR, dataclasses.replace(addr, flags=VRING_F_LOG, log=log_addr)
            )
        return self.dirty_log

    async def stop_dirty_log(self) -> None:
        """Turn dirty logging off again (LOG_ALL cleared, rings without the log flag)."""
        self.features &= ~VhostFeature.LOG_ALL.mask
        await self.request(_F.SET_FEATURES, U64(self.features))
        for index in self.queues:
            await self.request(_F.SET_VRING_ADDR, self._ring_addrs[index])
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

    async def close(self) -> None:
        for queue in self.queues.values():
            queue.close()
        self.queues.clear()
        self.channel.close()
        self._release_log()
        if self._memfd >= 0:
            os.close(self._memfd)
            self._memfd = -1
