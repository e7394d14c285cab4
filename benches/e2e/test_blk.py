"""End-to-end blk throughput through vvu's front-end: `vvu serve blk` vs qemu-storage-daemon.

Both back-ends are driven by the same front-end in the same run, so their ratio is meaningful
even on a noisy machine; absolute numbers include the Python front-end's own per-request cost.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import pytest
from conftest import DISK_MIB, check_read, measure
from pytest_benchmark.fixture import BenchmarkFixture

from vvu.frontend import BlkDriver

DEPTH = 32
RANDOM_READS = 4096
SEQ_READS = 512


def _driver(loop: asyncio.AbstractEventLoop, path: str, max_request: int) -> BlkDriver:
    return loop.run_until_complete(BlkDriver.open(path, depth=DEPTH, max_request=max_request))


async def _run(
    blk: BlkDriver, offsets: list[int], length: int, depth: int = DEPTH, *, check: bool = True
) -> None:
    """Read `length` bytes at each sector of `offsets`, `depth` requests in flight; with `check`,
    each read must return the stamped image's data there (conftest.stamped_image)."""
    queue = list(offsets)

    async def lane() -> None:
        while queue:
            sector = queue.pop()
            data = await blk.read(sector, length)
            if check:
                check_read(data, sector, length)

    await asyncio.gather(*(lane() for _ in range(depth)))


def _bench(
    benchmark: BenchmarkFixture, path: str, *, length: int, offsets: Callable[[], list[int]]
) -> None:
    loop = asyncio.new_event_loop()
    blk = _driver(loop, path, max(length, 4096))
    try:
        measure(benchmark, lambda: loop.run_until_complete(_run(blk, offsets(), length)), rounds=5)
    finally:
        loop.run_until_complete(blk.close())
        loop.close()


def _random_4k() -> list[int]:
    rng = random.Random(7)
    sectors = (DISK_MIB << 20) // 512
    return [rng.randrange(0, sectors - 8) & ~7 for _ in range(RANDOM_READS)]


def _sequential_64k() -> list[int]:
    return [i * 128 for i in range(SEQ_READS)][::-1]  # lanes pop from the end: ascending


@pytest.mark.parametrize("backend", ["vvu", "qemu-storage-daemon"])
def test_randread_4k_qd32(
    benchmark: BenchmarkFixture, backend: str, request: pytest.FixtureRequest
) -> None:
    path = request.getfixturevalue("vvu_blk_socket" if backend == "vvu" else "qsd_blk_socket")
    benchmark.extra_info["requests_per_round"] = RANDOM_READS
    _bench(benchmark, path, length=4096, offsets=_random_4k)


@pytest.mark.parametrize("backend", ["vvu", "qemu-storage-daemon"])
def test_seqread_64k_qd32(
    benchmark: BenchmarkFixture, backend: str, request: pytest.FixtureRequest
) -> None:
    path = request.getfixturevalue("vvu_blk_socket" if backend == "vvu" else "qsd_blk_socket")
    benchmark.extra_info["bytes_per_round"] = SEQ_READS * 65536
    _bench(benchmark, path, length=65536, offsets=_sequential_64k)
