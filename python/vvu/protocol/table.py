"""The one table of requests: payload, reply, fds and feature gate of every request, per channel.

Adding a request is one row in REQUESTS or BACKEND_REQUESTS. The codec validates with these rows
and nothing else, and the engine dispatches on the same keys.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Generic, Protocol, TypeVar

from vvu.protocol.constants import (
    DEVICE_STATE_ERROR_MASK,
    DEVICE_STATE_NOFD,
    BackendRequest,
    ChannelName,
    FrontendRequest,
    ProtocolFeature,
)
from vvu.protocol.payloads import (
    U64,
    Config,
    DeviceStateTransfer,
    Empty,
    Inflight,
    Iotlb,
    Log,
    MemoryTable,
    Payload,
    RawPayload,
    SharedObject,
    ShmemConfig,
    ShmemMap,
    SingleRegion,
    VringAddr,
    VringArea,
    VringState,
)

__all__ = [
    "BACKEND_REQUESTS",
    "NO_FDS",
    "ONE_FD",
    "OPTIONAL_FD",
    "REQUESTS",
    "Answer",
    "FdRange",
    "ReplyKind",
    "RequestSpec",
    "U64Meaning",
    "request_name",
    "resolve_request",
    "spec_for",
]

P = TypeVar("P", bound=Payload)


@dataclass(frozen=True, slots=True)
class FdRange:
    """How many fds a message may carry: `low` to `high`; `why` explains it in errors."""

    low: int
    high: int
    why: str = field(default="", compare=False)

    def __contains__(self, count: object) -> bool:
        return isinstance(count, int) and self.low <= count <= self.high

    def __str__(self) -> str:
        if self.low == self.high:
            text = str(self.low)
        elif self.high == self.low + 1:
            text = f"{self.low} or {self.high}"
        else:
            text = f"{self.low} to {self.high}"
        return f"{text} ({self.why})" if self.why else text


NO_FDS: Final = FdRange(0, 0)
ONE_FD: Final = FdRange(1, 1)
OPTIONAL_FD: Final = FdRange(0, 1)


class ReplyKind(enum.Enum):
    """When a request is answered.

    Every request may be answered with a u64 ack when REPLY_ACK is negotiated and NEED_REPLY is
    set; ACK rows are answered only then. ALWAYS rows always get their typed reply and never an
    extra ack. IF_FEATURE rows get their typed reply when `reply_feature` is negotiated, and are
    ACK rows otherwise.
    """

    ACK = "ack"
    ALWAYS = "always"
    IF_FEATURE = "if-feature"


class Answer(enum.Enum):
    """What the receiver of one request sends back."""

    NOTHING = "nothing"
    ACK = "ack"  # a U64 status: 0 ok, non-zero failure
    REPLY = "reply"  # the row's typed reply


class U64Meaning(enum.Enum):
    """What the u64 of a request or its typed reply means, so that describe() can decode it."""

    NUMBER = "number"
    FEATURES = "features"  # virtio and vhost feature bits
    PROTOCOL_FEATURES = "protocol-features"
    VRING = "vring"  # index in bits 0-7, NOFD in bit 8
    STATUS = "status"  # the virtio device status byte
    MAC = "mac"  # SEND_RARP: the first 6 bytes
    RESULT = "result"  # 0 ok, non-zero failure
    DEVICE_STATE_RESULT = "device-state-result"  # bits 0-7 error, bit 8 no fd


@dataclass(frozen=True, slots=True)
class RequestSpec(Generic[P]):
    """One row: everything the codec and the engine need to know about a request.

    `reply` lists every payload type a reply may have, the usual one first; ACK rows have
    `(U64,)` plus whatever a special mode (postcopy) answers with. `fds` and `reply_fds` are a
    range or a function of the decoded payload. `feature` is the protocol feature that must be
    negotiated before the request may be sent; backend-channel requests also need BACKEND_REQ,
    which the channel's existence implies.
    """

    payload: type[P]
    replies: ReplyKind = ReplyKind.ACK
    reply: tuple[type[Payload], ...] = (U64,)
    fds: FdRange | Callable[[P], FdRange] = NO_FDS
    reply_fds: FdRange | Callable[[Payload], FdRange] = NO_FDS
    feature: ProtocolFeature | None = None
    reply_feature: ProtocolFeature | None = None
    # Extra validation of a decoded request beyond its layout; returns the problem, or None.
    check: Callable[[P], str | None] | None = None
    u64: U64Meaning = U64Meaning.NUMBER

    def fd_range(self, payload: P) -> FdRange:
        """How many fds the request with this payload must carry."""
        return self.fds if isinstance(self.fds, FdRange) else self.fds(payload)

    def reply_fd_range(self, reply: Payload) -> FdRange:
        """How many fds the reply with this payload must carry."""
        return self.reply_fds if isinstance(self.reply_fds, FdRange) else self.reply_fds(reply)

    def answer(self, *, need_reply: bool, protocol_features: int) -> Answer:
        """What to send back for one request with these flags.

        `protocol_features` is the negotiated mask; the caller clears REPLY_ACK from it unless
        VHOST_USER_F_PROTOCOL_FEATURES was acked as well, as rust-vmm does.
        """
        if self.replies is ReplyKind.ALWAYS:
            return Answer.REPLY
        if (
            self.replies is ReplyKind.IF_FEATURE
            and self.reply_feature is not None
            and protocol_features & self.reply_feature.mask
        ):
            return Answer.REPLY
        if need_reply and protocol_features & ProtocolFeature.REPLY_ACK.mask:
            return Answer.ACK
        return Answer.NOTHING


class _HasNofd(Protocol):
    @property
    def nofd(self) -> bool: ...


def _fd_unless_nofd(payload: _HasNofd) -> FdRange:
    if payload.nofd:
        return FdRange(0, 0, "the NOFD bit is set")
    return FdRange(1, 1, "the NOFD bit is clear")


def _one_fd_per_region(table: MemoryTable) -> FdRange:
    return FdRange(table.nregions, table.nregions, f"one per region, nregions={table.nregions}")


def _config_not_empty(config: Config) -> str | None:
    return "size 0 asks for no config bytes" if config.size == 0 else None


def _inflight_reply_fds(reply: Payload) -> FdRange:
    # mmap_size 0 means the back-end has no buffer to give; QEMU then looks for no fd.
    if isinstance(reply, Inflight) and reply.mmap_size == 0:
        return FdRange(0, 1, "mmap_size is 0")
    return FdRange(1, 1, "the inflight buffer")


def _device_state_reply_fds(reply: Payload) -> FdRange:
    value = reply.value if isinstance(reply, U64) else 0
    if value & DEVICE_STATE_NOFD:
        return FdRange(0, 0, "bit 8 (no fd) is set")
    if value & DEVICE_STATE_ERROR_MASK:
        return FdRange(0, 1, "the transfer failed")  # QEMU ignores fds after an error
    return FdRange(1, 1, "bit 8 (no fd) is clear")


_F = FrontendRequest
_B = BackendRequest
_PF = ProtocolFeature
_M = U64Meaning
_ALWAYS = ReplyKind.ALWAYS

REQUESTS: Final[dict[FrontendRequest, RequestSpec[Any]]] = {
    _F.GET_FEATURES: RequestSpec(Empty, _ALWAYS, (U64,), u64=_M.FEATURES),
    _F.SET_FEATURES: RequestSpec(U64, u64=_M.FEATURES),
    _F.SET_OWNER: RequestSpec(Empty),
    # Deprecated: ignored (session state is kept), but acked when asked like any request.
    _F.RESET_OWNER: RequestSpec(Empty),
    # In postcopy the back-end answers with the table holding its own mapped addresses.
    _F.SET_MEM_TABLE: RequestSpec(MemoryTable, reply=(U64, MemoryTable), fds=_one_fd_per_region),
    # The fd and the mandatory reply come with LOG_SHMFD. DPDK replies with an empty payload,
    # rust-vmm echoes the Log; QEMU accepts both.
    _F.SET_LOG_BASE: RequestSpec(
        Log,
        ReplyKind.IF_FEATURE,
        (Log, Empty, U64),
        fds=OPTIONAL_FD,
        reply_feature=_PF.LOG_SHMFD,
    ),
    _F.SET_LOG_FD: RequestSpec(Empty, fds=ONE_FD),
    _F.SET_VRING_NUM: RequestSpec(VringState),
    _F.SET_VRING_ADDR: RequestSpec(VringAddr),
    _F.SET_VRING_BASE: RequestSpec(VringState),
    _F.GET_VRING_BASE: RequestSpec(VringState, _ALWAYS, (VringState,)),
    _F.SET_VRING_KICK: RequestSpec(U64, fds=_fd_unless_nofd, u64=_M.VRING),
    _F.SET_VRING_CALL: RequestSpec(U64, fds=_fd_unless_nofd, u64=_M.VRING),
    _F.SET_VRING_ERR: RequestSpec(U64, fds=_fd_unless_nofd, u64=_M.VRING),
    _F.GET_PROTOCOL_FEATURES: RequestSpec(Empty, _ALWAYS, (U64,), u64=_M.PROTOCOL_FEATURES),
    _F.SET_PROTOCOL_FEATURES: RequestSpec(U64, u64=_M.PROTOCOL_FEATURES),
    _F.GET_QUEUE_NUM: RequestSpec(Empty, _ALWAYS, (U64,), feature=_PF.MQ),
    # Gated by the virtio bit VHOST_USER_F_PROTOCOL_FEATURES, not by a protocol feature.
    _F.SET_VRING_ENABLE: RequestSpec(VringState),
    _F.SEND_RARP: RequestSpec(U64, feature=_PF.RARP, u64=_M.MAC),
    _F.NET_SET_MTU: RequestSpec(U64, feature=_PF.MTU),
    _F.SET_BACKEND_REQ_FD: RequestSpec(Empty, fds=ONE_FD, feature=_PF.BACKEND_REQ),
    # QEMU sets NEED_REPLY and waits for the u64 even without REPLY_ACK: always answer.
    _F.IOTLB_MSG: RequestSpec(Iotlb, _ALWAYS, (U64,), u64=_M.RESULT),
    _F.SET_VRING_ENDIAN: RequestSpec(VringState, feature=_PF.CROSS_ENDIAN),
    # The reply has the request's size; a reply with size 0 reports failure (rust-vmm).
    _F.GET_CONFIG: RequestSpec(
        Config, _ALWAYS, (Config,), feature=_PF.CONFIG, check=_config_not_empty
    ),
    _F.SET_CONFIG: RequestSpec(Config, feature=_PF.CONFIG),
    # The session struct changes between QEMU versions, so it stays opaque here.
    _F.CREATE_CRYPTO_SESSION: RequestSpec(
        RawPayload, _ALWAYS, (RawPayload,), feature=_PF.CRYPTO_SESSION
    ),
    _F.CLOSE_CRYPTO_SESSION: RequestSpec(U64, feature=_PF.CRYPTO_SESSION),
    # The userfaultfd comes with an empty reply; no fd means failure.
    _F.POSTCOPY_ADVISE: RequestSpec(
        Empty, _ALWAYS, (Empty,), reply_fds=OPTIONAL_FD, feature=_PF.PAGEFAULT
    ),
    _F.POSTCOPY_LISTEN: RequestSpec(Empty, feature=_PF.PAGEFAULT),  # QEMU sets NEED_REPLY
    _F.POSTCOPY_END: RequestSpec(Empty, _ALWAYS, (U64,), feature=_PF.PAGEFAULT, u64=_M.RESULT),
    _F.GET_INFLIGHT_FD: RequestSpec(
        Inflight,
        _ALWAYS,
        (Inflight,),
        reply_fds=_inflight_reply_fds,
        feature=_PF.INFLIGHT_SHMFD,
    ),
    _F.SET_INFLIGHT_FD: RequestSpec(Inflight, fds=ONE_FD, feature=_PF.INFLIGHT_SHMFD),
    _F.GPU_SET_SOCKET: RequestSpec(Empty, fds=ONE_FD),
    _F.RESET_DEVICE: RequestSpec(Empty, feature=_PF.RESET_DEVICE),
    _F.VRING_KICK: RequestSpec(VringState, feature=_PF.INBAND_NOTIFICATIONS),
    _F.GET_MAX_MEM_SLOTS: RequestSpec(Empty, _ALWAYS, (U64,), feature=_PF.CONFIGURE_MEM_SLOTS),
    # In postcopy the back-end answers with the region holding its own mapped address.
    _F.ADD_MEM_REG: RequestSpec(
        SingleRegion,
        reply=(U64, SingleRegion),
        fds=ONE_FD,
        feature=_PF.CONFIGURE_MEM_SLOTS,
    ),
    # Needs no fd, but some front-ends attach the region's; the engine closes it unused.
    _F.REM_MEM_REG: RequestSpec(SingleRegion, fds=OPTIONAL_FD, feature=_PF.CONFIGURE_MEM_SLOTS),
    _F.SET_STATUS: RequestSpec(U64, feature=_PF.STATUS, u64=_M.STATUS),
    _F.GET_STATUS: RequestSpec(Empty, _ALWAYS, (U64,), feature=_PF.STATUS, u64=_M.STATUS),
    # rust-vmm replies with an empty payload, libvhost-user echoes the UUID; no fd: not found.
    _F.GET_SHARED_OBJECT: RequestSpec(
        SharedObject,
        _ALWAYS,
        (Empty, SharedObject),
        reply_fds=OPTIONAL_FD,
        feature=_PF.SHARED_OBJECT,
    ),
    _F.SET_DEVICE_STATE_FD: RequestSpec(
        DeviceStateTransfer,
        _ALWAYS,
        (U64,),
        fds=ONE_FD,
        reply_fds=_device_state_reply_fds,
        feature=_PF.DEVICE_STATE,
        u64=_M.DEVICE_STATE_RESULT,
    ),
    _F.CHECK_DEVICE_STATE: RequestSpec(
        Empty, _ALWAYS, (U64,), feature=_PF.DEVICE_STATE, u64=_M.RESULT
    ),
    _F.GET_SHMEM_CONFIG: RequestSpec(Empty, _ALWAYS, (ShmemConfig,), feature=_PF.SHMEM),
    _F.GET_VRING_BASE_SKIP_DRAIN: RequestSpec(
        VringState, _ALWAYS, (VringState,), feature=_PF.GET_VRING_BASE_SKIP_DRAIN
    ),
}

BACKEND_REQUESTS: Final[dict[BackendRequest, RequestSpec[Any]]] = {
    _B.BACKEND_IOTLB_MSG: RequestSpec(Iotlb),
    _B.BACKEND_CONFIG_CHANGE_MSG: RequestSpec(Empty, feature=_PF.CONFIG),
    # NOFD asks the front-end to unmap the notifier area.
    _B.BACKEND_VRING_HOST_NOTIFIER_MSG: RequestSpec(
        VringArea, fds=_fd_unless_nofd, feature=_PF.HOST_NOTIFIER
    ),
    _B.BACKEND_VRING_CALL: RequestSpec(VringState, feature=_PF.INBAND_NOTIFICATIONS),
    _B.BACKEND_VRING_ERR: RequestSpec(VringState, feature=_PF.INBAND_NOTIFICATIONS),
    _B.BACKEND_SHARED_OBJECT_ADD: RequestSpec(SharedObject, feature=_PF.SHARED_OBJECT),
    _B.BACKEND_SHARED_OBJECT_REMOVE: RequestSpec(SharedObject, feature=_PF.SHARED_OBJECT),
    # QEMU always answers a lookup: u64 0 with the dma-buf fd, or an error and no fd.
    _B.BACKEND_SHARED_OBJECT_LOOKUP: RequestSpec(
        SharedObject,
        _ALWAYS,
        (U64,),
        reply_fds=OPTIONAL_FD,
        feature=_PF.SHARED_OBJECT,
        u64=_M.RESULT,
    ),
    _B.BACKEND_SHMEM_MAP: RequestSpec(ShmemMap, fds=ONE_FD, feature=_PF.SHMEM),
    _B.BACKEND_SHMEM_UNMAP: RequestSpec(ShmemMap, feature=_PF.SHMEM),
}


def resolve_request(
    request: int, channel: ChannelName | None = None
) -> tuple[FrontendRequest | BackendRequest | None, ChannelName]:
    """The enum member for a request id and the channel it belongs to.

    An enum member carries its channel; a plain int belongs to `channel` (default "frontend").
    The member is None when the id is unknown on that channel. Raises ValueError when `channel`
    contradicts the member's own.
    """
    if isinstance(request, FrontendRequest | BackendRequest):
        own: ChannelName = "frontend" if isinstance(request, FrontendRequest) else "backend"
        if channel is not None and channel != own:
            raise ValueError(f"{request.name} is a {own} request, not a {channel} one")
        return request, own
    channel = channel or "frontend"
    return _MEMBERS[channel].get(request), channel


def spec_for(request: int, channel: ChannelName | None = None) -> RequestSpec[Any] | None:
    """The row of a request, or None for an id its channel does not know (see resolve_request)."""
    if isinstance(request, FrontendRequest):
        if channel is None or channel == "frontend":
            return REQUESTS.get(request)
    elif isinstance(request, BackendRequest):
        if channel is None or channel == "backend":
            return BACKEND_REQUESTS.get(request)
    else:
        return _SPECS[channel or "frontend"].get(request)
    resolve_request(request, channel)  # a member on the other channel: ValueError
    raise AssertionError("unreachable")


def request_name(request: int, channel: ChannelName | None = None) -> str:
    """The spec's name of a request (`SET_MEM_TABLE`), or `unknown frontend request 99`."""
    member, channel = resolve_request(request, channel)
    return member.name if member is not None else f"unknown {channel} request {request}"


# By plain id, per channel: ids to members and rows by a dict lookup (calling the enum,
# `FrontendRequest(1)`, costs more than the rest of a trivial request's decoding).
_MEMBERS: Final[dict[ChannelName, dict[int, FrontendRequest | BackendRequest]]] = {
    "frontend": {m.value: m for m in FrontendRequest},
    "backend": {m.value: m for m in BackendRequest},
}
_SPECS: Final[dict[ChannelName, dict[int, RequestSpec[Any]]]] = {
    "frontend": {m.value: spec for m, spec in REQUESTS.items()},
    "backend": {m.value: spec for m, spec in BACKEND_REQUESTS.items()},
}
