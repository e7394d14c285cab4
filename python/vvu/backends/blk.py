"""virtio-blk over a raw image file, a block device or an in-memory disk, served by a native
Rust worker.

Requests (read, write, flush, get-id, discard, write-zeroes) are processed entirely in Rust,
without the GIL: reads and writes go straight between the image and guest memory, through
io_uring (`--aio io_uring`, many requests in flight per queue), a thread pool (`threads`) or
blocking preadv/pwritev on the worker thread (`sync`). `--cache none` opens the image with
O_DIRECT. `--nbd URI` serves an NBD export instead (qemu-nbd, nbdkit, rbd-nbd ...) through
vvu's own asynchronous NBD client. See docs/architecture.md, "Block I/O" and "NBD".
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import struct
from typing import ClassVar

from vvu._core import NativeHandler, blk_probe, io_uring_unavailable, nbd_probe
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
# SEG_MAX fits a 128-entry ring without indirect descriptors; SIZE_MAX is the largest
# page-aligned descriptor length (the worker has no segment size limit of its own).
SEG_MAX = 126
SIZE_MAX = 0xFFFF_F000
AIO_MODES = ("io_uring", "threads", "sync")
CACHE_MODES = ("none", "writeback", "writethrough")
DEFAULT_QUEUE_DEPTH = 128
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


#: The counters of a blk queue (`NativeHandler.stats`), zero before its first worker.
_STAT_NAMES = (
    "requests",
    "reads",
    "writes",
    "flushes",
    "get_ids",
    "discards",
    "write_zeroes",
    "bytes_read",
    "bytes_written",
    "io_errors",
    "unsupported",
    "malformed",
    "in_flight",
    "latency_ns_sum",
    "bounced",
    "unaligned",
    "async_requests",
)


def _add_counts(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    out = dict(a)
    for name, value in b.items():
        out[name] = out.get(name, 0) + value
    return out


def _add_buckets(a: list[int], b: list[int]) -> list[int]:
    longer, shorter = (a, b) if len(a) >= len(b) else (b, a)
    return [x + (shorter[i] if i < len(shorter) else 0) for i, x in enumerate(longer)]


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
        aio: str | None = None,
        cache: str = "writeback",
        queue_depth: int = DEFAULT_QUEUE_DEPTH,
        poll_us: int = 0,
        latency_histogram: bool = False,
        nbd: str | None = None,
        nbd_timeout: float = 30.0,
    ) -> None:
        super().__init__(num_queues=num_queues)
        self._check_options(cache, aio, queue_depth, poll_us)
        #: Time every request into a latency histogram (two clock reads per request).
        self.timed = latency_histogram
        self.read_only = read_only
        self.serial = self._serial = serial.encode()[:20]
        self.image = image
        self.cache = cache
        self.aio = self._pick_aio(aio)
        self.queue_depth = queue_depth
        self.busy_poll = poll_us / 1e6
        # Per queue: the handler of the running (or last) worker, and the final counters of
        # the ones before it (handlers count; `queue_stats` only reads).
        self._handlers: dict[int, NativeHandler] = {}
        self._retired: dict[int, tuple[dict[str, int], list[int]]] = {}
        # Per queue: a handler made ahead of its worker (`prepare_native_worker`), with the
        # settings it was made with.
        self._spares: dict[int, tuple[tuple[object, ...], NativeHandler]] = {}
        self.nbd = nbd
        self.nbd_timeout = nbd_timeout
        #: What the NBD server offers (`nbd_probe`); empty without --nbd.
        self.nbd_export: dict[str, int | bool] = {}
        self._fd = -1
        if nbd is not None:
            self._init_nbd(image, nbd, cache, aio)
            return
        self._fd, self.description = self._open_disk(image, size, read_only, cache)
        self.geometry = blk_probe(self._fd)
        size = int(self.geometry["size"])
        if size < SECTOR_SIZE:
            os.close(self._fd)
            raise ValueError(f"the disk must hold at least one {SECTOR_SIZE}-byte sector")
        self.capacity = size // SECTOR_SIZE
        # The guest's block size: the device's logical block size, and at least what direct
        # I/O needs, so that a driver that follows it never sends an unaligned request.
        self.block_size = max(
            int(self.geometry["logical_block_size"]), int(self.geometry["dio_offset_align"])
        )
        # The volatile write cache mode the driver chose (CONFIG_WCE); off means every write
        # is synced before it completes.
        self.writeback = cache != "writethrough"

    @staticmethod
    def _check_options(cache: str, aio: str | None, queue_depth: int, poll_us: int) -> None:
        if cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {', '.join(CACHE_MODES)}, not {cache!r}")
        if aio is not None and aio not in AIO_MODES:
            raise ValueError(f"aio must be one of {', '.join(AIO_MODES)}, not {aio!r}")
        if not 1 <= queue_depth <= 4096:
            raise ValueError(f"queue depth {queue_depth} is outside 1..4096")
        if poll_us < 0:
            raise ValueError("poll_us must not be negative")

    @staticmethod
    def _open_disk(image: str | None, size: int, read_only: bool, cache: str) -> tuple[int, str]:
        """The disk's fd and description: the image file, or an in-memory disk of `size`."""
        if image is not None:
            flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
            if cache == "none":
                flags |= os.O_DIRECT
            try:
                fd = os.open(image, flags)
            except OSError as e:
                if cache == "none" and e.errno == errno.EINVAL:
                    raise ValueError(
                        f"{image}: its file system does not support O_DIRECT (--cache none)"
                    ) from e
                raise
            description = image
        else:
            if cache == "none":
                raise ValueError("--cache none needs --blk-file (an in-memory disk has no cache)")
            # Not `memfd()`: that one is sealed against resizing (guest memory must not shrink
            # under a mapping), and `resize` changes this disk's size. Nobody maps it.
            fd = os.memfd_create("vvu-disk", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, size)
            except BaseException:
                os.close(fd)
                raise
            description = f"in-memory disk of {size // MiB} MiB"
        return fd, description

    def _init_nbd(self, image: str | None, uri: str, cache: str, aio: str | None) -> None:
        """Serve the NBD export at `uri`: size, read-only, flush/trim/write-zeroes and block
        size constraints come from the server (NBD_OPT_GO)."""
        if image is not None:
            raise ValueError("--nbd and --blk-file are exclusive: serve one disk")
        if cache == "none":
            raise ValueError("--cache none is O_DIRECT on a local file; it does not apply to --nbd")
        if aio is not None:
            raise ValueError("--aio picks a local file's engine; --nbd has its own (asynchronous)")
        if self.nbd_timeout <= 0:
            raise ValueError("--nbd-timeout must be positive")
        try:
            export = nbd_probe(uri, timeout=min(self.nbd_timeout, 5.0))
        except OSError as err:
            raise ValueError(f"NBD export {uri}: {err}") from err
        self.nbd_export = export
        self.aio = "nbd"
        if self.num_queues > 1 and not export["multi_conn"]:
            raise ValueError(
                f"--num-queues {self.num_queues}: each queue has its own NBD connection, and this "
                "server does not promise consistency across connections (NBD_FLAG_CAN_MULTI_CONN)"
            )
        if export["read_only"] and not self.read_only:
            log.info("blk: the NBD export is read-only; serving it read-only")
            self.read_only = True
        size = int(export["size"])
        if size < SECTOR_SIZE:
            raise ValueError(f"NBD export {uri} holds {size} bytes, less than one sector")
        self.capacity = size // SECTOR_SIZE
        self.block_size = max(SECTOR_SIZE, int(export["min_block"]))
        preferred = max(self.block_size, int(export["preferred_block"]))
        self.geometry = {
            "size": size,
            "block_device": False,
            "logical_block_size": self.block_size,
            "physical_block_size": preferred if preferred & (preferred - 1) == 0 else 0,
            "min_io": self.block_size,
            "opt_io": preferred,
            "dio_offset_align": 0,
        }
        # Without NBD_FLAG_SEND_FLUSH the server has no volatile cache to flush.
        self.writeback = cache != "writethrough" and bool(export["flush"])
        self.description = f"NBD export {uri}"

    @staticmethod
    def _pick_aio(aio: str | None) -> str:
        """`aio`, or the best engine this kernel allows: io_uring, else threads."""
        reason = io_uring_unavailable()
        if aio == "io_uring" and reason is not None:
            raise ValueError(f"--aio io_uring: io_uring is not available here ({reason})")
        if aio is not None:
            return aio
        if reason is not None:
            log.warning("blk: io_uring is not available (%s); using --aio threads", reason)
            return "threads"
        return "io_uring"

    def resize(self, size: int | None = None) -> bool:
        """Resize the disk while it is served: to `size` bytes (the image file or in-memory
        disk is truncated or extended), or, without `size`, to what the image file holds now
        (it was grown or shrunk by someone else). Returns whether the capacity changed; the
        front-end learns of it through `BackendEngine.config_changed()` (`vvu serve` does both
        on SIGHUP). Sectors beyond a shrunk end are gone."""
        if self.nbd is not None:
            if size is not None:
                raise ValueError("an NBD export cannot be resized by the back-end")
            return False
        if size is not None:
            if self.read_only:
                raise ValueError("a read-only disk cannot be resized by the back-end")
            if size < SECTOR_SIZE:
                raise ValueError(f"the disk must hold at least one {SECTOR_SIZE}-byte sector")
            if self.geometry["block_device"]:
                raise ValueError("a block device cannot be resized by the back-end")
            os.ftruncate(self._fd, size)
        else:
            size = int(blk_probe(self._fd)["size"])
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
        parser.add_argument(
            "--aio",
            choices=AIO_MODES,
            default=None,
            help=(
                "how reads, writes and flushes are done: io_uring (many in flight per queue), "
                "threads (a thread pool, same), sync (one at a time per queue, on the worker "
                "thread). Default: io_uring if the kernel allows it, else threads"
            ),
        )
        parser.add_argument(
            "--cache",
            choices=CACHE_MODES,
            default="writeback",
            help=(
                "none: O_DIRECT (no host page cache; the guest is told to flush); writeback "
                "(default): the host page cache, flushes are fdatasync; writethrough: every "
                "write is durable before it completes (RWF_DSYNC), the guest sees no write cache"
            ),
        )
        parser.add_argument(
            "--queue-depth",
            type=int,
            default=DEFAULT_QUEUE_DEPTH,
            metavar="N",
            help=f"most requests in flight per queue with io_uring/threads (default "
            f"{DEFAULT_QUEUE_DEPTH}); the rest wait in the ring",
        )
        parser.add_argument(
            "--poll-us",
            type=int,
            default=0,
            metavar="US",
            help=(
                "busy-poll the ring and the I/O completions this long before sleeping (costs a "
                "core per queue while it spins; default 0: off)"
            ),
        )
        parser.add_argument(
            "--latency-histogram",
            action="store_true",
            help=(
                "time every request into a latency histogram (`vvu daemon` stats and metrics; "
                "two clock reads per request, benches/RESULTS.md)"
            ),
        )

        parser.add_argument(
            "--nbd",
            metavar="URI",
            help=(
                "serve an NBD export instead of a file: nbd+unix:///EXPORT?socket=PATH or "
                "nbd://HOST[:PORT]/EXPORT (qemu-nbd, nbdkit, rbd-nbd ...); size, read-only, "
                "flush/trim/write-zeroes and block size come from the server. Requests fail "
                "with an I/O error while the server is unreachable; vvu reconnects"
            ),
        )
        parser.add_argument(
            "--nbd-timeout",
            type=float,
            default=30.0,
            metavar="S",
            help="drop an NBD connection whose requests got no reply for S seconds (default 30)",
        )

    @classmethod
    def from_arguments(cls, args: argparse.Namespace) -> BlkBackend:
        return cls(
            args.image,
            size=args.size * MiB,
            read_only=args.read_only,
            num_queues=args.num_queues,
            serial=args.serial,
            aio=args.aio,
            cache=args.cache,
            queue_depth=args.queue_depth,
            poll_us=args.poll_us,
            latency_histogram=args.latency_histogram,
            nbd=args.nbd,
            nbd_timeout=args.nbd_timeout,
        )

    def device_features(self) -> int:
        if self.nbd is not None:
            return self._nbd_features()
        bits = [
            BlkFeature.SIZE_MAX,
            BlkFeature.SEG_MAX,
            BlkFeature.BLK_SIZE,
            BlkFeature.TOPOLOGY,
            BlkFeature.FLUSH,
            BlkFeature.CONFIG_WCE,
            BlkFeature.MQ,
            BlkFeature.DISCARD,
            BlkFeature.WRITE_ZEROES,
        ]
        if self.read_only:
            bits.append(BlkFeature.RO)
        return sum(1 << b for b in bits)

    def _nbd_features(self) -> int:
        export = self.nbd_export
        bits = [
            BlkFeature.SIZE_MAX,
            BlkFeature.SEG_MAX,
            BlkFeature.BLK_SIZE,
            BlkFeature.TOPOLOGY,
            BlkFeature.MQ,
        ]
        if export["flush"]:
            bits += [BlkFeature.FLUSH, BlkFeature.CONFIG_WCE]
        if export["trim"] and not self.read_only:
            bits.append(BlkFeature.DISCARD)
        if export["write_zeroes"] and not self.read_only:
            bits.append(BlkFeature.WRITE_ZEROES)
        if self.read_only:
            bits.append(BlkFeature.RO)
        return sum(1 << b for b in bits)

    def topology(self) -> tuple[int, int, int, int]:
        """TOPOLOGY: physical_block_exp, alignment_offset, min_io_size, opt_io_size (the last
        two in blocks of `block_size`)."""
        physical = max(int(self.geometry["physical_block_size"]), self.block_size)
        exp = (physical // self.block_size).bit_length() - 1
        min_io = max(1, int(self.geometry["min_io"]) // self.block_size)
        opt_io = int(self.geometry["opt_io"]) // self.block_size
        return exp, 0, min(min_io, 0xFFFF), opt_io

    def config_space(self) -> bytes:
        # struct virtio_blk_config up to write_zeroes_may_unmap (60 bytes), little-endian.
        exp, alignment, min_io, opt_io = self.topology()
        return struct.pack(
            "<QIIHBBIBBHIBBHIIIIIB3x",
            self.capacity,
            SIZE_MAX,
            SEG_MAX,
            0,
            0,
            0,  # geometry
            self.block_size,
            exp,
            alignment,
            min_io,
            opt_io,
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
        if self.nbd is not None:
            export = self.nbd_export
            handler = NativeHandler.nbd(
                self.nbd,
                self.capacity,
                flags=int(export["flags"]),
                min_block=int(export["min_block"]),
                max_payload=int(export["max_payload"]),
                read_only=self.read_only,
                serial=self.serial,
                writethrough=not self.writeback,
                queue_depth=self.queue_depth,
                timeout=self.nbd_timeout,
            )
        else:
            spare = self._spares.pop(queue_index, None)
            if spare is not None and spare[0] == self._file_settings():
                handler = spare[1]
            else:
                handler = self._file_handler()
        self._retire(queue_index)  # (done when it stopped, unless that was not said)
        self._handlers[queue_index] = handler
        return handler

    def queue_stopped(self, queue_index: int) -> None:
        # Here rather than when the ring starts again, which a front-end waits for.
        self._retire(queue_index)

    def _retire(self, queue_index: int) -> None:
        """Add the counters of the queue's stopped worker to the retired ones (final now)."""
        previous = self._handlers.pop(queue_index, None)
        if previous is not None:
            counts, histogram = self._retired.get(queue_index, ({}, []))
            self._retired[queue_index] = (
                _add_counts(counts, previous.stats or {}),
                _add_buckets(histogram, previous.latency_histogram or []),
            )

    def prepare_native_worker(self, queue_index: int) -> None:
        # The handler of an image file sets up its io_uring (or thread pool) when made: done
        # here, ahead, `native_worker` takes it if the settings are still the same.
        if self.nbd is None and queue_index not in self._spares and self._fd >= 0:
            self._spares[queue_index] = (self._file_settings(), self._file_handler())

    def discard_prepared(self) -> None:
        self._spares.clear()

    def _file_settings(self) -> tuple[object, ...]:
        return (
            self._fd,
            self.capacity,
            self.read_only,
            self.serial,
            self.writeback,
            self.aio,
            self.queue_depth,
            self.timed,
        )

    def _file_handler(self) -> NativeHandler:
        return NativeHandler.blk(
            self._fd,
            self.capacity,
            read_only=self.read_only,
            serial=self.serial,
            writethrough=not self.writeback,
            aio=self.aio,
            queue_depth=self.queue_depth,
            latency_histogram=self.timed,
        )

    def queue_stats(self, queue_index: int) -> dict[str, int]:
        counts, _ = self._retired.get(queue_index, (dict.fromkeys(_STAT_NAMES, 0), []))
        live = self._handlers.get(queue_index)
        return _add_counts(counts, live.stats or {} if live is not None else {})

    def latency_histogram(self, queue_index: int) -> list[int] | None:
        if not self.timed:
            return None
        _, histogram = self._retired.get(queue_index, ({}, []))
        live = self._handlers.get(queue_index)
        return _add_buckets(histogram, live.latency_histogram or [] if live is not None else [])

    def set_read_only(self, read_only: bool) -> None:
        """Switch between read-only and read-write while served: an image file is reopened
        with the matching mode. Workers started from now on refuse writes (VIRTIO_BLK_S_IOERR)
        or accept them (restart the rings: `BackendEngine.restart_rings`); the RO feature bit
        changes for the next front-end session (features are negotiated once per session)."""
        if read_only == self.read_only:
            return
        if self.image is not None:
            flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
            fd = os.open(self.image, flags)
            os.close(self._fd)
            self._fd = fd
            self._spares.clear()  # made with the old fd
        self.read_only = read_only
        log.info("blk: now %s", "read-only" if read_only else "read-write")

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
        self.writeback = self.cache != "writethrough" and (
            self.nbd is None or bool(self.nbd_export["flush"])
        )
        self.serial = self._serial

    def describe(self) -> str:
        mode = "read-only" if self.read_only else "read-write"
        if self.nbd is not None:
            return (
                f"blk: {self.description}, {self.capacity} sectors of 512 B, block size "
                f"{self.block_size}, {mode}, {self.num_queues} queue(s), asynchronous NBD client"
            )
        kind = "block device" if self.geometry["block_device"] else "file"
        return (
            f"blk: {self.description} ({kind}), {self.capacity} sectors of 512 B, block size "
            f"{self.block_size}, {mode}, {self.num_queues} queue(s), aio {self.aio}, cache "
            f"{self.cache}"
        )

    def close(self) -> None:
        self._spares.clear()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
