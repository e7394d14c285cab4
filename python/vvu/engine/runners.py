"""Queue runners: what runs a started ring's data path. A native Rust worker
(`NativeQueueRunner`, off the event loop), the Python handler path (`PythonQueueRunner`, on it),
or, for asynchronous back-ends, `vvu.backends.request.RequestRunner`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from vvu._core import EventFd, GuestMemory, QueueWorker
from vvu.backends.base import Backend
from vvu.backends.request import DeviceQueue, RequestRunner
from vvu.errors import QueueError

log = logging.getLogger(__name__)

# How often a ring whose front-end sends no kicks (SET_VRING_KICK with NOFD) is looked at.
POLL_INTERVAL = 0.001


class PythonQueueRunner:
    """Runs one queue on the event loop, feeding batches of chains to `Backend.handle`."""

    def __init__(
        self,
        queue: DeviceQueue,
        kick: EventFd | None,
        call: EventFd | None,
        err: EventFd | None,
        handler: Callable[[list[object]], object],
        *,
        index: int,
        backend: Backend,
        batch: int = 64,
    ) -> None:
        self.queue = queue
        self._kick = kick
        self.call = call
        self.err = err
        self._backend = backend
        self._index = index
        self._batch = batch
        self._broken: str | None = None
        self._stopped = False
        self._poll_handle: asyncio.TimerHandle | None = None
        # Counters (`stats`): one addition per batch, on a path that is Python anyway.
        self._chains = 0
        self._batches = 0
        self._kicks = 0
        loop = asyncio.get_running_loop()
        if kick is not None:
            loop.add_reader(kick.fileno(), self._on_kick)
        loop.call_soon(self._process)  # buffers may be waiting already (reconnect, migration)

    def _on_kick(self) -> None:
        if self._kick is not None:
            self._kick.consume()
            self._kicks += 1
        self._process()

    def _process(self) -> None:
        if self._broken is not None or self._stopped:  # stop() may beat the first call_soon
            return
        queue = self.queue
        try:
            while True:
                chains = queue.pop(self._batch)
                if not chains:
                    if queue.enable_notifications():
                        continue
                    break
                used = self._backend.handle(self._index, chains)
                if len(used) != len(chains):
                    raise QueueError(
                        f"handler returned {len(used)} used lengths for {len(chains)} chains"
                    )
                queue.push_used_many(chains, used)
                self._chains += len(chains)
                self._batches += 1
                if queue.publish_used() and self.call is not None:
                    self.call.signal()
        except Exception as err:  # a broken ring or handler: stop this queue, keep the session
            self._broken = str(err)
            log.error("queue %d broken: %s", self._index, self._broken)
            if self.err is not None:
                self.err.signal()
            return
        if self._kick is None:  # NOFD: nobody kicks, so poll
            self._poll_handle = asyncio.get_running_loop().call_later(POLL_INTERVAL, self._process)

    def set_call(self, call: EventFd | None) -> None:
        self.call = call
        if call is not None:
            call.signal()  # a completion may have raced with the swap; a spurious call is harmless

    @property
    def stats(self) -> dict[str, int]:
        """Chains handled, batches published and kicks taken since the runner started."""
        return {"chains": self._chains, "batches": self._batches, "kicks": self._kicks}

    @property
    def fault(self) -> str | None:
        """Why the queue stopped processing (a broken ring or handler), or None."""
        return self._broken

    def set_err(self, err: EventFd | None) -> None:
        self.err = err
        if err is not None and self._broken is not None:
            err.signal()  # broken before the swap: tell the new listener too

    async def stop(self) -> DeviceQueue:
        self._stopped = True
        if self._kick is not None:
            asyncio.get_running_loop().remove_reader(self._kick.fileno())
        if self._poll_handle is not None:
            self._poll_handle.cancel()
        return self.queue


class NativeQueueRunner:
    """Runs one queue in a Rust worker thread (no GIL).

    Under an IOTLB, `on_miss(iova, perm)` is called on the event loop for each translation the
    worker waits for, and `set_memory` hands it the updated translations without a restart.
    """

    def __init__(
        self, worker: QueueWorker, on_miss: Callable[[int, int], None] | None = None
    ) -> None:
        self._worker = worker
        self._miss_fd: int | None = None
        if on_miss is not None:
            self._miss_fd = worker.miss_fd
            asyncio.get_running_loop().add_reader(self._miss_fd, self._on_miss_fd, on_miss)

    def _on_miss_fd(self, on_miss: Callable[[int, int], None]) -> None:
        miss = self._worker.take_miss()
        if miss is not None:
            on_miss(*miss)

    def set_memory(self, memory: GuestMemory) -> int:
        """Switch the worker to `memory` between batches; returns the generation to wait for."""
        return self._worker.set_memory(memory)

    async def wait_memory(self, generation: int, timeout: float) -> bool:
        """Whether the worker stopped using older memory within `timeout` seconds."""
        return await asyncio.to_thread(self._worker.wait_memory, generation, timeout)

    def set_call(self, call: EventFd | None) -> None:
        self._worker.set_call(call)

    @property
    def stats(self) -> dict[str, int]:
        """The worker's counters (chains, batches, kicks, notifications, ...); after `stop`,
        the final ones."""
        return self._worker.stats

    def set_err(self, err: EventFd | None) -> None:
        self._worker.set_err(err)

    @property
    def fault(self) -> str | None:
        """Why the worker stopped processing on its own (it cannot log it itself)."""
        return self._worker.fault

    async def stop(self) -> DeviceQueue:
        if self._miss_fd is not None:
            asyncio.get_running_loop().remove_reader(self._miss_fd)
            self._miss_fd = None
        # Joining waits for in-flight requests to complete: off the event loop.
        return await asyncio.to_thread(self._worker.stop)


QueueRunner = PythonQueueRunner | NativeQueueRunner | RequestRunner
