"""The back-end VM beside the same back-end on the host: what the virtio-vhost-user device costs
per request when a stock VMM (QEMU 11, `vfio-user-pci`) hosts it.

The same front-end (`BlkDriver`, its RAM in the same kind of /dev/shm file) drives the same
workload in the same run against:

- **af_unix**: `vvu serve blk --image` on the host, over AF_UNIX;
- **backend_vm**: `vvu device --frontend-memory` + the back-end VM (tests/backend_vm.py): a TCG
  guest runs `vvu serve blk --vvu-pci` through QEMU's vfio-user client and Linux VFIO.

TCG makes the back-end VM's absolute speed meaningless (every guest instruction is emulated),
so the figures that matter are per request and independent of it: vfio-user messages by command
and region, doorbells rung by REGION_WRITE, kicks relayed to MSI-X, and the device process's
CPU time (from `vvu device`'s SIGUSR1 statistics, /proc/PID/stat in 10 ms ticks and schedstat
run time in ns) — all in extra_info.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import _stop, _wait_for_socket, measure, stamped_image
from pytest_benchmark.fixture import BenchmarkFixture
from test_blk import _run
from test_vvu import cpu_seconds, run_seconds

from backend_vm import DISK_MIB, FRONTEND_MEMORY, BackendVm, backend_vm_rig
from vvu.frontend import BlkDriver

VVU = [sys.executable, "-m", "vvu", "-q"]
DEPTH = 8
#: Requests per round: the back-end VM does a few thousand per second under TCG.
REQUESTS = 512
ROUNDS = 5


@pytest.fixture(scope="module")
def backend_vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackendVm]:
    with backend_vm_rig(tmp_path_factory.mktemp("bench-backend-vm")) as vm:
        yield vm


@pytest.fixture(scope="module")
def af_unix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """`vvu serve blk` on the host, and a front-end memory file like the back-end VM's."""
    workdir = tmp_path_factory.mktemp("bench-af-unix")
    image, memory = workdir / "disk.img", Path("/dev/shm") / f"vvu-bench-{workdir.name}"
    stamped_image(image, DISK_MIB)
    with memory.open("wb") as f:
        f.truncate(FRONTEND_MEMORY)
    path = workdir / "blk.sock"
    proc = subprocess.Popen(
        [*VVU, "serve", "blk", "--socket-path", str(path), "--image", str(image)]
    )
    try:
        _wait_for_socket(path, proc)
        yield str(path), memory
    finally:
        _stop(proc)
        memory.unlink(missing_ok=True)


def _offsets() -> list[int]:
    rng = random.Random(11)
    sectors = (DISK_MIB << 20) // 512
    return [rng.randrange(0, sectors - 8) & ~7 for _ in range(REQUESTS)]


@pytest.mark.parametrize("path", ["af_unix", "backend_vm"])
def test_backend_vm_randread_4k(
    benchmark: BenchmarkFixture, path: str, request: pytest.FixtureRequest
) -> None:
    vm: BackendVm | None = None
    if path == "backend_vm":
        vm = request.getfixturevalue("backend_vm")
        socket, memory = str(vm.frontend_socket), vm.frontend_memory
    else:
        socket, memory = request.getfixturevalue("af_unix")
    loop = asyncio.new_event_loop()
    blk = loop.run_until_complete(
        BlkDriver.open(socket, depth=DEPTH, max_request=4096, timeout=60, memory_path=str(memory))
    )
    try:
        before = vm.device_stats() if vm is not None else None
        cpu0 = cpu_seconds(vm.device.proc.pid) if vm is not None else 0.0
        run0 = run_seconds(vm.device.proc.pid) if vm is not None else 0.0
        measure(
            benchmark,
            # The back-end VM's image is the rig's (zeros, its I/O checked by
            # tests/test_backend_vm.py); the host back-end's is stamped and checked.
            lambda: loop.run_until_complete(_run(blk, _offsets(), 4096, DEPTH, check=vm is None)),
            rounds=ROUNDS,
        )
        info = benchmark.extra_info
        info["requests_per_round"] = REQUESTS
        info["depth"] = DEPTH
        if vm is not None and before is not None:
            requests = REQUESTS * ROUNDS
            after = vm.device_stats()
            device_cpu = cpu_seconds(vm.device.proc.pid) - cpu0  # 10 ms ticks
            device_run = run_seconds(vm.device.proc.pid) - run0  # ns resolution
            info["device_cpu_us_per_request"] = round(1e6 * device_cpu / requests, 1)
            info["device_run_us_per_request"] = round(1e6 * device_run / requests, 1)
            for group in ("commands", "region_accesses"):
                for name, count in after[group].items():
                    delta = count - before[group].get(name, 0)
                    if delta:
                        info[f"{name}_per_request"] = round(delta / requests, 3)
            for name in ("doorbell_writes", "kicks_forwarded"):
                info[f"{name}_per_request"] = round((after[name] - before[name]) / requests, 3)
    finally:
        loop.run_until_complete(blk.close())
        loop.close()
