"""Payload layouts as frozen values: `pack()` gives the wire bytes, `unpack()` checks and decodes.

Every layout is little-endian on every host: the spec says host order, but every front-end we
meet is little-endian and a VVU tunnel must carry LE anyway. `unpack` checks the size before it
reads a byte and raises ProtocolError (the peer sent it); `pack` raises ValueError when a field
does not fit its wire type (the caller built it). Padding is written as zeros and ignored when
read, as C front-ends leave it uninitialised.
"""

from __future__ import annotations

import enum
import struct
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Final, Self
from uuid import UUID

from vvu.errors import ProtocolError
from vvu.protocol.constants import (
    MAX_PAYLOAD,
    MAX_REGIONS,
    VRING_IDX_MASK,
    VRING_NOFD,
    IotlbPerm,
    IotlbType,
    TransferDirection,
    TransferPhase,
)

__all__ = [
    "EMPTY",
    "MAX_CONFIG_DATA",
    "SHMEM_SLOTS",
    "U64",
    "Config",
    "DeviceStateTransfer",
    "Empty",
    "Inflight",
    "Iotlb",
    "Log",
    "MemoryRegion",
    "MemoryTable",
    "Payload",
    "RawPayload",
    "SharedObject",
    "ShmemConfig",
    "ShmemMap",
    "SingleRegion",
    "VringAddr",
    "VringArea",
    "VringState",
]

_DATA_PREVIEW: Final = 32  # bytes of opaque data shown by describe()


class Payload(ABC):
    """One payload layout. Subclasses are frozen dataclasses with the spec's field names."""

    __slots__ = ()
    # Declared so that dataclasses.fields() type-checks on subclasses, which are all dataclasses.
    __dataclass_fields__: ClassVar[dict[str, Any]]
    # Fields that describe() shows in hex: addresses, sizes and offsets.
    HEX_FIELDS: ClassVar[frozenset[str]] = frozenset()

    @abstractmethod
    def pack(self) -> bytes:
        """The wire bytes."""

    @classmethod
    @abstractmethod
    def unpack(cls, data: bytes) -> Self:
        """Decode `data`, which must be exactly one payload; raises ProtocolError."""

    @classmethod
    @abstractmethod
    def fits(cls, size: int) -> bool:
        """Whether a payload of `size` bytes can be this layout (before looking inside)."""

    @classmethod
    @abstractmethod
    def size_text(cls) -> str:
        """The allowed wire size, for error messages."""

    def describe(self) -> str:
        """The fields as `name=value` pairs, addresses in hex."""
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            shown = f"{value:#x}" if f.name in self.HEX_FIELDS else str(value)
            parts.append(f"{f.name}={shown}")
        return " ".join(parts)


def _wrong_size(cls: type[Payload], size: int) -> ProtocolError:
    return ProtocolError(f"{cls.__name__} payload must be {cls.size_text()}, got {size}")


def _pack(what: object, layout: struct.Struct, *values: int) -> bytes:
    try:
        return layout.pack(*values)
    except struct.error as err:
        raise ValueError(
            f"{type(what).__name__}: a field does not fit its wire type: {err}"
        ) from err


class _Struct(Payload):
    """A fixed-size layout whose dataclass fields are the struct's values, in order."""

    __slots__ = ()
    _LAYOUT: ClassVar[struct.Struct]
    __match_args__: ClassVar[tuple[str, ...]]

    def pack(self) -> bytes:
        # __match_args__: the dataclass's fields in order, without dataclasses.fields()'s cost.
        return _pack(self, self._LAYOUT, *[getattr(self, name) for name in self.__match_args__])

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        if len(data) != cls._LAYOUT.size:
            raise _wrong_size(cls, len(data))
        return cls(*cls._LAYOUT.unpack(data))

    @classmethod
    def fits(cls, size: int) -> bool:
        return size == cls._LAYOUT.size

    @classmethod
    def size_text(cls) -> str:
        return f"{cls._LAYOUT.size} bytes"


def _enum_text(cls: type[enum.IntEnum], value: int) -> str:
    try:
        return cls(value).name
    except ValueError:
        return str(value)


def _data_text(data: bytes) -> str:
    shown = data[:_DATA_PREVIEW].hex()
    return shown + "..." if len(data) > _DATA_PREVIEW else shown


@dataclass(frozen=True, slots=True)
class Empty(Payload):
    """No payload (size 0)."""

    def pack(self) -> bytes:
        return b""

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        if data:
            raise _wrong_size(cls, len(data))
        return cls()

    @classmethod
    def fits(cls, size: int) -> bool:
        return size == 0

    @classmethod
    def size_text(cls) -> str:
        return "0 bytes"


EMPTY: Final = Empty()


@dataclass(frozen=True, slots=True)
class RawPayload(Payload):
    """Bytes we do not interpret: requests with unknown ids, and crypto sessions."""

    data: bytes

    def pack(self) -> bytes:
        if len(self.data) > MAX_PAYLOAD:
            raise ValueError(f"RawPayload: {len(self.data)} bytes exceed {MAX_PAYLOAD}")
        return self.data

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        if len(data) > MAX_PAYLOAD:
            raise _wrong_size(cls, len(data))
        return cls(bytes(data))

    @classmethod
    def fits(cls, size: int) -> bool:
        return size <= MAX_PAYLOAD

    @classmethod
    def size_text(cls) -> str:
        return f"at most {MAX_PAYLOAD} bytes"

    def describe(self) -> str:
        return f"size={len(self.data)} data={_data_text(self.data)}"


@dataclass(frozen=True, slots=True)
class U64(_Struct):
    """One u64: feature masks, status values, acks, and the vring index of KICK/CALL/ERR."""

    _LAYOUT: ClassVar[struct.Struct] = struct.Struct("<Q")
    value: int

    @classmethod
    def vring(cls, index: int, *, nofd: bool = False) -> Self:
        """The payload of SET_VRING_KICK/CALL/ERR."""
        if not 0 <= index <= VRING_IDX_MASK:
            raise ValueError(f"vring index {index} does not fit in 8 bits")
        return cls(index | (VRING_NOFD if nofd else 0))

    @property
    def vring_index(self) -> int:
        """Bits 0-7, the vring index (SET_VRING_KICK/CALL/ERR)."""
        return self.value & VRING_IDX_MASK

    @property
    def nofd(self) -> bool:
        """Bit 8: no fd is attached (SET_VRING_KICK/CALL/ERR)."""
        return bool(self.value & VRING_NOFD)


@dataclass(frozen=True, slots=True)
class VringState(_Struct):
    """`u32 index; u32 num`: ring size, enable, endianness, or the base (split or packed)."""

    _LAYOUT: ClassVar[struct.Struct] = struct.Struct("<II")
    index: int
    num: int


@dataclass(frozen=True, slots=True)
class VringAddr(_Struct):
    """SET_VRING_ADDR. The wire order is desc, **used**, avail, log, and so is the field order."""

    _LAYOUT: ClassVar[struct.Struct] = struct.Struct("<IIQQQQ")
    HEX_FIELDS: ClassVar[frozenset[str]] = frozenset({"flags", "desc", "used", "avail", "log"})
    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int


@dataclass(frozen=True, slots=True)
class MemoryRegion(_Struct):
    """One guest memory region; its bytes start at `mmap_offset` in the fd that comes with it."""

    _LAYOUT: ClassVar[struct.Struct] = struct.Struct("<QQQQ")
    HEX_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"guest_phys_addr", "memory_size", "userspace_addr", "mmap_offset"}
    )
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


_REGION_SIZE: Final = MemoryRegion._LAYOUT.size
_TABLE_HEAD: Final = struct.Struct("<II")  # nregions, padding


@dataclass(frozen=True, slots=True)
class MemoryTable(Payload):
    """SET_MEM_TABLE: `u32 nregions; u32 padding; region[nregions]`, 8 + 32*n bytes, n <= 8.

    Front-ends send only the regions in use, not the whole 8-entry array.
    """

    regions: tuple[MemoryRegion, ...]

    @property
    def nregions(self) -> int:
        return len(self.regions)

    def pack(self) -> bytes:
        if len(self.regions) > MAX_REGIONS:
            raise ValueError(f"MemoryTable: {len(self.regions)} regions, at most {MAX_REGIONS}")
        return _TABLE_HEAD.pack(len(self.regions), 0) + b"".join(r.pack() for r in self.regions)

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        if len(data) < _TABLE_HEAD.size:
            raise _wrong_size(cls, len(data))
        nregions, _padding = _TABLE_HEAD.unpack_from(data)
        if nregions > MAX_REGIONS:
            raise ProtocolError(f"MemoryTable has {nregions} regions, at most {MAX_REGIONS}")
        expected = _TABLE_HEAD.size + nregions * _REGION_SIZE
        if len(data) != expected:
            raise ProtocolError(
                f"MemoryTable says nregions={nregions}, which needs {expected} bytes, "
                f"but the payload is {len(data)}"
            )
        regions = tuple(
            MemoryRegion.unpack(data[off : off + _REGION_SIZE])
            for off in range(_TABLE_HEAD.size, expected, _REGION_SIZE)
        )
        return cls(regions)

    @classmethod
    def fits(cls, size: int) -> bool:
        n, rest = divmod(size - _TABLE_HEAD.size, _REGION_SIZE)
        return size >= _TABLE_HEAD.size and rest == 0 and n <= MAX_REGIONS

    @classmethod
    def size_text(cls) -> str:
        return f"8 + 32*n bytes with n <= {MAX_REGIONS}"

    def describe(self) -> str:
        regions = "; ".join(r.describe() for r in self.regions)
        return f"nregions={self.nregions} [{regions}]"


_SINGLE_PAD: Final = struct.Struct("<Q")


@dataclass(frozen=True, slots=True)
class SingleRegion(Payload):
    """ADD_MEM_REG and REM_MEM_REG: `u64 padding; region` (40 bytes)."""

    region: MemoryRegion

    def pack(self) -> bytes:
        return _SINGLE_PAD.pack(0) + self.region.pack()

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        if not cls.fits(len(data)):
            raise _wrong_size(cls, len(data))
        return cls(MemoryRegion.unpack(data[_SINGLE_PAD.size :]))

    @classmethod
    def fits(cls, size: int) -> bool:
        return size == _SINGLE_PAD.size + _REGION_SIZE

    @classmethod
    def size_text(cls) -> str:
        return f"{_SINGLE_PAD.size + _REGION_SIZE} bytes"

    def describe(self) -> str:
        return self.region.describe()


@dataclass(frozen=True, slots=True)
class Log(_Struct):
    """SET_LOG_BASE: the dirty log lives at `mmap_offset` in the fd, `mmap_size` bytes long.

    16 bytes; the spec's request table says u64, which is wrong.
    """

    _LAYOUT: ClassVar[struct.Struct] = struct.Struct("<QQ")
    HEX_FIELDS: ClassVar[frozenset[str]] = frozenset({"mmap_size", "mmap_offset"})
    mmap_size: int
    mmap_offset: int


@dataclass(frozen=True, slots=True)
class Iotlb(_Struct):
    """IOTLB_MSG and BACKEND_IOTLB_MSG: 32 bytes with C's tail padding after `perm` and `type`.

    `perm` and `type` are plain ints so that an unknown value reaches the engine, which answers
    it with a failure instead of dropping the connection; compare them with IotlbPerm/IotlbType.
    """

    _LAYOUT: ClassVar[struct.Struct] = struct.Struct("<QQQBB6x")
    HEX_FIELDS: ClassVar[frozenset[str]] = frozenset({"iova", "size", "uaddr"})
    iova: int
    size: int
    uaddr: int
    perm: int
    type: int

    def describe(self) -> str:
        return (
            f"iova={self.iova:#x} size={self.size:#x} uaddr={self.uaddr:#x} "
            f"perm={_enum_text(IotlbPerm, self.perm)} type={_enum_text(IotlbType, self.type)}"
        )


_CONFIG_HEAD: Final = struct.Struct("<III")  # offset, size, flags
MAX_CONFIG_DATA: Final = MAX_PAYLOAD - _CONFIG_HEAD.size


@dataclass(frozen=True, slots=True)
class Config(Payload):
    """GET_CONFIG and SET_CONFIG: `u32 offset; u32 size; u32 flags; u8 data[size]`.

    `size` on the wire is `len(data)`. QEMU sends `flags` as a value: 0 for a guest write, 1 for
    a live-migration restore.
    """

    offset: int
    flags: int
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    def pack(self) -> bytes:
        if len(self.data) > MAX_CONFIG_DATA:
            raise ValueError(f"Config: {len(self.data)} data bytes, at most {MAX_CONFIG_DATA}")
        return _pack(self, _CONFIG_HEAD, self.offset, len(self.data), self.flags) + self.data

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        if not cls.fits(len(data)):
            raise _wrong_size(cls, len(data))
        offset, size, flags = _CONFIG_HEAD.unpack_from(data)
        if size != len(data) - _CONFIG_HEAD.size:
            raise ProtocolError(
                f"Config says size={size} but carries {len(data) - _CONFIG_HEAD.size} data bytes"
            )
        return cls(offset, flags, bytes(data[_CONFIG_HEAD.size :]))

    @classmethod
    def fits(cls, size: int) -> bool:
        return _CONFIG_HEAD.size <= size <= MAX_PAYLOAD

    @classmethod
    def size_text(cls) -> str:
        return f"12 + size bytes with size <= {MAX_CONFIG_DATA}"

    def describe(self) -> str:
        return (
            f"offset={self.offset:#x} size={self.size} flags={self.flags:#x} "
            f"data={_data_text(self.data)}"
        )


@dataclass(frozen=True, slots=True)
class VringArea(_Struct):
    """BACKEND_VRING_HOST_NOTIFIER_MSG: `u64` holds the vring index (bits 0-7) and NOFD (bit 8)."""

    _LAYOUT: ClassVar[struct.Struct] = struct.Struct("<QQQ")
    u64: int
    size: int
    offset: int

    @property
    def index(self) -> int:
        return self.u64 & VRING_IDX_MASK

    @property
    def nofd(self) -> bool:
        """No fd attached: unmap the notifier area."""
        return bool(self.u64 & VRING_NOFD)

    def describe(self) -> str:
        nofd = " nofd" if self.nofd else ""
        return f"index={self.index}{nofd} size={self.size:#x} offset={self.offset:#x}"


_INFLIGHT_SPEC_SIZE: Final = 20  # the spec's table, without C's tail padding


@dataclass(frozen=True, slots=True)
class Inflight(_Struct):
    """GET_INFLIGHT_FD and SET_INFLIGHT_FD.

    24 bytes on the wire (QEMU and rust-vmm send sizeof, with 4 bytes of tail padding); 20, the
    size in the spec's table, is accepted too. `pack` writes 24.
    """

    _LAYOUT: ClassVar[struct.Struct] = struct.Struct("<QQHH4x")
    HEX_FIELDS: ClassVar[frozenset[str]] = frozenset({"mmap_size", "mmap_offset"})
    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        if not cls.fits(len(data)):
            raise _wrong_size(cls, len(data))
        padded = bytes(data) + bytes(cls._LAYOUT.size - len(data))
        return cls(*cls._LAYOUT.unpack(padded))

    @classmethod
    def fits(cls, size: int) -> bool:
        return size in (_INFLIGHT_SPEC_SIZE, cls._LAYOUT.size)

    @classmethod
    def size_text(cls) -> str:
        return f"{cls._LAYOUT.size} (or {_INFLIGHT_SPEC_SIZE}) bytes"


_UUID_SIZE: Final = 16


@dataclass(frozen=True, slots=True)
class SharedObject(Payload):
    """A 16-byte UUID in RFC 4122 byte order (the first three fields big-endian)."""

    uuid: UUID

    def pack(self) -> bytes:
        return self.uuid.bytes

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        if len(data) != _UUID_SIZE:
            raise _wrong_size(cls, len(data))
        return cls(UUID(bytes=bytes(data)))

    @classmethod
    def fits(cls, size: int) -> bool:
        return size == _UUID_SIZE

    @classmethod
    def size_text(cls) -> str:
        return f"{_UUID_SIZE} bytes"


@dataclass(frozen=True, slots=True)
class DeviceStateTransfer(_Struct):
    """SET_DEVICE_STATE_FD: `u32 direction` (0 save, 1 load); `u32 phase` (0 stopped)."""

    _LAYOUT: ClassVar[struct.Struct] = struct.Struct("<II")
    direction: int
    phase: int

    def describe(self) -> str:
        return (
            f"direction={_enum_text(TransferDirection, self.direction)} "
            f"phase={_enum_text(TransferPhase, self.phase)}"
        )


@dataclass(frozen=True, slots=True)
class ShmemMap(_Struct):
    """BACKEND_SHMEM_MAP and _UNMAP: map `len` bytes of the fd at `fd_offset` to `shm_offset`.

    `flags` bit 0: 0 read-only, 1 read-write.
    """

    _LAYOUT: ClassVar[struct.Struct] = struct.Struct("<B7xQQQQ")
    HEX_FIELDS: ClassVar[frozenset[str]] = frozenset({"fd_offset", "shm_offset", "len", "flags"})
    shmid: int
    fd_offset: int
    shm_offset: int
    len: int
    flags: int


SHMEM_SLOTS: Final = 256
_SHMEM_CONFIG: Final = struct.Struct(f"<II{SHMEM_SLOTS}Q")


@dataclass(frozen=True, slots=True)
class ShmemConfig(Payload):
    """GET_SHMEM_CONFIG reply: `u32 nregions; u32 pad; u64 memory_sizes[256]` (2056 bytes).

    `memory_sizes[shmid]` is the size of region `shmid`, 0 for unused. A shorter tuple is padded
    with zeros so that equal configurations compare equal.
    """

    nregions: int
    memory_sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if len(self.memory_sizes) > SHMEM_SLOTS:
            raise ValueError(f"ShmemConfig: {len(self.memory_sizes)} sizes, at most {SHMEM_SLOTS}")
        padded = tuple(self.memory_sizes) + (0,) * (SHMEM_SLOTS - len(self.memory_sizes))
        object.__setattr__(self, "memory_sizes", padded)  # frozen: the only way to normalise

    def pack(self) -> bytes:
        return _pack(self, _SHMEM_CONFIG, self.nregions, 0, *self.memory_sizes)

    @classmethod
    def unpack(cls, data: bytes) -> Self:
        if len(data) != _SHMEM_CONFIG.size:
            raise _wrong_size(cls, len(data))
        nregions, _pad, *sizes = _SHMEM_CONFIG.unpack(data)
        return cls(nregions, tuple(sizes))

    @classmethod
    def fits(cls, size: int) -> bool:
        return size == _SHMEM_CONFIG.size

    @classmethod
    def size_text(cls) -> str:
        return f"{_SHMEM_CONFIG.size} bytes"

    def describe(self) -> str:
        used = ", ".join(f"{i}: {s:#x}" for i, s in enumerate(self.memory_sizes) if s)
        return f"nregions={self.nregions} memory_sizes={{{used}}}"
