"""Blocking wrappers for a plain `python` REPL or a script without an event loop of its own.

The asyncio API is the primary one. These wrappers run it on one private event loop in a daemon
thread and block the caller until each call completes:

>>> from vvu.blocking import serve, BlockingBlk
>>> from vvu.backends import BlkBackend
>>> server = serve(BlkBackend(size=64 << 20), "/tmp/blk.sock")
>>> blk = BlockingBlk.open("/tmp/blk.sock")
>>> blk.write(0, b"hello".ljust(512, b"\\0"))
>>> blk.read(0, 5)
b'hello'
>>> blk.close(); server.stop()
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from vvu.backends.base import Backend
from vvu.engine import BackendEngine
from vvu.frontend import BlkDriver, RngDriver
from vvu.transport.unix import UnixListener

__all__ = ["BackgroundServer", "BlockingBlk", "BlockingRng", "run", "serve"]

T = TypeVar("T")

_loops: list[asyncio.AbstractEventLoop] = []  # at most one
_loop_lock = threading.Lock()


def _background_loop() -> asyncio.AbstractEventLoop:
    """The one event loop all blocking wrappers share, started on first use."""
    with _loop_lock:
        if not _loops:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="vvu-loop", daemon=True).start()
            _loops.append(loop)
        return _loops[0]


def run(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run `coro` on the background loop and wait for its result (Ctrl-C cancels it)."""
    future = asyncio.run_coroutine_threadsafe(coro, _background_loop())
    try:
        return future.result(timeout)
    except (KeyboardInterrupt, concurrent.futures.TimeoutError):
        future.cancel()
        raise


class BackgroundServer:
    """A back-end engine serving front-ends on a socket from the background loop."""

    def __init__(self, backend: Backend, listener: UnixListener) -> None:
        self.backend = backend
        self.engine = BackendEngine(backend)
        self._listener = listener

        async def start() -> asyncio.Task[None]:
            return asyncio.ensure_future(self.engine.serve_forever(listener))

        self._task = run(start())

    @property
    def path(self) -> str | None:
        return self._listener.path

    def config_changed(self) -> bool:
        """Tell the front-end that the back-end's config space changed (e.g. after
        `BlkBackend.resize`); returns whether there was one to tell."""
        return run(self.engine.config_changed())

    def stop(self) -> None:
        """Stop serving (the current session is torn down) and remove the socket."""

        async def stop() -> None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._listener.close()

        run(stop())
        self.backend.close()


def serve(backend: Backend, socket_path: str) -> BackgroundServer:
    """Serve `backend` on `socket_path` in the background; returns at once."""
    return BackgroundServer(backend, UnixListener(socket_path))


class BlockingBlk:
    """`BlkDriver` with blocking methods."""

    def __init__(self, driver: BlkDriver) -> None:
        self.driver = driver

    @classmethod
    def open(cls, path: str, *, timeout: float = 5.0) -> BlockingBlk:
        """Connect; `capacity` follows resizes the back-end announces."""
        return cls(run(BlkDriver.open(path, timeout=timeout, backend_channel=True)))

    @property
    def capacity(self) -> int:
        return self.driver.capacity

    def read(self, sector: int, length: int) -> bytes:
        return run(self.driver.read(sector, length))

    def write(self, sector: int, data: bytes) -> None:
        run(self.driver.write(sector, data))

    def flush(self) -> None:
        run(self.driver.flush())

    def discard(self, sector: int, sectors: int) -> None:
        run(self.driver.discard(sector, sectors))

    def get_id(self) -> bytes:
        return run(self.driver.get_id())

    def close(self) -> None:
        run(self.driver.close())


class BlockingRng:
    """`RngDriver` with blocking methods."""

    def __init__(self, driver: RngDriver) -> None:
        self.driver = driver

    @classmethod
    def open(cls, path: str, *, timeout: float = 5.0) -> BlockingRng:
        return cls(run(RngDriver.open(path, timeout=timeout)))

    def read(self, length: int) -> bytes:
        return run(self.driver.read(length))

    def close(self) -> None:
        run(self.driver.close())
