"""`vvu demo`: a blk back-end in a child process, our front-end in this one, data verified."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable

from vvu.frontend import BlkDriver

MiB = 1 << 20


def _say(step: str) -> None:
    print(f"vvu demo: {step}", flush=True)


def _pattern(index: int, size: int) -> bytes:
    """Deterministic, incompressible data for request `index` (so nothing needs storing)."""
    seed = hashlib.blake2b(index.to_bytes(8, "little"), digest_size=32).digest()
    block = hashlib.shake_256(seed).digest(size)
    return block


async def run_demo(*, total_mib: int = 256, request_kib: int = 1024, depth: int = 8) -> int:
    request = request_kib * 1024
    if request % 512 or request <= 0 or total_mib <= 0:
        print("vvu demo: sizes must be positive and a multiple of 512 bytes", file=sys.stderr)
        return 2
    count = total_mib * MiB // request
    disk_mib = total_mib + 16
    workdir = tempfile.mkdtemp(prefix="vvu-demo-")
    socket_path = os.path.join(workdir, "blk.sock")
    _say(f"starting `vvu serve blk` with a {disk_mib} MiB in-memory disk on {socket_path}")
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "vvu", "-q", "serve", "blk",
        "--socket-path", socket_path, "--size", str(disk_mib),
    )  # fmt: skip
    try:
        blk = await BlkDriver.open(socket_path, depth=depth, max_request=request, timeout=10)
        try:
            ok = await _exercise(blk, server.pid, count=count, request=request, depth=depth)
        finally:
            await blk.close()
        if not ok:
            return 1
    finally:
        if server.returncode is None:
            server.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(server.wait(), 10)
            except TimeoutError:
                server.kill()
                await server.wait()
        cleaned = not os.path.exists(socket_path)
        shutil.rmtree(workdir, ignore_errors=True)
    _say(
        f"back-end stopped on SIGTERM (exit {server.returncode}), socket removed: {cleaned}; "
        "all good"
    )
    return 0 if server.returncode == 0 and cleaned else 1


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


async def _exercise(blk: BlkDriver, pid: int, *, count: int, request: int, depth: int) -> bool:
    """Write, read back and verify `count` requests; then discard. True if all checks pass."""
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
    _say(
        f"wrote {total_mib} MiB in {count} requests of {request // 1024} KiB, queue depth "
        f"{depth}, and flushed: {total_mib / elapsed:.0f} MiB/s"
    )
    mismatches = 0

    async def read_one(i: int) -> None:
        nonlocal mismatches
        if await blk.read(i * sectors, request) != _pattern(i, request):
            mismatches += 1

    start = time.perf_counter()
    await _run_all(count, depth, read_one)
    elapsed = time.perf_counter() - start
    _say(f"read back {total_mib} MiB: {total_mib / elapsed:.0f} MiB/s")
    if mismatches:
        _say(f"FAILED: {mismatches} of {count} requests read back wrong data")
        return False
    _say(f"verified every byte of {count} requests")
    await blk.discard(0, sectors)
    zeroed = await blk.read(0, request) == bytes(request)
    _say(f"discarded the first request's sectors: they read back as zeros: {zeroed}")
    cpu = os.times()
    _say(
        f"front-end CPU time {cpu.user - cpu0.user + cpu.system - cpu0.system:.2f} s "
        "(the back-end's data path runs in Rust worker threads)"
    )
    return zeroed
