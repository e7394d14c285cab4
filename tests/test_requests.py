"""Requests that outlive a call (`Backend.run_queue`, `Request`), driven by vvu's own front-end.

A test back-end hands every request it takes to the test (`HoldingBackend.taken`), which
completes them when and where it likes: another task, a callback, a thread, out of order. Then
what the protocol does to rings while requests are held: GET_VRING_BASE (waits, rewinds, or
leaves them to the inflight region), a memory table change, a disconnect, RESET_DEVICE. The
front-end sees each chain come back exactly once, with the length and bytes the back-end gave.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import ClassVar

import pytest
import pytest_asyncio

from vvu._core import EventFd
from vvu.aio import wait_eventfd
from vvu.backends import Backend, Request, RequestDone, RequestQueue
from vvu.backends import request as request_module
from vvu.engine import BackendEngine
from vvu.frontend.core import WANTED_PROTOCOL_FEATURES, Frontend, FrontendQueue
from vvu.protocol import U64, FrontendRequest, ProtocolFeature, VringState
from vvu.transport.unix import socketpair_channels

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]
_F = FrontendRequest
MiB = 1 << 20
BUF = 64  # bytes per test buffer
TIMEOUT = 5.0


class HoldingBackend(Backend):
    """Takes every request and hands it to the test; never completes one by itself."""

    name: ClassVar[str] = "holding"
    device_id: ClassVar[int] = 42

    def __init__(self, *, inflight: bool = False, fail: bool = False) -> None:
        super().__init__(num_queues=1)
        self.taken: asyncio.Queue[Request] = asyncio.Queue()
        self.inflight = inflight
        self.fail = fail
        self.cancelled = asyncio.Event()

    def protocol_features(self) -> int:
        extra = ProtocolFeature.INFLIGHT_SHMFD.mask if self.inflight else 0
        return super().protocol_features() | extra

    async def run_queue(self, queue: RequestQueue) -> None:
        try:
            async for request in queue:
                if self.fail:
                    raise RuntimeError("the device fell over")
                self.taken.put_nowait(request)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def take(self, n: int) -> list[Request]:
        return [await asyncio.wait_for(self.taken.get(), TIMEOUT) for _ in range(n)]


@dataclass
class Session:
    frontend: Frontend
    engine: BackendEngine
    backend: HoldingBackend
    task: asyncio.Task[None]
    queue: FrontendQueue
    buffers: list[int]

    def submit(self, n: int, *, readable: bytes = b"") -> list[asyncio.Future[int]]:
        """`n` chains (a readable part with `readable`, a writable part of BUF bytes), kicked."""
        futures = []
        for _ in range(n):
            out = self.frontend.allocator.alloc(BUF)
            self.buffers.append(out)
            chain_readable = []
            if readable:
                src = self.frontend.allocator.alloc(len(readable))
                self.frontend.memory.write(src, readable)
                chain_readable.append((src, len(readable)))
            head = self.queue.submit(chain_readable, [(out, BUF)])
            futures.append(self.queue.completion(head))
        self.queue.notify()
        return futures

    async def get_vring_base(self) -> int:
        reply = await self.frontend.request(_F.GET_VRING_BASE, VringState(0, 0))
        assert isinstance(reply, VringState)
        return reply.num

    async def restart(self, base: int) -> None:
        """Start the same ring again at `base` (QEMU after a stop: NUM, BASE, ADDR, KICK...)."""
        await self.frontend._hand_over(self.queue, base)


async def _open(backend: HoldingBackend, *, packed: bool = False) -> AsyncIterator[Session]:
    ours, theirs = socketpair_channels()
    engine = BackendEngine(backend)
    task = asyncio.ensure_future(engine.serve(theirs))
    frontend = Frontend(ours, memory_size=4 * MiB, packed=packed)
    try:
        await frontend.negotiate(
            protocol_features=WANTED_PROTOCOL_FEATURES | ProtocolFeature.RESET_DEVICE.mask
        )
        if backend.inflight:
            assert await frontend.setup_inflight(1, 16)
        await frontend.set_mem_table()
        queue = await frontend.start_queue(0, 16)
        yield Session(frontend, engine, backend, task, queue, [])
    finally:
        await frontend.close()
        await asyncio.wait_for(task, TIMEOUT)


@pytest_asyncio.fixture
async def session() -> AsyncIterator[Session]:
    async for s in _open(HoldingBackend()):
        yield s


@pytest.fixture
def short_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(request_module, "STOP_TIMEOUT", 0.2)


async def test_requests_complete_out_of_order_from_a_task_a_callback_and_a_thread(
    session: Session,
) -> None:
    futures = session.submit(4, readable=b"ping")
    reqs = await session.backend.take(4)
    assert [r.read() for r in reqs] == [b"ping"] * 4
    assert all(r.readable_len == 4 and r.writable_len == BUF for r in reqs)

    def answer(request: Request, data: bytes) -> None:
        assert request.complete(request.write(data))

    thread = threading.Thread(target=answer, args=(reqs[3], b"from a thread"))
    thread.start()
    asyncio.get_running_loop().call_soon(answer, reqs[0], b"callback")
    thread.join()

    async def later() -> None:
        answer(reqs[1], b"task")

    await asyncio.ensure_future(later())
    assert not futures[2].done()
    reqs[2].writable[0][:4] = b"view"  # zero-copy, straight into the driver's buffer
    reqs[2].complete(4)
    lengths = await asyncio.wait_for(asyncio.gather(*futures), TIMEOUT)
    assert lengths == [8, 4, 4, 13]
    got = [
        session.frontend.memory.read(b, n) for b, n in zip(session.buffers, lengths, strict=True)
    ]
    assert got == [b"callback", b"task", b"view", b"from a thread"]


async def test_buffers_are_invalid_after_completion_and_mistakes_raise(session: Session) -> None:
    futures = session.submit(1)
    (request,) = await session.backend.take(1)
    view = request.writable[0]
    with pytest.raises(ValueError, match="within the writable part"):
        request.complete(BUF + 1)
    assert request.complete(3)
    assert request.done
    with pytest.raises(ValueError, match="released"):
        view[0] = 1  # the view was released: no write into the driver's buffer any more
    with pytest.raises(RequestDone):
        request.write(b"late")
    with pytest.raises(RequestDone):
        _ = request.writable
    with pytest.raises(RequestDone, match="completed already"):
        request.complete(3)
    assert await asyncio.wait_for(futures[0], TIMEOUT) == 3


async def test_many_threads_complete_every_request_exactly_once(session: Session) -> None:
    rounds, per_round = 20, 16
    for _ in range(rounds):
        futures = session.submit(per_round)
        reqs = await session.backend.take(per_round)
        threads = [
            threading.Thread(target=lambda rs: [r.complete(r.head % 7) for r in rs], args=(part,))
            for part in (reqs[0::4], reqs[1::4], reqs[2::4], reqs[3::4])
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        lengths = await asyncio.wait_for(asyncio.gather(*futures), TIMEOUT)
        assert sorted(lengths) == sorted(r.head % 7 for r in reqs)
        assert session.queue.driver.in_flight == 0


async def test_a_request_given_back_is_handed_out_again(session: Session) -> None:
    futures = session.submit(2)
    first, second = await session.backend.take(2)
    assert first.give_back()
    assert first.done and first.complete(1) is False  # released: a no-op
    again = await session.backend.take(1)
    assert again[0].head == first.head and not again[0].done
    again[0].complete(5)
    second.complete(6)
    assert await asyncio.wait_for(asyncio.gather(*futures), TIMEOUT) == [5, 6]


async def test_get_vring_base_waits_for_requests_the_backend_finishes_when_cancelled(
    session: Session,
) -> None:
    futures = session.submit(2)
    reqs = await session.backend.take(2)
    reqs[0].complete(1)

    async def finish_when_asked() -> None:
        # Completes the second only once the ring is stopping (its task was cancelled).
        await session.backend.cancelled.wait()
        reqs[1].complete(2)

    finisher = asyncio.ensure_future(finish_when_asked())
    assert await session.get_vring_base() == 2
    await finisher
    assert await asyncio.wait_for(asyncio.gather(*futures), TIMEOUT) == [1, 2]


@pytest.mark.usefixtures("short_stop")
async def test_get_vring_base_rewinds_held_requests_and_the_restarted_ring_hands_them_out(
    session: Session,
) -> None:
    futures = session.submit(4)
    reqs = await session.backend.take(4)
    reqs[0].complete(7)  # the rest stays held: the newest three go back into the ring
    assert await session.get_vring_base() == 1
    assert all(r.done for r in reqs)
    assert reqs[1].complete(1) is False  # released: no double completion later
    assert [f.done() for f in futures] == [True, False, False, False]
    await session.restart(1)
    again = await session.backend.take(3)
    assert [r.head for r in again] == [r.head for r in reqs[1:]]
    for i, r in enumerate(again):
        r.complete(10 + i)
    assert await asyncio.wait_for(asyncio.gather(*futures), TIMEOUT) == [7, 10, 11, 12]
    assert session.queue.driver.in_flight == 0


@pytest.mark.usefixtures("short_stop")
async def test_held_requests_that_cannot_be_rewound_come_back_with_length_0(
    session: Session,
) -> None:
    futures = session.submit(3)
    reqs = await session.backend.take(3)
    reqs[2].complete(9)  # the newest is done: the older two cannot be rewound past it
    assert await session.get_vring_base() == 3
    assert await asyncio.wait_for(asyncio.gather(*futures), TIMEOUT) == [0, 0, 9]


@pytest.mark.usefixtures("short_stop")
async def test_with_an_inflight_region_held_requests_stay_in_flight_and_are_resubmitted() -> None:
    async for s in _open(HoldingBackend(inflight=True)):
        futures = s.submit(3)
        reqs = await s.backend.take(3)
        reqs[1].complete(4)
        assert await s.get_vring_base() == 3  # the region says what is still in flight
        assert not futures[0].done() and not futures[2].done()
        await s.restart(3)
        again = await s.backend.take(2)
        assert sorted(r.head for r in again) == sorted([reqs[0].head, reqs[2].head])
        for r in again:
            r.complete(8)
        assert await asyncio.wait_for(asyncio.gather(*futures), TIMEOUT) == [8, 4, 8]


@pytest.mark.usefixtures("short_stop")
async def test_memory_table_change_invalidates_held_buffers_and_hands_the_chains_out_again(
    session: Session,
) -> None:
    futures = session.submit(1)
    (request,) = await session.backend.take(1)
    view = request.writable[0]
    await session.frontend.set_mem_table()  # the same memory, mapped anew
    with pytest.raises(ValueError, match="released"):
        view[0] = 1
    assert request.complete(1) is False
    (again,) = await session.backend.take(1)
    assert again.head == request.head
    again.complete(again.write(b"new mapping"))
    assert await asyncio.wait_for(futures[0], TIMEOUT) == 11
    assert session.frontend.memory.read(session.buffers[0], 11) == b"new mapping"


async def test_disconnect_releases_held_requests_and_late_completions_do_nothing() -> None:
    backend = HoldingBackend()
    reqs: list[Request] = []
    async for s in _open(backend):
        s.submit(2)
        reqs = await backend.take(2)
        used_before = s.frontend.memory.load_u16(s.queue.used + 2)
    # The session is gone (the front-end closed, the engine tore it down).
    assert used_before == 0
    assert all(r.done for r in reqs)
    results: list[bool] = []
    thread = threading.Thread(target=lambda: results.append(reqs[0].complete(1)))
    thread.start()
    thread.join()
    assert results == [False] and reqs[1].complete(2) is False
    with pytest.raises(RequestDone):  # nor does a late write reach the driver's memory
        reqs[1].write(b"late")
    # The same back-end serves the next front-end as if nothing happened.
    async for s in _open(backend):
        futures = s.submit(1)
        (request,) = await backend.take(1)
        request.complete(3)
        assert await asyncio.wait_for(futures[0], TIMEOUT) == 3


async def test_reset_device_releases_held_requests(session: Session) -> None:
    futures = session.submit(1)
    (request,) = await session.backend.take(1)
    await session.frontend.request(_F.RESET_DEVICE)
    assert request.done and request.complete(1) is False
    assert not futures[0].done()  # a reset ring is not written
    futures[0].cancel()


@pytest.mark.usefixtures("short_stop")
async def test_a_failing_run_queue_breaks_only_its_queue_and_signals_err() -> None:
    async for s in _open(HoldingBackend()):
        err = EventFd()
        await s.frontend.request(_F.SET_VRING_ERR, U64.vring(0), [err.fileno()])
        s.backend.fail = True
        s.submit(1)
        await asyncio.wait_for(wait_eventfd(err), TIMEOUT)
        err.close()
        # The session goes on: the front-end still gets answers.
        assert await s.get_vring_base() == 1


async def test_a_driver_that_offers_more_than_its_ring_cannot_make_the_backend_hold_more(
    session: Session,
) -> None:
    """Hostile: the driver makes its 16 chains available again while the device holds them
    all (avail entries repeating held heads). The device holds at most the ring's worth."""
    size = session.queue.size
    session.submit(size)
    reqs = await session.backend.take(size)
    avail = session.queue.avail
    for i, request in enumerate(reqs):
        session.frontend.memory.write(
            avail + 4 + 2 * ((size + i) % size), request.head.to_bytes(2, "little")
        )
    session.frontend.memory.write(avail + 2, (2 * size).to_bytes(2, "little"))
    session.queue.kick.signal()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(session.backend.taken.get(), 0.3)
    runner = session.engine.session.vrings[0].runner if session.engine.session else None
    assert isinstance(runner, request_module.RequestRunner)
    assert len(runner.held) == size and runner.stats["full"] >= 1
    reqs[0].complete(0)  # room for one: exactly one more is handed out
    (extra,) = await session.backend.take(1)
    assert extra.head == reqs[0].head and len(runner.held) == size


@pytest.mark.usefixtures("short_stop")
async def test_on_a_packed_ring_held_requests_come_back_with_length_0() -> None:
    """A packed ring cannot be rewound from Python: what is held at GET_VRING_BASE is returned
    used with length 0, and the base reports every chain as taken."""
    async for s in _open(HoldingBackend(), packed=True):
        futures = s.submit(3)
        reqs = await s.backend.take(3)
        reqs[0].complete(5)
        base = await s.get_vring_base()
        assert base & 0x7FFF == 3 and (base >> 16) & 0x7FFF == 3  # avail and used positions
        assert await asyncio.wait_for(asyncio.gather(*futures), TIMEOUT) == [5, 0, 0]


async def test_a_ring_without_a_kick_fd_is_polled_while_the_backend_waits(
    session: Session,
) -> None:
    await session.frontend.request(_F.SET_VRING_KICK, U64.vring(0, nofd=True))
    futures = session.submit(2)  # the kick eventfd is ours alone now: nobody reads it
    reqs = await session.backend.take(2)
    for r in reqs:
        r.complete(1)
    assert await asyncio.wait_for(asyncio.gather(*futures), TIMEOUT) == [1, 1]
