"""End-to-end blk throughput over AF_UNIX vs through the virtio-vhost-user device.

The same `vvu serve blk` on the same kind of image, driven by the same front-end (`BlkDriver`,
the workloads of test_blk.py), in the same run:

- **af_unix**: front-end → vhost-user socket → `vvu serve blk --socket-path`;
- **vvu**: front-end → `vvu device` (vfio-user) → `vvu serve blk --vvu` (the VVU driver), with
  direct kicks (the default: the back-end waits on the front-end's kick eventfd itself);
- **vvu_msix**: the same with `--vvu-kick-mode msix` (the device relays every kick to an MSI-X
  eventfd), so both kick paths are measured in the same run.

Both daemons are child processes. Around each benchmark the back-end's and (for vvu) the device
process's CPU time (utime + stime of every thread, /proc/PID/stat, 10 ms ticks) and run time
(every live thread's /proc/PID/task/TID/schedstat, ns) are read, so extra_info shows how much
the device costs next to the back-end it serves.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import _stop, _wait_for_socket, measure, stamped_image
from pytest_benchmark.fixture import BenchmarkFixture
from test_blk import DEPTH, RANDOM_READS, SEQ_READS, _random_4k, _run, _sequential_64k

from vvu.frontend import BlkDriver

VVU = [sys.executable, "-m", "vvu", "-q"]
TICKS = os.sysconf("SC_CLK_TCK")
#: More rounds than test_blk.py: CPU time is counted in 10 ms ticks.
ROUNDS = 15


@dataclass
class Served:
    """Where front-ends connect, and the processes whose CPU time is measured."""

    socket: str
    backend: subprocess.Popen[bytes]
    device: subprocess.Popen[bytes] | None = None


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of `pid` so far (/proc/PID/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def run_seconds(pid: int) -> float:
    """Time on CPU of every live thread of `pid` so far, in ns resolution (first field of
    /proc/PID/task/TID/schedstat): where 10 ms ticks say 0, this still says how much."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, IndexError, ValueError):
            continue  # the thread ended meanwhile
    return total / 1e9


def _image(workdir: Path) -> Path:
    return stamped_image(workdir / "disk.img")


@pytest.fixture(scope="module")
def af_unix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    workdir = tmp_path_factory.mktemp("vvu-unix")
    path = workdir / "blk.sock"
    proc = subprocess.Popen(
        [*VVU, "serve", "blk", "--socket-path", str(path), "--image", str(_image(workdir))]
    )
    try:
        _wait_for_socket(path, proc)
        yield Served(str(path), proc)
    finally:
        _stop(proc)


def _vvu(tmp_path_factory: pytest.TempPathFactory, kick_mode: str) -> Iterator[Served]:
    workdir = tmp_path_factory.mktemp(f"vvu-device-{kick_mode}")
    frontend, device_socket = workdir / "frontend.sock", workdir / "device.sock"
    device = subprocess.Popen(
        [*VVU, "device", "--socket-path", str(frontend), "--vfio-user", str(device_socket),
         "--max-queues", "4"],
    )  # fmt: skip
    backend: subprocess.Popen[bytes] | None = None
    try:
        _wait_for_socket(device_socket, device)
        backend = subprocess.Popen(
            [*VVU, "serve", "blk", "--vvu", str(device_socket), "--vvu-kick-mode", kick_mode,
             "--image", str(_image(workdir))]
        )  # fmt: skip
        yield Served(str(frontend), backend, device)
    finally:
        if backend is not None:
            _stop(backend)
        _stop(device)


@pytest.fixture(scope="module")
def vvu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    yield from _vvu(tmp_path_factory, "direct")


@pytest.fixture(scope="module")
def vvu_msix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    yield from _vvu(tmp_path_factory, "msix")


def _bench(
    benchmark: BenchmarkFixture, served: Served, *, length: int, offsets: Callable[[], list[int]]
) -> None:
    loop = asyncio.new_event_loop()
    blk = loop.run_until_complete(
        BlkDriver.open(served.socket, depth=DEPTH, max_request=max(length, 4096), timeout=15)
    )
    try:
        backend0 = cpu_seconds(served.backend.pid)
        device0 = cpu_seconds(served.device.pid) if served.device else 0.0
        backend_run0 = run_seconds(served.backend.pid)
        device_run0 = run_seconds(served.device.pid) if served.device else 0.0
        measure(
            benchmark, lambda: loop.run_until_complete(_run(blk, offsets(), length)), rounds=ROUNDS
        )
        backend_cpu = cpu_seconds(served.backend.pid) - backend0
        backend_run = run_seconds(served.backend.pid) - backend_run0
        info = benchmark.extra_info
        info["backend_cpu_s"] = round(backend_cpu, 3)
        info["backend_run_s"] = round(backend_run, 4)
        if served.device is not None:
            device_cpu = cpu_seconds(served.device.pid) - device0
            device_run = run_seconds(served.device.pid) - device_run0
            info["device_cpu_s"] = round(device_cpu, 3)
            info["device_cpu_pct_of_backend"] = round(100 * device_cpu / max(backend_cpu, 1e-9), 2)
            info["device_run_s"] = round(device_run, 4)
            info["device_run_pct_of_backend"] = round(100 * device_run / max(backend_run, 1e-9), 2)
    finally:
        loop.run_until_complete(blk.close())
        loop.close()


@pytest.mark.parametrize("transport", ["af_unix", "vvu", "vvu_msix"])
def test_vvu_randread_4k_qd32(
    benchmark: BenchmarkFixture, transport: str, request: pytest.FixtureRequest
) -> None:
    served: Served = request.getfixturevalue(transport)
    benchmark.extra_info["requests_per_round"] = RANDOM_READS
    _bench(benchmark, served, length=4096, offsets=_random_4k)


@pytest.mark.parametrize("transport", ["af_unix", "vvu", "vvu_msix"])
def test_vvu_seqread_64k_qd32(
    benchmark: BenchmarkFixture, transport: str, request: pytest.FixtureRequest
) -> None:
    served: Served = request.getfixturevalue(transport)
    benchmark.extra_info["bytes_per_round"] = SEQ_READS * 65536
    _bench(benchmark, served, length=65536, offsets=_sequential_64k)
