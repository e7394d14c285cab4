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
import logging
import os
import random
import struct
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from vvu._core import DirtyLog, EventFd
from vvu.backends import BlkBackend, RngBackend
from vvu.backends.base import Backend
from vvu.device.vvu import FEATURES_FILTERED, PROTOCOL_FEATURES_ALLOWED
from vvu.engine import BackendEngine, page_ranges
from vvu.frontend import BlkDriver, Frontend, FrontendQueue
from vvu.frontend.blk import T_FLUSH, T_IN, T_OUT
from vvu.frontend.core import Allocator, FrontendError
from vvu.protocol import U64, FrontendRequest, Log, ProtocolFeature, VhostFeature, VringState
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
# The emulated migrations: guest memory, disk, requests in flight, and migrations per test.
MIGRATION_MEMORY = 2 * MiB
MIGRATION_DISK = 4 * MiB
MIGRATION_DEPTH = 16
MIGRATIONS = int(os.environ.get("VVU_MIGRATIONS", "20"))  # more for a soak


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
async def test_a_stopping_ring_lists_every_page_it_marked_at_debug_level(
    blk: BlkBackend, packed: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """For telling who wrote a page a migration left stale: at debug level the log remembers
    each page marked, also once the front-end's sync cleared it, and a ring that stops while
    logging lists them all."""
    caplog.set_level(logging.DEBUG, logger="vvu.engine")
    async with session(blk, packed) as (frontend, queue, _):
        dirty = await frontend.start_dirty_log(used_ring_log={0: USED_LOG})
        await blk_request(frontend, queue, T_IN, 8)
        assert dirty.take_dirty_pages()  # cleared by the front-end, still remembered
        await frontend.stop_queue(0)
        marked = {*pages(DATA, DATA_LEN), *pages(STATUS, 1), USED_LOG, *ring_pages(queue, packed)}
    lines = [r.getMessage() for r in caplog.records if "pages marked" in r.getMessage()]
    assert lines == [
        f"vring 0 stopped; pages marked in the dirty log: {page_ranges(sorted(marked))}"
    ]


def test_page_ranges_join_consecutive_pages_and_stop_at_the_limit() -> None:
    assert page_ranges([]) == "none"
    assert page_ranges([0, PAGE, 2 * PAGE, 5 * PAGE]) == "0x0-0x2000,0x5000"
    assert page_ranges([0, 2 * PAGE, 4 * PAGE], limit=2) == "0x0,0x2000 and 1 more ranges"


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
        # Reported when the ring stops (GET_VRING_BASE, before a migration's last sync), not
        # only when the session ends.
        assert not any("could not be logged" in r.getMessage() for r in caplog.records)
        await frontend.stop_queue(0)
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


class _PagePerAllocation(Allocator):
    """Each allocation on pages of its own, as a guest's DMA allocations are: every page then
    has one writer (the driver or the device), except the ring the packed format shares."""

    def alloc(self, size: int, align: int = 64) -> int:
        return super().alloc(-(-size // PAGE) * PAGE, PAGE)


@dataclass
class _MigrationSlot:
    """One request's guest memory: header and indirect table (the driver writes them), data
    pages and status byte (only the device writes them)."""

    header: int
    table: int
    out: int
    data: int
    status: int


class _ReadingGuest:
    """A driver that keeps `MIGRATION_DEPTH` requests in flight, as direct or indirect
    chains: mostly reads, each into 1 to 4 of its slot's data pages in random order, some
    writes (from a page of the driver's) and flushes (the engine does those even for a
    page-cache read it serves at once)."""

    def __init__(self, frontend: Frontend, queue: FrontendQueue, rng: random.Random) -> None:
        self.frontend, self.queue, self.rng = frontend, queue, rng
        alloc = frontend.allocator.alloc
        self.slots = [
            _MigrationSlot(alloc(16), alloc(16 * 5), alloc(PAGE), alloc(4 * PAGE), alloc(1))
            for _ in range(MIGRATION_DEPTH)
        ]
        self.freed: asyncio.Queue[_MigrationSlot] = asyncio.Queue()
        for slot in self.slots:
            self.freed.put_nowait(slot)
        self.completed = 0

    def driver_pages(self) -> set[int]:
        """The pages the driver writes when it adds a request."""
        queue = self.queue
        ring = set(pages(queue.desc, 16 * queue.size))
        return ring | {gpa for s in self.slots for gpa in (s.header, s.table, s.out)}

    def holds(self, gpa: int) -> str:
        if any(s.data <= gpa < s.data + 4 * PAGE for s in self.slots):
            return "data"
        if any(s.status // PAGE * PAGE == gpa for s in self.slots):
            return "status byte"
        return "ring"

    def _add(self, slot: _MigrationSlot) -> None:
        rng = self.rng
        kind = rng.choices([T_IN, T_OUT, T_FLUSH], [6, 3, 1])[0]
        sector = rng.randrange(0, MIGRATION_DISK // 512 - 4 * 8, 8) if kind != T_FLUSH else 0
        self.frontend.memory.write(slot.header, struct.pack("<IIQ", kind, 0, sector))
        readable = [(slot.header, 16)] + ([(slot.out, PAGE)] if kind == T_OUT else [])
        data = [slot.data + i * PAGE for i in rng.sample(range(4), rng.randrange(1, 5))]
        writable = [(gpa, PAGE) for gpa in data if kind == T_IN] + [(slot.status, 1)]
        if rng.random() < 0.5:
            head = self.queue.driver.add_indirect(slot.table, readable, writable)
        else:
            head = self.queue.submit(readable, writable)
        self.queue.completion(head).add_done_callback(lambda fut: self._done(fut, slot))

    def _done(self, fut: asyncio.Future[int], slot: _MigrationSlot) -> None:
        if fut.exception() is None:  # (else the ring stopped with it in flight, never reaped)
            self.freed.put_nowait(slot)

    async def run(self, completions: int) -> None:
        """Go on reading until `completions` more reads completed."""
        until = self.completed + completions
        while self.completed < until:
            batch = [await asyncio.wait_for(self.freed.get(), TIMEOUT)]
            while not self.freed.empty():
                batch.append(self.freed.get_nowait())
            self.completed += len(batch)
            for slot in batch:
                self._add(slot)
            self.queue.notify()


async def _emulated_migration(backend: BlkBackend, packed: bool, seed: int) -> list[str]:
    """QEMU's live migration of a guest reading through `backend`, emulated with a copy of
    guest memory as the destination: reads stay in flight throughout (`_ReadingGuest`);
    logging starts as QEMU starts it (SET_LOG_BASE, LOG_ALL, SET_VRING_ADDR with the log
    flag: two ring restarts with reads in flight); the copy is taken, then the log is synced
    into it again and again while reads go on; the driver stops adding requests and its own
    pages are copied (QEMU tracks the vCPUs' writes itself); SET_STATUS 0, SET_VRING_ENABLE 0
    and GET_VRING_BASE stop the ring with reads in flight; the last sync. Returns the pages
    that differ between the copy and guest memory (a write the back-end did not log)."""
    rng = random.Random(seed)
    engine = BackendEngine(backend)
    client, server = socketpair_channels()
    task = asyncio.ensure_future(engine.serve(server))
    frontend = Frontend(client, memory_size=MIGRATION_MEMORY, packed=packed)
    frontend.allocator = _PagePerAllocation(0x1000, MIGRATION_MEMORY)
    try:
        await frontend.negotiate()
        await frontend.set_mem_table()
        await frontend.setup_inflight(1, 128)
        queue = await frontend.start_queue(0, 128)  # room for every slot's longest chain
        guest, memory = _ReadingGuest(frontend, queue, rng), frontend.memory
        await guest.run(rng.randrange(1, 64))
        dirty = await frontend.start_dirty_log()
        destination = bytearray(memory.read(0, MIGRATION_MEMORY))

        def copy(pages: Iterable[int]) -> None:
            for gpa in pages:
                destination[gpa : gpa + PAGE] = memory.read(gpa, PAGE)

        for _ in range(rng.randrange(1, 8)):
            await guest.run(rng.randrange(1, 64))
            copy(dirty.take_dirty_pages())
        copy(guest.driver_pages())  # the vCPUs stop; QEMU copies what they wrote itself
        # QEMU 7.2's order, none of them waiting: GET_VRING_BASE's reply covers them all.
        await frontend.request(FrontendRequest.SET_STATUS, U64(0), need_reply=False)
        disable = VringState(0, 0)
        await frontend.request(FrontendRequest.SET_VRING_ENABLE, disable, need_reply=False)
        await frontend.stop_queue(0)
        copy(dirty.take_dirty_pages())
        now = memory.read(0, MIGRATION_MEMORY)
        # The driver writes its event area (split: the available ring) whenever it reaps.
        reaping = set(pages(queue.avail, 4 if packed else 6 + 2 * queue.size))
        return [
            f"{gpa:#x} ({guest.holds(gpa)})"
            for gpa in range(0, MIGRATION_MEMORY, PAGE)
            if gpa not in reaping and destination[gpa : gpa + PAGE] != now[gpa : gpa + PAGE]
        ]
    finally:
        await frontend.close()
        await asyncio.wait_for(task, TIMEOUT)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("aio", "cache"), [("io_uring", "none"), ("threads", "none"), ("io_uring", "writeback")]
)
async def test_emulated_migrations_leave_no_page_the_back_end_wrote_behind(
    packed: bool, aio: str, cache: str, tmp_path: Path
) -> None:
    """Reads through an asynchronous engine, completed out of order (`--cache none`: every
    read goes to the engine; writeback: most are served from the page cache at once), while
    QEMU's migration is emulated (`_emulated_migration`): every page the back-end wrote
    after the copy began must have been logged and copied again."""
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(MIGRATION_DISK))
    try:
        backend = BlkBackend(str(image), cache=cache, aio=aio)
    except ValueError as err:  # no io_uring, or no O_DIRECT on this file system
        pytest.skip(str(err))
    try:
        for seed in range(MIGRATIONS):
            stale = await _emulated_migration(backend, packed, seed)
            assert stale == [], f"migration {seed}: stale pages {stale}"
    finally:
        backend.close()
