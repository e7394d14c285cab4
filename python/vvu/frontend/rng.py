"""A virtio-rng driver on top of the scriptable front-end."""

from __future__ import annotations

from vvu.frontend.core import Frontend, FrontendQueue

__all__ = ["RngDriver"]


class RngDriver:
    """Reads entropy from a vhost-user-rng back-end."""

    def __init__(
        self, frontend: Frontend, queue: FrontendQueue, *, buffer_size: int = 4096
    ) -> None:
        self.frontend = frontend
        self.queue = queue
        self.buffer_size = buffer_size
        self._buffer = frontend.allocator.alloc(buffer_size, 64)

    @classmethod
    async def open(
        cls,
        path: str,
        *,
        timeout: float = 5.0,
        packed: bool = False,
        memory_path: str | None = None,
    ) -> RngDriver:
        """`memory_path`: guest memory in that file (see `Frontend`)."""
        frontend = await Frontend.connect(
            path, memory_size=1 << 20, timeout=timeout, packed=packed, memory_path=memory_path
        )
        try:
            await frontend.negotiate()
            await frontend.set_mem_table()
            return cls(frontend, await frontend.start_queue(0, 64))
        except BaseException:
            await frontend.close()
            raise

    async def read(self, length: int) -> bytes:
        """Up to `length` random bytes (one request; the device may return fewer)."""
        length = min(length, self.buffer_size)
        used = await self.queue.request([], [(self._buffer, length)])
        return self.frontend.memory.read(self._buffer, min(used, length))

    async def close(self) -> None:
        await self.frontend.close()
