"""Request ids, feature bits and header constants of the vhost-user protocol, with the spec's names.

Names drop the `VHOST_USER_` / `VHOST_USER_PROTOCOL_F_` / `VIRTIO_F_` prefixes and use the current
terms (front-end, back-end, BACKEND_ instead of SLAVE_).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Final, Literal, Self, TypeAlias

__all__ = [
    "DEVICE_STATE_ERROR_MASK",
    "DEVICE_STATE_NOFD",
    "HEADER_SIZE",
    "KNOWN_FLAGS",
    "MAX_BACKEND_FDS",
    "MAX_PAYLOAD",
    "MAX_REGIONS",
    "NEED_REPLY",
    "REPLY",
    "REPLY_FLAGS",
    "VERSION",
    "VERSION_MASK",
    "VRING_F_LOG",
    "VRING_IDX_MASK",
    "VRING_NOFD",
    "BackendRequest",
    "ChannelName",
    "DeviceStatus",
    "FeatureBit",
    "FrontendRequest",
    "IotlbPerm",
    "IotlbType",
    "ProtocolFeature",
    "TransferDirection",
    "TransferPhase",
    "VhostFeature",
    "VirtioFeature",
    "feature_names",
]

# --- header -------------------------------------------------------------------------------------

HEADER_SIZE: Final = 12
VERSION: Final = 0x1  # bits 0-1 of flags; 1 is the only version there is
VERSION_MASK: Final = 0x3
REPLY: Final = 0x4
NEED_REPLY: Final = 0x8
KNOWN_FLAGS: Final = VERSION_MASK | REPLY | NEED_REPLY
# QEMU and DPDK compare a reply's flags against exactly this value, so nothing else may be set.
REPLY_FLAGS: Final = VERSION | REPLY

# rust-vmm's MAX_MSG_SIZE; QEMU's own bound is smaller, so nothing legitimate is larger.
MAX_PAYLOAD: Final = 4096

# --- payload field constants --------------------------------------------------------------------

VRING_IDX_MASK: Final = 0xFF  # vring index in the u64 of SET_VRING_KICK/CALL/ERR
VRING_NOFD: Final = 0x100  # same u64: no fd attached, poll instead
VRING_F_LOG: Final = 0x1  # SET_VRING_ADDR flags: log used-ring writes at `log`
MAX_REGIONS: Final = 8  # VHOST_MEMORY_BASELINE_NREGIONS: the SET_MEM_TABLE array size
MAX_BACKEND_FDS: Final = 8  # fds per backend-channel message with BACKEND_SEND_FD
DEVICE_STATE_ERROR_MASK: Final = 0xFF  # SET_DEVICE_STATE_FD reply: bits 0-7 error code
DEVICE_STATE_NOFD: Final = 0x100  # same reply: bit 8, no fd returned (use the front-end's)

ChannelName: TypeAlias = Literal["frontend", "backend"]
"""Which socket a message travels on: the main one, or the one from SET_BACKEND_REQ_FD."""


class FrontendRequest(enum.IntEnum):
    """Requests the front-end sends on the main socket (VHOST_USER_*)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43
    GET_SHMEM_CONFIG = 44
    GET_VRING_BASE_SKIP_DRAIN = 45


class BackendRequest(enum.IntEnum):
    """Requests the back-end sends on the backend channel (VHOST_USER_BACKEND_*)."""

    BACKEND_IOTLB_MSG = 1
    BACKEND_CONFIG_CHANGE_MSG = 2
    BACKEND_VRING_HOST_NOTIFIER_MSG = 3
    BACKEND_VRING_CALL = 4
    BACKEND_VRING_ERR = 5
    BACKEND_SHARED_OBJECT_ADD = 6
    BACKEND_SHARED_OBJECT_REMOVE = 7
    BACKEND_SHARED_OBJECT_LOOKUP = 8
    BACKEND_SHMEM_MAP = 9
    BACKEND_SHMEM_UNMAP = 10


class FeatureBit(enum.IntEnum):
    """A feature as its bit number, with conversions between masks and members or names."""

    @property
    def mask(self) -> int:
        """This feature as a mask (`1 << bit`)."""
        return 1 << self._value_  # not `.value`: enum's descriptor costs more than the shift

    @classmethod
    def from_mask(cls, mask: int) -> list[Self]:
        """The members whose bits are set in `mask`, by bit number; unknown bits are dropped."""
        return [member for member in cls if (mask >> member.value) & 1]

    @classmethod
    def to_mask(cls, features: Iterable[Self | str]) -> int:
        """OR together members or member names (`"MQ"`); raises KeyError for an unknown name."""
        mask = 0
        for feature in features:
            member = cls[feature] if isinstance(feature, str) else feature
            mask |= 1 << member.value
        return mask

    @classmethod
    def names(cls, mask: int) -> list[str]:
        """Names of the bits set in `mask`, lowest bit first; bits without a name as `bitN`."""
        return _bit_names(mask, [cls])


class ProtocolFeature(FeatureBit):
    """Bits of GET/SET_PROTOCOL_FEATURES (VHOST_USER_PROTOCOL_F_*), as bit numbers.

    Bits 20 and up differ between QEMU (used here) and rust-vmm; see the reference, section 3.2.
    """

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19
    GET_VRING_BASE_INFLIGHT = 20
    GPA_ADDRESSES = 21
    SHMEM = 22
    GET_VRING_BASE_SKIP_DRAIN = 23


class VirtioFeature(FeatureBit):
    """Transport bits of GET/SET_FEATURES (VIRTIO_F_*), as bit numbers. 0-23 are per device."""

    NOTIFY_ON_EMPTY = 24
    ANY_LAYOUT = 27
    INDIRECT_DESC = 28
    EVENT_IDX = 29
    VERSION_1 = 32
    ACCESS_PLATFORM = 33
    RING_PACKED = 34
    IN_ORDER = 35
    ORDER_PLATFORM = 36
    SR_IOV = 37
    NOTIFICATION_DATA = 38
    NOTIF_CONFIG_DATA = 39
    RING_RESET = 40


class VhostFeature(FeatureBit):
    """vhost-specific bits of GET/SET_FEATURES, as bit numbers; never offered to the guest."""

    LOG_ALL = 26  # VHOST_F_LOG_ALL
    PROTOCOL_FEATURES = 30  # VHOST_USER_F_PROTOCOL_FEATURES


def _bit_names(mask: int, enums: Iterable[type[FeatureBit]]) -> list[str]:
    by_bit = {member.value: member.name for cls in enums for member in cls}
    return [by_bit.get(bit, f"bit{bit}") for bit in range(mask.bit_length()) if (mask >> bit) & 1]


def feature_names(mask: int) -> list[str]:
    """Names of the bits of a GET/SET_FEATURES mask (virtio and vhost bits; others as `bitN`)."""
    return _bit_names(mask, [VirtioFeature, VhostFeature])


class DeviceStatus(enum.IntFlag):
    """The virtio device status byte carried by SET_STATUS and GET_STATUS."""

    ACKNOWLEDGE = 0x1
    DRIVER = 0x2
    DRIVER_OK = 0x4
    FEATURES_OK = 0x8
    NEEDS_RESET = 0x40
    FAILED = 0x80


class IotlbPerm(enum.IntEnum):
    """`perm` of an IOTLB message."""

    NONE = 0
    RO = 1
    WO = 2
    RW = 3


class IotlbType(enum.IntEnum):
    """`type` of an IOTLB message."""

    MISS = 1
    UPDATE = 2
    INVALIDATE = 3
    ACCESS_FAIL = 4


class TransferDirection(enum.IntEnum):
    """`direction` of SET_DEVICE_STATE_FD."""

    SAVE = 0
    LOAD = 1


class TransferPhase(enum.IntEnum):
    """`phase` of SET_DEVICE_STATE_FD."""

    STOPPED = 0
