"""Inflight tracking (INFLIGHT_SHMFD): the shared region each ring records its requests in,
so that a back-end started after a crash resubmits what the last one left in flight.

The region comes from GET_INFLIGHT_FD (allocated here, handed to the front-end to keep) or
SET_INFLIGHT_FD (the front-end's, after a reconnect); its layout follows the ring layout
negotiated, so SET_FEATURES comes first.
"""

from __future__ import annotations

import logging
import os

from vvu._core import InflightRegion
from vvu.backends.base import Backend
from vvu.backends.request import DeviceQueue
from vvu.engine.common import ReplyWithFd, RequestFailed
from vvu.errors import GuestMemoryError, QueueError
from vvu.protocol import Inflight

log = logging.getLogger(__name__)


class InflightTracking:
    """One session's inflight region (`region`), None until the front-end gives or asks for
    one."""

    def __init__(self, backend: Backend) -> None:
        self.region: InflightRegion | None = None
        self._backend = backend  # whose queues the region may describe
        # A fresh region made ahead (`allocate_spare`), for a GET_INFLIGHT_FD of its geometry.
        self.spare: InflightRegion | None = None

    @staticmethod
    def allocate_spare(num_queues: int, queue_size: int, *, packed: bool) -> InflightRegion | None:
        """A fresh region of this geometry made ahead (a front-end reconnecting asks for the
        one it had), for `allocate` to hand out as it would allocate one itself: never
        handed out, never touched."""
        try:
            return InflightRegion.allocate(num_queues, queue_size, packed=packed)
        except GuestMemoryError as err:
            log.debug("inflight region not made ahead: %s", err)
            return None

    def check_geometry(self, payload: Inflight) -> None:
        """RequestFailed for a region of more queues than the device has, or bigger queues."""
        num_queues, max_queue_size = self._backend.num_queues, self._backend.max_queue_size
        if not 0 < payload.num_queues <= num_queues:
            raise RequestFailed(
                f"inflight region for {payload.num_queues} queues; the device has {num_queues}"
            )
        if not 0 < payload.queue_size <= max_queue_size:
            raise RequestFailed(
                f"inflight queue size {payload.queue_size} is not in 1..{max_queue_size}"
            )

    def allocate(self, payload: Inflight, *, packed: bool) -> ReplyWithFd:
        """GET_INFLIGHT_FD: a new region, used from now on (as after SET_INFLIGHT_FD, which
        QEMU sends next anyway); the reply carries its fd."""
        self.check_geometry(payload)
        num_queues, queue_size = payload.num_queues, payload.queue_size
        spare, self.spare = self.spare, None
        if spare is not None and _geometry(spare) == (num_queues, queue_size, packed):
            region = spare  # never handed out, never touched: as fresh as a new one
        else:
            try:
                region = InflightRegion.allocate(num_queues, queue_size, packed=packed)
            except GuestMemoryError as err:
                raise RequestFailed(str(err)) from err
        self.region = region
        reply = Inflight(region.mmap_size, 0, num_queues, queue_size)
        return ReplyWithFd(reply, region.fileno())

    def map(self, payload: Inflight, fd: int, *, packed: bool) -> None:
        """SET_INFLIGHT_FD: map the front-end's region (`fd` is duplicated, not kept). The
        region GET_INFLIGHT_FD just gave, handed back whole (QEMU's order), is mapped already:
        the same file at the same offset, kept as it is."""
        self.check_geometry(payload)
        current = self.region
        if (
            current is not None
            and payload.mmap_offset == 0
            and payload.mmap_size == current.mmap_size
            and _geometry(current) == (payload.num_queues, payload.queue_size, packed)
            and _same_file(fd, current.fileno())
        ):
            return
        self.region = InflightRegion.map(
            fd,
            payload.mmap_size,
            payload.mmap_offset,
            payload.num_queues,
            payload.queue_size,
            packed=packed,
        )

    def geometry(self) -> tuple[int, int, bool] | None:
        """The region's (num_queues, queue_size, packed), if there is one."""
        return None if self.region is None else _geometry(self.region)

    def forget(self) -> None:
        """The rings start over (RESET_DEVICE) or the session ends: the region belongs to the
        front-end, which hands it back after a reconnect or fetches a new one."""
        self.region = None
        self.spare = None

    def track(self, queue: DeviceQueue, index: int) -> None:
        """Hook ring `index` to its part of the region, if there is one; chains a previous
        back-end left in flight are handed out first (the ring positions are recomputed from
        the region)."""
        if self.region is None:
            return
        try:
            resubmit, discarded = queue.set_inflight(self.region, index)
        except (GuestMemoryError, QueueError) as err:
            raise RequestFailed(f"vring {index} inflight tracking: {err}") from err
        if discarded is not None:
            log.warning("vring %d: inflight region discarded: %s", index, discarded)
        if resubmit:
            log.info(
                "vring %d: resubmitting %d request(s) left in flight, vring base %#x",
                index,
                resubmit,
                queue.vring_base,
            )


def _geometry(region: InflightRegion) -> tuple[int, int, bool]:
    return region.num_queues, region.queue_size, region.packed


def _same_file(fd: int, other: int) -> bool:
    """Whether two fds open the same file (a memfd dup'd through a front-end)."""
    try:
        a, b = os.fstat(fd), os.fstat(other)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
