"""asyncio helpers for doorbells."""

from __future__ import annotations

import asyncio

from vvu._core import EventFd

__all__ = ["wait_eventfd"]


async def wait_eventfd(efd: EventFd, timeout: float | None = None) -> int:
    """Wait on the event loop until `efd` is signalled; consume and return its counter.

    Raises TimeoutError after `timeout` seconds (None: wait forever).
    """
    loop = asyncio.get_running_loop()
    count = efd.consume()  # already signalled: no need to wait
    if count:
        return count
    fd = efd.fileno()
    ready: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, on_readable)
    try:
        while True:
            await asyncio.wait_for(asyncio.shield(ready), timeout)
            count = efd.consume()
            if count:
                return count
            ready = loop.create_future()  # spurious wake-up (someone else consumed it)
    finally:
        loop.remove_reader(fd)
