"""Headers and messages to and from bytes, validated against the request table. No I/O.

Decoding raises ProtocolError: the peer broke the protocol and the engine closes the session
(or, for an unknown request id, which decodes fine, answers a failure). Encoding raises
ValueError or TypeError: the caller built a message the protocol does not allow.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final

from vvu.errors import ProtocolError
from vvu.protocol.constants import (
    HEADER_SIZE,
    KNOWN_FLAGS,
    MAX_PAYLOAD,
    NEED_REPLY,
    REPLY,
    REPLY_FLAGS,
    VERSION,
    VERSION_MASK,
    BackendRequest,
    ChannelName,
    FrontendRequest,
)
from vvu.protocol.payloads import EMPTY, U64, Payload, RawPayload
from vvu.protocol.table import (
    BACKEND_REQUESTS,
    REQUESTS,
    RequestSpec,
    request_name,
    resolve_request,
    spec_for,
)

__all__ = [
    "HEADER_LAYOUT",
    "Header",
    "Message",
    "decode_header",
    "decode_message",
    "encode",
    "encode_ack",
    "encode_message",
    "encode_reply",
]

# The status an ack carries on failure; QEMU's backend_read sends !!ret, so 1.
_ACK_FAILED: Final = 1
#: The header's wire layout (`Header`), for the hot paths that skip building a Header.
HEADER_LAYOUT: Final = struct.Struct("<III")


@dataclass(frozen=True, slots=True)
class Header:
    """The 12-byte header: `u32 request; u32 flags; u32 size` (payload bytes that follow)."""

    _LAYOUT: ClassVar[struct.Struct] = HEADER_LAYOUT
    request: int
    flags: int
    size: int

    @property
    def version(self) -> int:
        return self.flags & VERSION_MASK

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & REPLY)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & NEED_REPLY)

    def pack(self) -> bytes:
        """The wire bytes, as they are: no validation beyond the field widths."""
        try:
            return self._LAYOUT.pack(self.request, self.flags, self.size)
        except struct.error as err:
            raise ValueError(f"Header: a field does not fit in a u32: {err}") from err

    @classmethod
    def unpack(cls, data: bytes) -> Header:
        """Split 12 bytes into the fields, checking nothing else (see decode_header)."""
        if len(data) != HEADER_SIZE:
            raise ProtocolError(f"a header is {HEADER_SIZE} bytes, got {len(data)}")
        return cls(*cls._LAYOUT.unpack(data))


@dataclass(frozen=True, slots=True)
class Message:
    """One decoded message: a request, or the reply to one.

    `request` is a FrontendRequest or BackendRequest member when the id is known on `channel`,
    and a plain int otherwise; the payload of an unknown request is a RawPayload. A member sets
    `channel` itself; `channel` only places plain ids. `fds` are the fds that came with it,
    owned by whoever holds the message.
    """

    request: FrontendRequest | BackendRequest | int
    flags: int
    payload: Payload
    fds: tuple[int, ...] = ()
    channel: ChannelName = "frontend"

    def __post_init__(self) -> None:
        # Normalise so that a known id is always its member and the channel always matches it;
        # object.__setattr__ because the dataclass is frozen.
        if isinstance(self.request, BackendRequest):
            if self.channel != "backend":
                object.__setattr__(self, "channel", "backend")
        elif isinstance(self.request, FrontendRequest):
            if self.channel != "frontend":
                object.__setattr__(self, "channel", "frontend")
        else:
            member, _ = resolve_request(self.request, self.channel)
            if member is not None:
                object.__setattr__(self, "request", member)
        if type(self.fds) is not tuple:
            object.__setattr__(self, "fds", tuple(self.fds))

    @property
    def known(self) -> bool:
        """False for a request id the channel does not know: answer a failure or disconnect."""
        return isinstance(self.request, FrontendRequest | BackendRequest)

    @property
    def name(self) -> str:
        return request_name(self.request, self.channel)

    @property
    def spec(self) -> RequestSpec[Any] | None:
        return spec_for(self.request, self.channel)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & REPLY)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & NEED_REPLY)


#: Per channel, by plain request id: the member and its row (`decode_message`'s one lookup).
_ROWS: Final[
    dict[ChannelName, dict[int, tuple[FrontendRequest | BackendRequest, RequestSpec[Any]]]]
] = {
    "frontend": {int(m): (m, spec) for m, spec in REQUESTS.items()},
    "backend": {int(m): (m, spec) for m, spec in BACKEND_REQUESTS.items()},
}
_UNKNOWN: Final[tuple[None, None]] = (None, None)


def _header_problem(header: Header) -> str | None:
    if header.version != VERSION:
        return f"unsupported version {header.version} in flags {header.flags:#x} (only 1 exists)"
    if header.flags & ~KNOWN_FLAGS:
        return f"unknown flag bits {header.flags & ~KNOWN_FLAGS:#x} in flags {header.flags:#x}"
    if header.size > MAX_PAYLOAD:
        return f"payload size {header.size} exceeds the {MAX_PAYLOAD}-byte maximum"
    return None


def decode_header(data: bytes, *, channel: ChannelName = "frontend") -> Header:
    """Decode and validate a header: version 1, no unknown flag bits, size <= MAX_PAYLOAD.

    An unknown request id is not an error here (see decode_message). Raises ProtocolError,
    naming the request when the id is known on `channel`.
    """
    header = Header.unpack(data)
    problem = _header_problem(header)
    if problem is not None:
        raise ProtocolError(f"{request_name(header.request, channel)}: {problem}")
    return header


def _type_names(types: Sequence[type[Payload]]) -> str:
    return " or ".join(t.__name__ for t in types)


def _unpack_one_of(types: Sequence[type[Payload]], data: bytes) -> Payload:
    if len(types) == 1:
        return types[0].unpack(data)  # its own, more precise, error
    for payload_type in types:
        if payload_type.fits(len(data)):
            return payload_type.unpack(data)
    allowed = ", ".join(f"{t.__name__} ({t.size_text()})" for t in types)
    raise ProtocolError(f"payload of {len(data)} bytes is none of {allowed}")


def _type_problem(spec: RequestSpec[Any], payload: Payload, *, is_reply: bool) -> str | None:
    allowed = spec.reply if is_reply else (spec.payload,)
    if isinstance(payload, allowed):
        return None
    return f"payload must be {_type_names(allowed)}, not {type(payload).__name__}"


def _content_problem(
    spec: RequestSpec[Any], payload: Payload, nfds: int, *, is_reply: bool
) -> str | None:
    """What is wrong with a payload of the right type: the row's extra check, the fd count."""
    if is_reply:
        allowed = spec.reply_fd_range(payload)
    else:
        if spec.check is not None:
            problem = spec.check(payload)
            if problem is not None:
                return problem
        allowed = spec.fd_range(payload)
    if nfds not in allowed:
        return f"{nfds} fds attached, expected {allowed}"
    return None


def decode_message(
    header: Header,
    payload: bytes,
    fds: Sequence[int] = (),
    *,
    channel: ChannelName = "frontend",
    is_reply: bool = False,
) -> Message:
    """Decode one message whose header and payload bytes have been read, with its fds.

    Validates the header again (so a header built from a transport's fields is safe), that the
    payload is `header.size` bytes, the REPLY flag (`is_reply`: flags exactly 0x5; otherwise
    REPLY clear), and, for known ids, the payload layout and the fd count against the table.
    An unknown id decodes to a Message with a RawPayload and `known` False.

    Never closes `fds`, not even when it raises: the caller owns them and must close the ones
    it does not keep. Raises ProtocolError naming the request and the reason.
    """
    problem = _header_problem(header)
    if problem is None and len(payload) != header.size:
        problem = f"header says {header.size} payload bytes, got {len(payload)}"
    if problem is None and is_reply and header.flags != REPLY_FLAGS:
        problem = f"reply flags must be exactly {REPLY_FLAGS:#x}, got {header.flags:#x}"
    if problem is None and not is_reply and header.is_reply:
        problem = f"REPLY flag set on a request (flags {header.flags:#x})"
    if problem is not None:
        raise ProtocolError(f"{_what(header.request, channel, is_reply)}: {problem}")

    if type(header.request) is int:  # from the wire: one lookup for the member and its row
        member, spec = _ROWS[channel].get(header.request, _UNKNOWN)
    else:
        member, _ = resolve_request(header.request, channel)
        spec = spec_for(header.request, channel)
    if member is None or spec is None:
        return Message(
            header.request, header.flags, RawPayload(bytes(payload)), tuple(fds), channel
        )
    try:
        body = _unpack_one_of(spec.reply, payload) if is_reply else spec.payload.unpack(payload)
    except ProtocolError as err:
        raise ProtocolError(f"{_what(member, channel, is_reply)}: {err}") from err
    # The layout came from the table, so only the content can be wrong.
    problem = _content_problem(spec, body, len(fds), is_reply=is_reply)
    if problem is not None:
        raise ProtocolError(f"{_what(member, channel, is_reply)}: {problem}")
    return Message(member, header.flags, body, tuple(fds), channel)


def _what(request: int, channel: ChannelName | None, is_reply: bool) -> str:
    """A message's name in errors (`SET_MEM_TABLE reply`): built only when one is raised."""
    return request_name(request, channel) + (" reply" if is_reply else "")


def _encode(
    request: int, flags: int, payload: Payload, nfds: int, channel: ChannelName | None
) -> bytes:
    _, channel = resolve_request(request, channel)
    is_reply = bool(flags & REPLY)
    if flags & VERSION_MASK != VERSION or flags & ~KNOWN_FLAGS:
        raise ValueError(
            f"{_what(request, channel, is_reply)}: flags {flags:#x} are not version 1 with "
            "known bits"
        )
    if is_reply and flags != REPLY_FLAGS:
        raise ValueError(
            f"{_what(request, channel, is_reply)}: reply flags must be exactly "
            f"{REPLY_FLAGS:#x}, not {flags:#x}"
        )
    body = payload.pack()
    if len(body) > MAX_PAYLOAD:
        raise ValueError(
            f"{_what(request, channel, is_reply)}: payload of {len(body)} bytes exceeds "
            f"{MAX_PAYLOAD}"
        )
    spec = spec_for(request, channel)
    if spec is not None:
        problem = _type_problem(spec, payload, is_reply=is_reply)
        if problem is not None:
            raise TypeError(f"{_what(request, channel, is_reply)}: {problem}")
        problem = _content_problem(spec, payload, nfds, is_reply=is_reply)
        if problem is not None:
            raise ValueError(f"{_what(request, channel, is_reply)}: {problem}")
    try:
        return HEADER_LAYOUT.pack(request, flags, len(body)) + body
    except struct.error as err:
        raise ValueError(f"Header: a field does not fit in a u32: {err}") from err


def encode(message: Message) -> bytes:
    """Header and payload bytes of a message; its fds travel beside them, with the first byte.

    Known requests are checked against the table like decode_message checks them (TypeError for
    a wrong payload type, ValueError otherwise); unknown ids are encoded as given.
    """
    return _encode(
        message.request, message.flags, message.payload, len(message.fds), message.channel
    )


def encode_message(
    request: FrontendRequest | BackendRequest,
    payload: Payload = EMPTY,
    *,
    need_reply: bool = False,
    nfds: int = 0,
) -> bytes:
    """A request's bytes. `nfds` is how many fds the caller will attach; it is checked."""
    flags = VERSION | (NEED_REPLY if need_reply else 0)
    return _encode(request, flags, payload, nfds, None)


def encode_reply(
    request: int, payload: Payload, *, nfds: int = 0, channel: ChannelName | None = None
) -> bytes:
    """A reply's bytes: flags exactly 0x5 (VERSION|REPLY), never NEED_REPLY, same request id.

    `channel` places a plain int id (default "frontend"); a member carries its own.
    """
    return _encode(request, REPLY_FLAGS, payload, nfds, channel)


def encode_ack(request: int, ok: bool, *, channel: ChannelName | None = None) -> bytes:
    """A REPLY_ACK status reply: u64 0 for success, 1 for failure.

    Also the answer to an unknown request id that asked for a reply. A request whose reply is
    never a bare u64 (GET_VRING_BASE, GET_CONFIG, ...) needs its typed reply: ValueError.
    """
    key = (request, ok, channel)
    data = _ACKS.get(key)
    if data is None:
        spec = spec_for(request, channel)
        if spec is not None and U64 not in spec.reply:
            raise ValueError(
                f"{request_name(request, channel)} is answered with "
                f"{_type_names(spec.reply)}, not an ack"
            )
        data = _encode(request, REPLY_FLAGS, U64(0 if ok else _ACK_FAILED), 0, channel)
        if spec is not None:  # known ids only: the cache stays as small as the table
            _ACKS[key] = data
    return data


#: Every ack sent so far, by (request, ok, channel): the same bytes each time.
_ACKS: Final[dict[tuple[int, bool, ChannelName | None], bytes]] = {}
