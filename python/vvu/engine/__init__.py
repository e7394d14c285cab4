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
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from vvu._core import (
    DirtyLog,
    EventFd,
    GuestMemory,
    InflightRegion,
    Iotlb,
    PackedQueue,
    QueueWorker,
    SplitQueue,
)
from vvu.aio import read_to_eof, write_all
from vvu.backends.base import Backend, ConfigError
from vvu.backends.request import DeviceQueue, RequestRunner
from vvu.engine.backend_channel import BACKEND_REPLY_TIMEOUT, BackendChannel, InbandSignal
from vvu.engine.common import Disconnect as _Disconnect
from vvu.engine.common import ReplyWithFd, RequestFailed
from vvu.engine.dirty_log import DirtyLogging
from vvu.engine.dirty_log import page_ranges as page_ranges
from vvu.engine.inflight import InflightTracking
from vvu.engine.iotlb import IOTLB_SWITCH_TIMEOUT as IOTLB_SWITCH_TIMEOUT
from vvu.engine.iotlb import IotlbRoom
from vvu.engine.memory import MAX_MEM_SLOTS as MAX_MEM_SLOTS
from vvu.engine.memory import MemoryTable as MemoryTableRoom
from vvu.engine.runners import POLL_INTERVAL as POLL_INTERVAL
from vvu.engine.runners import NativeQueueRunner, PythonQueueRunner, QueueRunner
from vvu.engine.vrings import PACKED_START_BASE as PACKED_START_BASE
from vvu.engine.vrings import QueueCounters, Vring
from vvu.engine.vrings import packed_vring_base as packed_vring_base
from vvu.errors import GuestMemoryError, IotlbMiss, ProtocolError, QueueError
from vvu.memfault import on_memory_fault
from vvu.protocol import (
    DEVICE_STATE_NOFD,
    EMPTY,
    NEED_REPLY,
    U64,
    VERSION,
    VRING_F_LOG,
    BackendRequest,
    Config,
    DeviceStateTransfer,
    DeviceStatus,
    FrontendRequest,
    Inflight,
    IotlbType,
    Log,
    MemoryRegion,
    MemoryTable,
    Message,
    Payload,
    ProtocolFeature,
    RawPayload,
    ShmemConfig,
    SingleRegion,
    TransferDirection,
    TransferPhase,
    VhostFeature,
    VirtioFeature,
    VringAddr,
    VringState,
    decode_message,
    describe,
    encode_ack,
    encode_reply,
)
from vvu.protocol import (
    Iotlb as IotlbMessage,
)
from vvu.protocol.codec import Header
from vvu.protocol.table import REQUESTS, Answer, RequestSpec, spec_for
from vvu.transport.base import Channel, Listener, RawMessage, TransportError, close_fds

log = logging.getLogger(__name__)

__all__ = ["ENGINE_PROTOCOL_FEATURES", "REFUSED", "BackendEngine", "ReplyWithFd", "RequestFailed"]

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
    | _PF.INBAND_NOTIFICATIONS.mask
)
# QEMU asks for the size of its own config struct, which may exceed what a device defines.
MAX_CONFIG_SPACE = 256
# Largest device state accepted from a front-end, and how long CHECK_DEVICE_STATE waits for
# the end of a transfer (the front-end closes its end of the pipe before it asks).
MAX_DEVICE_STATE = 1 << 20
STATE_TRANSFER_TIMEOUT = 5.0
# The error code of a failed state transfer (bits 0-7 of the reply: any non-zero value).
DEVICE_STATE_FAILED = 1


#: Why the engine refuses the requests it has no handler for (docs/protocol-support.md). Each
#: needs a protocol feature the engine never offers, so a front-end that follows the spec never
#: sends them; one that does gets a failure ack, or the failure form of the typed reply
#: (`_failure_reply`), or, where neither exists, is dropped.
REFUSED: Final[dict[FrontendRequest, str]] = {
    _F.SET_VRING_ENDIAN: (
        "rings are little-endian (VERSION_1); legacy cross-endian rings are not supported "
        "(CROSS_ENDIAN is not offered)"
    ),
    _F.CREATE_CRYPTO_SESSION: "no crypto device here (CRYPTO_SESSION is not offered)",
    _F.CLOSE_CRYPTO_SESSION: "no crypto device here (CRYPTO_SESSION is not offered)",
    _F.POSTCOPY_ADVISE: "postcopy migration is not implemented (PAGEFAULT is not offered)",
    _F.POSTCOPY_LISTEN: "postcopy migration is not implemented (PAGEFAULT is not offered)",
    _F.POSTCOPY_END: "postcopy migration is not implemented (PAGEFAULT is not offered)",
    _F.GPU_SET_SOCKET: "not a GPU device",
    _F.GET_SHARED_OBJECT: "no shared objects are exported (SHARED_OBJECT is not offered)",
    _F.GET_SHMEM_CONFIG: "no shared memory regions (SHMEM is not offered)",
    _F.GET_VRING_BASE_SKIP_DRAIN: (
        "rings always drain on GET_VRING_BASE (GET_VRING_BASE_SKIP_DRAIN is not offered)"
    ),
}


def _log_received(msg: Message) -> None:
    if log.isEnabledFor(logging.DEBUG):  # describe() costs more than most requests
        log.debug("<- %s", describe(msg))


def _failure_reply(msg: Message) -> Payload | None:
    """The spec's failure form of a request's typed reply, or None when it has none."""
    fixed: dict[int, Payload] = {
        _F.POSTCOPY_ADVISE: EMPTY,  # without the userfaultfd: failed
        _F.GET_SHARED_OBJECT: EMPTY,  # without the dma-buf fd: not found
        _F.POSTCOPY_END: U64(1),
        _F.GET_SHMEM_CONFIG: ShmemConfig(0),
    }
    payload = msg.payload
    failure = fixed.get(msg.request)
    if msg.request == _F.GET_CONFIG and isinstance(payload, Config):
        # "zero length of payload to indicate an error": the header with size 0 (rust-vmm).
        failure = Config(payload.offset, payload.flags, b"")
    elif msg.request == _F.GET_INFLIGHT_FD and isinstance(payload, Inflight):
        # No buffer to give: QEMU takes mmap_size 0 for that and looks for no fd.
        failure = Inflight(0, 0, payload.num_queues, payload.queue_size)
    elif (
        msg.request == _F.CREATE_CRYPTO_SESSION
        and isinstance(payload, RawPayload)
        and len(payload.data) >= 8
    ):
        # QEMU's reply is the session struct with a negative session id for a failure.
        failure = RawPayload(struct.pack("<q", -1) + payload.data[8:])
    return failure


def _note_transfer_failure(transfer: asyncio.Task[bytes | None]) -> None:
    # Retrieved here so that a transfer nobody CHECKs (the front-end left) is not reported
    # as an unhandled task error; CHECK_DEVICE_STATE reports it to the front-end.
    if not transfer.cancelled() and transfer.exception() is not None:
        log.info("device state transfer failed: %s", transfer.exception())


#: The feature bits the engine handles itself (not the back-end's to see).
_ENGINE_FEATURES = VhostFeature.PROTOCOL_FEATURES.mask | VhostFeature.LOG_ALL.mask

#: SET_CONFIG's flags (vhost-user.rst, "Virtio device config space"): a driver's write of
#: writable fields, or the source's config space restored on a migration's destination.
SET_CONFIG_TYPE_FRONTEND = 0
SET_CONFIG_TYPE_MIGRATION = 1


@dataclass
class Session:
    """Everything one front-end connection set up; released as a whole on disconnect."""

    channel: Channel
    vrings: list[Vring]
    # INFLIGHT_SHMFD: the region the rings track their requests in (GET or SET_INFLIGHT_FD).
    inflight_tracking: InflightTracking
    features: int = 0
    features_set: bool = False
    protocol_features: int = 0
    owner: bool = False
    status: int = 0
    # SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG: the guest memory and its regions.
    memory_table: MemoryTableRoom = field(default_factory=MemoryTableRoom)
    # LOG_ALL: the dirty log and SET_LOG_FD's eventfd.
    dirty_logging: DirtyLogging = field(default_factory=DirtyLogging)

    @property
    def logging(self) -> bool:
        """Dirty logging is on: VHOST_F_LOG_ALL acked and a log mapped."""
        return self.dirty_logging.on(self.features)

    @property
    def dirty_log(self) -> DirtyLog | None:
        return self.dirty_logging.log

    @property
    def log_fd(self) -> EventFd | None:
        return self.dirty_logging.fd

    # Serialises front-end requests with back-end initiated changes of the session.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # DEVICE_STATE: the transfer SET_DEVICE_STATE_FD started (its result: the loaded bytes, or
    # None for a save), until CHECK_DEVICE_STATE collects it.
    state_transfer: asyncio.Task[bytes | None] | None = None
    # INFLIGHT_SHMFD: the region the rings track their requests in (GET or SET_INFLIGHT_FD).
    fault: str | None = None  # why the session's memory went away (a SIGBUS caught in it)
    # VIRTIO_F_ACCESS_PLATFORM negotiated: ring and buffer addresses are IOVAs translated here.
    iommu: IotlbRoom = field(default_factory=IotlbRoom)
    # BACKEND_REQ: the back-end channel, and whether the device is suspended.
    backchannel: BackendChannel = field(default_factory=BackendChannel)
    # A ring broke (its runner stopped on a bad chain or handler): DEVICE_NEEDS_RESET in
    # GET_STATUS until the driver resets the device (SET_STATUS 0 or RESET_DEVICE).
    needs_reset: bool = False
    # The (features, protocol features) offered to this front-end: taken once per session
    # (`BackendEngine._offered`), as features are negotiated once per session.
    offered: tuple[int, int] | None = None

    @property
    def backend_channel(self) -> Channel | None:
        """The back-end channel the front-end gave (SET_BACKEND_REQ_FD), if any."""
        return self.backchannel.channel

    @property
    def iotlb(self) -> Iotlb | None:
        """The IOTLB while VIRTIO_F_ACCESS_PLATFORM is negotiated."""
        return self.iommu.table

    @property
    def inflight(self) -> InflightRegion | None:
        """The inflight region, once the front-end gave or asked for one."""
        return self.inflight_tracking.region

    @property
    def memory(self) -> GuestMemory | None:
        """The guest memory the rings attach to, once the front-end shared some."""
        return self.memory_table.memory

    @property
    def regions(self) -> list[MemoryRegion]:
        return self.memory_table.regions

    @property
    def suspended(self) -> bool:
        return not any(vring.started for vring in self.vrings)

    @property
    def reply_ack(self) -> bool:
        # Protocol features exist only because VHOST_USER_F_PROTOCOL_FEATURES was offered, so the
        # protocol bit alone decides, from SET_PROTOCOL_FEATURES on (QEMU and cloud-hypervisor
        # may ask for an ack of the very SET_FEATURES that acks bit 30).
        return bool(self.protocol_features & _PF.REPLY_ACK.mask)


Handler = Callable[[Message], Awaitable[Payload | ReplyWithFd | None]]
#: `BackendEngine._routes` of an id the table does not know.
_NO_ROUTE: Final[tuple[None, None]] = (None, None)


class BackendEngine:
    """Serves one Backend to front-ends, one session at a time."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.session: Session | None = None
        self.sessions_served = 0
        #: Why the last session ended ("disconnected", "dropped: ..."), for a daemon's events.
        self.last_session_end: str | None = None
        # The runners' counters over every session (`queue_stats`).
        self._counters = QueueCounters()
        # The last session's inflight region (num_queues, queue_size, packed), if it had one.
        self._inflight_geometry: tuple[int, int, bool] | None = None
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
            _F.VRING_KICK: self._vring_kick,
            _F.SET_DEVICE_STATE_FD: self._set_device_state_fd,
            _F.CHECK_DEVICE_STATE: self._check_device_state,
            _F.GET_INFLIGHT_FD: self._get_inflight_fd,
            _F.SET_INFLIGHT_FD: self._set_inflight_fd,
            _F.IOTLB_MSG: self._iotlb_msg,
        }
        # Every request id the table knows: its handler (None: refused) and its row.
        self._routes: dict[int, tuple[Handler | None, RequestSpec[Any] | None]] = {
            request: (self._handlers.get(request), spec) for request, spec in REQUESTS.items()
        }

    # --- offered features --------------------------------------------------------------------

    def offered_features(self) -> int:
        iommu = VirtioFeature.ACCESS_PLATFORM.mask if self.backend.supports_iommu else 0
        # Every back-end writes guest memory only through its queues' pushed chains, which the
        # queues log themselves: dirty logging works for all of them.
        return (
            self.backend.features()
            | iommu
            | VhostFeature.PROTOCOL_FEATURES.mask
            | VhostFeature.LOG_ALL.mask
        )

    def offered_protocol_features(self) -> int:
        return ENGINE_PROTOCOL_FEATURES | self.backend.protocol_features()

    def _offered(self, session: Session) -> tuple[int, int]:
        """The session's offer (features, protocol features), computed on first use."""
        if session.offered is None:
            session.offered = (self.offered_features(), self.offered_protocol_features())
        return session.offered

    # --- back-end channel --------------------------------------------------------------------
    # Back-end requests are sent from outside the handling of a front-end request: QEMU does not
    # read the back-end channel while it waits for one of our replies, so waiting for its ack
    # from inside a handler could deadlock.

    async def backend_request(
        self,
        request: BackendRequest,
        payload: Payload = EMPTY,
        fds: Sequence[int] = (),
        *,
        need_reply: bool = True,
        timeout: float = BACKEND_REPLY_TIMEOUT,
    ) -> Payload | None:
        """Send one back-end request to the current front-end and wait for its answer when
        one is due: its typed reply for requests that always reply, a REPLY_ACK ack when
        `need_reply` and REPLY_ACK is negotiated. Returns the reply (the ack's U64 on success),
        or None when nothing was waited for. `fds` are sent along, not closed.

        Raises RequestFailed when there is no back-end channel, the request's protocol feature
        was not negotiated, the front-end refused it (failure ack), or no answer came within
        `timeout` seconds (the channel is then dropped: a late answer could be taken for the
        answer to a later request).
        """
        session = self.session
        if session is None:
            raise RequestFailed(f"{request.name}: the front-end gave no back-end channel")
        return await session.backchannel.request(
            request,
            payload,
            fds,
            protocol_features=session.protocol_features,
            need_reply=need_reply,
            timeout=timeout,
        )

    async def notify_config_change(self) -> bool:
        """Tell the front-end the config space changed (BACKEND_CONFIG_CHANGE_MSG), so it
        re-reads it with GET_CONFIG (e.g. a resized disk); with REPLY_ACK, wait for its ack.
        Returns False when the session has no back-end channel or did not negotiate CONFIG,
        and when the device is suspended (no ring started): the message is then sent (once,
        however many changes came meanwhile) when a ring starts. Raises RequestFailed when the
        front-end refused it or did not answer."""
        session = self.session
        if session is None or session.backend_channel is None:
            return False
        if not session.protocol_features & _PF.CONFIG.mask:
            return False
        if session.suspended:
            session.backchannel.note_config_change()
            return False
        await self.backend_request(BackendRequest.BACKEND_CONFIG_CHANGE_MSG)
        return True

    def _note_ring_states(self, session: Session) -> None:
        """Track whether the device is suspended (after any ring started or stopped); on
        resuming, announce a config change noted meanwhile."""
        if session.suspended:
            session.backchannel.suspend()
        elif session.backchannel.resume():
            session.backchannel.spawn(self._announce_config_change())

    async def _announce_config_change(self) -> None:
        try:
            await self.notify_config_change()
        except RequestFailed as err:
            log.warning("config change not announced: %s", err)

    async def config_changed(self) -> bool:
        """The back-end's config space changed on its own (a resized disk): restart the running
        rings, so that native workers start over with the new configuration, then tell the
        front-end (`notify_config_change`). Call it from outside request handling (a signal
        handler, a task); returns whether the front-end was told."""
        session = self.session
        if session is None:
            return False
        async with session.lock:  # not in the middle of a front-end request
            if self.session is not session:
                return False
            await self._restart_rings(lambda: None)
        return await self.notify_config_change()

    def queue_stats(self) -> list[dict[str, int]]:
        """Per queue, the runner counters since the engine was made (every session, every
        start of the ring): chains, batches, kicks, and for native workers notifications,
        wakeups, call_errors, iotlb_misses. Read from the runners' own counters, nothing is
        counted per request here."""
        running: dict[int, QueueRunner] = {}
        if self.session is not None:
            running = {v.index: v.runner for v in self.session.vrings if v.runner is not None}
        return self._counters.snapshot(self.backend.num_queues, running)

    def queue_faults(self) -> dict[int, str]:
        """Queues of the current session that stopped processing on their own, and why."""
        if self.session is None:
            return {}
        return {
            v.index: v.runner.fault
            for v in self.session.vrings
            if v.runner is not None and v.runner.fault is not None
        }

    async def restart_rings(self) -> None:
        """Restart the running rings, so native workers take the back-end's current
        configuration (a daemon's set-read-only); from outside request handling."""
        session = self.session
        if session is None:
            return
        async with session.lock:
            if self.session is session:
                await self._restart_rings(lambda: None)

    async def reload(self) -> bool:
        """`Backend.reload()` (re-read outside state: blk takes its image's size) and, if the
        config space changed, `config_changed()`. What `vvu serve` does on SIGHUP; returns
        whether the front-end was told."""
        if not self.backend.reload():
            return False
        return await self.config_changed()

    def _request_translation(self, iova: int, perm: int) -> None:
        """A worker missed the translation of `iova`: ask the front-end for it."""
        session = self.session
        backchannel = None if session is None else session.backchannel
        IotlbRoom.ask(iova, perm, backchannel, self._send_quietly)

    async def _send_quietly(self, request: BackendRequest, payload: Payload) -> None:
        """`backend_request` without waiting for an ack, failures logged (for tasks)."""
        try:
            await self.backend_request(request, payload, need_reply=False)
        except RequestFailed as err:
            log.warning("%s not sent: %s", request.name, err)

    # --- session loop ------------------------------------------------------------------------

    async def serve_forever(self, listener: Listener) -> None:
        """Serve front-ends one after another until cancelled."""
        while True:
            channel = await listener.accept()
            await self.serve(channel)

    async def serve(self, channel: Channel) -> None:
        """Serve one front-end until it disconnects or breaks the protocol; then release all."""
        session = Session(
            channel,
            [Vring(i) for i in range(self.backend.num_queues)],
            InflightTracking(self.backend),
        )
        self.session = session
        log.info("%s connected", channel.peer)
        # While the front-end sets up its side, before its first request needs us.
        asyncio.get_running_loop().call_soon(self._prepare_session, session)
        reason = "disconnected"
        serving = asyncio.current_task()
        unsubscribe = on_memory_fault(lambda: self._on_memory_fault(session, serving))
        try:
            await channel.serve_each(lambda raw: self._dispatch(session, raw))
        except _Disconnect as err:
            reason = f"dropped: {err}"
        except TransportError as err:
            reason = f"transport error: {err}"
        except asyncio.CancelledError:
            if session.fault is None or serving is None:
                raise
            serving.uncancel()  # our own cancellation (below): drop the session, keep serving
            reason = f"dropped: {session.fault}"
        except Exception as err:  # a bug or resource exhaustion: drop this session, keep serving
            log.exception("%s: unexpected error", channel.peer)
            reason = f"dropped after an unexpected error: {err}"
        finally:
            unsubscribe()
            # Shielded: a cancellation (SIGTERM) arriving mid-teardown must not leak the session.
            await asyncio.shield(self._teardown(session))
            self.session = None
            self.sessions_served += 1
            self.last_session_end = reason
            # A front-end that broke the protocol or the channel is worth a warning.
            level = logging.INFO if reason == "disconnected" else logging.WARNING
            log.log(level, "%s %s; session released", channel.peer, reason)

    def _prepare_session(self, session: Session) -> None:
        """Make ahead, while the front-end sets up its side, what this session would make
        while the front-end waits: the first queue's native handler (the others' when they
        get their kick: `_update_ring`), and an inflight region of the geometry the last
        front-end had (a reconnect asks for the same). What is not used goes with the
        session (`_release`)."""
        if self.session is not session:
            return
        if self.backend.num_queues:
            self._prepare_worker(0)
        geometry = self._inflight_geometry
        if geometry is not None and self._offered(session)[1] & _PF.INFLIGHT_SHMFD.mask:
            num_queues, queue_size, packed = geometry
            session.inflight_tracking.spare = InflightTracking.allocate_spare(
                num_queues, queue_size, packed=packed
            )

    @staticmethod
    def _on_memory_fault(session: Session, serving: asyncio.Task[object] | None) -> None:
        """A SIGBUS was caught in some guest memory of this process: if it is this session's,
        drop the session (cancelling the task in `serve`, which logs the reason and tears down)."""
        if session.fault is not None or serving is None:
            return
        mappings = (
            ("guest memory", session.memory),
            ("inflight region", session.inflight),
            ("dirty log", session.dirty_logging.log),
        )
        for name, mapping in mappings:
            if mapping is not None and mapping.poisoned:
                session.fault = f"the front-end shrank the file of its {name} under our mapping"
                serving.cancel()
                return

    async def _teardown(self, session: Session) -> None:
        # Under the session's lock: a ring restart from outside request handling (a daemon's
        # set-read-only, a resize) finishes first, instead of racing the teardown for the rings.
        async with session.lock:
            await self._release(session)

    async def _release(self, session: Session) -> None:
        try:
            for vring in session.vrings:
                try:
                    if vring.runner is not None:
                        with contextlib.suppress(Exception):
                            await self._stop_runner(vring, hand_back=False)
                finally:
                    vring.release()
        finally:
            if session.state_transfer is not None:
                session.state_transfer.cancel()  # closes its fd
            session.backchannel.close()  # back-end requests waiting for a ring fail
            session.dirty_logging.release()
            session.memory_table.release()
            # The region belongs to the front-end, which hands it back after a reconnect.
            self._inflight_geometry = session.inflight_tracking.geometry() or (
                self._inflight_geometry
            )
            session.inflight_tracking.forget()
            self.backend.discard_prepared()  # made ahead for this session, unused
            session.iommu.reset()
            session.channel.close()
            self.backend.reset()

    async def _dispatch(self, session: Session, raw: RawMessage) -> None:
        header = Header(raw.request, raw.flags, len(raw.payload))
        try:
            msg = decode_message(header, raw.payload, raw.fds, channel="frontend")
        except ProtocolError as err:
            raw.close_fds()
            if self._acks_requested(session, header):
                # REPLY_ACK: "the back-end MUST respond with ... non-zero otherwise".
                await session.channel.send(encode_ack(header.request, ok=False))
            raise _Disconnect(f"malformed message: {err}") from err
        _log_received(msg)
        # One lookup: the handler (None: refused) and the request's row (None: unknown id).
        handler, spec = self._routes.get(msg.request, _NO_ROUTE)
        need_reply = bool(raw.flags & NEED_REPLY)
        answer = (
            spec.answer(need_reply=need_reply, protocol_features=session.protocol_features)
            if spec is not None
            else (Answer.ACK if need_reply and session.reply_ack else Answer.NOTHING)
        )
        try:
            if handler is None or (
                spec is not None
                and spec.feature is not None
                and not session.protocol_features & spec.feature.mask
            ):
                raise RequestFailed(self._refusal(msg, spec, handled=handler is not None))
            async with session.lock:  # against back-end initiated changes (config_changed)
                reply = await handler(msg)
        except _Disconnect:
            if answer is Answer.ACK:  # asked for an ack: it MUST get one, even before a drop
                await session.channel.send(encode_ack(msg.request, ok=False))
            raise
        except (RequestFailed, GuestMemoryError, QueueError, ConfigError, ValueError) as err:
            if answer is Answer.ACK:
                # The text only: a log record kept with the error would pin its frames (memory).
                log.warning("%s failed: %s", msg.name, str(err))
                await session.channel.send(encode_ack(msg.request, ok=False))
                return
            failure = _failure_reply(msg) if answer is Answer.REPLY else None
            if failure is not None:
                log.warning("%s failed: %s", msg.name, str(err))
                await session.channel.send(encode_reply(msg.request, failure))
                return
            raise _Disconnect(f"{msg.name} failed: {err}") from err
        finally:
            # Whatever keeps an fd (a region, an eventfd, a channel) keeps its own duplicate, so
            # every received fd is closed here, once, success or not.
            close_fds(msg.fds)
        if isinstance(reply, ReplyWithFd):
            await session.channel.send(encode_reply(msg.request, reply.payload, nfds=1), [reply.fd])
        elif answer is Answer.REPLY:
            await session.channel.send(encode_reply(msg.request, reply if reply else EMPTY))
        elif answer is Answer.ACK:
            await session.channel.send(encode_ack(msg.request, ok=True))

    # --- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _refusal(msg: Message, spec: RequestSpec[Any] | None, *, handled: bool) -> str:
        """Why a request is refused: no handler, or its protocol feature not negotiated."""
        if handled and spec is not None and spec.feature is not None:
            return f"{msg.name} needs protocol feature {spec.feature.name}"
        why = REFUSED.get(msg.request, "") if isinstance(msg.request, _F) else ""
        return f"{msg.name} is not supported by this back-end" + (f": {why}" if why else "")

    @staticmethod
    def _acks_requested(session: Session, header: Header) -> bool:
        """Whether a request the engine could not decode still asked, in a well-formed header,
        for a REPLY_ACK ack (not for a typed reply, whose failure form needs the payload)."""
        spec = spec_for(header.request, "frontend")
        if header.flags != VERSION | NEED_REPLY or spec is None:
            return False
        answer = spec.answer(need_reply=True, protocol_features=session.protocol_features)
        return answer is Answer.ACK

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

    async def _stop_runner(self, vring: Vring, *, hand_back: bool = True) -> None:
        """Stop the ring's runner and keep where it stopped. Requests a back-end still holds
        go back to the driver (`hand_back`: the ring goes on later) or are only released (the
        front-end left, or the device resets)."""
        runner, vring.runner = vring.runner, None
        if runner is None:
            return
        if runner.fault is not None:
            self._session().needs_reset = True
            if isinstance(runner, NativeQueueRunner):  # (the Python runners logged it already)
                log.error("queue %d broken: %s", vring.index, runner.fault)
        if isinstance(runner, RequestRunner):
            queue = await runner.stop(hand_back=hand_back)
        else:
            queue = await runner.stop()
        self._counters.retire(vring.index, runner)
        vring.base = queue.vring_base
        # Everything the ring wrote is done: a write it could not log is reported now, while
        # a migration is still under way (GET_VRING_BASE stops the rings before the last sync).
        self._session().dirty_logging.report_faults()
        # Let go of the guest memory now: the thread pool may keep the queue object alive in a
        # reference cycle until the next garbage collection.
        queue.detach()
        if not vring.runner_disabled:
            self.backend.queue_stopped(vring.index)

    async def _update_ring(self, vring: Vring) -> None:
        """Start or stop the ring's runner to match started, enabled and has memory. A started
        but disabled ring runs the back-end's `disabled_worker`, if it has one."""
        session = self._session()
        self._note_ring_states(session)
        should_run = vring.started and session.memory is not None
        if vring.runner is not None and (not should_run or vring.runner_disabled == vring.enabled):
            await self._stop_runner(vring)  # stopped, or enabled or disabled since it started
        if should_run and vring.runner is None:
            self._start_runner(vring)
            if vring.runner is None and not vring.enabled:  # will run once enabled
                # After this request's reply, while the front-end makes its next one.
                asyncio.get_running_loop().call_soon(self._prepare_runner, session, vring)

    def _prepare_runner(self, session: Session, vring: Vring) -> None:
        if self.session is session and vring.runner is None and vring.started:
            self._prepare_worker(vring.index)

    def _prepare_worker(self, index: int) -> None:
        try:
            self.backend.prepare_native_worker(index)
        except Exception as err:  # made when the ring starts then, failing there if it must
            log.debug("queue %d: worker not made ahead: %s", index, err)

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

    def _attached_queue(self, vring: Vring) -> DeviceQueue | None:
        """The device side of `vring` in the negotiated format, attached at its base; None when
        an IOTLB translation of a ring is missing (it was asked for, and the UPDATE that answers
        starts the ring)."""
        session = self._session()
        memory = session.memory
        if vring.size == 0 or vring.addr is None or memory is None:
            raise RequestFailed(f"vring {vring.index} started before its size/addresses/memory")
        addr = vring.addr
        packed = bool(session.features & VirtioFeature.RING_PACKED.mask)
        try:
            if session.iotlb is not None:
                # Ring addresses are IOVAs, translated like every buffer address.
                memory = session.iotlb.view(memory)
                rings = (addr.desc, addr.avail, addr.used)
            else:
                to_gpa = memory.uva_to_gpa
                rings = (to_gpa(addr.desc), to_gpa(addr.avail), to_gpa(addr.used))
            # For a packed ring, SET_VRING_ADDR's desc/avail/used are the descriptor ring and
            # the driver and device event suppression areas.
            queue: DeviceQueue = (PackedQueue if packed else SplitQueue)(
                vring.size,
                *rings,
                event_idx=bool(session.features & VirtioFeature.EVENT_IDX.mask),
                indirect=bool(session.features & VirtioFeature.INDIRECT_DESC.mask),
            )
            queue.attach(memory)
            if packed:
                base = PACKED_START_BASE if vring.base is None else packed_vring_base(vring.base)
            else:
                base = vring.base or 0
            queue.vring_base = base
        except IotlbMiss as miss:
            self._request_translation(miss.iova, miss.perm)
            return None
        except (GuestMemoryError, QueueError) as err:
            raise RequestFailed(f"vring {vring.index}: {err}") from err
        if session.logging:
            # Before any pop (a packed queue records each chain's buffers when it pops it).
            # The used ring (split) or device event area (packed: QEMU gives its address) is
            # logged at the address the front-end gave, only with the flag.
            used_log = addr.log if addr.flags & VRING_F_LOG else None
            queue.set_log(session.dirty_logging.log, used_log)
            # Where the ring writes, for telling a stale page after a migration (tests).
            log.info(
                "vring %d logging: descriptors at %#x, %s at %#x, used-ring log %s",
                vring.index,
                rings[0],
                "device event area" if packed else "used ring",
                rings[2],
                "off" if used_log is None else f"at {used_log:#x}",
            )
        session.inflight_tracking.track(queue, vring.index)
        return queue

    def _start_runner(self, vring: Vring) -> None:
        disabled = self.backend.disabled_worker(vring.index) if not vring.enabled else None
        if not vring.enabled and disabled is None:
            return  # left alone until enabled
        queue = self._attached_queue(vring)
        if queue is None:
            return
        iotlb = self._session().iotlb
        # Read before a worker takes the queue over.
        packed, base = isinstance(queue, PackedQueue), queue.vring_base
        vring.runner_disabled = not vring.enabled
        native = disabled if not vring.enabled else self.backend.native_worker(vring.index)
        if iotlb is not None and native is None:
            raise RequestFailed(f"vring {vring.index}: IOTLB translation needs a native worker")
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
                    busy_poll=self.backend.busy_poll,
                ),
                on_miss=self._request_translation if iotlb is not None else None,
            )
        elif self.backend.asynchronous():
            vring.runner = RequestRunner(
                queue,
                vring.kick,
                vring.call,
                vring.err,
                self.backend.run_queue,
                index=vring.index,
                inflight=self._session().inflight is not None,
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
        if vring.runner_disabled:
            log.debug("vring %d started but disabled: discarding what it is given", vring.index)
            return
        self.backend.queue_started(vring.index)
        if vring.call is not None:
            # A back-end killed between publishing a used entry and signalling left the driver
            # waiting for an interrupt; a spurious one costs nothing (libvhost-user does this).
            vring.call.signal()
        log.debug(
            "vring %d running (%s, size %d, base %#x)",
            vring.index,
            "packed" if packed else "split",
            vring.size,
            base,
        )

    # --- request handlers --------------------------------------------------------------------
    # Each returns the reply payload for requests that always reply, None otherwise, and raises
    # RequestFailed (or a vvu error) to fail. Handlers duplicate the fds they keep.

    async def _get_features(self, msg: Message) -> Payload:
        return U64(self._offered(self._session())[0])

    async def _set_features(self, msg: Message) -> None:
        assert isinstance(msg.payload, U64)
        session = self._session()
        features = msg.payload.value
        unknown = features & ~self._offered(session)[0]
        if unknown:
            raise RequestFailed(f"features {unknown:#x} were never offered")
        iommu = bool(features & VirtioFeature.ACCESS_PLATFORM.mask)
        if iommu and features & VhostFeature.LOG_ALL.mask:
            # Dirty logging is by guest address; under an IOMMU the writes are by IOVA.
            raise RequestFailed("dirty logging (LOG_ALL) together with an IOMMU is not supported")
        if iommu and not session.protocol_features & _PF.BACKEND_REQ.mask:
            # Translations arrive only as answers to misses sent on the back-end channel.
            raise RequestFailed("VIRTIO_F_ACCESS_PLATFORM needs protocol feature BACKEND_REQ")
        was_logging = session.logging
        session.features = features
        session.features_set = True
        session.iommu.negotiate(iommu)
        self.backend.set_features(features & ~_ENGINE_FEATURES)
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

    async def _set_mem_table(self, msg: Message) -> None:
        assert isinstance(msg.payload, MemoryTable)
        table = self._session().memory_table
        await self._restart_rings(table.replacing(msg.payload.regions, msg.fds))

    async def _set_log_base(self, msg: Message) -> Payload:
        assert isinstance(msg.payload, Log)
        session = self._session()
        fd = self._one_fd(msg)
        if fd is None:
            raise RequestFailed("SET_LOG_BASE without a log fd (only LOG_SHMFD is supported)")
        dirty_log = DirtyLogging.map(fd, msg.payload.mmap_size, msg.payload.mmap_offset)

        def swap() -> None:
            session.dirty_logging.replace(dirty_log)

        if session.features & VhostFeature.LOG_ALL.mask:
            # Logging on (a resize while migrating, or LOG_ALL acked before the first log):
            # the running rings move to the new log.
            await self._restart_rings(swap)
        else:
            swap()
        return msg.payload  # the reply LOG_SHMFD requires (rust-vmm's form: the log echoed)

    async def _set_log_fd(self, msg: Message) -> None:
        self._session().dirty_logging.set_fd(self._one_fd(msg))

    async def _get_max_mem_slots(self, msg: Message) -> Payload:
        return U64(MAX_MEM_SLOTS)

    async def _add_mem_reg(self, msg: Message) -> None:
        assert isinstance(msg.payload, SingleRegion)
        table = self._session().memory_table
        # The rings re-attach to a snapshot that has the region.
        await self._restart_rings(table.adding(msg.payload.region, msg.fds))

    async def _rem_mem_reg(self, msg: Message) -> None:
        assert isinstance(msg.payload, SingleRegion)
        # An fd sent along is tolerated and closed unused.
        table = self._session().memory_table
        await self._restart_rings(table.removing(msg.payload.region))

    async def _set_vring_num(self, msg: Message) -> None:
        assert isinstance(msg.payload, VringState)
        vring = self._vring(msg.payload.index)
        num = msg.payload.num
        if vring.runner is not None:
            raise RequestFailed(f"vring {vring.index} is running; stop it before resizing")
        packed = bool(self._session().features & VirtioFeature.RING_PACKED.mask)
        if not 0 < num <= self.backend.max_queue_size:
            raise RequestFailed(
                f"vring {vring.index} size {num} is not in 1..{self.backend.max_queue_size}"
            )
        if not packed and num & (num - 1):  # a packed ring may have any size
            raise RequestFailed(f"vring {vring.index} size {num} is not a power of two")
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
        packed = bool(self._session().features & VirtioFeature.RING_PACKED.mask)
        if not packed and msg.payload.num > 0xFFFF:
            raise RequestFailed(f"split-ring base {msg.payload.num:#x} does not fit 16 bits")
        vring.base = msg.payload.num

    async def _stop_ring(self, vring: Vring) -> None:
        """Stopped: the runner finishes its in-flight requests and records where the ring
        stopped (`vring.base`); the kick fd goes (SET_VRING_KICK starts the ring again)."""
        vring.started = False
        ran = vring.runner is not None
        await self._stop_runner(vring)  # drains in-flight requests first
        if vring.kick is not None:
            vring.kick.close()
            vring.kick = None
        vring.kick_set = False
        session = self._session()
        self._note_ring_states(session)
        if ran and session.logging:
            session.dirty_logging.note_ring_stopped(vring.index)

    async def _get_vring_base(self, msg: Message) -> Payload:
        assert isinstance(msg.payload, VringState)
        vring = self._vring(msg.payload.index)
        await self._stop_ring(vring)
        if vring.base is None:  # never ran and never set: report the fresh position
            packed = bool(self._session().features & VirtioFeature.RING_PACKED.mask)
            return VringState(vring.index, PACKED_START_BASE if packed else 0)
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
        if vring.kick is None and self._inband():
            vring.kick = EventFd()  # signalled by VRING_KICK messages, so nothing polls
        vring.kick_set = True
        vring.started = True  # rings start at SET_VRING_KICK
        await self._update_ring(vring)

    async def _set_vring_call(self, msg: Message) -> None:
        assert isinstance(msg.payload, U64)
        vring = self._vring(msg.payload.vring_index)
        old, old_signal = vring.call, vring.inband_call
        vring.call, vring.inband_call = self._call_or_inband(
            msg, BackendRequest.BACKEND_VRING_CALL, vring.index
        )
        if vring.runner is not None:
            vring.runner.set_call(vring.call)
        if old_signal is not None:
            old_signal.close()
        elif old is not None:
            old.close()

    async def _set_vring_err(self, msg: Message) -> None:
        assert isinstance(msg.payload, U64)
        vring = self._vring(msg.payload.vring_index)
        old, old_signal = vring.err, vring.inband_err
        vring.err, vring.inband_err = self._call_or_inband(
            msg, BackendRequest.BACKEND_VRING_ERR, vring.index
        )
        if vring.runner is not None:
            vring.runner.set_err(vring.err)
        if old_signal is not None:
            old_signal.close()
        elif old is not None:
            old.close()

    # --- in-band notifications (INBAND_NOTIFICATIONS) -----------------------------------------
    # A front-end that negotiated it and gives no kick/call/err fd (NOFD) kicks with VRING_KICK
    # messages and gets BACKEND_VRING_CALL/ERR messages. The runners do not know: they get
    # engine-owned eventfds, which VRING_KICK signals and InbandSignal turns into messages.

    def _inband(self) -> bool:
        return bool(self._session().protocol_features & _PF.INBAND_NOTIFICATIONS.mask)

    def _call_or_inband(
        self, msg: Message, request: BackendRequest, index: int
    ) -> tuple[EventFd | None, InbandSignal | None]:
        """The eventfd a SET_VRING_CALL/ERR gives, or for NOFD with in-band notifications one
        whose signals become `request` messages."""
        efd = self._adopt_eventfd(msg)
        if efd is not None or not self._inband():
            return efd, None
        signal = InbandSignal(self.backend_request, request, index, EventFd())
        return signal.efd, signal

    async def _vring_kick(self, msg: Message) -> None:
        assert isinstance(msg.payload, VringState)
        vring = self._vring(msg.payload.index)
        if vring.kick is None:  # no SET_VRING_KICK yet: the in-band kick starts the ring
            vring.kick = EventFd()
            vring.kick_set = vring.started = True
            await self._update_ring(vring)
        vring.kick.signal()

    async def _get_protocol_features(self, msg: Message) -> Payload:
        return U64(self._offered(self._session())[1])

    async def _set_protocol_features(self, msg: Message) -> None:
        assert isinstance(msg.payload, U64)
        requested = msg.payload.value
        unknown = requested & ~self._offered(self._session())[1]
        if unknown:
            raise RequestFailed(f"protocol features {unknown:#x} were never offered")
        inband_needs = _PF.REPLY_ACK.mask | _PF.BACKEND_REQ.mask
        if requested & _PF.INBAND_NOTIFICATIONS.mask and requested & inband_needs != inband_needs:
            # vhost-user.rst: "the back-end should close the connection as a response".
            raise _Disconnect("INBAND_NOTIFICATIONS needs REPLY_ACK and BACKEND_REQ too")
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
        session.backchannel.replace(None)
        fd = self._one_fd(msg)
        try:
            session.backchannel.channel = session.channel.open_backend_channel(
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
        offset, data, flags = msg.payload.offset, msg.payload.data, msg.payload.flags
        if flags == SET_CONFIG_TYPE_FRONTEND:
            self.backend.write_config(offset, data)
        elif flags == SET_CONFIG_TYPE_MIGRATION:
            self._restore_config(offset, data)
        else:
            raise RequestFailed(f"SET_CONFIG flags {flags:#x} are neither front-end nor migration")
        # A written field may change how the queues run (blk's cache mode): native workers
        # take their configuration when they start.
        await self._restart_rings(lambda: None)

    def _restore_config(self, offset: int, data: bytes) -> None:
        """A migration's SET_CONFIG: the source's config space. Bytes equal to ours are taken
        as they are (read-only fields of the same device); each run of differing bytes is a
        driver write, refused where the field is not writable; a refusal undoes the runs
        written before it (they were writable, so writing back our bytes succeeds)."""
        if offset + len(data) > MAX_CONFIG_SPACE:
            raise RequestFailed(
                f"config write {offset}+{len(data)} beyond {MAX_CONFIG_SPACE} bytes"
            )
        ours = self.backend.config_space().ljust(MAX_CONFIG_SPACE, b"\0")[offset:]
        runs: list[tuple[int, int]] = []
        for i, byte in enumerate(data):
            if byte == ours[i]:
                continue
            if runs and runs[-1][1] == i:
                runs[-1] = (runs[-1][0], i + 1)
            else:
                runs.append((i, i + 1))
        done: list[tuple[int, int]] = []
        try:
            for start, end in runs:
                self.backend.write_config(offset + start, data[start:end])
                done.append((start, end))
        except ConfigError:
            for start, end in reversed(done):
                self.backend.write_config(offset + start, ours[start:end])
            raise

    async def _reset_device(self, msg: Message) -> None:
        session = self._session()
        for vring in session.vrings:
            await self._stop_runner(vring, hand_back=False)
            vring.release()
        session.vrings = [Vring(i) for i in range(self.backend.num_queues)]
        session.inflight_tracking.forget()  # the rings start over: the front-end fetches a new one
        session.features = 0
        session.features_set = False
        session.iommu.reset()  # the IOMMU is re-negotiated with the features
        session.status = 0
        session.needs_reset = False
        session.dirty_logging.release()
        self._note_ring_states(session)
        self.backend.reset()

    async def _set_status(self, msg: Message) -> None:
        assert isinstance(msg.payload, U64)
        status = msg.payload.value
        if status > 0xFF:
            raise RequestFailed(f"device status {status:#x} is not a byte")
        session = self._session()
        if status == 0:
            await self._virtio_reset(session)
        # DEVICE_NEEDS_RESET is the device's to set; the driver clears it only by a reset.
        session.status = status & ~DeviceStatus.NEEDS_RESET

    async def _virtio_reset(self, session: Session) -> None:
        """SET_STATUS(0): "writing 0 into this field resets the device" (virtio 1.2, 2.1).
        The device's state goes: every ring stops (its in-flight requests complete first, as
        for GET_VRING_BASE), the device's own state is reset (`Backend.reset`: blk's cache
        mode, net's queued frames), DEVICE_NEEDS_RESET clears. What belongs to the connection
        stays: memory table, features, ring sizes, addresses and call/err fds, the inflight
        region, the back-end channel, and where each ring stopped. QEMU 7.2 sends SET_STATUS(0)
        *before* its GET_VRING_BASEs (8.1 and later after them), and those must still answer
        where the rings stopped (docs/protocol-support.md, "SET_STATUS(0)")."""
        for vring in session.vrings:
            await self._stop_ring(vring)
        session.needs_reset = False
        self.backend.reset()
        if session.features_set:  # still negotiated: the next start uses them
            self.backend.set_features(session.features & ~_ENGINE_FEATURES)
        log.info("device reset (SET_STATUS 0): every ring stopped")

    async def _get_status(self, msg: Message) -> Payload:
        session = self._session()
        broken = any(v.runner is not None and v.runner.fault is not None for v in session.vrings)
        if broken or session.needs_reset:
            return U64(session.status | DeviceStatus.NEEDS_RESET)
        return U64(session.status)

    # --- device state transfer (DEVICE_STATE) --------------------------------------------------
    # SET_DEVICE_STATE_FD starts moving Backend.save_state()'s bytes out through the front-end's
    # pipe, or reading a state in; CHECK_DEVICE_STATE waits for the end of it and, for a load,
    # hands the bytes to Backend.load_state(). Both always reply, so failures are error codes.

    async def _set_device_state_fd(self, msg: Message) -> Payload:
        assert isinstance(msg.payload, DeviceStateTransfer)
        session = self._session()
        direction, phase = msg.payload.direction, msg.payload.phase
        problem = None
        if direction not in (TransferDirection.SAVE, TransferDirection.LOAD):
            problem = f"unknown transfer direction {direction}"
        elif phase != TransferPhase.STOPPED:
            problem = f"unknown transfer phase {phase} (only 0, stopped, exists)"
        elif any(vring.runner is not None for vring in session.vrings):
            problem = "rings are still running (stop them with GET_VRING_BASE first)"
        elif session.state_transfer is not None:
            problem = "a transfer is already in progress"
        if problem is None and direction == TransferDirection.SAVE:
            try:
                state = self.backend.save_state()
            except (ValueError, NotImplementedError) as err:
                problem = f"saving the state failed: {err}"
        if problem is not None:
            log.warning("SET_DEVICE_STATE_FD refused: %s", problem)
            return U64(DEVICE_STATE_NOFD | DEVICE_STATE_FAILED)
        fd = os.dup(msg.fds[0])
        transfer: asyncio.Task[bytes | None]
        if direction == TransferDirection.SAVE:
            transfer = asyncio.ensure_future(self._send_state(fd, state))
        else:
            transfer = asyncio.ensure_future(self._receive_state(fd))
        transfer.add_done_callback(_note_transfer_failure)
        session.state_transfer = transfer
        return U64(DEVICE_STATE_NOFD)  # we use the front-end's fd and return none

    @staticmethod
    async def _send_state(fd: int, state: bytes) -> None:
        try:
            await write_all(fd, state)
        finally:
            os.close(fd)  # EOF tells the reader that this was all

    @staticmethod
    async def _receive_state(fd: int) -> bytes:
        try:
            return await read_to_eof(fd, MAX_DEVICE_STATE)
        finally:
            os.close(fd)

    async def _check_device_state(self, msg: Message) -> Payload:
        session = self._session()
        transfer, session.state_transfer = session.state_transfer, None
        if transfer is None:
            log.warning("CHECK_DEVICE_STATE: no state transfer was started")
            return U64(DEVICE_STATE_FAILED)
        try:
            state = await asyncio.wait_for(transfer, STATE_TRANSFER_TIMEOUT)
            if state is not None:
                self.backend.load_state(state)
        except TimeoutError:
            log.warning("CHECK_DEVICE_STATE: the transfer did not end (the pipe is still open)")
            return U64(DEVICE_STATE_FAILED)
        except (OSError, ValueError, NotImplementedError) as err:
            log.warning("CHECK_DEVICE_STATE: the state transfer failed: %s", err)
            return U64(DEVICE_STATE_FAILED)
        log.info("device state %s", "loaded" if state is not None else "saved")
        return U64(0)

    def _packed_rings(self) -> bool:
        """The region's layout follows the ring layout negotiated (SET_FEATURES comes first)."""
        return bool(self._session().features & VirtioFeature.RING_PACKED.mask)

    async def _get_inflight_fd(self, msg: Message) -> ReplyWithFd:
        assert isinstance(msg.payload, Inflight)
        return self._session().inflight_tracking.allocate(msg.payload, packed=self._packed_rings())

    async def _set_inflight_fd(self, msg: Message) -> None:
        assert isinstance(msg.payload, Inflight)
        fd = self._one_fd(msg)
        assert fd is not None  # the table demands one fd
        tracking = self._session().inflight_tracking
        tracking.map(msg.payload, fd, packed=self._packed_rings())

    async def _iotlb_msg(self, msg: Message) -> Payload:
        """IOTLB_MSG: the front-end's IOMMU adds (UPDATE) or removes (INVALIDATE) translations.
        Always answered with a u64 (QEMU waits for it): 0 once done, 1 on failure. An
        invalidation is done when no worker uses the range any more."""
        assert isinstance(msg.payload, IotlbMessage)
        entry = msg.payload
        session = self._session()
        try:
            if session.iommu.apply(entry, session.memory):
                await self._iotlb_changed(invalidated=entry.type == IotlbType.INVALIDATE)
        except (RequestFailed, GuestMemoryError) as err:
            log.warning("IOTLB_MSG %s failed: %s", entry.describe(), str(err))
            return U64(1)
        return U64(0)

    async def _iotlb_changed(self, *, invalidated: bool) -> None:
        """Hand the running workers the new translations; after an invalidation, wait until
        each stopped using the old ones (or restart its ring). Then start rings that were
        waiting for a translation."""
        session = self._session()
        memory = session.memory
        if memory is None:
            return
        workers = [
            (vring.index, vring.runner)
            for vring in session.vrings
            if isinstance(vring.runner, NativeQueueRunner)
        ]

        async def restart(index: int) -> None:
            await self._stop_runner(session.vrings[index])  # waits for its batch; restarted below

        await session.iommu.hand_over(memory, workers, invalidated=invalidated, on_slow=restart)
        for vring in session.vrings:
            if vring.runner is None:
                try:
                    await self._update_ring(vring)
                except RequestFailed as err:
                    log.warning("%s", err)
