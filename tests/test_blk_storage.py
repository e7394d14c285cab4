"""`vvu serve blk` on real storage: loop devices, direct I/O, io_uring, and storage that fails.

Each test runs `vvu serve blk` as a daemon and drives it with vvu's own front-end (`BlkDriver`,
many requests in flight). Loop devices, device-mapper targets and tmpfs mounts are created by
the test and removed by name even when it fails; a test skips only where the machine does not
let it create them (no root, no /dev/loop-control, no device-mapper).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemons import Daemon
from vvu._core import io_uring_unavailable
from vvu.backends.blk import SIZE_MAX, BlkBackend, BlkFeature
from vvu.frontend import BlkDriver, BlkIOError

MiB = 1 << 20


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


@contextlib.contextmanager
def loop_device(backing: Path, *, sector_size: int = 512) -> Iterator[str]:
    """A loop device over `backing` (detached by name on exit); skips where losetup fails."""
    try:
        dev = _run("losetup", "--find", "--show", "--sector-size", str(sector_size), str(backing))
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"no loop device here: {err}")
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@contextlib.contextmanager
def dm_device(name: str, table: str) -> Iterator[str]:
    """A device-mapper device from `table` (removed by name on exit); skips without dmsetup."""
    try:
        subprocess.run(
            ["dmsetup", "create", name], input=table, check=True, capture_output=True, text=True
        )
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"no device-mapper here: {err}")
    try:
        yield f"/dev/mapper/{name}"
    finally:
        subprocess.run(["dmsetup", "remove", "--retry", name], check=False, capture_output=True)


def _image(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


def _serve(tmp_path: Path, *args: str) -> Daemon:
    socket = tmp_path / "blk.sock"
    return Daemon(["blk", "--socket-path", str(socket), *args], socket, tmp_path / "blk.log")


@contextlib.contextmanager
def serving(tmp_path: Path, *args: str) -> Iterator[Daemon]:
    daemon = _serve(tmp_path, *args)
    try:
        yield daemon
    finally:
        assert daemon.stop() == 0, daemon.log()


def _pattern(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


async def _write_many(blk: BlkDriver, extents: list[tuple[int, bytes]]) -> None:
    """All writes in flight together (up to the driver's depth), then read each back."""
    await asyncio.gather(*(blk.write(sector, data) for sector, data in extents))
    back = await asyncio.gather(*(blk.read(sector, len(data)) for sector, data in extents))
    assert back == [data for _, data in extents]


def test_loop_device_with_direct_io_through_io_uring(tmp_path: Path) -> None:
    """`--blk-file /dev/loopN --cache none --aio io_uring` on a loop device with 4 KiB
    sectors: the config space says so (capacity from BLKGETSIZE64, BLK_SIZE 4096, TOPOLOGY,
    SIZE_MAX), 32 concurrent writes land on the backing file, discard and write-zeroes
    (BLKDISCARD/BLKZEROOUT) read back zeros, and a request the device cannot do (past the end,
    not 4 KiB aligned) fails with IOERR while the daemon keeps serving."""
    backing = _image(tmp_path / "backing.img", 32 * MiB)
    with (
        loop_device(backing, sector_size=4096) as dev,
        serving(tmp_path, "--blk-file", dev, "--cache", "none", "--aio", "io_uring") as daemon,
    ):

        async def main() -> None:
            async with await BlkDriver.open(str(daemon.socket_path), depth=32) as blk:
                features = blk.frontend.features
                for bit in (BlkFeature.SIZE_MAX, BlkFeature.BLK_SIZE, BlkFeature.TOPOLOGY):
                    assert features & (1 << bit), bit
                config = await blk.frontend.get_config(0, 36)
                capacity, size_max, _seg_max = struct.unpack_from("<QII", config)
                blk_size, exp, alignment, min_io, opt_io = struct.unpack_from("<IBBHI", config, 20)
                assert capacity == 32 * MiB // 512
                assert size_max == SIZE_MAX
                assert (blk_size, exp, alignment) == (4096, 0, 0)
                assert min_io >= 1 and opt_io >= 0
                assert config[32] == 1, "cache none keeps a write cache: the guest must flush"
                extents = [(i * 256 + 8, _pattern(i, 8192)) for i in range(32)]
                await _write_many(blk, extents)
                await blk.flush()
                await blk.discard(8, 16)
                await blk.write_zeroes(256 + 8, 8)
                assert await blk.read(8, 8192) == bytes(8192)
                assert await blk.read(256 + 8, 4096) == bytes(4096)
                # Past the end, and a 512-byte request on a 4 KiB-sector device.
                with pytest.raises(BlkIOError):
                    await blk.read(capacity - 8, 8192)
                with pytest.raises(BlkIOError):
                    await blk.write(1, bytes(512))
                assert await blk.read(512 + 8, 8192) == extents[2][1]

        asyncio.run(main())
        log = daemon.log()
        assert "(block device)" in log and "block size 4096" in log, log
        assert "aio io_uring, cache none" in log, log
    data = backing.read_bytes()
    assert data[(2 * 256 + 8) * 512 :][:8192] == _pattern(2, 8192)
    assert data[8 * 512 : 16 * 512] == bytes(4096)


def test_block_device_that_shrinks_gives_ioerr_not_zeros(tmp_path: Path) -> None:
    """The loop device under a running daemon loses its second half (backing file truncated,
    `losetup -c`): reads and writes there fail with IOERR — never zeros, never a hang — and the
    first half still works."""
    backing = _image(tmp_path / "backing.img", 16 * MiB)
    with (
        loop_device(backing) as dev,
        serving(tmp_path, "--blk-file", dev, "--aio", "io_uring") as daemon,
    ):

        async def main() -> None:
            async with await BlkDriver.open(str(daemon.socket_path), depth=8) as blk:
                await blk.write(20000, _pattern(1, 4096))
                await blk.write(100, _pattern(2, 4096))
                os.truncate(backing, 8 * MiB)
                _run("losetup", "-c", dev)
                with pytest.raises(BlkIOError):
                    await blk.read(20000, 4096)
                with pytest.raises(BlkIOError):
                    await blk.write(20000, _pattern(3, 4096))
                assert await blk.read(100, 4096) == _pattern(2, 4096)

        asyncio.run(main())
        assert daemon.running()


def test_eio_from_a_device_mapper_error_target(tmp_path: Path) -> None:
    """A device whose second MiB is a device-mapper `error` target: reads and writes there fail
    with IOERR through io_uring and through the thread pool; the first MiB works."""
    backing = _image(tmp_path / "backing.img", MiB)
    with loop_device(backing) as loop:
        table = f"0 2048 linear {loop} 0\n2048 2048 error\n"
        with dm_device(f"vvu-test-err-{os.getpid()}", table) as dev:
            # Direct I/O through io_uring; writethrough (RWF_DSYNC) through the thread pool: a
            # buffered write-back write would only fail later, at the flush.
            for aio, cache in (("io_uring", "none"), ("threads", "writethrough")):
                with serving(tmp_path, "--blk-file", dev, "--aio", aio, "--cache", cache) as daemon:

                    async def main() -> None:
                        async with await BlkDriver.open(str(daemon.socket_path), depth=8) as blk:
                            assert blk.capacity == 4096
                            await blk.write(8, _pattern(4, 4096))
                            with pytest.raises(BlkIOError):
                                await blk.read(2048 + 8, 4096)
                            with pytest.raises(BlkIOError):
                                await blk.write(4096 - 8, bytes(4096))
                            assert await blk.read(8, 4096) == _pattern(4, 4096)

                    asyncio.run(main())


def test_enospc_on_a_full_file_system_is_ioerr(tmp_path: Path) -> None:
    """A sparse 16 MiB image on a 2 MiB tmpfs: writes that need space it has not got fail with
    IOERR; what was written before reads back; the daemon keeps serving (busy-polling). tmpfs
    is memory-backed, so the requests run on the worker thread, not in io_uring."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        _run("mount", "-t", "tmpfs", "-o", "size=2m", "vvu-test-enospc", str(mnt))
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"cannot mount a tmpfs here: {err}")
    try:
        image = _image(mnt / "disk.img", 16 * MiB)
        # With busy-polling on (--poll-us): the worker spins on the ring and the completions.
        with serving(
            tmp_path, "--blk-file", str(image), "--aio", "io_uring", "--poll-us", "200"
        ) as daemon:

            async def main() -> None:
                async with await BlkDriver.open(
                    str(daemon.socket_path), depth=8, max_request=MiB
                ) as blk:
                    await blk.write(0, _pattern(5, MiB))
                    with pytest.raises(BlkIOError):
                        for k in range(1, 16):
                            await blk.write(k * 2048, _pattern(k, MiB))
                    assert await blk.read(0, MiB) == _pattern(5, MiB)

            asyncio.run(main())
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_blk_options_pick_the_engine_and_set_the_cache_mode(tmp_path: Path) -> None:
    """`--aio` defaults to io_uring where the kernel allows it (threads otherwise); `--cache`
    decides WCE in the config space (writethrough: 0) and survives a device reset; `--cache
    none` opens the image O_DIRECT and offers a block size direct I/O can do; bad values and
    `--cache none` without a file are refused."""
    image = _image(tmp_path / "disk.img", 4 * MiB)
    default = BlkBackend(str(image))
    assert default.aio == ("io_uring" if io_uring_unavailable() is None else "threads")
    assert default.config_space()[32] == 1
    default.close()
    through = BlkBackend(str(image), cache="writethrough", aio="sync")
    assert (through.aio, through.config_space()[32]) == ("sync", 0)
    through.reset()
    assert through.config_space()[32] == 0, "a reset keeps the configured cache mode"
    through.close()
    try:
        direct = BlkBackend(str(image), cache="none", aio="threads")
    except ValueError as err:  # a temp dir on a file system without O_DIRECT
        pytest.skip(str(err))
    assert direct.geometry["direct"]
    (blk_size,) = struct.unpack_from("<I", direct.config_space(), 20)
    assert blk_size == direct.block_size >= max(512, int(direct.geometry["dio_offset_align"]))
    direct.close()
    for bad in ({"cache": "unsafe"}, {"aio": "posix"}, {"queue_depth": 0}, {"poll_us": -1}):
        with pytest.raises(ValueError):
            BlkBackend(str(image), **bad)
    with pytest.raises(ValueError, match="needs --blk-file"):
        BlkBackend(cache="none")
