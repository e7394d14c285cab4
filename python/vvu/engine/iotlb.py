"""The IOTLB of one session (VIRTIO_F_ACCESS_PLATFORM): ring and buffer addresses are IOVAs,
translated by what the front-end's IOMMU sends (IOTLB_MSG UPDATE/INVALIDATE). A translation a
worker misses is asked for on the back-end channel (BACKEND_IOTLB_MSG MISS); the UPDATE that
answers it is handed to the running workers."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Protocol

from vvu._core import GuestMemory, Iotlb
from vvu.engine.backend_channel import BackendChannel
from vvu.engine.common import RequestFailed
from vvu.protocol import BackendRequest, IotlbType, Payload
from vvu.protocol import Iotlb as IotlbMessage

log = logging.getLogger(__name__)

# How long an IOTLB invalidation waits for a worker to finish its batch and switch to the new
# translations before the ring is stopped and restarted instead.
IOTLB_SWITCH_TIMEOUT = 5.0


class Translating(Protocol):
    """A worker that translates through the IOTLB (a native queue runner)."""

    def set_memory(self, memory: GuestMemory) -> int: ...

    async def wait_memory(self, generation: int, timeout: float) -> bool: ...


class IotlbRoom:
    """The session's IOTLB while VIRTIO_F_ACCESS_PLATFORM is negotiated (`table`), else None."""

    def __init__(self) -> None:
        self.table: Iotlb | None = None

    def negotiate(self, iommu: bool) -> None:
        """SET_FEATURES: keep the table if the IOMMU stays, start an empty one if it comes."""
        if not iommu:
            self.table = None
        elif self.table is None:
            self.table = Iotlb()

    def reset(self) -> None:
        """The IOMMU is re-negotiated with the features (RESET_DEVICE, end of session)."""
        self.table = None

    def apply(self, entry: IotlbMessage, memory: GuestMemory | None) -> bool:
        """Apply one IOTLB_MSG; True when the workers must be handed the new translations.
        Raises RequestFailed for a message that cannot be applied."""
        if self.table is None:
            raise RequestFailed("IOTLB_MSG without VIRTIO_F_ACCESS_PLATFORM")
        if entry.type == IotlbType.UPDATE:
            if memory is None:
                raise RequestFailed("IOTLB update before any memory table")
            self.table.update(entry.iova, entry.size, entry.uaddr, entry.perm, memory)
            return True
        if entry.type == IotlbType.INVALIDATE:
            return self.table.invalidate(entry.iova, entry.size)
        raise RequestFailed(f"IOTLB_MSG type {entry.type} is not one a back-end handles")

    async def hand_over(
        self,
        memory: GuestMemory,
        workers: Sequence[tuple[int, Translating]],
        *,
        invalidated: bool,
        on_slow: Callable[[int], Awaitable[None]],
    ) -> None:
        """Hand the running `workers` (ring index, worker) the new translations; after an
        invalidation, wait until each stopped using the old ones, `on_slow(index)` for one that
        did not within IOTLB_SWITCH_TIMEOUT (its ring is then restarted instead)."""
        assert self.table is not None
        view = self.table.view(memory)
        switched = [(index, worker, worker.set_memory(view)) for index, worker in workers]
        del view  # the workers hold what they use; REM_MEM_REG must not wait for us
        if invalidated:
            for index, worker, generation in switched:
                if not await worker.wait_memory(generation, IOTLB_SWITCH_TIMEOUT):
                    log.warning("vring %d is slow to drop invalidated IOTLB entries", index)
                    await on_slow(index)

    @staticmethod
    def ask(
        iova: int,
        perm: int,
        backchannel: BackendChannel | None,
        send: Callable[[BackendRequest, Payload], Coroutine[Any, Any, None]],
    ) -> None:
        """Ask the front-end for the translation of `iova` (BACKEND_IOTLB_MSG MISS); it answers
        with IOTLB_MSG UPDATE on the front-end channel. Sent without waiting for an ack and
        from a task (`send`): the front-end may be waiting for one of our replies meanwhile."""
        if backchannel is None or backchannel.channel is None:
            log.warning("IOTLB miss at iova %#x but no back-end channel to ask for it", iova)
            return
        log.debug("IOTLB miss at iova %#x (perm %d)", iova, perm)
        miss = IotlbMessage(iova, 0, 0, perm, IotlbType.MISS)
        backchannel.spawn(send(BackendRequest.BACKEND_IOTLB_MSG, miss))
