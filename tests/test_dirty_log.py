"""Dirty logging for live migration, checked by our own front-end.

The front-end turns logging on the way QEMU does at migration start (SET_LOG_BASE with a memfd,
SET_FEATURES with LOG_ALL, SET_VRING_ADDR with the log flag), drives I/O into buffers at known
guest addresses, and compares the bitmap it reads back (and clears, as QEMU's log sync does) with
exactly the pages the back-end wrote: the device-writable buffers of each request and the used
ring at its log address. Pages the back-end only read, or did not touch, must stay clean. Both
queue runners are covered: the native blk worker and the Python handler path (rng), and both
ring formats: a packed ring's used descriptors go into its descriptor ring, logged by guest
address, and its device event suppression area is logged at the ring's log address (QEMU gives
that area's address, as the split ring's used ring address).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from vvu._core import DirtyLog, EventFd
from vvu.backends import BlkBackend, RngBackend
from vvu.backends.base import Backend
from vvu.device.vvu import FEATURES_FILTERED, PROTOCOL_FEATURES_ALLOWED
from vvu.engine import BackendEngine
from vvu.frontend import BlkDriver, Frontend, FrontendQueue
from vvu.frontend.blk import T_IN, T_OUT
from vvu.frontend.core import FrontendError
from vvu.protocol import U64, FrontendRequest, Log, ProtocolFeature, VhostFeature
from vvu.transport.unix import socketpair_channels
from vvu_harness import served

pytestmark = pytest.mark.timeout(30)

MiB = 1 << 20
PAGE = 4096
TIMEOUT = 5.0  # hang guard only
DISK = 4 * MiB
MEMORY = 2 * MiB
# Buffers at fixed guest addresses, far above the rings the front-end allocates from 0x1000.
HEADER = 0x10_0000  # device-readable request header
DATA = 0x12_0800  # 8 KiB from the middle of a page: touches pages 0x120000..0x122000
DATA_LEN = 0x2000
OUT_DATA = 0x14_0000  # device-readable write payload
STATUS = 0x13_07FF  # one status byte
USED_LOG = 0x1F_F000  # where the used ring's writes are logged (not where the ring is)


def pages(gpa: int, length: int) -> list[int]:
    return list(range(gpa // PAGE * PAGE, gpa + length, PAGE))


@pytest.fixture(params=[False, True], ids=["split", "packed"])
def packed(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def ring_pages(queue: FrontendQueue, packed: bool, used_log: int = USED_LOG) -> set[int]:
    """The ring pages every completion dirties: the used ring at its log address (split), the
    descriptor ring's page by guest address, where the used descriptors go (packed)."""
    return {queue.desc // PAGE * PAGE} if packed else {used_log // PAGE * PAGE}


def without_packed_event_area(dirty: list[int], packed: bool, used_log: int = USED_LOG) -> set[int]:
    """The dirty pages, less the packed ring's device event area at its log address: a native
    worker writes it when it goes to sleep or wakes up, which a completion may or may not beat
    (the queue tests check its logging exactly)."""
    return set(dirty) - ({used_log // PAGE * PAGE} if packed else set())


@contextlib.asynccontextmanager
async def session(
    backend: Backend,
    packed: bool = False,
    size: int = 64,
    *,
    transport: str = "socketpair",
    tmp_path: Path | None = None,
) -> AsyncIterator[tuple[Frontend, FrontendQueue, BackendEngine]]:
    """Our front-end and an in-process engine, queue 0 (of `size`, packed with `packed`)
    running: on a socketpair, or served by vvu_harness over `transport` ("unix", "vvu": the log
    is the VVU device's shmid 2)."""
    engine = BackendEngine(backend)
    async with contextlib.AsyncExitStack() as stack:
        if transport == "socketpair":
            client, server = socketpair_channels()
            task = asyncio.ensure_future(engine.serve(server))
            stack.push_async_callback(asyncio.wait_for, task, TIMEOUT)
            frontend = Frontend(client, memory_size=MEMORY, packed=packed)
        else:
            assert tmp_path is not None
            path = await stack.enter_async_context(served(engine, transport, tmp_path))
            frontend = await Frontend.connect(
                path, memory_size=MEMORY, timeout=TIMEOUT, packed=packed
            )
        stack.push_async_callback(frontend.close)
        await frontend.negotiate()
        await frontend.set_mem_table()
        queue = await frontend.start_queue(0, size)
        yield frontend, queue, engine


async def blk_request(
    frontend: Frontend, queue: FrontendQueue, kind: int, sector: int, data: bytes = b""
) -> int:
    """One blk request with the fixed buffers: T_IN reads DATA_LEN bytes into DATA, T_OUT
    writes `data` from OUT_DATA. Returns the used length; the status must be OK."""
    memory = frontend.memory
    memory.write(HEADER, struct.pack("<IIQ", kind, 0, sector))
    memory.write(STATUS, b"\xff")
    readable = [(HEADER, 16)]
    writable = [(STATUS, 1)]
    if kind == T_OUT:
        memory.write(OUT_DATA, data)
        readable.append((OUT_DATA, len(data)))
    else:
        writable.insert(0, (DATA, DATA_LEN))
    used = await asyncio.wait_for(queue.request(readable, writable), TIMEOUT)
    assert memory.read(STATUS, 1) == b"\0"
    return used


@pytest.fixture
def blk() -> Iterator[BlkBackend]:
    backend = BlkBackend(size=DISK)
    yield backend
    backend.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("transport", ["socketpair", "vvu"])
async def test_blk_worker_logs_exactly_the_pages_it_writes(
    blk: BlkBackend, packed: bool, transport: str, tmp_path: Path
) -> None:
    async with session(blk, packed, transport=transport, tmp_path=tmp_path) as (
        frontend,
        queue,
        _,
    ):
        before = os.urandom(DATA_LEN)
        await blk_request(frontend, queue, T_OUT, 8, before)
        dirty = await frontend.start_dirty_log(used_ring_log={0: USED_LOG})
        # The rings restarted with the log: at most the notification word at the log address.
        assert set(dirty.take_dirty_pages()) <= {USED_LOG}
        ring = ring_pages(queue, packed)

        # A read: the back-end writes the data buffer, the status byte and the used ring.
        assert await blk_request(frontend, queue, T_IN, 8) == DATA_LEN + 1
        assert frontend.memory.read(DATA, DATA_LEN) == before
        assert without_packed_event_area(dirty.take_dirty_pages(), packed) == {
            *pages(DATA, DATA_LEN),
            *pages(STATUS, 1),
            *ring,
        }

        # A write: the data is only read, so only the status byte and the used ring are dirty.
        await blk_request(frontend, queue, T_OUT, 16, os.urandom(DATA_LEN))
        assert without_packed_event_area(dirty.take_dirty_pages(), packed) == {
            *pages(STATUS, 1),
            *ring,
        }
        assert dirty.faults == 0

        await frontend.stop_dirty_log()
        # Whatever the ring wrote while logging was still on (going to sleep after the last
        # request: avail_event) may be logged; from here on nothing is.
        dirty.take_dirty_pages()
        await blk_request(frontend, queue, T_IN, 16)
        assert dirty.dirty_pages() == [], "nothing is logged once LOG_ALL is cleared"


@pytest.mark.asyncio
async def test_python_handler_writes_are_logged_at_push(packed: bool) -> None:
    async with session(RngBackend(), packed) as (frontend, queue, _):
        dirty = await frontend.start_dirty_log(used_ring_log={0: USED_LOG})
        dirty.take_dirty_pages()
        buffer = 0x15_0F00  # 512 bytes across a page boundary
        used = await asyncio.wait_for(queue.request([], [(buffer, 512)]), TIMEOUT)
        assert used == 512
        # The Python runner re-enables notifications (at USED_LOG, for both formats) before the
        # event loop lets the front-end see the completion.
        assert dirty.take_dirty_pages() == sorted(
            {0x15_0000, 0x15_1000, USED_LOG, *ring_pages(queue, packed)}
        )


@pytest.mark.asyncio
async def test_the_used_ring_is_logged_at_its_own_address_by_default(
    blk: BlkBackend, packed: bool
) -> None:
    async with session(blk, packed) as (frontend, queue, engine):
        dirty = await frontend.start_dirty_log()
        dirty.take_dirty_pages()
        await blk_request(frontend, queue, T_IN, 0)
        assert engine.session is not None
        addr = engine.session.vrings[0].addr
        assert addr is not None
        # The used ring's address: a packed ring's device event area, as QEMU gives it.
        used_gpa = addr.log
        assert used_gpa == frontend.memory.uva_to_gpa(addr.used)
        assert without_packed_event_area(dirty.take_dirty_pages(), packed, used_gpa) == {
            *pages(DATA, DATA_LEN),
            *pages(STATUS, 1),
            *ring_pages(queue, packed, used_gpa),
        } - ({used_gpa // PAGE * PAGE} if packed else set())


@pytest.mark.asyncio
async def test_log_all_acked_before_the_log_is_set_logs_from_set_log_base(
    blk: BlkBackend, packed: bool
) -> None:
    async with session(blk, packed) as (frontend, queue, _):
        frontend.features |= VhostFeature.LOG_ALL.mask
        await frontend.request(FrontendRequest.SET_FEATURES, U64(frontend.features))
        await blk_request(frontend, queue, T_IN, 0)  # no log yet: nothing to log into
        fd = os.memfd_create("log")
        try:
            size = MEMORY // (8 * PAGE)
            os.ftruncate(fd, size)
            dirty = DirtyLog(fd, size)
            await frontend.request(FrontendRequest.SET_LOG_BASE, Log(size, 0), [fd])
            dirty.take_dirty_pages()
            await blk_request(frontend, queue, T_IN, 0)
            # No VHOST_VRING_F_LOG on the ring: its buffers are logged, its used ring (split) or
            # device event area (packed) is not. A packed ring's used descriptors are logged by
            # guest address like the buffers: they are not in the used ring.
            packed_used = {queue.desc // PAGE * PAGE} if packed else set()
            assert dirty.take_dirty_pages() == sorted(
                {*pages(DATA, DATA_LEN), *pages(STATUS, 1), *packed_used}
            )
        finally:
            os.close(fd)


@pytest.mark.asyncio
async def test_io_in_flight_while_logging_starts_and_stops_completes_intact(
    blk: BlkBackend, packed: bool
) -> None:
    async with session(blk, packed) as (frontend, queue, _):
        driver = BlkDriver(frontend, queue, DISK // 512, depth=8, max_request=64 * 1024)
        blocks = {sector: os.urandom(16 * 1024) for sector in range(0, 64 * 32, 32)}

        async def toggle() -> None:
            await frontend.start_dirty_log()
            await asyncio.sleep(0)
            await frontend.stop_dirty_log()
            await frontend.start_dirty_log()

        writes = [driver.write(sector, data) for sector, data in blocks.items()]
        await asyncio.wait_for(asyncio.gather(toggle(), *writes), TIMEOUT)
        for sector, data in blocks.items():
            assert await asyncio.wait_for(driver.read(sector, len(data)), TIMEOUT) == data
        assert frontend.dirty_log is not None
        assert frontend.dirty_log.faults == 0


@pytest.mark.asyncio
async def test_writes_outside_the_log_are_counted_and_reported_not_done(
    blk: BlkBackend, packed: bool, caplog: pytest.LogCaptureFixture
) -> None:
    beyond = MEMORY + 0x10_0000  # the log covers guest memory only
    async with session(blk, packed) as (frontend, queue, engine):
        dirty = await frontend.start_dirty_log(used_ring_log={0: beyond})
        dirty.take_dirty_pages()
        before = os.urandom(DATA_LEN)
        await blk_request(frontend, queue, T_OUT, 8, before)
        assert await blk_request(frontend, queue, T_IN, 8) == DATA_LEN + 1
        assert frontend.memory.read(DATA, DATA_LEN) == before, "I/O goes on"
        assert engine.session is not None and engine.session.dirty_log is not None
        assert engine.session.dirty_log.faults > 0
        # The buffers are still logged; nothing was written beyond the bitmap (it is memfd-sized).
        assert set(pages(DATA, DATA_LEN)) <= set(dirty.take_dirty_pages())
    assert any("could not be logged" in r.getMessage() for r in caplog.records)


@pytest.mark.asyncio
@pytest.mark.parametrize("transport", ["socketpair", "vvu"])
async def test_set_log_base_replies_with_the_log_and_refuses_a_log_beyond_its_fd(
    blk: BlkBackend, transport: str, tmp_path: Path
) -> None:
    async with session(blk, transport=transport, tmp_path=tmp_path) as (frontend, _, engine):
        fd = os.memfd_create("log")
        try:
            os.ftruncate(fd, PAGE)
            log_fd = EventFd()
            await frontend.request(FrontendRequest.SET_LOG_FD, fds=[log_fd.fileno()])  # kept
            log_fd.close()
            reply = await frontend.request(FrontendRequest.SET_LOG_BASE, Log(64, 0), [fd])
            assert reply == Log(64, 0)
            assert engine.session is not None and engine.session.dirty_log is not None
            assert engine.session.dirty_log.covers == 64 * 8 * PAGE
            with pytest.raises(FrontendError, match="closed the connection"):
                await frontend.request(FrontendRequest.SET_LOG_BASE, Log(2 * PAGE, 0), [fd])
        finally:
            os.close(fd)


@pytest.mark.asyncio
async def test_packed_ring_logs_each_used_descriptor_in_its_own_slots_page(blk: BlkBackend) -> None:
    """A packed ring of 512 descriptors spans two pages. Each read takes three slots (header,
    data, status) and completes alone, so its used descriptor goes to slot 3k: request 85 to
    slot 255 (first page), request 86 to slot 258 (second page)."""
    async with session(blk, packed=True, size=512) as (frontend, queue, _):
        dirty = await frontend.start_dirty_log(used_ring_log={0: USED_LOG})
        dirty.take_dirty_pages()
        buffers = {*pages(DATA, DATA_LEN), *pages(STATUS, 1)}
        ring: list[set[int]] = []
        for _ in range(87):
            assert await blk_request(frontend, queue, T_IN, 8) == DATA_LEN + 1
            written = without_packed_event_area(dirty.take_dirty_pages(), True)
            assert written >= buffers
            ring.append(written - buffers)
        first, second = queue.desc, queue.desc + PAGE
        assert ring[:86] == [{first}] * 86
        assert ring[86] == {second}
        assert dirty.faults == 0


@pytest_asyncio.fixture
async def vvu_path(blk: BlkBackend, tmp_path: Path) -> AsyncIterator[str]:
    async with served(BackendEngine(blk), "vvu", tmp_path) as path:
        yield path


@pytest.mark.asyncio
async def test_vvu_device_offers_dirty_logging(vvu_path: str) -> None:
    assert not FEATURES_FILTERED & VhostFeature.LOG_ALL.mask
    assert PROTOCOL_FEATURES_ALLOWED & ProtocolFeature.LOG_SHMFD.mask
    frontend = await Frontend.connect(vvu_path, timeout=TIMEOUT)
    try:
        offered = await frontend.request_u64(FrontendRequest.GET_FEATURES)
        assert offered & VhostFeature.LOG_ALL.mask
        offered_protocol = await frontend.request_u64(FrontendRequest.GET_PROTOCOL_FEATURES)
        assert offered_protocol & ProtocolFeature.LOG_SHMFD.mask
    finally:
        await frontend.close()


@pytest.mark.asyncio
async def test_vvu_log_doorbell_signals_the_frontends_log_eventfd(
    blk: BlkBackend, tmp_path: Path
) -> None:
    # The back-end's SET_LOG_FD fd is device aux notification 2N: signalling it reaches the
    # front-end's own eventfd through the device.
    async with session(blk, transport="vvu", tmp_path=tmp_path) as (frontend, _, engine):
        log_fd = EventFd()
        try:
            await frontend.request(FrontendRequest.SET_LOG_FD, fds=[log_fd.fileno()])
            await frontend.request_u64(FrontendRequest.GET_FEATURES)  # SET_LOG_FD is handled
            assert engine.session is not None and engine.session.log_fd is not None
            assert not log_fd.consume()
            engine.session.log_fd.signal()
            assert await asyncio.wait_for(_readable(log_fd), TIMEOUT)
        finally:
            log_fd.close()


@pytest.mark.asyncio
async def test_vvu_log_larger_than_shmid_2_is_refused_not_mapped(
    blk: BlkBackend, tmp_path: Path
) -> None:
    async with session(blk, transport="vvu", tmp_path=tmp_path) as (frontend, _, engine):
        fd = os.memfd_create("log")
        try:
            os.ftruncate(fd, PAGE)
            with pytest.raises(FrontendError, match="closed the connection"):
                await frontend.request(FrontendRequest.SET_LOG_BASE, Log(2 << 30, 0), [fd])
            assert engine.session is None or engine.session.dirty_log is None
        finally:
            os.close(fd)


async def _readable(efd: EventFd) -> bool:
    while not efd.consume():
        await asyncio.sleep(0.01)
    return True


@pytest.mark.asyncio
async def test_unix_engine_offers_dirty_logging(blk: BlkBackend) -> None:
    engine = BackendEngine(blk)
    assert engine.offered_features() & VhostFeature.LOG_ALL.mask
    assert engine.offered_protocol_features() & ProtocolFeature.LOG_SHMFD.mask
