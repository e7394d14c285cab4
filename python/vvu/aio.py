"""asyncio helpers for doorbells and pipes."""

from __future__ import annotations

import asyncio
import os
import stat

from vvu._core import EventFd

__all__ = ["read_to_eof", "wait_eventfd", "write_all"]


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


async def _ready(fd: int, *, write: bool) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, wake)
    try:
        await ready
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)


def _pollable(fd: int) -> bool:
    """Pipes and sockets can wait on the event loop; regular files never block (and epoll
    refuses them)."""
    return not stat.S_ISREG(os.fstat(fd).st_mode)


async def read_to_eof(fd: int, limit: int) -> bytes:
    """Everything readable from `fd` (a pipe, socket or file) until EOF, without blocking the
    event loop. Raises ValueError when more than `limit` bytes come. `fd` stays open and is
    left non-blocking."""
    chunks: list[bytes] = []
    total = 0
    pollable = _pollable(fd)
    if pollable:
        os.set_blocking(fd, False)
    while True:
        try:
            chunk = os.read(fd, min(65536, limit + 1 - total))
        except BlockingIOError:
            await _ready(fd, write=False)
            continue
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise ValueError(f"more than {limit} bytes")
        if not pollable:
            await asyncio.sleep(0)


async def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to `fd` (a pipe, socket or file) without blocking the event loop.
    `fd` stays open and is left non-blocking."""
    if _pollable(fd):
        os.set_blocking(fd, False)
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            await _ready(fd, write=True)
