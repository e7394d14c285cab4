"""Our front-end and `vvu probe` against a real back-end: qemu-storage-daemon's vhost-user-blk.

qemu-storage-daemon (Debian package qemu-system-common) exports a raw image file; `BlkDriver`
does I/O through it and the image file is checked on the host. No VM is involved.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vvu.frontend import BlkDriver
from vvu.frontend.blk import S_IOERR, BlkIOError

QSD = "qemu-storage-daemon"
MiB = 1 << 20
DISK_SIZE = 16 * MiB
SECTOR = 512
HEADER = b"vvu-host-wrote-this-header".ljust(SECTOR, b".")
STOP_GRACE = 10.0

pytestmark = pytest.mark.timeout(60)

# virtio-blk feature bits and the virtio/vhost-user ones probe names.
BLK_F_SEG_MAX, BLK_F_RO, BLK_F_BLK_SIZE, BLK_F_FLUSH, BLK_F_MQ = 2, 5, 6, 9, 12
BLK_F_DISCARD, BLK_F_WRITE_ZEROES = 13, 14


def _qsd_binary() -> str:
    path = shutil.which(QSD)
    if path is None:
        message = f"{QSD} not found (scripts/setup.sh installs qemu-system-common)"
        if os.environ.get("CI") or os.environ.get("VVU_GUEST_REQUIRED") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


@dataclass
class Qsd:
    """One qemu-storage-daemon exporting `image` as vhost-user-blk on `socket`."""

    proc: subprocess.Popen[bytes]
    socket: Path
    image: Path
    log: Path

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def qsd_export(tmp_path: Path, *, writable: bool = True, num_queues: int = 1) -> Iterator[Qsd]:
    """Start qemu-storage-daemon on a fresh image (HEADER at sector 0); stop it by PID after."""
    binary = _qsd_binary()
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.write(HEADER)
        f.truncate(DISK_SIZE)
    sock = tmp_path / "qsd.sock"
    log = tmp_path / "qsd.log"
    argv = [
        binary,
        "--blockdev", f"driver=file,node-name=file0,filename={image}",
        "--blockdev", "driver=raw,node-name=disk0,file=file0",
        "--export",
        "type=vhost-user-blk,id=exp0,addr.type=unix,"
        f"addr.path={sock},node-name=disk0,writable={'on' if writable else 'off'},"
        f"num-queues={num_queues}",
    ]  # fmt: skip
    setpriv = shutil.which("setpriv")
    if setpriv is not None:  # killed if the test process dies without cleaning up
        argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
    qsd = Qsd(proc, sock, image, log)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            if proc.poll() is not None:
                raise AssertionError(f"{QSD} exited with {proc.returncode}: {qsd.stderr()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{sock} did not appear: {qsd.stderr()}")
            time.sleep(0.02)
        yield qsd
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        sock.unlink(missing_ok=True)  # qsd removes it on SIGTERM, but not when killed
    assert proc.returncode == 0, qsd.stderr()


@pytest.fixture
def qsd(tmp_path: Path) -> Iterator[Qsd]:
    with qsd_export(tmp_path) as export:
        yield export


def _image_bytes(qsd: Qsd, offset: int, length: int) -> bytes:
    with qsd.image.open("rb") as f:
        f.seek(offset)
        return f.read(length)


def _probe(qsd: Qsd) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-m", "vvu", "probe", "--socket-path", str(qsd.socket), "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr + qsd.stderr()
    report: dict[str, object] = json.loads(out.stdout)
    return report


# --- BlkDriver through qsd -----------------------------------------------------------------


@pytest.mark.asyncio
async def test_blk_driver_writes_reads_flushes_and_gets_the_id(qsd: Qsd) -> None:
    data = random.Random(1).randbytes(256 * 1024)
    sector = MiB // SECTOR
    async with await BlkDriver.open(str(qsd.socket)) as blk:
        assert blk.capacity == DISK_SIZE // SECTOR  # from GET_CONFIG
        assert await blk.read(0, SECTOR) == HEADER  # what the host wrote
        await blk.write(sector, data)
        assert await blk.read(sector, len(data)) == data
        await blk.flush()
        assert _image_bytes(qsd, MiB, len(data)) == data  # on the host, after the flush
        assert await blk.get_id() == b"vhost_user_blk"  # qsd's fixed serial
        # The last sector is reachable; the one past the end is refused.
        await blk.write(DISK_SIZE // SECTOR - 1, b"\xee" * SECTOR)
        with pytest.raises(BlkIOError) as info:
            await blk.read(DISK_SIZE // SECTOR, SECTOR)
        assert info.value.status == S_IOERR
    assert _image_bytes(qsd, DISK_SIZE - SECTOR, SECTOR) == b"\xee" * SECTOR
    assert _image_bytes(qsd, 0, SECTOR) == HEADER


@pytest.mark.asyncio
async def test_blk_driver_keeps_many_requests_in_flight(qsd: Qsd) -> None:
    rnd = random.Random(2)
    chunk = 64 * 1024
    blocks = {n * 4 * chunk // SECTOR: rnd.randbytes(chunk) for n in range(1, 33)}
    async with await BlkDriver.open(str(qsd.socket), depth=32, max_request=chunk) as blk:
        await asyncio.gather(*(blk.write(sector, data) for sector, data in blocks.items()))
        await blk.flush()
        reads = await asyncio.gather(*(blk.read(sector, chunk) for sector in blocks))
    assert reads == list(blocks.values())
    for sector, data in blocks.items():
        assert _image_bytes(qsd, sector * SECTOR, chunk) == data


@pytest.mark.asyncio
async def test_write_zeroes_and_discard(qsd: Qsd) -> None:
    data = b"\x5a" * (64 * 1024)
    sector = 2 * MiB // SECTOR
    async with await BlkDriver.open(str(qsd.socket)) as blk:
        await blk.write(sector, data)
        await blk.write_zeroes(sector + 8, 16)
        expected = data[: 8 * SECTOR] + bytes(16 * SECTOR) + data[24 * SECTOR :]
        assert await blk.read(sector, len(data)) == expected
        await blk.discard(sector + 64, 8)  # accepted (the file node ignores discards by default)
        await blk.flush()
    assert _image_bytes(qsd, sector * SECTOR, len(data)) == expected


@pytest.mark.asyncio
async def test_a_second_session_reads_what_the_first_wrote(qsd: Qsd) -> None:
    data = random.Random(3).randbytes(128 * 1024)
    async with await BlkDriver.open(str(qsd.socket)) as blk:
        await blk.write(100, data)
        await blk.flush()
    async with await BlkDriver.open(str(qsd.socket)) as blk:
        assert await blk.read(100, len(data)) == data


@pytest.mark.asyncio
async def test_read_only_export_refuses_writes(tmp_path: Path) -> None:
    with qsd_export(tmp_path, writable=False) as qsd:
        features = int(str(_probe(qsd)["features"]), 16)
        assert features & (1 << BLK_F_RO)
        async with await BlkDriver.open(str(qsd.socket)) as blk:
            assert await blk.read(0, SECTOR) == HEADER
            with pytest.raises(BlkIOError):
                await blk.write(0, bytes(SECTOR))
        assert _image_bytes(qsd, 0, SECTOR) == HEADER


# --- vvu probe against qsd -----------------------------------------------------------------


def test_probe_decodes_qsd(tmp_path: Path) -> None:
    with qsd_export(tmp_path, num_queues=2) as qsd:
        report = _probe(qsd)
    assert report["socket"] == str(qsd.socket)
    features = int(str(report["features"]), 16)
    names = report["feature_names"]
    assert isinstance(names, list)
    for name in ("VERSION_1", "PROTOCOL_FEATURES", "EVENT_IDX", "INDIRECT_DESC"):
        assert name in names
    for bit in (BLK_F_SEG_MAX, BLK_F_BLK_SIZE, BLK_F_FLUSH, BLK_F_MQ, BLK_F_DISCARD):
        assert features & (1 << bit), f"virtio-blk feature bit {bit} missing in {features:#x}"
    assert features & (1 << BLK_F_WRITE_ZEROES)
    assert not features & (1 << BLK_F_RO)
    protocol = report["protocol_feature_names"]
    assert isinstance(protocol, list)
    for name in ("MQ", "REPLY_ACK", "CONFIG", "CONFIGURE_MEM_SLOTS"):
        assert name in protocol
    assert report["queues"] == 2
    assert isinstance(report["max_mem_slots"], int) and report["max_mem_slots"] > 0
    config = bytes.fromhex(str(report["config"]))
    assert len(config) == 60  # struct virtio_blk_config through write_zeroes_may_unmap
    (capacity,) = struct.unpack_from("<Q", config, 0)
    (blk_size,) = struct.unpack_from("<I", config, 20)
    (num_queues,) = struct.unpack_from("<H", config, 34)
    assert capacity == DISK_SIZE // SECTOR
    assert blk_size == SECTOR
    assert num_queues == 2
