"""Hearing about guest memory that a front-end pulled away under us.

A front-end can shrink (`ftruncate`) the file behind its guest memory, inflight region or dirty
log after handing it over; touching such a mapping raises SIGBUS. The native core catches that
fault inside any mapping of a peer's fd (`vvu_core::sigbus`, docs/architecture.md "Memory a peer
cannot pull away"): the access completes on zero pages, the mapping is marked poisoned (its
`poisoned` property; accessors raise `GuestMemoryError`, queues break) and one process-wide
eventfd is signalled. `on_memory_fault` hands that event to the engines of the running event
loop, each of which checks its own session and drops only the session whose memory is poisoned.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable

from vvu._core import memory_fault_fd


class _Watcher:
    """One reader on the fault eventfd per event loop, fanning out to its callbacks."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.fd = memory_fault_fd()
        self.callbacks: list[Callable[[], None]] = []
        loop.add_reader(self.fd, self._on_fault)

    def _on_fault(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self.fd, 8)
        for callback in list(self.callbacks):
            callback()

    def close(self) -> None:
        self.loop.remove_reader(self.fd)
        os.close(self.fd)


_watchers: dict[asyncio.AbstractEventLoop, _Watcher] = {}


def on_memory_fault(callback: Callable[[], None]) -> Callable[[], None]:
    """Call `callback` on the running loop after each SIGBUS caught in guest memory (any
    session's: the callback checks its own). Returns the function that unsubscribes; the
    eventfd is closed with the loop's last subscriber."""
    loop = asyncio.get_running_loop()
    watcher = _watchers.get(loop)
    if watcher is None:
        watcher = _watchers[loop] = _Watcher(loop)
    watcher.callbacks.append(callback)

    def unsubscribe() -> None:
        if callback in watcher.callbacks:
            watcher.callbacks.remove(callback)
        if not watcher.callbacks and _watchers.get(loop) is watcher:
            del _watchers[loop]
            watcher.close()

    return unsubscribe
