"""virtio-rng: fills every device-writable buffer from the OS random source (Python path)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import ClassVar

from vvu._core import DescriptorChain
from vvu.backends.base import Backend

__all__ = ["RngBackend"]


class RngBackend(Backend):
    """The entropy device (virtio id 4): one queue, no config space, no device features."""

    name: ClassVar[str] = "rng"
    device_id: ClassVar[int] = 4

    def __init__(self, *, num_queues: int = 1) -> None:
        super().__init__(num_queues=num_queues)
        self._urandom = os.open("/dev/urandom", os.O_RDONLY | os.O_CLOEXEC)

    def handle(self, queue_index: int, chains: Sequence[DescriptorChain]) -> Sequence[int]:
        used = []
        for chain in chains:
            total = 0
            for view in chain.writable:
                # getrandom(2) straight into guest memory: no intermediate copy of the request.
                total += os.readv(self._urandom, [view])
            used.append(total)
        return used

    def close(self) -> None:
        if self._urandom >= 0:
            os.close(self._urandom)
            self._urandom = -1
