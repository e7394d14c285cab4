"""The vhost-user back-end engine: a device-agnostic state machine over any Transport.

One `BackendEngine` serves one front-end session at a time (`serve`), or front-ends one after
another on a listener (`serve_forever`). It negotiates features, maps memory, runs the vring life
cycle and answers every request exactly as the protocol says (one reply, flags 0x5, request id
echoed). Device behaviour comes from a `Backend`; the data path runs in queue runners, either
native Rust workers or the Python handler path.

Errors: a malformed message, a wrong fd count or an unknown request the front-end does not wait
for drops that front-end (it cannot learn of the failure otherwise); a failing request that asked
for an ack gets a failure ack. Either way every fd is closed, everything the session held is
released, and the engine is ready for the next front-end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from vvu._core import DirtyLog, EventFd, GuestMemory, QueueWorker, SplitQueue
from vvu.backends.base import Backend, ConfigError
from vvu.errors import GuestMemoryError, ProtocolError, QueueError, VvuError
from vvu.protocol import (
    EMPTY,
    U64,
    VRING_F_LOG,
    BackendRequest,
    Config,
    FrontendRequest,
    Log,
    MemoryRegion,
    MemoryTable,
    Message,
    Payload,
    ProtocolFeature,
    SingleRegion,
    VhostFeature,
    VirtioFeature,
    VringAddr,
    VringState,
    decode_message,
    describe,
    encode_ack,
    encode_message,
    encode_reply,
)
from vvu.protocol.codec import Header
from vvu.protocol.table import Answer
from vvu.transport.base import Channel, Listener, RawMessage, TransportError, close_fds

log = logging.getLogger(__name__)

__all__ = ["ENGINE_PROTOCOL_FEATURES", "BackendEngine", "RequestFailed"]

_F = FrontendRequest
_PF = ProtocolFeature

#: Protocol features the engine implements for every device.
ENGINE_PROTOCOL_FEATURES = (
    _PF.MQ.mask
    | _PF.REPLY_ACK.mask
    | _PF.BACKEND_REQ.mask
    | _PF.RESET_DEVICE.mask
    | _PF.CONFIGURE_MEM_SLOTS.mask
    | _PF.STATUS.mask
    | _PF.LOG_SHMFD.mask
)
MAX_MEM_SLOTS = 256
# QEMU asks for the size of its own config struct, which may exceed what a device defines.
MAX_CONFIG_SPACE = 256
# How often a ring whose front-end sends no kicks (SET_VRING_KICK with NOFD) is looked at.
POLL_INTERVAL = 0.001
# How long REM_MEM_REG waits for buffers still held by Python code before failing.
REGION_RELEASE_TIMEOUT = 1.0


class RequestFailed(VvuError):
    """A request could not be carried out; answered with a failure ack or a disconnect."""


class _Disconnect(Exception):
    """Drop this front-end (the reason is logged)."""


class PythonQueueRunner:
    """Runs one queue on the event loop, feeding batches of chains to `Backend.handle`."""

    def __init__(
        self,
        queue: SplitQueue,
        kick: EventFd | None,
        call: EventFd | None,
        err: EventFd | None,
        handler: Callable[[list[object]], object],
        *,
        index: int,
        backend: Backend,
        batch: int = 64,
    ) -> None:
        self.queue = queue
        self._kick = kick
        self.call = call
        self.err = err
        self._backend = backend
        self._index = index
        self._batch = batch
        self._broken: str | None = None
        self._stopped = False
        self._poll_handle: asyncio.TimerHandle | None = None
        loop = asyncio.get_running_loop()
        if kick is not None:
            loop.add_reader(kick.fileno(), self._on_kick)
        loop.call_soon(self._process)  # buffers may be waiting already (reconnect, migration)

    def _on_kick(self) -> None:
        if self._kick is not None:
            self._kick.consume()
        self._process()

    def _process(self) -> None:
        if self._broken is not None or self._stopped:  # stop() may beat the first call_soon
            return
        queue = self.queue
        try:
            while True:
                chains = queue.pop(self._batch)
                if not chains:
                    if queue.enable_notifications():
                        continue
                    break
                used = self._backend.handle(self._index, chains)
                if len(used) != len(chains):
                    raise QueueError(
                        f"handler returned {len(used)} used lengths for {len(chains)} chains"
                    )
                for chain, length in zip(chains, used, strict=True):
                    queue.push_used(chain.head, length)
                if queue.publish_used() and self.call is not None:
                    self.call.signal()
        except Exception as err:  # a broken ring or handler: stop this queue, keep the session
            self._broken = str(err)
            log.error("queue %d broken: %s", self._index, self._broken)
            if self.err is not None:
                self.err.signal()
            return
        if self._kick is None:  # NOFD: nobody kicks, so poll
            self._poll_handle = asyncio.get_running_loop().call_later(POLL_INTERVAL, self._process)

    def set_call(self, call: EventFd | None) -> None:
        self.call = call
        if call is not None:
            call.signal()  # a completion may have raced with the swap; a spurious call is harmless

    def set_err(self, err: EventFd | None) -> None:
        self.err = err
        if err is not None and self._broken is not None:
            err.signal()  # broken before the swap: tell the new listener too

    async def stop(self) -> SplitQueue:
        self._stopped = True
        if self._kick is not None:
            asyncio.get_running_loop().remove_reader(self._kick.fileno())
        if self._poll_handle is not None:
            self._poll_handle.cancel()
        return self.queue


class NativeQueueRunner:
    """Runs one queue in a Rust worker thread (no GIL)."""

    def __init__(self, worker: QueueWorker) -> None:
        self._worker = worker

    def set_call(self, call: EventFd | None) -> None:
        self._worker.set_call(call)

    def set_err(self, err: EventFd | None) -> None:
        self._worker.set_err(err)

    @property
    def fault(self) -> str | None:
        """Why the worker stopped processing on its own (it cannot log it itself)."""
        return self._worker.fault

    async def stop(self) -> SplitQueue:
        # Joining waits for in-flight requests to complete: off the event loop.
        return await asyncio.to_thread(self._worker.stop)


QueueRunner = PythonQueueRunner | NativeQueueRunner


@dataclass
class Vring:
    """What the front-end told us about one ring, and its runner while it runs."""

    index: int
    size: int = 0
    addr: VringAddr | None = None
    base: int = 0
    kick: EventFd | None = None
    kick_set: bool = False  # SET_VRING_KICK seen (possibly NOFD)
    call: EventFd | None = None
    err: EventFd | None = None
    started: bool = False
    enabled: bool = False
    runner: QueueRunner | None = None

    def release(self) -> None:
        for efd in (self.kick, self.call, self.err):
            if efd is not None:
                efd.close()
        self.kick = self.call = self.err = None


@dataclass
class Session:
    """Everything one front-end connection set up; released as a whole on disconnect."""

    channel: Channel
    vrings: list[Vring]
    features: int = 0
    features_set: bool = False
    protocol_features: int = 0
    owner: bool = False
    status: int = 0
    memory: GuestMemory | None = None
    regions: list[MemoryRegion] = field(default_factory=list)
    backend_channel: Channel | None = None
    dirty_log: DirtyLog | None = None  # SET_LOG_BASE
    log_fd: EventFd | None = None  # SET_LOG_FD: kept, never signalled (QEMU does not use it)

    @property
    def logging(self) -> bool:
        """Dirty logging is on: VHOST_F_LOG_ALL acked and a log mapped."""
        return bool(self.features & VhostFeature.LOG_ALL.mask) and self.dirty_log is not None

    def release_log(self) -> None:
        if self.dirty_log is not None and self.dirty_log.faults:
            log.warning("%d writes could not be logged: %r", self.dirty_log.faults, self.dirty_log)
        self.dirty_log = None
        if self.log_fd is not None:
            self.log_fd.close()
            self.log_fd = None

    @property
    def reply_ack(self) -> bool:
        # Protocol features exist only because VHOST_USER_F_PROTOCOL_FEATURES was offered, so the
        # protocol bit alone decides, from SET_PROTOCOL_FEATURES on (QEMU and cloud-hypervisor
        # may ask for an ack of the very SET_FEATURES that acks bit 30).
        return bool(self.protocol_features & _PF.REPLY_ACK.mask)


Handler = Callable[[Message], Awaitable[Payload | None]]


class BackendEngine:
    """Serves one Backend to front-ends, one session at a time."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.session: Session | None = None
        self.sessions_served = 0
        self._handlers: dict[FrontendRequest, Handler] = {
            _F.GET_FEATURES: self._get_features,
            _F.SET_FEATURES: self._set_features,
            _F.SET_OWNER: self._set_owner,
            _F.RESET_OWNER: self._reset_owner,
            _F.SET_MEM_TABLE: self._set_mem_table,
            _F.SET_LOG_BASE: self._set_log_base,
            _F.SET_LOG_FD: self._set_log_fd,
            _F.SET_VRING_NUM: self._set_vring_num,
            _F.SET_VRING_ADDR: self._set_vring_addr,
            _F.SET_VRING_BASE: self._set_vring_base,
            _F.GET_VRING_BASE: self._get_vring_base,
            _F.SET_VRING_KICK: self._set_vring_kick,
            _F.SET_VRING_CALL: self._set_vring_call,
            _F.SET_VRING_ERR: self._set_vring_err,
            _F.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            _F.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            _F.GET_QUEUE_NUM: self._get_queue_num,
            _F.SET_VRING_ENABLE: self._set_vring_enable,
            _F.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
            _F.GET_CONFIG: self._get_config,
            _F.SET_CONFIG: self._set_config,
            _F.RESET_DEVICE: self._reset_device,
            _F.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            _F.ADD_MEM_REG: self._add_mem_reg,
            _F.REM_MEM_REG: self._rem_mem_reg,
            _F.SET_STATUS: self._set_status,
            _F.NET_SET_MTU: self._net_set_mtu,
            _F.SEND_RARP: self._send_rarp,
            _F.GET_STATUS: self._get_status,
        }

    # --- offered features --------------------------------------------------------------------

    def offered_features(self) -> int:
        # Every back-end writes guest memory only through its queues' pushed chains, which the
        # queues log themselves: dirty logging works for all of them.
        return (
            self.backend.features()
            | VhostFeature.PROTOCOL_FEATURES.mask
            | VhostFeature.LOG_ALL.mask
        )

    def offered_protocol_features(self) -> int:
        return ENGINE_PROTOCOL_FEATURES | self.backend.protocol_features()

    # --- back-end initiated ----------------------------------------------------------------

    async def notify_config_change(self) -> bool:
        """Tell the front-end the config space changed (BACKEND_CONFIG_CHANGE_MSG), so it
        re-reads it with GET_CONFIG (e.g. a resized disk). Sent without NEED_REPLY: waiting for
        an ack here could deadlock a front-end that is itself waiting for one of our replies.
        Returns False when the session has no back-end channel or did not negotiate CONFIG."""
        session = self.session
        if session is None or session.backend_channel is None:
            return False
        if not session.protocol_features & _PF.CONFIG.mask:
            return False
        await session.backend_channel.send(encode_message(BackendRequest.BACKEND_CONFIG_CHANGE_MSG))
        return True

    # --- session loop ------------------------------------------------------------------------

    async def serve_forever(self, listener: Listener) -> None:
        """Serve front-ends one after another until cancelled."""
        while True:
            channel = await listener.accept()
            await self.serve(channel)

    async def serve(self, channel: Channel) -> None:
        """Serve one front-end until it disconnects or breaks the protocol; then release all."""
        session = Session(channel, [Vring(i) for i in range(self.backend.num_queues)])
        self.session = session
        log.info("%s connected", channel.peer)
        reason = "disconnected"
        try:
            while True:
                raw = await channel.recv()
                if raw is None:
                    break
                await self._dispatch(session, raw)
        except _Disconnect as err:
            reason = f"dropped: {err}"
        except TransportError as err:
            reason = f"transport error: {err}"
        except Exception as err:  # a bug or resource exhaustion: drop this session, keep serving
            log.exception("%s: unexpected error", channel.peer)
            reason = f"dropped after an unexpected error: {err}"
        finally:
            # Shielded: a cancellation (SIGTERM) arriving mid-teardown must not leak the session.
            await asyncio.shield(self._teardown(session))
            self.session = None
            self.sessions_served += 1
            # A front-end that broke the protocol or the channel is worth a warning.
            level = logging.INFO if reason == "disconnected" else logging.WARNING
            log.log(level, "%s %s; session released", channel.peer, reason)

    async def _teardown(self, session: Session) -> None:
        try:
            for vring in session.vrings:
                try:
                    if vring.runner is not None:
                        with contextlib.suppress(Exception):
                            await self._stop_runner(vring)
                finally:
                    vring.release()
        finally:
            if session.backend_channel is not None:
                session.backend_channel.close()
            session.release_log()
            session.memory = None
            session.channel.close()
            self.backend.reset()

    async def _dispatch(self, session: Session, raw: RawMessage) -> None:
        header = Header(raw.request, raw.flags, len(raw.payload))
        try:
            msg = decode_message(header, raw.payload, raw.fds, channel="frontend")
        except ProtocolError as err:
            raw.close_fds()
            raise _Disconnect(f"malformed message: {err}") from err
        log.debug("<- %s", describe(msg))
        spec = msg.spec
        answer = (
            spec.answer(need_reply=msg.need_reply, protocol_features=session.protocol_features)
            if spec is not None
            else (Answer.ACK if msg.need_reply and session.reply_ack else Answer.NOTHING)
        )
        handler = self._handlers.get(msg.request) if isinstance(msg.request, _F) else None
        try:
            if handler is None:
                raise RequestFailed(f"{msg.name} is not supported by this back-end")
            if (
                spec is not None
                and spec.feature is not None
                and not (session.protocol_features & spec.feature.mask)
            ):
                raise RequestFailed(f"{msg.name} needs protocol feature {spec.feature.name}")
            reply = await handler(msg)
        except (RequestFailed, GuestMemoryError, QueueError, ConfigError, ValueError) as err:
            if answer is Answer.ACK:
                # The text only: a log record kept with the error would pin its frames (memory).
                log.warning("%s failed: %s", msg.name, str(err))
                await session.channel.send(encode_ack(msg.request, ok=False))
                return
            raise _Disconnect(f"{msg.name} failed: {err}") from err
        finally:
            # Whatever keeps an fd (a region, an eventfd, a channel) keeps its own duplicate, so
            # every received fd is closed here, once, success or not.
            close_fds(msg.fds)
        if answer is Answer.REPLY:
            await session.channel.send(encode_reply(msg.request, reply if reply else EMPTY))
        elif answer is Answer.ACK:
            await session.channel.send(encode_ack(msg.request, ok=True))

    # --- helpers -----------------------------------------------------------------------------

    def _session(self) -> Session:
        assert self.session is not None
        return self.session

    def _vring(self, index: int) -> Vring:
        vrings = self._session().vrings
        if not 0 <= index < len(vrings):
            raise RequestFailed(f"vring index {index} out of range (device has {len(vrings)})")
        return vrings[index]

    @staticmethod
    def _one_fd(msg: Message) -> int | None:
        return msg.fds[0] if msg.fds else None

    async def _stop_runner(self, vring: Vring) -> None:
        runner, vring.runner = vring.runner, None
        if runner is None:
            return
        if isinstance(runner, NativeQueueRunner) and runner.fault is not None:
            log.error("queue %d broken: %s", vring.index, runner.fault)
        queue = await runner.stop()
        vring.base = queue.next_avail
        # Let go of the guest memory now: the thread pool may keep the queue object alive in a
        # reference cycle until the next garbage collection.
        queue.detach()
        self.backend.queue_stopped(vring.index)

    async def _update_ring(self, vring: Vring) -> None:
        """Start or stop the ring's runner to match started and enabled and has memory."""
        session = self._session()
        should_run = vring.started and vring.enabled and session.memory is not None
        if should_run and vring.runner is None:
            self._start_runner(vring)
        elif not should_run and vring.runner is not None:
            await self._stop_runner(vring)

    async def _restart_rings(self, change: Callable[[], None]) -> None:
        """Stop the running rings, apply `change` (new memory), start them again."""
        running = [v for v in self._session().vrings if v.runner is not None]
        for vring in running:
            await self._stop_runner(vring)
        try:
            change()
        finally:  # refused (overlap, region in use): the rings go on with the memory they had
            failures = []
            for vring in running:  # every ring gets its chance, even after one failed
                try:
                    await self._update_ring(vring)
                except RequestFailed as err:
                    failures.append(str(err))
            if failures:
                raise RequestFailed("; ".join(failures))

    def _start_runner(self, vring: Vring) -> None:
        session = self._session()
        memory = session.memory
        if vring.size == 0 or vring.addr is None or memory is None:
            raise RequestFailed(f"vring {vring.index} started before its size/addresses/memory")
        addr = vring.addr
        try:
            queue = SplitQueue(
                vring.size,
                memory.uva_to_gpa(addr.desc),
                memory.uva_to_gpa(addr.avail),
                memory.uva_to_gpa(addr.used),
                event_idx=bool(session.features & VirtioFeature.EVENT_IDX.mask),
                indirect=bool(session.features & VirtioFeature.INDIRECT_DESC.mask),
            )
            queue.attach(memory)
        except (GuestMemoryError, QueueError) as err:
            raise RequestFailed(f"vring {vring.index}: {err}") from err
        queue.next_avail = vring.base
        if session.logging:
            # The used ring is logged at the address the front-end gave, only with the flag.
            used_log = addr.log if addr.flags & VRING_F_LOG else None
            queue.set_log(session.dirty_log, used_log)
        native = self.backend.native_worker(vring.index)
        if native is not None:
            vring.runner = NativeQueueRunner(
                QueueWorker(
                    f"vq{vring.index}",
                    queue,
                    native,
                    # NOFD kick: nobody will signal this private eventfd; the worker polls.
                    kick=vring.kick if vring.kick is not None else EventFd(),
                    call=vring.call,
                    err=vring.err,
                    poll_interval=None if vring.kick is not None else POLL_INTERVAL,
                )
            )
        else:
            vring.runner = PythonQueueRunner(
                queue,
                vring.kick,
                vring.call,
                vring.err,
                self.backend.handle,  # type: ignore[arg-type]
                index=vring.index,
                backend=self.backend,
            )
        self.backend.queue_started(vring.index)
        log.debug("vring %d running (size %d, base %d)", vring.index, vring.size, vring.base)

    # --- request handlers --------------------------------------------------------------------
    # Each returns the reply payload for requests that always reply, None otherwise, and raises
    # RequestFailed (or a vvu error) to fail. Handlers duplicate the fds they keep.

    async def _get_features(self, msg: Message) -> Payload:
        return U64(self.offered_features())

    async def _set_features(self, msg: Message) -> None:
        assert isinstance(msg.payload, U64)
        session = self._session()
        features = msg.payload.value
        unknown = features & ~self.offered_features()
        if unknown:
            raise RequestFailed(f"features {unknown:#x} were never offered")
        was_logging = session.logging
        session.features = features
        session.features_set = True
        engine_bits = VhostFeature.PROTOCOL_FEATURES.mask | VhostFeature.LOG_ALL.mask
        self.backend.set_features(features & ~engine_bits)
        if session.logging != was_logging:
            # Migration starts or ends: the running rings pick the log up (or drop it) at a
            # restart, which finishes in-flight requests first and resumes at the same index.
            await self._restart_rings(lambda: None)
        if not features & VhostFeature.PROTOCOL_FEATURES.mask:
            # Without VHOST_USER_F_PROTOCOL_FEATURES rings are enabled from the start.
            for vring in session.vrings:
                vring.enabled = True
                await self._update_ring(vring)

    async def _set_owner(self, msg: Message) -> None:
        self._session().owner = True

    async def _reset_owner(self, msg: Message) -> None:
        # Deprecated: stop the rings, keep the session (the spec forbids dropping state here).
        for vring in self._session().vrings:
            vring.started = False
            await self._update_ring(vring)

    def _map_regions(
        self, memory: GuestMemory, regions: tuple[MemoryRegion, ...], fds: tuple[int, ...]
    ) -> None:
        for region, fd in zip(regions, fds, strict=True):
            memory.add_region(
                fd,
                region.guest_phys_addr,
                region.memory_size,
                userspace_addr=region.userspace_addr,
                mmap_offset=region.mmap_offset,
            )

    async def _set_mem_table(self, msg: Message) -> None:
        assert isinstance(msg.payload, MemoryTable)
        session = self._session()
        memory = GuestMemory()
        regions = list(msg.payload.regions)
        self._map_regions(memory, msg.payload.regions, msg.fds)  # refuses overlaps

        def swap() -> None:
            session.memory = memory
            session.regions = regions

        await self._restart_rings(swap)

    async def _set_log_base(self, msg: Message) -> Payload:
        assert isinstance(msg.payload, Log)
        session = self._session()
        fd = self._one_fd(msg)
        if fd is None:
            raise RequestFailed("SET_LOG_BASE without a log fd (only LOG_SHMFD is supported)")
        dirty_log = DirtyLog(fd, msg.payload.mmap_size, msg.payload.mmap_offset)
        log.info("dirty log mapped: %r", dirty_log)

        def swap() -> None:
            old, session.dirty_log = session.dirty_log, dirty_log
            if old is not None and old.faults:
                log.warning("%d writes could not be logged: %r", old.faults, old)

        if session.features & VhostFeature.LOG_ALL.mask:
            # Logging on (a resize while migrating, or LOG_ALL acked before the first log):
            # the running rings move to the new log.
            await self._restart_rings(swap)
        else:
            swap()
        return msg.payload  # the reply LOG_SHMFD requires (rust-vmm's form: the log echoed)

    async def _set_log_fd(self, msg: Message) -> None:
        session = self._session()
        fd = self._one_fd(msg)
        old, session.log_fd = session.log_fd, None if fd is None else EventFd.from_fd(fd)
        if old is not None:
            old.close()

    async def _get_max_mem_slots(self, msg: Message) -> Payload:
        return U64(MAX_MEM_SLOTS)

    async def _add_mem_reg(self, msg: Message) -> None:
        assert isinstance(msg.payload, SingleRegion)
        session = self._session()
        if len(session.regions) >= MAX_MEM_SLOTS:
            raise RequestFailed(f"all {MAX_MEM_SLOTS} memory slots are in use")
        region = msg.payload.region
        memory = session.memory if session.memory is not None else GuestMemory()

        def add() -> None:
            self._map_regions(memory, (region,), msg.fds)
            session.memory = memory
            session.regions.append(region)

        await self._restart_rings(add)  # rings re-attach to a snapshot that has the region

    async def _rem_mem_reg(self, msg: Message) -> None:
        assert isinstance(msg.payload, SingleRegion)
        session = self._session()  # an fd sent along is tolerated and closed unused
        target = msg.payload.region
        match = next(
            (
                r
                for r in session.regions
                if (r.guest_phys_addr, r.userspace_addr, r.memory_size)
                == (target.guest_phys_addr, target.userspace_addr, target.memory_size)
            ),
            None,
        )
        if match is None or session.memory is None:
            raise RequestFailed(f"no region at gpa {target.guest_phys_addr:#x} to remove")
        memory = session.memory

        def remove() -> None:
            memory.remove_region(match.guest_phys_addr, REGION_RELEASE_TIMEOUT)
            session.regions.remove(match)

        await self._restart_rings(remove)

    async def _set_vring_num(self, msg: Message) -> None:
        assert isinstance(msg.payload, VringState)
        vring = self._vring(msg.payload.index)
        num = msg.payload.num
        if vring.runner is not None:
            raise RequestFailed(f"vring {vring.index} is running; stop it before resizing")
        if not (0 < num <= self.backend.max_queue_size and num & (num - 1) == 0):
            raise RequestFailed(
                f"vring {vring.index} size {num} is not a power of two "
                f"up to {self.backend.max_queue_size}"
            )
        vring.size = num

    async def _set_vring_addr(self, msg: Message) -> None:
        assert isinstance(msg.payload, VringAddr)
        vring = self._vring(msg.payload.index)
        vring.addr = msg.payload
        if vring.runner is not None:  # e.g. the log flag toggled: re-translate
            await self._stop_runner(vring)
        await self._update_ring(vring)  # also starts a ring whose earlier start failed

    async def _set_vring_base(self, msg: Message) -> None:
        assert isinstance(msg.payload, VringState)
        vring = self._vring(msg.payload.index)
        if vring.runner is not None:
            raise RequestFailed(f"vring {vring.index} is running; SET_VRING_BASE needs it stopped")
        if msg.payload.num > 0xFFFF:
            raise RequestFailed(f"split-ring base {msg.payload.num:#x} does not fit 16 bits")
        vring.base = msg.payload.num

    async def _get_vring_base(self, msg: Message) -> Payload:
        assert isinstance(msg.payload, VringState)
        vring = self._vring(msg.payload.index)
        vring.started = False
        await self._stop_runner(vring)  # drains in-flight requests first
        if vring.kick is not None:
            vring.kick.close()
            vring.kick = None
        vring.kick_set = False
        return VringState(vring.index, vring.base)

    def _adopt_eventfd(self, msg: Message) -> EventFd | None:
        assert isinstance(msg.payload, U64)
        fd = self._one_fd(msg)
        return None if fd is None else EventFd.from_fd(fd)

    async def _set_vring_kick(self, msg: Message) -> None:
        assert isinstance(msg.payload, U64)
        vring = self._vring(msg.payload.vring_index)
        if vring.runner is not None:
            await self._stop_runner(vring)
        if vring.kick is not None:
            vring.kick.close()
        vring.kick = self._adopt_eventfd(msg)
        vring.kick_set = True
        vring.started = True  # rings start at SET_VRING_KICK
        await self._update_ring(vring)

    async def _set_vring_call(self, msg: Message) -> None:
        assert isinstance(msg.payload, U64)
        vring = self._vring(msg.payload.vring_index)
        old, vring.call = vring.call, self._adopt_eventfd(msg)
        if vring.runner is not None:
            vring.runner.set_call(vring.call)
        if old is not None:
            old.close()

    async def _set_vring_err(self, msg: Message) -> None:
        assert isinstance(msg.payload, U64)
        vring = self._vring(msg.payload.vring_index)
        old, vring.err = vring.err, self._adopt_eventfd(msg)
        if vring.runner is not None:
            vring.runner.set_err(vring.err)
        if old is not None:
            old.close()

    async def _get_protocol_features(self, msg: Message) -> Payload:
        return U64(self.offered_protocol_features())

    async def _set_protocol_features(self, msg: Message) -> None:
        assert isinstance(msg.payload, U64)
        requested = msg.payload.value
        unknown = requested & ~self.offered_protocol_features()
        if unknown:
            raise RequestFailed(f"protocol features {unknown:#x} were never offered")
        self._session().protocol_features = requested

    async def _get_queue_num(self, msg: Message) -> Payload:
        return U64(self.backend.queue_num())

    async def _net_set_mtu(self, msg: Message) -> None:
        assert isinstance(msg.payload, U64)
        self.backend.net_set_mtu(msg.payload.value)

    async def _send_rarp(self, msg: Message) -> None:
        assert isinstance(msg.payload, U64)
        self.backend.send_rarp(msg.payload.value.to_bytes(8, "little")[:6])

    async def _set_vring_enable(self, msg: Message) -> None:
        assert isinstance(msg.payload, VringState)
        vring = self._vring(msg.payload.index)
        if msg.payload.num not in (0, 1):
            raise RequestFailed(f"SET_VRING_ENABLE num must be 0 or 1, not {msg.payload.num}")
        vring.enabled = msg.payload.num == 1
        await self._update_ring(vring)

    async def _set_backend_req_fd(self, msg: Message) -> None:
        session = self._session()
        if session.backend_channel is not None:
            session.backend_channel.close()
            session.backend_channel = None
        fd = self._one_fd(msg)
        try:
            session.backend_channel = session.channel.open_backend_channel(
                None if fd is None else os.dup(fd)
            )
        except TransportError as err:  # not a socket: refuse the request, keep the session
            raise RequestFailed(str(err)) from err

    async def _get_config(self, msg: Message) -> Payload:
        assert isinstance(msg.payload, Config)
        offset, size = msg.payload.offset, msg.payload.size
        if offset + size > MAX_CONFIG_SPACE:
            raise RequestFailed(f"config read {offset}+{size} beyond {MAX_CONFIG_SPACE} bytes")
        space = self.backend.config_space().ljust(MAX_CONFIG_SPACE, b"\0")
        return Config(offset, msg.payload.flags, space[offset : offset + size])

    async def _set_config(self, msg: Message) -> None:
        assert isinstance(msg.payload, Config)
        self.backend.write_config(msg.payload.offset, msg.payload.data)

    async def _reset_device(self, msg: Message) -> None:
        session = self._session()
        for vring in session.vrings:
            await self._stop_runner(vring)
            vring.release()
        session.vrings = [Vring(i) for i in range(self.backend.num_queues)]
        session.features = 0
        session.features_set = False
        session.status = 0
        session.release_log()
        self.backend.reset()

    async def _set_status(self, msg: Message) -> None:
        assert isinstance(msg.payload, U64)
        if msg.payload.value > 0xFF:
            raise RequestFailed(f"device status {msg.payload.value:#x} is not a byte")
        self._session().status = msg.payload.value

    async def _get_status(self, msg: Message) -> Payload:
        return U64(self._session().status)
