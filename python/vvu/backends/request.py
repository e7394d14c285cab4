"""Requests that outlive a call: the asynchronous request path of the plugin API.

`Backend.handle` gets a batch of chains and must return a used length for each before it
returns: right for rng, wrong for every device whose buffers wait for something outside (a
console's receive buffers wait for host bytes, a socket write waits for the peer to read). Such a
back-end overrides `Backend.run_queue` instead:

    async def run_queue(self, queue: RequestQueue) -> None:
        async for request in queue:             # one Request per descriptor chain
            data = await host.read(request.writable_len)
            request.complete(request.write(data))

Why this shape: it is what asyncio code already looks like. A queue is consumed the way an
`asyncio.Queue` or a stream is (`await queue.get()`, `async for`), so back-pressure is natural:
a back-end that does not ask leaves the chains in the ring, where the guest's own flow control
sees them, and a request is taken only when the back-end can use it. Holding one is just keeping
the object; finishing it is one call, `Request.complete(length)`, which like
`loop.call_soon_threadsafe` may be made from any thread or callback and in any order. The
engine owns the task that runs `run_queue` (it starts with the ring and is cancelled when the
ring stops), so a back-end never has to learn the vhost-user life cycle.

A request's buffers are memoryviews straight into guest memory, valid while it is held. When it
is completed or released they are released: using them then raises `ValueError` (never a write
into memory the guest already took back). Views derived from them (slices) are not tracked.

When the ring stops (GET_VRING_BASE, SET_VRING_ENABLE 0, a memory table change), the engine
cancels the task and waits up to `STOP_TIMEOUT` seconds for it to end and for the requests it
handed out to complete; the task may finish its work in a `finally`. What is still held then is
released (completing it later returns False and does nothing) and goes back to the driver: with
an inflight region (INFLIGHT_SHMFD) it stays recorded there and is handed out again when the
ring restarts; on a split ring the most recently taken requests are rewound into the ring (the
driver's buffers stay available, untouched); any other is returned used with length 0. A
disconnect or a device reset only releases them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final

from vvu._core import DescriptorChain, EventFd, PackedQueue, SplitQueue
from vvu.errors import QueueError, VvuError

log = logging.getLogger(__name__)

__all__ = [
    "DeviceQueue",
    "Request",
    "RequestDone",
    "RequestQueue",
    "RequestRunner",
    "RequestState",
]

#: The device side of either ring format.
DeviceQueue = SplitQueue | PackedQueue

#: How long a stopping ring waits for its task to end and its held requests to complete.
STOP_TIMEOUT: Final = 1.0
#: Chains popped from the ring at once (handed out one by one).
POP_BATCH: Final = 64
#: How often a ring whose front-end sends no kicks is looked at while a request is awaited.
POLL_INTERVAL: Final = 0.001


class RequestDone(VvuError):
    """The request was completed already, or released; its buffers are gone."""


class RequestState(enum.Enum):
    HELD = "held"  # the back-end has it
    COMPLETED = "completed"  # complete() was called
    RELEASED = "released"  # given back, or the ring stopped while it was held


class Request:
    """One descriptor chain a back-end holds until it calls `complete` (any thread)."""

    __slots__ = (
        "_chain",
        "_readable",
        "_runner",
        "_seq",
        "_state",
        "_views",
        "_writable",
        "head",
        "queue_index",
    )

    def __init__(self, runner: RequestRunner, chain: DescriptorChain, seq: int) -> None:
        self._runner = runner
        self._chain: DescriptorChain | None = chain
        self._seq = seq
        self._state = RequestState.HELD
        self._views: list[memoryview] = []
        self._readable: list[memoryview] | None = None
        self._writable: list[memoryview] | None = None
        #: The chain's head descriptor (split) or buffer id (packed).
        self.head: int = chain.head
        #: The queue it came from.
        self.queue_index: int = runner.index

    def __repr__(self) -> str:
        return f"Request(queue {self.queue_index}, head {self.head}, {self._state.value})"

    @property
    def state(self) -> RequestState:
        return self._state

    @property
    def done(self) -> bool:
        """Completed or released: nothing more can be done with it."""
        return self._state is not RequestState.HELD

    def _held_chain(self) -> DescriptorChain:
        chain = self._chain
        if chain is None or self._state is not RequestState.HELD:
            raise RequestDone(f"{self!r}: its buffers belong to the driver again")
        return chain

    @property
    def readable_len(self) -> int:
        """Bytes in the device-readable part (what the driver sent)."""
        return self._held_chain().readable_len

    @property
    def writable_len(self) -> int:
        """Bytes in the device-writable part (room for the answer)."""
        return self._held_chain().writable_len

    @property
    def readable(self) -> list[memoryview]:
        """The device-readable buffers: read-only memoryviews into guest memory, valid while
        the request is held (the same list on every call)."""
        if self._readable is None:
            self._readable = self._held_chain().readable
            self._views.extend(self._readable)
        else:
            self._held_chain()
        return self._readable

    @property
    def writable(self) -> list[memoryview]:
        """The device-writable buffers: writable memoryviews into guest memory, valid while
        the request is held (the same list on every call). A view another thread still uses
        when the request completes or is released cannot be released (it is logged): finish
        with the views before completing."""
        if self._writable is None:
            self._writable = self._held_chain().writable
            self._views.extend(self._writable)
        else:
            self._held_chain()
        return self._writable

    def read(self) -> bytes:
        """All device-readable bytes, concatenated (a copy). Atomic with respect to the
        request's release: it never reads a buffer the driver has back."""
        with self._runner.lock:
            return self._held_chain().read()

    def write(self, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Copy `data` into the device-writable buffers from byte `offset` on; returns how many
        bytes fitted. Atomic with respect to the request's release (any thread may call it): it
        never writes a buffer the driver has back, and raises RequestDone instead."""
        with self._runner.lock:
            return self._held_chain().write(data, offset)

    def complete(self, length: int = 0) -> bool:
        """Return the chain to the driver with `length` bytes written into its writable part.

        Safe from any thread; completions may come in any order. Returns False, doing nothing,
        when the request was released meanwhile (its ring stopped or the front-end left).
        Raises RequestDone when it was completed already, ValueError for a length beyond its
        writable part."""
        return self._runner.finish(self, length)

    def give_back(self) -> bool:
        """Hand the request back unused: the queue hands the same chain out again (a new
        Request), or the driver gets it back untouched when the ring stops first. Returns False
        when it was released already; raises RequestDone when it was completed."""
        return self._runner.finish(self, None)

    # --- for the runner (under its lock) -------------------------------------------------------

    def _end(self, state: RequestState) -> DescriptorChain:
        chain = self._chain
        assert chain is not None
        self._state = state
        self._chain = None  # the memory snapshot goes with it (REM_MEM_REG waits for it)
        if self._views:
            for view in self._views:
                try:
                    view.release()
                except BufferError:  # exported right now (e.g. a recv_into in another thread)
                    log.debug("%r: a buffer was still in use at completion", self)
            self._views.clear()
            self._readable = self._writable = None
        return chain


class RequestQueue:
    """A running virtqueue as a back-end consumes it: an async source of Requests.

    `await get()` waits for the driver to make a chain available and hands it out as a
    Request; `async for request in queue` does that until the ring stops (the task running
    `Backend.run_queue` is then cancelled). At most `size` requests are outstanding at once: a
    driver cannot make the back-end hold more than its ring has room for.
    """

    def __init__(self, runner: RequestRunner) -> None:
        self._runner = runner

    @property
    def index(self) -> int:
        """The queue's index (0 = the device's first virtqueue)."""
        return self._runner.index

    @property
    def size(self) -> int:
        """The ring size: the most requests that can be held at once."""
        return self._runner.size

    @property
    def held(self) -> int:
        """Requests handed out and not completed yet."""
        return len(self._runner.held)

    async def get(self) -> Request:
        """The next available chain, waiting for the driver if there is none."""
        return await self._runner.get()

    def get_nowait(self) -> Request:
        """The next available chain; raises asyncio.QueueEmpty when there is none now."""
        request = self._runner.take()
        if request is None:
            raise asyncio.QueueEmpty
        return request

    def __aiter__(self) -> RequestQueue:
        return self

    def __anext__(self) -> Coroutine[Any, Any, Request]:
        # The runner's coroutine itself: no async generator or extra frame per request.
        return self._runner.get()


class RequestRunner:
    """Runs one queue for `Backend.run_queue` (engine side): pops chains when the back-end asks
    for them, pushes completions in batches, and hands held requests back when the ring stops.

    Everything runs on the event loop except `finish`, which any thread may call: it records
    the completion under a lock and schedules the push on the loop.
    """

    def __init__(
        self,
        queue: DeviceQueue,
        kick: EventFd | None,
        call: EventFd | None,
        err: EventFd | None,
        run: Callable[[RequestQueue], Awaitable[None]],
        *,
        index: int,
        inflight: bool = False,
    ) -> None:
        self.queue = queue
        self.index = index
        self.size = queue.size
        self.call = call
        self.err = err
        self._kick = kick
        self._inflight = inflight
        self._stop_timeout = STOP_TIMEOUT
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self.lock = threading.Lock()
        # Popped and not handed out (given-back ones first), by pop sequence number.
        self._ready: collections.deque[tuple[int, DescriptorChain]] = collections.deque()
        self.held: dict[int, Request] = {}
        self._completed: list[tuple[int, int]] = []  # (head, length) not pushed yet
        self._given_back: list[tuple[int, DescriptorChain]] = []  # not back in _ready yet
        self._flush_scheduled = False
        self._next_seq = 0
        self._stopping = False
        self._broken: str | None = None
        self._waiters: list[asyncio.Future[None]] = []  # get() calls waiting for work
        self._drained = asyncio.Event()
        self.stats: collections.Counter[str] = collections.Counter()
        if kick is not None:
            self._loop.add_reader(kick.fileno(), self._on_kick)
        self.requests = RequestQueue(self)
        self._task = asyncio.ensure_future(run(self.requests))
        self._task.add_done_callback(self._task_done)

    # --- the back-end's task -----------------------------------------------------------------

    def _task_done(self, task: asyncio.Future[None]) -> None:
        if task.cancelled() or self._broken is not None:
            return
        error = task.exception()
        if error is not None:
            self._break(f"the back-end's queue task failed: {error!r}")

    @property
    def fault(self) -> str | None:
        """Why the queue stopped processing on its own (its task failed, the ring broke)."""
        return self._broken

    def _break(self, why: str) -> None:
        self._broken = why
        log.error("queue %d broken: %s", self.index, why)
        if self.err is not None:
            self.err.signal()

    # --- handing out -------------------------------------------------------------------------

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _on_kick(self) -> None:
        if self._kick is not None:
            self._kick.consume()
        self._wake()

    def take(self) -> Request | None:
        """A request from what was popped, or from the ring; None when there is none now."""
        if self._stopping:
            raise QueueError(f"queue {self.index} is stopping")
        if self._broken is not None:
            raise QueueError(f"queue {self.index} is broken: {self._broken}")
        if not self._ready:
            self._pop()
        if not self._ready:
            return None
        seq, chain = self._ready.popleft()
        request = Request(self, chain, seq)
        with self.lock:
            self.held[seq] = request
        return request

    def _pop(self) -> None:
        room = self.size - len(self.held) - len(self._ready) - len(self._given_back)
        if room <= 0:  # as many outstanding as the ring holds: wait for a completion
            self.stats["full"] += 1
            return
        try:
            chains = self.queue.pop(min(room, POP_BATCH))
            if not chains and self.queue.enable_notifications():
                chains = self.queue.pop(min(room, POP_BATCH))
        except QueueError as err:
            self._break(str(err))
            raise
        for chain in chains:
            self._ready.append((self._next_seq, chain))
            self._next_seq += 1

    async def get(self) -> Request:
        while True:
            request = self.take()
            if request is not None:
                return request
            waiter = self._loop.create_future()
            self._waiters.append(waiter)
            if self._kick is None:  # NOFD: nobody kicks, so poll
                poll = self._loop.call_later(POLL_INTERVAL, self._wake)
                try:
                    await waiter
                finally:
                    poll.cancel()
            else:
                await waiter

    # --- completing (any thread) -----------------------------------------------------------

    def finish(self, request: Request, length: int | None) -> bool:
        """Complete `request` with `length`, or (None) give it back unused."""
        with self.lock:
            state = request._state
            if state is not RequestState.HELD:
                if state is RequestState.RELEASED:
                    return False
                raise RequestDone(f"{request!r} was completed already")
            if length is None:
                del self.held[request._seq]
                self._given_back.append((request._seq, request._end(RequestState.RELEASED)))
            else:
                chain = request._chain
                assert chain is not None  # (held)
                if not 0 <= length <= chain.writable_len:
                    raise ValueError(
                        f"used length {length} is not within the writable part "
                        f"({chain.writable_len} bytes)"
                    )
                del self.held[request._seq]
                request._end(RequestState.COMPLETED)
                self._completed.append((request.head, length))
            schedule = not self._flush_scheduled
            self._flush_scheduled = True
        if schedule:
            if threading.get_ident() == self._thread:
                self._loop.call_soon(self._flush)
            else:
                try:
                    self._loop.call_soon_threadsafe(self._flush)
                except RuntimeError:  # the loop is closed: the session is long gone
                    log.debug("queue %d: completion after the event loop closed", self.index)
        return True

    def _flush(self) -> None:
        """Push the completions recorded so far and tell the driver; take given-back chains
        into the hand-out order again (on the loop)."""
        with self.lock:
            completed, self._completed = self._completed, []
            given_back, self._given_back = self._given_back, []
            self._flush_scheduled = False
            drained = not self.held
        if given_back:  # handed out again first, oldest first
            self._ready = collections.deque(
                sorted([*given_back, *self._ready], key=lambda item: item[0])
            )
        if completed and self._broken is None:
            try:
                for head, length in completed:
                    self.queue.push_used(head, length)
                if self.queue.publish_used() and self.call is not None:
                    self.call.signal()
            except QueueError as err:
                self._break(str(err))
            self.stats["completed"] += len(completed)
        if drained:
            self._drained.set()
        self._wake()  # room for more (the outstanding bound)

    # --- the engine's side -------------------------------------------------------------------

    def set_call(self, call: EventFd | None) -> None:
        self.call = call
        if call is not None:
            call.signal()  # a completion may have raced with the swap; a spurious call is harmless

    def set_err(self, err: EventFd | None) -> None:
        self.err = err
        if err is not None and self._broken is not None:
            err.signal()

    async def stop(self, *, hand_back: bool = True) -> DeviceQueue:
        """Stop the ring: cancel the back-end's task, wait (bounded) for it and for the requests
        it holds, release the rest and, with `hand_back`, return them to the driver (see the
        module's docs). Returns the queue, positioned for GET_VRING_BASE."""
        if self._kick is not None:
            self._loop.remove_reader(self._kick.fileno())
        task = self._task
        task.cancel()
        deadline = self._loop.time() + self._stop_timeout
        done, _ = await asyncio.wait({task}, timeout=self._stop_timeout)
        if not done:
            log.warning("queue %d: the back-end's task did not end when cancelled", self.index)
        self._stopping = True
        self._flush()
        remaining = deadline - self._loop.time()
        if self.held and remaining > 0 and hand_back:  # (nobody waits for a gone front-end)
            self._drained.clear()
            if not self.held:  # completed between the check and the clear
                self._drained.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), remaining)
        with self.lock:
            released = [
                (seq, request._end(RequestState.RELEASED)) for seq, request in self.held.items()
            ]
            self.held.clear()
        self._flush()  # completions and give-backs that came before the release
        outstanding = dict(released)
        outstanding.update(self._ready)
        self._ready.clear()
        if outstanding:
            self.stats["released"] += len(outstanding)
            if hand_back and self._broken is None:
                self._hand_back(outstanding)
            else:
                log.info("queue %d: %d request(s) released", self.index, len(outstanding))
        self._wake()
        return self.queue

    def _hand_back(self, outstanding: dict[int, DescriptorChain]) -> None:
        """Return popped, unfinished chains to the driver (see the module's docs)."""
        if self._inflight:
            log.info(
                "queue %d: %d request(s) stay in flight (inflight region)",
                self.index,
                len(outstanding),
            )
            return
        rewind = 0
        if isinstance(self.queue, SplitQueue):
            while self._next_seq - 1 - rewind in outstanding:
                rewind += 1
        tail = range(self._next_seq - rewind, self._next_seq)
        returned = [chain.head for seq, chain in outstanding.items() if seq not in tail]
        try:
            for head in returned:
                self.queue.push_used(head, 0)
            if self.queue.publish_used() and self.call is not None:
                self.call.signal()
            if rewind:
                self.queue.vring_base = (self.queue.vring_base - rewind) & 0xFFFF
        except QueueError as err:
            self._break(str(err))
            return
        self._next_seq -= rewind
        self.stats["rewound"] += rewind
        self.stats["returned_empty"] += len(returned)
        log.info(
            "queue %d: %d held request(s) rewound into the ring, %d returned with length 0",
            self.index,
            rewind,
            len(returned),
        )
