"""`vvu demo`: a blk back-end in a child process, our front-end in this one, data verified.

The same run twice: over a vhost-user AF_UNIX socket, then through the virtio-vhost-user
device (`vvu device` + `vvu serve blk --vvu`, both child processes).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from vvu.frontend import BlkDriver

MiB = 1 << 20


def _say(step: str) -> None:
    print(f"vvu demo: {step}", flush=True)


def _pattern(index: int, size: int) -> bytes:
    """Deterministic, incompressible data for request `index` (so nothing needs storing)."""
    seed = hashlib.blake2b(index.to_bytes(8, "little"), digest_size=32).digest()
    block = hashlib.shake_256(seed).digest(size)
    return block


@dataclass
class _Result:
    ok: bool
    write_mib_s: float = 0.0
    read_mib_s: float = 0.0


async def _stop(proc: asyncio.subprocess.Process) -> bytes:
    """SIGTERM (SIGKILL after 10 s); returns what it wrote to stderr if that was piped."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 10)
    except TimeoutError:
        proc.kill()
        _, err = await proc.communicate()
    return err or b""


async def run_demo(*, total_mib: int = 256, request_kib: int = 1024, depth: int = 8) -> int:
    request = request_kib * 1024
    if request % 512 or request <= 0 or total_mib <= 0:
        print("vvu demo: sizes must be positive and a multiple of 512 bytes", file=sys.stderr)
        return 2
    count = total_mib * MiB // request
    disk_mib = total_mib + 16
    workdir = tempfile.mkdtemp(prefix="vvu-demo-")
    try:
        unix = await _demo_unix(workdir, disk_mib, count=count, request=request, depth=depth)
        if not unix.ok:
            return 1
        vvu, device_cpu = await _demo_vvu(
            workdir, disk_mib, count=count, request=request, depth=depth
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if not vvu.ok:
        return 1
    _say("summary, same run, same data:")
    for name, r in (("AF_UNIX", unix), ("VVU    ", vvu)):
        _say(f"  {name}  write {r.write_mib_s:6.0f} MiB/s   read {r.read_mib_s:6.0f} MiB/s")
    _say(
        f"  VVU / AF_UNIX: write {vvu.write_mib_s / unix.write_mib_s:.2f}, "
        f"read {vvu.read_mib_s / unix.read_mib_s:.2f}; the device process used "
        f"{device_cpu} of CPU for {2 * total_mib} MiB (memory, calls and kicks are the "
        "front-end's own fds, so the data path bypasses it)"
    )
    _say(
        "  (both are bound by this front-end generating and checking the data; "
        "benches/e2e/test_vvu.py compares the paths themselves)"
    )
    _say("both paths verified; all good")
    return 0


async def _demo_unix(
    workdir: str, disk_mib: int, *, count: int, request: int, depth: int
) -> _Result:
    socket_path = os.path.join(workdir, "blk.sock")
    _say("1/2 AF_UNIX: vvu's front-end -> vhost-user socket -> `vvu serve blk`")
    _say(f"starting `vvu serve blk` with a {disk_mib} MiB in-memory disk on {socket_path}")
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "vvu", "-q", "serve", "blk",
        "--socket-path", socket_path, "--size", str(disk_mib),
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    result = _Result(ok=False)
    err = b""
    try:
        blk = await BlkDriver.open(socket_path, depth=depth, max_request=request, timeout=10)
        try:
            result = await _exercise(blk, server.pid, count=count, request=request, depth=depth)
        finally:
            await blk.close()
    finally:
        err = await _stop(server)
    cleaned = not os.path.exists(socket_path)
    _say(f"back-end stopped on SIGTERM (exit {server.returncode}), socket removed: {cleaned}")
    if server.returncode != 0 or not cleaned:
        sys.stderr.write(err.decode(errors="replace"))
        result.ok = False
    return result


async def _demo_vvu(
    workdir: str, disk_mib: int, *, count: int, request: int, depth: int
) -> tuple[_Result, str]:
    frontend_socket = os.path.join(workdir, "frontend.sock")
    device_socket = os.path.join(workdir, "device.sock")
    _say(
        "2/2 VVU: vvu's front-end -> `vvu device` (virtio-vhost-user over vfio-user) -> "
        "`vvu serve blk --vvu`"
    )
    _say(f"starting `vvu device`: front-ends on {frontend_socket}, its driver on {device_socket}")
    device = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "vvu", "-q", "device",
        "--socket-path", frontend_socket, "--vfio-user", device_socket, "--max-queues", "4",
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    server: asyncio.subprocess.Process | None = None
    result = _Result(ok=False)
    device_err = server_err = b""
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(device_socket):
            if device.returncode is not None or time.monotonic() > deadline:
                raise OSError(f"`vvu device` did not create {device_socket}")
            await asyncio.sleep(0.02)
        _say(f"starting `vvu serve blk --vvu` with a {disk_mib} MiB in-memory disk")
        server = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "vvu", "-q", "serve", "blk",
            "--vvu", device_socket, "--size", str(disk_mib),
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        blk = await BlkDriver.open(frontend_socket, depth=depth, max_request=request, timeout=10)
        try:
            result = await _exercise(blk, server.pid, count=count, request=request, depth=depth)
        finally:
            await blk.close()
    except (OSError, TimeoutError) as err:
        _say(f"FAILED: {err}")
    finally:
        if server is not None:
            server_err = await _stop(server)
        device_err = await _stop(device)
    match = re.search(rb"device process CPU time ([0-9.]+ s)", device_err)
    cpu = match.group(1).decode() if match else "?"
    _say(
        f"driver stopped (exit {server.returncode if server else '-'}), device stopped "
        f"(exit {device.returncode}); device process CPU time {cpu}"
    )
    if server is None or server.returncode != 0 or device.returncode != 0 or match is None:
        sys.stderr.write((server_err + device_err).decode(errors="replace"))
        result.ok = False
    return result, cpu


async def _run_all(count: int, depth: int, one: Callable[[int], Awaitable[None]]) -> None:
    """Run `one(i)` for i in range(count) with at most `depth` in flight."""
    next_index = 0

    async def lane() -> None:
        nonlocal next_index
        while next_index < count:
            i = next_index
            next_index += 1
            await one(i)

    await asyncio.gather(*(lane() for _ in range(depth)))


async def _exercise(blk: BlkDriver, pid: int, *, count: int, request: int, depth: int) -> _Result:
    """Write, read back and verify `count` requests; then discard. ok if all checks pass."""
    fe = blk.frontend
    total_mib = count * request // MiB
    _say(
        f"connected (pid {pid}); negotiated features {fe.features:#x}, "
        f"protocol features {fe.protocol_features:#x}, {fe.num_queues} queue(s)"
    )
    _say(
        f"disk: {blk.capacity} sectors ({blk.capacity * 512 // MiB} MiB), "
        f"serial {(await blk.get_id()).decode(errors='replace')!r}"
    )
    sectors = request // 512
    cpu0 = os.times()

    async def write_one(i: int) -> None:
        await blk.write(i * sectors, _pattern(i, request))

    start = time.perf_counter()
    await _run_all(count, depth, write_one)
    await blk.flush()
    elapsed = time.perf_counter() - start
    write_rate = count * request / MiB / elapsed
    _say(
        f"wrote {total_mib} MiB in {count} requests of {request // 1024} KiB, queue depth "
        f"{depth}, and flushed: {write_rate:.0f} MiB/s"
    )
    mismatches = 0

    async def read_one(i: int) -> None:
        nonlocal mismatches
        if await blk.read(i * sectors, request) != _pattern(i, request):
            mismatches += 1

    start = time.perf_counter()
    await _run_all(count, depth, read_one)
    read_rate = count * request / MiB / (time.perf_counter() - start)
    _say(f"read back {total_mib} MiB: {read_rate:.0f} MiB/s")
    if mismatches:
        _say(f"FAILED: {mismatches} of {count} requests read back wrong data")
        return _Result(ok=False)
    _say(f"verified every byte of {count} requests")
    await blk.discard(0, sectors)
    zeroed = await blk.read(0, request) == bytes(request)
    _say(f"discarded the first request's sectors: they read back as zeros: {zeroed}")
    cpu = os.times()
    _say(
        f"front-end CPU time {cpu.user - cpu0.user + cpu.system - cpu0.system:.2f} s "
        "(the back-end's data path runs in Rust worker threads)"
    )
    return _Result(zeroed, write_rate, read_rate)
