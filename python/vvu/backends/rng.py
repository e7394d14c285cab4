"""virtio-rng: fills every device-writable buffer from the OS random source (Python path)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import ClassVar

from vvu._core import DescriptorChain, writable_views
from vvu.backends.base import Backend

__all__ = ["RngBackend"]

_IOV_MAX = 1024


class RngBackend(Backend):
    """The entropy device (virtio id 4): one queue, no config space, no device features."""

    name: ClassVar[str] = "rng"
    device_id: ClassVar[int] = 4

    def __init__(self, *, num_queues: int = 1) -> None:
        super().__init__(num_queues=num_queues)
        self._urandom = os.open("/dev/urandom", os.O_RDONLY | os.O_CLOEXEC)

    def handle(self, queue_index: int, chains: Sequence[DescriptorChain]) -> Sequence[int]:
        # One readv for the whole batch, straight into guest memory: the syscall, not Python,
        # is the cost per request, so it is paid once per batch (IOV_MAX views at a time).
        views = writable_views(chains)
        wanted = sum(chain.writable_len for chain in chains)
        got = 0
        for start in range(0, len(views), _IOV_MAX):
            got += os.readv(self._urandom, views[start : start + _IOV_MAX])
        if got == wanted:
            return [chain.writable_len for chain in chains]
        # /dev/urandom filled less than asked (it never does below 32 MiB): report what was
        # written, chain by chain, never more.
        used = []
        for chain in chains:
            length = min(chain.writable_len, got)
            used.append(length)
            got -= length
        return used

    def close(self) -> None:
        if self._urandom >= 0:
            os.close(self._urandom)
            self._urandom = -1
