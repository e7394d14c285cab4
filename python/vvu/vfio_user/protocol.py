"""The vfio-user wire format (QEMU docs/interop/vfio-user.rst) as typed values. No I/O.

Every message is a 16-byte header (`<HHIII`: id, command, size incl. header, flags, error) and a
command-specific payload. The spec says host byte order; we write little-endian on every host
(every peer we meet is little-endian, and it keeps the format independent of where we run).

`unpack` checks sizes before reading a byte and raises `PayloadError` (the peer sent it: answer
with an error reply carrying `errno`); `pack` raises ValueError when a field does not fit its wire
type (the caller built it). Framing errors (a header that cannot be trusted) are the
connection's business (`vvu.vfio_user.connection`): they end the session.
"""

from __future__ import annotations

import enum
import errno as _errno
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

from vvu.errors import ProtocolError, VvuError

__all__ = [
    "DEFAULT_MAX_DATA_XFER_SIZE",
    "DEFAULT_MAX_DMA_MAPS",
    "DEFAULT_MAX_MSG_FDS",
    "DEFAULT_PGSIZES",
    "HEADER_SIZE",
    "NUM_IRQS",
    "NUM_REGIONS",
    "REGION_INFO_SIZE",
    "Capabilities",
    "Command",
    "DeviceFlag",
    "DeviceInfo",
    "DmaAccess",
    "DmaMap",
    "DmaMapFlag",
    "DmaUnmap",
    "DmaUnmapFlag",
    "Header",
    "IoFdEntry",
    "IoFdType",
    "IoFdsReply",
    "IoFdsRequest",
    "IoeventfdFlag",
    "IrqIndex",
    "IrqInfo",
    "IrqInfoFlag",
    "IrqSet",
    "IrqSetFlag",
    "Migration",
    "MsixMappableCap",
    "PayloadError",
    "RegionAccess",
    "RegionCap",
    "RegionFlag",
    "RegionIndex",
    "RegionInfo",
    "SparseMmapCap",
    "SparseMmapFdsCap",
    "TwinSocket",
    "TypeCap",
    "UnknownCap",
    "Version",
    "VfioUserError",
    "WriteMulti",
    "command_name",
    "encode",
    "encode_error",
    "split_chunks",
]

HEADER_SIZE: Final = 16
REGION_INFO_SIZE: Final = 32  # struct vfio_region_info
U32_MAX: Final = (1 << 32) - 1
U64_MAX: Final = (1 << 64) - 1

# What every client accepts (libvfio-user always reports 9 regions and 5 irq types; QEMU needs
# at least 8 and 3, its sample client insists on 9).
NUM_REGIONS: Final = 9
NUM_IRQS: Final = 5

# Spec defaults for absent capabilities.
DEFAULT_MAX_MSG_FDS: Final = 1
DEFAULT_MAX_DATA_XFER_SIZE: Final = 1 << 20
DEFAULT_MAX_DMA_MAPS: Final = 65535
DEFAULT_PGSIZES: Final = 4096

# A VERSION payload's JSON is a few hundred bytes in practice.
MAX_VERSION_JSON: Final = 16 * 1024


class PayloadError(ProtocolError):
    """A payload the peer sent is malformed; the reply is an error carrying `errno`."""

    def __init__(self, message: str, errno: int = _errno.EINVAL) -> None:
        super().__init__(message)
        self.errno = errno


class VfioUserError(VvuError):
    """A command failed with `errno`: an error reply from the peer (client side), or the reason a
    server refuses a command (raised by request handlers and device models)."""

    def __init__(self, errno: int, message: str = "", command: int | None = None) -> None:
        self.errno = errno
        self.command = command
        text = message or _errno.errorcode.get(errno, f"errno {errno}")
        if command is not None:
            text = f"{command_name(command)}: {text}"
        super().__init__(text)


class Command(enum.IntEnum):
    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    DIRTY_PAGES = 14  # dropped from the spec, still in QEMU's and the Rust crate's enums
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


def command_name(command: int) -> str:
    try:
        return Command(command).name
    except ValueError:
        return f"command {command}"


# Header flags.
TYPE_MASK: Final = 0xF
TYPE_COMMAND: Final = 0
TYPE_REPLY: Final = 1
NO_REPLY: Final = 0x10
ERROR: Final = 0x20
KNOWN_FLAGS: Final = TYPE_MASK | NO_REPLY | ERROR


class DeviceFlag(enum.IntFlag):
    RESET = 1
    PCI = 2


class RegionIndex(enum.IntEnum):
    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


class RegionFlag(enum.IntFlag):
    READ = 1
    WRITE = 2
    MMAP = 4
    CAPS = 8


class IrqIndex(enum.IntEnum):
    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


class IrqInfoFlag(enum.IntFlag):
    EVENTFD = 1
    MASKABLE = 2
    AUTOMASKED = 4
    NORESIZE = 8


class IrqSetFlag(enum.IntFlag):
    DATA_NONE = 1
    DATA_BOOL = 2
    DATA_EVENTFD = 4
    ACTION_MASK = 8
    ACTION_UNMASK = 16
    ACTION_TRIGGER = 32


IRQ_DATA_MASK: Final = 0x7
IRQ_ACTION_MASK: Final = 0x38


class DmaMapFlag(enum.IntFlag):
    READ = 1
    WRITE = 2
    MMAP = 4  # newer: access through mmap of the fd (libvfio-user #842)
    FILE_IO = 8  # newer: access through pread/pwrite of the fd


class DmaUnmapFlag(enum.IntFlag):
    GET_DIRTY_BITMAP = 1  # old migration path (kernel numbering; the Rust crate uses 2)
    ALL = 2  # kernel numbering (the Rust crate uses 4)


class IoFdType(enum.IntEnum):
    IOEVENTFD = 0
    IOREGIONFD = 1


class IoeventfdFlag(enum.IntFlag):
    DATAMATCH = 1
    PIO = 2
    VIRTIO_CCW_NOTIFY = 8


# Region capability ids (struct vfio_info_cap_header.id).
CAP_SPARSE_MMAP: Final = 1
CAP_TYPE: Final = 2
CAP_MSIX_MAPPABLE: Final = 3
# Per-area fds: an unmerged proposal (p-b-o/qemu-ci @e339b501), used only when both sides put
# `sparse_mmap_fds: true` in their VERSION capabilities.
CAP_SPARSE_MMAP_FDS: Final = 0x8001


# ---------------------------------------------------------------------------------------------
# Header


@dataclass(frozen=True, slots=True)
class Header:
    """`u16 id; u16 command; u32 size (whole message); u32 flags; u32 error`."""

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<HHIII")
    id: int
    command: int
    size: int
    flags: int = TYPE_COMMAND
    error: int = 0

    @property
    def msg_type(self) -> int:
        return self.flags & TYPE_MASK

    @property
    def is_reply(self) -> bool:
        return self.msg_type == TYPE_REPLY

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & NO_REPLY)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & ERROR)

    def pack(self) -> bytes:
        try:
            return self.LAYOUT.pack(self.id, self.command, self.size, self.flags, self.error)
        except struct.error as err:
            raise ValueError(f"Header: a field does not fit: {err}") from err

    @classmethod
    def unpack(cls, data: bytes) -> Header:
        if len(data) != HEADER_SIZE:
            raise ProtocolError(f"a header is {HEADER_SIZE} bytes, got {len(data)}")
        return cls(*cls.LAYOUT.unpack(data))


def encode(
    msg_id: int, command: int, payload: bytes = b"", *, reply: bool = False, no_reply: bool = False
) -> bytes:
    """One whole message: header and payload."""
    flags = (TYPE_REPLY if reply else TYPE_COMMAND) | (NO_REPLY if no_reply else 0)
    return Header(msg_id, command, HEADER_SIZE + len(payload), flags).pack() + payload


def encode_error(msg_id: int, command: int, errno: int) -> bytes:
    """An error reply: header only, REPLY|ERROR, a positive errno (EINVAL for nonsense)."""
    if not 0 < errno < 4096:
        errno = _errno.EINVAL
    return Header(msg_id, command, HEADER_SIZE, TYPE_REPLY | ERROR, errno).pack()


# ---------------------------------------------------------------------------------------------
# Helpers


def _need(name: str, data: bytes, size: int, *, exact: bool = True) -> None:
    if (len(data) != size) if exact else (len(data) < size):
        relation = "" if exact else "at least "
        raise PayloadError(f"{name}: payload is {len(data)} bytes, expected {relation}{size}")


def _check_range(what: str, value: int, bits: int) -> None:
    if not 0 <= value < (1 << bits):
        raise ValueError(f"{what}={value} does not fit in u{bits}")


# ---------------------------------------------------------------------------------------------
# VERSION


@dataclass(frozen=True, slots=True)
class Migration:
    """The old dirty-page migration capability (parsed, never offered)."""

    pgsize: int
    max_bitmap_size: int | None = None


@dataclass(frozen=True, slots=True)
class TwinSocket:
    supported: bool = False
    fd_index: int | None = None


@dataclass(frozen=True, slots=True)
class Capabilities:
    """The `capabilities` object of a VERSION message. None = the member is absent."""

    max_msg_fds: int | None = None
    max_data_xfer_size: int | None = None
    max_dma_maps: int | None = None
    pgsizes: int | None = None
    migration: Migration | None = None
    twin_socket: TwinSocket | None = None
    write_multiple: bool | None = None
    sparse_mmap_fds: bool | None = None

    # Effective values (spec defaults for absent members).
    @property
    def msg_fds(self) -> int:
        return DEFAULT_MAX_MSG_FDS if self.max_msg_fds is None else self.max_msg_fds

    @property
    def data_xfer_size(self) -> int:
        return (
            DEFAULT_MAX_DATA_XFER_SIZE
            if self.max_data_xfer_size is None
            else self.max_data_xfer_size
        )

    @property
    def dma_maps(self) -> int:
        return DEFAULT_MAX_DMA_MAPS if self.max_dma_maps is None else self.max_dma_maps

    @property
    def page_sizes(self) -> int:
        return DEFAULT_PGSIZES if self.pgsizes is None else self.pgsizes

    def to_json(self) -> dict[str, Any]:
        caps: dict[str, Any] = {}
        for name in ("max_msg_fds", "max_data_xfer_size", "max_dma_maps", "pgsizes"):
            value = getattr(self, name)
            if value is not None:
                caps[name] = value
        if self.migration is not None:
            mig: dict[str, int] = {"pgsize": self.migration.pgsize}
            if self.migration.max_bitmap_size is not None:
                mig["max_bitmap_size"] = self.migration.max_bitmap_size
            caps["migration"] = mig
        if self.twin_socket is not None:
            twin: dict[str, Any] = {"supported": self.twin_socket.supported}
            if self.twin_socket.fd_index is not None:
                twin["fd_index"] = self.twin_socket.fd_index
            caps["twin_socket"] = twin
        if self.write_multiple is not None:
            caps["write_multiple"] = self.write_multiple
        if self.sparse_mmap_fds is not None:
            caps["sparse_mmap_fds"] = self.sparse_mmap_fds
        return caps

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Capabilities:
        """Validate the members we know (types and ranges); ignore unknown ones."""

        def number(name: str, value: Any, *, bits: int = 32, minimum: int = 0) -> int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise PayloadError(f"VERSION: capability {name} must be an integer")
            if not minimum <= value < (1 << bits):
                raise PayloadError(f"VERSION: capability {name}={value} is out of range")
            return value

        def boolean(name: str, value: Any) -> bool:
            if not isinstance(value, bool):
                raise PayloadError(f"VERSION: capability {name} must be a boolean")
            return value

        def obj_member(name: str, value: Any) -> Mapping[str, Any]:
            if not isinstance(value, dict):
                raise PayloadError(f"VERSION: capability {name} must be an object")
            return value

        kwargs: dict[str, Any] = {}
        if "max_msg_fds" in obj:
            kwargs["max_msg_fds"] = number("max_msg_fds", obj["max_msg_fds"], bits=16)
        if "max_data_xfer_size" in obj:
            kwargs["max_data_xfer_size"] = number(
                "max_data_xfer_size", obj["max_data_xfer_size"], minimum=1
            )
        if "max_dma_maps" in obj:
            kwargs["max_dma_maps"] = number("max_dma_maps", obj["max_dma_maps"])
        if "pgsizes" in obj:
            kwargs["pgsizes"] = number("pgsizes", obj["pgsizes"], bits=64, minimum=1)
        if "migration" in obj:
            mig = obj_member("migration", obj["migration"])
            bitmap = mig.get("max_bitmap_size")
            kwargs["migration"] = Migration(
                pgsize=number("migration.pgsize", mig.get("pgsize", 0), bits=64),
                max_bitmap_size=None
                if bitmap is None
                else number("migration.max_bitmap_size", bitmap, bits=64),
            )
        if "twin_socket" in obj:
            twin = obj_member("twin_socket", obj["twin_socket"])
            index = twin.get("fd_index")
            kwargs["twin_socket"] = TwinSocket(
                supported=boolean("twin_socket.supported", twin.get("supported", False)),
                fd_index=None if index is None else number("twin_socket.fd_index", index),
            )
        if "write_multiple" in obj:
            kwargs["write_multiple"] = boolean("write_multiple", obj["write_multiple"])
        if "sparse_mmap_fds" in obj:
            kwargs["sparse_mmap_fds"] = boolean("sparse_mmap_fds", obj["sparse_mmap_fds"])
        return cls(**kwargs)


@dataclass(frozen=True, slots=True)
class Version:
    """`u16 major; u16 minor;` then optional NUL-terminated UTF-8 JSON `{"capabilities": {}}`.

    `capabilities` None means no JSON at all; an empty Capabilities means JSON without members.
    """

    major: int
    minor: int
    capabilities: Capabilities | None = None

    _FIXED: ClassVar[struct.Struct] = struct.Struct("<HH")

    def pack(self) -> bytes:
        _check_range("major", self.major, 16)
        _check_range("minor", self.minor, 16)
        data = self._FIXED.pack(self.major, self.minor)
        if self.capabilities is not None:
            text = json.dumps({"capabilities": self.capabilities.to_json()}, separators=(",", ":"))
            data += text.encode() + b"\0"
        return data

    @classmethod
    def unpack(cls, data: bytes) -> Version:
        _need("VERSION", data, 4, exact=False)
        major, minor = cls._FIXED.unpack_from(data)
        raw = data[4:]
        if not raw:
            return cls(major, minor)
        if len(raw) > MAX_VERSION_JSON:
            raise PayloadError(f"VERSION: {len(raw)} bytes of JSON, more than {MAX_VERSION_JSON}")
        if raw[-1] != 0 or 0 in raw[:-1]:
            raise PayloadError("VERSION: the JSON must be one NUL-terminated string")
        try:
            doc = json.loads(raw[:-1].decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise PayloadError(f"VERSION: bad JSON: {err}") from err
        if not isinstance(doc, dict):
            raise PayloadError("VERSION: the JSON must be an object")
        caps = doc.get("capabilities", {})
        if not isinstance(caps, dict):
            raise PayloadError("VERSION: capabilities must be an object")
        return cls(major, minor, Capabilities.from_json(caps))


# ---------------------------------------------------------------------------------------------
# DMA_MAP / DMA_UNMAP


@dataclass(frozen=True, slots=True)
class DmaMap:
    """`u32 argsz; u32 flags; u64 offset; u64 address; u64 size` (argsz = 32)."""

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<IIQQQ")
    flags: int
    offset: int
    address: int
    size: int
    argsz: int = 32

    def pack(self) -> bytes:
        try:
            return self.LAYOUT.pack(self.argsz, self.flags, self.offset, self.address, self.size)
        except struct.error as err:
            raise ValueError(f"DMA_MAP: {err}") from err

    @classmethod
    def unpack(cls, data: bytes) -> DmaMap:
        _need("DMA_MAP", data, cls.LAYOUT.size)
        argsz, flags, offset, address, size = cls.LAYOUT.unpack(data)
        return cls(flags, offset, address, size, argsz)


@dataclass(frozen=True, slots=True)
class DmaUnmap:
    """`u32 argsz; u32 flags; u64 address; u64 size` (the reply echoes it)."""

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<IIQQ")
    flags: int
    address: int
    size: int
    argsz: int = 24

    def pack(self) -> bytes:
        try:
            return self.LAYOUT.pack(self.argsz, self.flags, self.address, self.size)
        except struct.error as err:
            raise ValueError(f"DMA_UNMAP: {err}") from err

    @classmethod
    def unpack(cls, data: bytes) -> DmaUnmap:
        # A request with GET_DIRTY_BITMAP carries a bitmap struct after these 24 bytes; the
        # caller refuses that flag before asking for an exact size.
        _need("DMA_UNMAP", data, cls.LAYOUT.size, exact=False)
        argsz, flags, address, size = cls.LAYOUT.unpack_from(data)
        return cls(flags, address, size, argsz)


# ---------------------------------------------------------------------------------------------
# DEVICE_GET_INFO, DEVICE_GET_IRQ_INFO


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """`u32 argsz; u32 flags; u32 num_regions; u32 num_irqs` (request and reply)."""

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<IIII")
    flags: int = 0
    num_regions: int = 0
    num_irqs: int = 0
    argsz: int = 16

    def pack(self) -> bytes:
        try:
            return self.LAYOUT.pack(self.argsz, self.flags, self.num_regions, self.num_irqs)
        except struct.error as err:
            raise ValueError(f"DEVICE_GET_INFO: {err}") from err

    @classmethod
    def unpack(cls, data: bytes) -> DeviceInfo:
        _need("DEVICE_GET_INFO", data, cls.LAYOUT.size)
        argsz, flags, num_regions, num_irqs = cls.LAYOUT.unpack(data)
        return cls(flags, num_regions, num_irqs, argsz)


@dataclass(frozen=True, slots=True)
class IrqInfo:
    """`u32 argsz; u32 flags; u32 index; u32 count` (request and reply)."""

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<IIII")
    index: int
    flags: int = 0
    count: int = 0
    argsz: int = 16

    def pack(self) -> bytes:
        try:
            return self.LAYOUT.pack(self.argsz, self.flags, self.index, self.count)
        except struct.error as err:
            raise ValueError(f"DEVICE_GET_IRQ_INFO: {err}") from err

    @classmethod
    def unpack(cls, data: bytes) -> IrqInfo:
        _need("DEVICE_GET_IRQ_INFO", data, cls.LAYOUT.size)
        argsz, flags, index, count = cls.LAYOUT.unpack(data)
        return cls(index, flags, count, argsz)


# ---------------------------------------------------------------------------------------------
# DEVICE_GET_REGION_INFO and region capabilities

_CAP_HEADER = struct.Struct("<HHI")  # id, version, next
_SPARSE_HEADER = struct.Struct("<II")  # nr_areas, reserved
_SPARSE_AREA = struct.Struct("<QQ")  # offset, size
_SPARSE_FD_AREA = struct.Struct("<QQQII")  # offset, fd_offset, size, fd_index, pad
MAX_SPARSE_AREAS: Final = 1024


@dataclass(frozen=True, slots=True)
class SparseMmapCap:
    """id 1: areas `(offset, size)`; area i is mmap(fd, size, info.offset + offset) and appears
    at region offset `offset`."""

    areas: tuple[tuple[int, int], ...]
    ID: ClassVar[int] = CAP_SPARSE_MMAP

    def body(self) -> bytes:
        return _SPARSE_HEADER.pack(len(self.areas), 0) + b"".join(
            _SPARSE_AREA.pack(off, size) for off, size in self.areas
        )

    @classmethod
    def parse(cls, body: bytes) -> SparseMmapCap:
        nr = _sparse_count(body, _SPARSE_AREA.size)
        return cls(
            tuple(
                _SPARSE_AREA.unpack_from(body, _SPARSE_HEADER.size + i * _SPARSE_AREA.size)
                for i in range(nr)
            )
        )


@dataclass(frozen=True, slots=True)
class SparseMmapFdsCap:
    """id 0x8001 (unmerged proposal): areas `(offset, fd_offset, size, fd_index)`, each mapped
    from the reply's fd number `fd_index` at `fd_offset`, appearing at region offset `offset`."""

    areas: tuple[tuple[int, int, int, int], ...]
    ID: ClassVar[int] = CAP_SPARSE_MMAP_FDS

    def body(self) -> bytes:
        return _SPARSE_HEADER.pack(len(self.areas), 0) + b"".join(
            _SPARSE_FD_AREA.pack(off, fd_off, size, index, 0)
            for off, fd_off, size, index in self.areas
        )

    @classmethod
    def parse(cls, body: bytes) -> SparseMmapFdsCap:
        nr = _sparse_count(body, _SPARSE_FD_AREA.size)
        areas = []
        for i in range(nr):
            off, fd_off, size, index, _pad = _SPARSE_FD_AREA.unpack_from(
                body, _SPARSE_HEADER.size + i * _SPARSE_FD_AREA.size
            )
            areas.append((off, fd_off, size, index))
        return cls(tuple(areas))


def _sparse_count(body: bytes, area_size: int) -> int:
    if len(body) < _SPARSE_HEADER.size:
        raise PayloadError("sparse mmap capability is truncated")
    nr, _reserved = _SPARSE_HEADER.unpack_from(body)
    if nr > MAX_SPARSE_AREAS or len(body) < _SPARSE_HEADER.size + nr * area_size:
        raise PayloadError(f"sparse mmap capability claims {nr} areas that do not fit")
    return int(nr)


@dataclass(frozen=True, slots=True)
class TypeCap:
    """id 2: device-specific region type and subtype."""

    type: int
    subtype: int
    ID: ClassVar[int] = CAP_TYPE

    def body(self) -> bytes:
        return struct.pack("<II", self.type, self.subtype)

    @classmethod
    def parse(cls, body: bytes) -> TypeCap:
        if len(body) < 8:
            raise PayloadError("type capability is truncated")
        return cls(*struct.unpack_from("<II", body))


@dataclass(frozen=True, slots=True)
class MsixMappableCap:
    """id 3: the MSI-X table's BAR may be mapped whole."""

    ID: ClassVar[int] = CAP_MSIX_MAPPABLE

    def body(self) -> bytes:
        return b""

    @classmethod
    def parse(cls, body: bytes) -> MsixMappableCap:
        return cls()


@dataclass(frozen=True, slots=True)
class UnknownCap:
    """A capability we do not interpret (kept so a list round-trips)."""

    id: int
    version: int
    data: bytes

    def body(self) -> bytes:
        return self.data


RegionCap = SparseMmapCap | SparseMmapFdsCap | TypeCap | MsixMappableCap | UnknownCap

_CAP_CLASSES: Final[dict[int, Any]] = {
    CAP_SPARSE_MMAP: SparseMmapCap,
    CAP_SPARSE_MMAP_FDS: SparseMmapFdsCap,
    CAP_TYPE: TypeCap,
    CAP_MSIX_MAPPABLE: MsixMappableCap,
}


def _cap_id_version(cap: RegionCap) -> tuple[int, int]:
    if isinstance(cap, UnknownCap):
        return cap.id, cap.version
    return cap.ID, 1


@dataclass(frozen=True, slots=True)
class RegionInfo:
    """`struct vfio_region_info` (32 bytes) plus its capability chain.

    In a request only `index` and `argsz` (the reply room offered) matter. In a reply `argsz` is
    the size the full reply needs; a reply shorter than that carries the struct alone.
    """

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<IIIIQQ")
    index: int
    flags: int = 0
    size: int = 0
    offset: int = 0
    argsz: int = REGION_INFO_SIZE
    cap_offset: int = 0
    caps: tuple[RegionCap, ...] = ()

    def caps_bytes(self) -> bytes:
        """The chain, with `next` offsets counted from the start of the 32-byte struct."""
        out = b""
        bodies = [c.body() for c in self.caps]
        pos = REGION_INFO_SIZE
        for i, (cap, body) in enumerate(zip(self.caps, bodies, strict=True)):
            cap_id, version = _cap_id_version(cap)
            # Keep each following cap 8-byte aligned, as the kernel does.
            length = _CAP_HEADER.size + len(body)
            last = i + 1 == len(self.caps)
            padded = length if last else (length + 7) & ~7
            nxt = 0 if last else pos + padded
            out += _CAP_HEADER.pack(cap_id, version, nxt) + body + bytes(padded - length)
            pos += padded
        return out

    def full_argsz(self) -> int:
        return REGION_INFO_SIZE + len(self.caps_bytes())

    def pack(self, *, with_caps: bool = True) -> bytes:
        """The struct, then the caps when `with_caps` (CAPS flag and cap_offset follow)."""
        caps = self.caps_bytes() if with_caps else b""
        caps_bit = int(RegionFlag.CAPS)
        flags = self.flags | caps_bit if caps else self.flags & ~caps_bit
        cap_offset = REGION_INFO_SIZE if caps else 0
        try:
            head = self.LAYOUT.pack(
                self.argsz, int(flags), self.index, cap_offset, self.size, self.offset
            )
        except struct.error as err:
            raise ValueError(f"DEVICE_GET_REGION_INFO: {err}") from err
        return head + caps

    def pack_request(self) -> bytes:
        return self.LAYOUT.pack(self.argsz, 0, self.index, 0, 0, 0)

    @classmethod
    def unpack(cls, data: bytes) -> RegionInfo:
        """Parse a reply (or a request: then `data` is exactly the struct)."""
        _need("DEVICE_GET_REGION_INFO", data, REGION_INFO_SIZE, exact=False)
        argsz, flags, index, cap_offset, size, offset = cls.LAYOUT.unpack_from(data)
        caps: list[RegionCap] = []
        if flags & RegionFlag.CAPS and cap_offset:
            seen = 0
            pos = cap_offset
            while pos:
                if pos <= seen or pos < REGION_INFO_SIZE or pos + _CAP_HEADER.size > len(data):
                    raise PayloadError(f"region {index}: capability chain is broken at {pos}")
                cap_id, version, nxt = _CAP_HEADER.unpack_from(data, pos)
                end = nxt if nxt else len(data)
                if nxt and nxt <= pos:
                    raise PayloadError(f"region {index}: capability chain loops at {pos}")
                body = data[pos + _CAP_HEADER.size : end]
                klass = _CAP_CLASSES.get(cap_id)
                caps.append(
                    UnknownCap(cap_id, version, bytes(body)) if klass is None else klass.parse(body)
                )
                seen, pos = pos, nxt
        return cls(index, flags, size, offset, argsz, cap_offset, tuple(caps))


# ---------------------------------------------------------------------------------------------
# DEVICE_GET_REGION_IO_FDS

_IO_FD_ENTRY = struct.Struct("<QQIIIIQ")  # offset, size, fd_index, type, flags, pad, datamatch


@dataclass(frozen=True, slots=True)
class IoFdsRequest:
    """`u32 argsz; u32 flags (0); u32 index; u32 count (0)`."""

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<IIII")
    index: int
    argsz: int = 16
    flags: int = 0
    count: int = 0

    def pack(self) -> bytes:
        return self.LAYOUT.pack(self.argsz, self.flags, self.index, self.count)

    @classmethod
    def unpack(cls, data: bytes) -> IoFdsRequest:
        _need("DEVICE_GET_REGION_IO_FDS", data, cls.LAYOUT.size)
        argsz, flags, index, count = cls.LAYOUT.unpack(data)
        return cls(index, argsz, flags, count)


@dataclass(frozen=True, slots=True)
class IoFdEntry:
    """One sub-region (40 bytes): offset, size (0 = any width), fd_index, type, flags,
    datamatch (ioeventfd) or user_data (ioregionfd)."""

    offset: int
    size: int
    fd_index: int
    type: int = IoFdType.IOEVENTFD
    flags: int = 0
    datamatch: int = 0

    SIZE: ClassVar[int] = _IO_FD_ENTRY.size

    def pack(self) -> bytes:
        try:
            return _IO_FD_ENTRY.pack(
                self.offset, self.size, self.fd_index, self.type, self.flags, 0, self.datamatch
            )
        except struct.error as err:
            raise ValueError(f"io fd entry: {err}") from err


@dataclass(frozen=True, slots=True)
class IoFdsReply:
    """`u32 argsz; u32 flags; u32 index; u32 count;` then `count` entries (stride
    (argsz - 16)/count; 40 bytes here, 48 from libvfio-user's shadow ioeventfds)."""

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<IIII")
    index: int
    count: int
    entries: tuple[IoFdEntry, ...] = ()
    argsz: int = 16
    flags: int = 0

    def pack(self) -> bytes:
        return self.LAYOUT.pack(self.argsz, self.flags, self.index, self.count) + b"".join(
            e.pack() for e in self.entries
        )

    @classmethod
    def unpack(cls, data: bytes) -> IoFdsReply:
        _need("DEVICE_GET_REGION_IO_FDS reply", data, 16, exact=False)
        argsz, flags, index, count = cls.LAYOUT.unpack_from(data)
        rest = data[16:]
        if not rest:  # a short reply: argsz says how much room the full one needs
            return cls(index, count, (), argsz, flags)
        if count == 0 or len(rest) % count or len(rest) // count < IoFdEntry.SIZE:
            raise PayloadError(f"IO_FDS reply: {len(rest)} bytes do not hold {count} entries")
        stride = len(rest) // count
        entries = []
        for i in range(count):
            off, size, fd_index, kind, eflags, _pad, datamatch = _IO_FD_ENTRY.unpack_from(
                rest, i * stride
            )
            entries.append(IoFdEntry(off, size, fd_index, kind, eflags, datamatch))
        return cls(index, count, tuple(entries), argsz, flags)


# ---------------------------------------------------------------------------------------------
# DEVICE_SET_IRQS


@dataclass(frozen=True, slots=True)
class IrqSet:
    """`u32 argsz; u32 flags; u32 index; u32 start; u32 count;` then `count` bool bytes with
    DATA_BOOL. Eventfds travel as SCM_RIGHTS, never in the payload (argsz = 20)."""

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<IIIII")
    flags: int
    index: int
    start: int
    count: int
    data: bytes = b""
    argsz: int | None = None  # None: computed (20 + len(data))

    def pack(self) -> bytes:
        argsz = self.LAYOUT.size + len(self.data) if self.argsz is None else self.argsz
        try:
            head = self.LAYOUT.pack(argsz, self.flags, self.index, self.start, self.count)
        except struct.error as err:
            raise ValueError(f"DEVICE_SET_IRQS: {err}") from err
        return head + self.data

    @classmethod
    def unpack(cls, data: bytes) -> IrqSet:
        _need("DEVICE_SET_IRQS", data, cls.LAYOUT.size, exact=False)
        argsz, flags, index, start, count = cls.LAYOUT.unpack_from(data)
        return cls(flags, index, start, count, bytes(data[cls.LAYOUT.size :]), argsz)

    @property
    def data_kind(self) -> int:
        return self.flags & IRQ_DATA_MASK

    @property
    def action(self) -> int:
        return self.flags & IRQ_ACTION_MASK


# ---------------------------------------------------------------------------------------------
# REGION_READ / REGION_WRITE / REGION_WRITE_MULTI, DMA_READ / DMA_WRITE


@dataclass(frozen=True, slots=True)
class RegionAccess:
    """`u64 offset; u32 region; u32 count;` then data (write requests, read replies)."""

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<QII")
    offset: int
    region: int
    count: int
    data: bytes = b""

    def pack(self) -> bytes:
        try:
            return self.LAYOUT.pack(self.offset, self.region, self.count) + self.data
        except struct.error as err:
            raise ValueError(f"region access: {err}") from err

    @classmethod
    def unpack(cls, data: bytes, *, with_data: bool) -> RegionAccess:
        """`with_data`: the payload carries `count` bytes after the 16 (else exactly 16)."""
        _need("region access", data, cls.LAYOUT.size, exact=not with_data)
        offset, region, count = cls.LAYOUT.unpack_from(data)
        body = bytes(data[cls.LAYOUT.size :])
        if with_data and len(body) != count:
            raise PayloadError(f"region access: count is {count} but {len(body)} bytes follow")
        return cls(offset, region, count, body)


@dataclass(frozen=True, slots=True)
class DmaAccess:
    """`u64 address; u64 count;` then data (DMA_WRITE requests, DMA_READ replies)."""

    LAYOUT: ClassVar[struct.Struct] = struct.Struct("<QQ")
    address: int
    count: int
    data: bytes = b""

    def pack(self) -> bytes:
        try:
            return self.LAYOUT.pack(self.address, self.count) + self.data
        except struct.error as err:
            raise ValueError(f"DMA access: {err}") from err

    @classmethod
    def unpack(cls, data: bytes, *, with_data: bool) -> DmaAccess:
        _need("DMA access", data, cls.LAYOUT.size, exact=not with_data)
        address, count = cls.LAYOUT.unpack_from(data)
        body = bytes(data[cls.LAYOUT.size :])
        if with_data and len(body) != count:
            raise PayloadError(f"DMA access: count is {count} but {len(body)} bytes follow")
        return cls(address, count, body)


_WRITE_ENTRY = struct.Struct("<QII8s")
MAX_WRITE_MULTI: Final = 1024


@dataclass(frozen=True, slots=True)
class WriteMulti:
    """`u64 wr_cnt;` then wr_cnt times {u64 offset; u32 region; u32 count (≤ 8); u8 data[8]}."""

    writes: tuple[RegionAccess, ...] = field(default_factory=tuple)

    def pack(self) -> bytes:
        out = struct.pack("<Q", len(self.writes))
        for w in self.writes:
            if len(w.data) > 8 or w.count != len(w.data):
                raise ValueError("REGION_WRITE_MULTI: each write carries 1 to 8 bytes")
            out += _WRITE_ENTRY.pack(w.offset, w.region, w.count, w.data.ljust(8, b"\0"))
        return out

    @classmethod
    def unpack(cls, data: bytes) -> WriteMulti:
        _need("REGION_WRITE_MULTI", data, 8, exact=False)
        (count,) = struct.unpack_from("<Q", data)
        if not 0 < count <= MAX_WRITE_MULTI:
            raise PayloadError(f"REGION_WRITE_MULTI: wr_cnt {count} is not in 1..{MAX_WRITE_MULTI}")
        _need("REGION_WRITE_MULTI", data, 8 + count * _WRITE_ENTRY.size)
        writes = []
        for i in range(count):
            offset, region, n, raw = _WRITE_ENTRY.unpack_from(data, 8 + i * _WRITE_ENTRY.size)
            if not 0 < n <= 8:
                raise PayloadError(f"REGION_WRITE_MULTI: write {i} has count {n}, not 1..8")
            writes.append(RegionAccess(offset, region, n, bytes(raw[:n])))
        return cls(tuple(writes))


def split_chunks(total: int, chunk: int) -> Sequence[tuple[int, int]]:
    """(offset, length) pieces of at most `chunk` bytes covering `total` bytes."""
    return [(pos, min(chunk, total - pos)) for pos in range(0, total, chunk)]
