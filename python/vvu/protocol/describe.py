"""One human-readable line per message, for `vvu trace` and logs."""

from __future__ import annotations

from typing import Final

from vvu.protocol.codec import Message
from vvu.protocol.constants import (
    DEVICE_STATE_ERROR_MASK,
    DEVICE_STATE_NOFD,
    VRING_IDX_MASK,
    VRING_NOFD,
    DeviceStatus,
    ProtocolFeature,
    feature_names,
)
from vvu.protocol.payloads import U64, Empty
from vvu.protocol.table import ReplyKind, U64Meaning

__all__ = ["describe"]

_MAC_BYTES: Final = 6


def _names(names: list[str]) -> str:
    return "(" + "|".join(names) + ")" if names else "(none)"


def _status_names(value: int) -> list[str]:
    names = [member.name or "" for member in DeviceStatus if value & member]
    rest = value & ~sum(DeviceStatus)
    return [*names, f"{rest:#x}"] if rest else names


def _result(value: int) -> str:
    return "result=ok" if value == 0 else f"result=failed({value:#x})"


def _u64_text(value: int, meaning: U64Meaning) -> str:
    text: str
    match meaning:
        case U64Meaning.FEATURES:
            text = f"features={value:#x} {_names(feature_names(value))}"
        case U64Meaning.PROTOCOL_FEATURES:
            text = f"protocol_features={value:#x} {_names(ProtocolFeature.names(value))}"
        case U64Meaning.VRING:
            text = f"index={value & VRING_IDX_MASK}"
            if value & VRING_NOFD:
                text += " nofd"
            if value & ~(VRING_IDX_MASK | VRING_NOFD):
                text += f" unknown_bits={value & ~(VRING_IDX_MASK | VRING_NOFD):#x}"
        case U64Meaning.STATUS:
            text = f"status={value:#x} {_names(_status_names(value))}"
        case U64Meaning.MAC:
            mac = value.to_bytes(8, "little")[:_MAC_BYTES]
            text = "mac=" + ":".join(f"{b:02x}" for b in mac)
        case U64Meaning.RESULT:
            text = _result(value)
        case U64Meaning.DEVICE_STATE_RESULT:
            text = _result(value & DEVICE_STATE_ERROR_MASK)
            text += " nofd" if value & DEVICE_STATE_NOFD else " fd"
        case U64Meaning.NUMBER:
            text = f"u64={value}"
    return text


def describe(message: Message) -> str:
    """`NAME [reply] [need_reply] fields... fds=N`, addresses in hex, feature bits by name."""
    parts = [message.name]
    if message.is_reply:
        parts.append("reply")
    if message.need_reply:
        parts.append("need_reply")
    spec = message.spec
    payload = message.payload
    if isinstance(payload, U64) and spec is not None:
        # A u64 reply to a request that is not always answered is an ack, whatever the row's
        # u64 means for the request itself.
        is_ack = message.is_reply and spec.replies is not ReplyKind.ALWAYS
        parts.append(_u64_text(payload.value, U64Meaning.RESULT if is_ack else spec.u64))
    elif not isinstance(payload, Empty):
        parts.append(payload.describe())
    parts.append(f"fds={len(message.fds)}")
    return " ".join(parts)
