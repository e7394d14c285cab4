"""Fixtures for the end-to-end benchmarks: back-end daemons started and stopped by PID."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

# The test rigs the benchmarks share with the test suite (tests/backend_vm.py, tests/guest.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

DISK_MIB = 256
#: Every 4 KiB block of a bench image starts with its first sector number (8 bytes, LE), so a
#: read can be checked (`check_read`): a back-end that returns zeros or the wrong block fails.
STAMP_EVERY = 4096


def stamped_image(path: Path, mib: int = DISK_MIB) -> Path:
    """A sparse image of `mib` MiB whose 4 KiB blocks carry their sector numbers."""
    with open(path, "wb") as f:
        f.truncate(mib << 20)
        for offset in range(0, mib << 20, STAMP_EVERY):
            os.pwrite(f.fileno(), (offset // 512).to_bytes(8, "little"), offset)
    return path


def check_read(data: bytes, sector: int, length: int) -> None:
    """`data`, read at `sector`, is `length` bytes of the stamped image at that place."""
    assert len(data) == length, f"read at sector {sector}: {len(data)} bytes, not {length}"
    for offset in range(0, length, STAMP_EVERY):
        stamp = int.from_bytes(data[offset : offset + 8], "little")
        assert stamp == sector + offset // 512, f"read at sector {sector}: wrong data at +{offset}"


def _wait_for_socket(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args!r} did not start listening on {path}")
        time.sleep(0.02)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def vvu_blk_socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`vvu serve blk` on an image file in tmp."""
    workdir = tmp_path_factory.mktemp("vvu-blk")
    image = stamped_image(workdir / "disk.img")
    path = workdir / "blk.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vvu", "-q", "serve", "blk", "--socket-path", str(path),
         "--image", str(image)],
    )  # fmt: skip
    try:
        _wait_for_socket(path, proc)
        yield str(path)
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def qsd_blk_socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """qemu-storage-daemon exporting the same kind of image as vhost-user-blk."""
    qsd = shutil.which("qemu-storage-daemon")
    if qsd is None:
        pytest.skip("qemu-storage-daemon is not installed (package qemu-system-common)")
    workdir = tmp_path_factory.mktemp("qsd-blk")
    image = stamped_image(workdir / "disk.img")
    path = workdir / "qsd.sock"
    proc = subprocess.Popen(
        [qsd,
         "--blockdev", f"driver=file,node-name=file0,filename={image},cache.direct=off",
         "--blockdev", "driver=raw,node-name=disk0,file=file0",
         "--export", f"type=vhost-user-blk,id=exp0,addr.type=unix,addr.path={path},"
         "node-name=disk0,writable=on"],
    )  # fmt: skip
    try:
        _wait_for_socket(path, proc)
        yield str(path)
    finally:
        _stop(proc)


def measure(benchmark: BenchmarkFixture, fn: Callable[[], None], *, rounds: int) -> None:
    """benchmark.pedantic with a fixed number of rounds (pytest-benchmark ships no types)."""
    benchmark.pedantic(fn, rounds=rounds, iterations=1)  # type: ignore[no-untyped-call]
