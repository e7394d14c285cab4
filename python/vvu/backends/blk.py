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

from vvu._core import NativeHandler, memfd
from vvu.backends.base import Backend

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
    MQ = 12
    DISCARD = 13
    WRITE_ZEROES = 14


# Limits advertised in the config space; the worker itself accepts any chain the ring allows.
SEG_MAX = 126
MAX_DISCARD_SECTORS = 1 << 22
MAX_DISCARD_SEG = 1
MAX_WRITE_ZEROES_SECTORS = 1 << 22
MAX_WRITE_ZEROES_SEG = 1


class BlkBackend(Backend):
    """The block device (virtio id 2)."""

    name: ClassVar[str] = "blk"
    device_id: ClassVar[int] = 2
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
        self.serial = serial.encode()[:20]
        if image is not None:
            flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
            self._fd = os.open(image, flags)
            size = os.fstat(self._fd).st_size
            self.description = image
        else:
            self._fd = memfd(size, "vvu-disk")
            self.description = f"in-memory disk of {size // MiB} MiB"
        if size < SECTOR_SIZE:
            os.close(self._fd)
            raise ValueError(f"the disk must hold at least one {SECTOR_SIZE}-byte sector")
        self.capacity = size // SECTOR_SIZE

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--image", help="raw disk image (default: an in-memory disk)")
        parser.add_argument(
            "--size", type=int, default=64, metavar="MiB", help="in-memory disk size (default 64)"
        )
        parser.add_argument("--read-only", action="store_true", help="refuse writes")
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
            1,  # writeback: a flush is needed for durability
            0,
            self.num_queues,
            MAX_DISCARD_SECTORS,
            MAX_DISCARD_SEG,
            1,  # discard_sector_alignment
            MAX_WRITE_ZEROES_SECTORS,
            MAX_WRITE_ZEROES_SEG,
            1,  # write_zeroes_may_unmap
        )

    def native_worker(self, queue_index: int) -> NativeHandler:
        return NativeHandler.blk(
            self._fd, self.capacity, read_only=self.read_only, serial=self.serial
        )

    def describe(self) -> str:
        mode = "read-only" if self.read_only else "read-write"
        return (
            f"blk: {self.description}, {self.capacity} sectors, {mode}, {self.num_queues} queue(s)"
        )

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
