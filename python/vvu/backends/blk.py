"""virtio-blk over a raw image file or an in-memory disk, served by a native Rust worker.

Requests (read, write, flush, get-id, discard, write-zeroes) are processed entirely in Rust:
preadv/pwritev go straight between the image and guest memory, without the GIL.
"""

from __future__ import annotations

import argparse
import logging
import os
import struct
from typing import ClassVar

from vvu._core import NativeHandler
from vvu.backends.base import Backend, ConfigError
from vvu.protocol import ProtocolFeature

log = logging.getLogger(__name__)

__all__ = ["BlkBackend", "BlkFeature"]

SECTOR_SIZE = 512
MiB = 1 << 20


class BlkFeature:
    """virtio-blk feature bits (virtio 1.2, 5.2.3)."""

    SIZE_MAX = 1
    SEG_MAX = 2
    RO = 5
    BLK_SIZE = 6
    FLUSH = 9
    TOPOLOGY = 10
    CONFIG_WCE = 11
    MQ = 12
    DISCARD = 13
    WRITE_ZEROES = 14


# Limits advertised in the config space; the worker itself accepts any chain the ring allows.
SEG_MAX = 126
MAX_DISCARD_SECTORS = 1 << 22
MAX_DISCARD_SEG = 1
MAX_WRITE_ZEROES_SECTORS = 1 << 22
MAX_WRITE_ZEROES_SEG = 1
# Config-space offset of `u8 writeback` (CONFIG_WCE: the driver sets the cache mode there).
WRITEBACK_OFFSET = 32
# DEVICE_STATE: what a blk back-end hands to the migration's destination. Version 1: magic,
# version, capacity (sectors), read-only, writeback, serial. Everything else (the image, the
# queue count) is the destination's own configuration and must match.
_STATE = struct.Struct("<8sIQBB2x20s")
_STATE_MAGIC = b"vvu-blk\0"
_STATE_VERSION = 1


class BlkBackend(Backend):
    """The block device (virtio id 2)."""

    name: ClassVar[str] = "blk"
    device_id: ClassVar[int] = 2
    has_state: ClassVar[bool] = True
    supports_iommu: ClassVar[bool] = True  # native workers only

    def __init__(
        self,
        image: str | None = None,
        *,
        size: int = 64 * MiB,
        read_only: bool = False,
        num_queues: int = 1,
        serial: str = "vvu",
    ) -> None:
        super().__init__(num_queues=num_queues)
        self.read_only = read_only
        self.serial = self._serial = serial.encode()[:20]
        if image is not None:
            flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
            self._fd = os.open(image, flags)
            size = os.fstat(self._fd).st_size
            self.description = image
        else:
            # Not `memfd()`: that one is sealed against resizing (guest memory must not shrink
            # under a mapping), and `resize` changes this disk's size. Nobody maps it.
            self._fd = os.memfd_create("vvu-disk", os.MFD_CLOEXEC)
            try:
                os.ftruncate(self._fd, size)
            except BaseException:
                os.close(self._fd)
                raise
            self.description = f"in-memory disk of {size // MiB} MiB"
        if size < SECTOR_SIZE:
            os.close(self._fd)
            raise ValueError(f"the disk must hold at least one {SECTOR_SIZE}-byte sector")
        self.capacity = size // SECTOR_SIZE
        # The volatile write cache mode the driver chose (CONFIG_WCE); off means every write
        # is synced before it completes.
        self.writeback = True

    def resize(self, size: int | None = None) -> bool:
        """Resize the disk while it is served: to `size` bytes (the image file or in-memory
        disk is truncated or extended), or, without `size`, to what the image file holds now
        (it was grown or shrunk by someone else). Returns whether the capacity changed; the
        front-end learns of it through `BackendEngine.config_changed()` (`vvu serve` does both
        on SIGHUP). Sectors beyond a shrunk end are gone."""
        if size is not None:
            if self.read_only:
                raise ValueError("a read-only disk cannot be resized by the back-end")
            if size < SECTOR_SIZE:
                raise ValueError(f"the disk must hold at least one {SECTOR_SIZE}-byte sector")
            os.ftruncate(self._fd, size)
        else:
            size = os.fstat(self._fd).st_size
            if size < SECTOR_SIZE:
                raise ValueError(f"the image holds {size} bytes, less than one sector")
        capacity = size // SECTOR_SIZE
        if capacity == self.capacity:
            return False
        log.info("blk: capacity %d -> %d sectors", self.capacity, capacity)
        self.capacity = capacity
        return True

    def reload(self) -> bool:
        return self.resize()

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--blk-file",
            "--image",
            dest="image",
            metavar="FILE",
            help=(
                "raw disk image or block device (default: an in-memory disk; --blk-file is "
                "the name QEMU's back-end conventions give it, --image an alias). "
                "Resize while serving: grow the "
                "file, then send SIGHUP; the new size reaches the front-end (and the guest)"
            ),
        )
        parser.add_argument(
            "--size", type=int, default=64, metavar="MiB", help="in-memory disk size (default 64)"
        )
        parser.add_argument(
            "--read-only",
            action="store_true",
            help="offer a read-only disk (VIRTIO_BLK_F_RO) and refuse writes",
        )
        parser.add_argument("--num-queues", type=int, default=1, metavar="N", help="default 1")
        parser.add_argument("--serial", default="vvu", help="the id GET_ID returns (20 bytes)")

    @classmethod
    def from_arguments(cls, args: argparse.Namespace) -> BlkBackend:
        return cls(
            args.image,
            size=args.size * MiB,
            read_only=args.read_only,
            num_queues=args.num_queues,
            serial=args.serial,
        )

    def device_features(self) -> int:
        bits = [
            BlkFeature.SEG_MAX,
            BlkFeature.BLK_SIZE,
            BlkFeature.FLUSH,
            BlkFeature.CONFIG_WCE,
            BlkFeature.MQ,
            BlkFeature.DISCARD,
            BlkFeature.WRITE_ZEROES,
        ]
        if self.read_only:
            bits.append(BlkFeature.RO)
        return sum(1 << b for b in bits)

    def config_space(self) -> bytes:
        # struct virtio_blk_config up to write_zeroes_may_unmap (60 bytes), little-endian.
        return struct.pack(
            "<QIIHBBIBBHIBBHIIIIIB3x",
            self.capacity,
            0,  # size_max: unused without SIZE_MAX
            SEG_MAX,
            0,
            0,
            0,  # geometry
            SECTOR_SIZE,
            0,
            0,
            0,
            0,  # topology
            int(self.writeback),  # writeback: a flush is needed for durability
            0,
            self.num_queues,
            MAX_DISCARD_SECTORS,
            MAX_DISCARD_SEG,
            1,  # discard_sector_alignment
            MAX_WRITE_ZEROES_SECTORS,
            MAX_WRITE_ZEROES_SEG,
            1,  # write_zeroes_may_unmap
        )

    def write_config(self, offset: int, data: bytes) -> None:
        # Only the cache mode is writable, and only with CONFIG_WCE (virtio 1.2, 5.2.5). The
        # engine restarts running rings after a config write, so workers pick the mode up.
        if not self.acked_features & (1 << BlkFeature.CONFIG_WCE):
            super().write_config(offset, data)
        if offset != WRITEBACK_OFFSET or len(data) != 1 or data[0] > 1:
            raise ConfigError(
                f"only writeback (1 byte at {WRITEBACK_OFFSET}, 0 or 1) is writable, "
                f"not {len(data)} bytes at {offset}"
            )
        self.writeback = data[0] == 1
        log.info("blk: the driver set the write cache to %s", self.cache_mode)

    @property
    def cache_mode(self) -> str:
        return "write back" if self.writeback else "write through"

    def protocol_features(self) -> int:
        # The native worker's queue tracks requests in the inflight region, so a restarted
        # back-end finishes what a killed one had in flight.
        return super().protocol_features() | ProtocolFeature.INFLIGHT_SHMFD.mask

    def native_worker(self, queue_index: int) -> NativeHandler:
        return NativeHandler.blk(
            self._fd,
            self.capacity,
            read_only=self.read_only,
            serial=self.serial,
            writethrough=not self.writeback,
        )

    def save_state(self) -> bytes:
        return _STATE.pack(
            _STATE_MAGIC,
            _STATE_VERSION,
            self.capacity,
            int(self.read_only),
            int(self.writeback),
            self.serial,
        )

    def load_state(self, state: bytes) -> None:
        if len(state) != _STATE.size:
            raise ValueError(f"blk state is {_STATE.size} bytes, got {len(state)}")
        magic, version, capacity, read_only, writeback, serial = _STATE.unpack(state)
        if magic != _STATE_MAGIC or version != _STATE_VERSION:
            raise ValueError(f"not a version {_STATE_VERSION} blk state (magic {magic!r})")
        if capacity != self.capacity or read_only != int(self.read_only):
            raise ValueError(
                f"the source disk had {capacity} sectors, read-only={bool(read_only)}; this one "
                f"has {self.capacity}, read-only={self.read_only}"
            )
        if writeback > 1:
            raise ValueError(f"writeback must be 0 or 1, got {writeback}")
        self.writeback = writeback == 1
        self.serial = serial.rstrip(b"\0")

    def reset(self) -> None:
        super().reset()
        # A new driver starts from the configured device, whatever a migration brought in.
        self.writeback = True
        self.serial = self._serial

    def describe(self) -> str:
        mode = "read-only" if self.read_only else "read-write"
        return (
            f"blk: {self.description}, {self.capacity} sectors, {mode}, {self.num_queues} queue(s)"
        )

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
