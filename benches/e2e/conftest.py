"""Fixtures for the end-to-end benchmarks: back-end daemons started and stopped by PID."""

from __future__ import annotations

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
    image = workdir / "disk.img"
    with open(image, "wb") as f:
        f.truncate(DISK_MIB << 20)
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
    image = workdir / "disk.img"
    with open(image, "wb") as f:
        f.truncate(DISK_MIB << 20)
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
