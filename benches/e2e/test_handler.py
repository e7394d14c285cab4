"""Requests per second through the Python handler path (the rng back-end's `handle`).

A driver-side ring in the same process keeps 256 requests available; the device side pops
batches of 64 and hands them to `RngBackend.handle`, pushes used and publishes once per batch —
exactly what the engine's Python queue runner does, without sockets in the way.
"""

from __future__ import annotations

import asyncio
import os

from conftest import measure
from pytest_benchmark.fixture import BenchmarkFixture

from vvu._core import EventFd, GuestMemory, SplitQueue, SplitQueueDriver, memfd
from vvu.backends.request import RequestQueue, RequestRunner
from vvu.backends.rng import RngBackend

SIZE = 256
BATCH = 64
ROUNDS_OF_REQUESTS = 64 * 256


def test_rng_python_handler_requests(benchmark: BenchmarkFixture) -> None:
    fd = memfd(4 << 20)
    try:
        driver_mem, device_mem = GuestMemory(), GuestMemory()
        driver_mem.add_region(fd, 0, 4 << 20)
        device_mem.add_region(fd, 0, 4 << 20)
        driver = SplitQueueDriver(driver_mem, SIZE, 0, 0x1000, 0x2000)
        device = SplitQueue(SIZE, 0, 0x1000, 0x2000)
        device.attach(device_mem)
        backend = RngBackend()
        for i in range(SIZE):
            driver.add_chain([], [(0x10000 + 64 * i, 16)])
        driver.publish()

        def run() -> None:
            done = 0
            while done < ROUNDS_OF_REQUESTS:
                chains = device.pop(BATCH)
                used = backend.handle(0, chains)
                assert list(used) == [16] * len(chains), "every request is answered in full"
                device.push_used_many(chains, used)
                device.publish_used()
                done += len(chains)
                for head, _ in driver.reap_all():  # give the buffers straight back
                    driver.add_chain([], [(0x10000 + 64 * head, 16)])
                driver.publish()

        benchmark.extra_info["requests_per_round"] = ROUNDS_OF_REQUESTS
        measure(benchmark, run, rounds=3)
        # The buffers started as zeros (a new memfd): the handler must have filled each one.
        data = driver_mem.read(0x10000, 16 * 4 * SIZE)
        empty = [i for i in range(SIZE) if data[64 * i : 64 * i + 16] == bytes(16)]
        assert empty == [], f"buffers the rng handler never wrote: {empty[:8]}"
    finally:
        os.close(fd)


def test_rng_async_request_path_requests(benchmark: BenchmarkFixture) -> None:
    """The same rng work on the asynchronous path (`Backend.run_queue`, one `Request` per chain,
    completed at once): what holding and completing requests one by one costs against the
    batched `handle`. The engine's `RequestRunner` runs the ring; kicks and calls are real
    eventfds, and the driver side refills on each call, on the same event loop."""
    fd = memfd(4 << 20)
    urandom = os.open("/dev/urandom", os.O_RDONLY | os.O_CLOEXEC)
    try:
        driver_mem, device_mem = GuestMemory(), GuestMemory()
        driver_mem.add_region(fd, 0, 4 << 20)
        device_mem.add_region(fd, 0, 4 << 20)

        async def serve(queue: RequestQueue) -> None:
            async for request in queue:
                request.complete(os.readv(urandom, request.writable))

        async def rounds_of_requests() -> None:
            driver = SplitQueueDriver(driver_mem, SIZE, 0, 0x1000, 0x2000)
            device = SplitQueue(SIZE, 0, 0x1000, 0x2000)
            device.attach(device_mem)
            kick, call = EventFd(), EventFd()
            for i in range(SIZE):
                driver.add_chain([], [(0x10000 + 64 * i, 16)])
            driver.publish()
            finished = asyncio.Event()
            done = 0

            def refill() -> None:
                nonlocal done
                call.consume()
                for head, _ in driver.reap_all():
                    driver.add_chain([], [(0x10000 + 64 * head, 16)])
                    done += 1
                if done >= ROUNDS_OF_REQUESTS:
                    finished.set()
                if driver.publish():
                    kick.signal()

            loop = asyncio.get_running_loop()
            loop.add_reader(call.fileno(), refill)
            runner = RequestRunner(device, kick, call, None, serve, index=0)
            await finished.wait()
            loop.remove_reader(call.fileno())
            await runner.stop(hand_back=False)
            device.detach()
            kick.close()
            call.close()

        benchmark.extra_info["requests_per_round"] = ROUNDS_OF_REQUESTS
        measure(benchmark, lambda: asyncio.run(rounds_of_requests()), rounds=3)
    finally:
        os.close(urandom)
        os.close(fd)
