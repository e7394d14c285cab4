"""In-band notifications vs eventfds: the same `vvu serve blk`, the same front-end, QD 32.

With INBAND_NOTIFICATIONS every kick is a VRING_KICK message on the main socket and every call a
BACKEND_VRING_CALL on the back-end channel (both through the engine's event loop), instead of an
eventfd the native worker waits on and signals itself. Run together so the ratio is meaningful.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from conftest import DISK_MIB, measure
from pytest_benchmark.fixture import BenchmarkFixture
from test_blk import _run

from vvu.frontend import BlkDriver

DEPTH = 32
RANDOM_READS = 4096


@pytest.mark.parametrize("notifications", ["eventfd", "inband"])
def test_randread_4k_qd32_notifications(
    benchmark: BenchmarkFixture, vvu_blk_socket: str, notifications: str
) -> None:
    rng = random.Random(7)
    sectors = (DISK_MIB << 20) // 512
    offsets = [rng.randrange(0, sectors - 8) & ~7 for _ in range(RANDOM_READS)]
    benchmark.extra_info["requests_per_round"] = RANDOM_READS
    loop = asyncio.new_event_loop()
    blk = loop.run_until_complete(
        BlkDriver.open(
            vvu_blk_socket, depth=DEPTH, max_request=4096, inband=notifications == "inband"
        )
    )
    try:
        assert blk.frontend.inband == (notifications == "inband")
        measure(benchmark, lambda: loop.run_until_complete(_run(blk, offsets, 4096)), rounds=5)
    finally:
        loop.run_until_complete(blk.close())
        loop.close()
