"""Dirty logging for live migration (LOG_ALL, LOG_SHMFD): the log the front-end maps with
SET_LOG_BASE, the fd of SET_LOG_FD, whether logging is on, and the writes the log lost.

The queues mark the pages they write themselves (`set_log`); this room only keeps the log,
swaps it when the front-end sends a new one, and reports what it could not record while the
front-end is still there to be told.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from vvu._core import DirtyLog, EventFd
from vvu.protocol import VhostFeature

log = logging.getLogger(__name__)


def page_ranges(pages: Sequence[int], page: int = 4096, limit: int = 4096) -> str:
    """Sorted page addresses as `first-last` ranges of consecutive pages ("0x1000-0x3000,
    0x8000"), at most `limit` of them and then how many more; "none" for none."""
    ranges: list[list[int]] = []
    for gpa in pages:
        if ranges and gpa == ranges[-1][1] + page:
            ranges[-1][1] = gpa
        else:
            ranges.append([gpa, gpa])
    text = ",".join(f"{a:#x}" if a == b else f"{a:#x}-{b:#x}" for a, b in ranges[:limit])
    if len(ranges) > limit:
        text += f" and {len(ranges) - limit} more ranges"
    return text or "none"


class DirtyLogging:
    """One session's dirty log (not to be confused with `vvu._core.DirtyLog`, the mapped log
    itself, which this room holds)."""

    def __init__(self) -> None:
        self.log: DirtyLog | None = None  # SET_LOG_BASE
        self.fd: EventFd | None = None  # SET_LOG_FD: kept, never signalled (QEMU does not use it)
        # Faults of `log` already reported (`report_faults`).
        self._faults_reported = 0

    def on(self, features: int) -> bool:
        """Dirty logging is on: VHOST_F_LOG_ALL acked (in `features`) and a log mapped."""
        return bool(features & VhostFeature.LOG_ALL.mask) and self.log is not None

    @staticmethod
    def map(fd: int, mmap_size: int, mmap_offset: int) -> DirtyLog:
        """Map the log SET_LOG_BASE gives (`fd` is duplicated, not kept)."""
        # At debug level the log remembers every page marked (a line when a ring stops).
        dirty_log = DirtyLog(fd, mmap_size, mmap_offset, trace=log.isEnabledFor(logging.DEBUG))
        log.info("dirty log mapped: %r", dirty_log)
        return dirty_log

    def report_faults(self) -> None:
        """Warn about writes the log lost since the last report (a migration that will copy a
        stale page), once a ring stopped or the log goes: while the front-end is still there
        to be told, not only at the end of the session."""
        dirty_log = self.log
        if dirty_log is not None and dirty_log.faults > self._faults_reported:
            log.warning(
                "%d writes could not be logged: %r",
                dirty_log.faults - self._faults_reported,
                dirty_log,
            )
            self._faults_reported = dirty_log.faults

    def replace(self, dirty_log: DirtyLog | None) -> None:
        """Report what the current log lost, then switch to `dirty_log`."""
        self.report_faults()
        self.log, self._faults_reported = dirty_log, 0

    def set_fd(self, fd: int | None) -> None:
        """SET_LOG_FD: keep a duplicate of `fd` (None: NOFD), closing the one kept before."""
        old, self.fd = self.fd, None if fd is None else EventFd.from_fd(fd)
        if old is not None:
            old.close()

    def note_ring_stopped(self, index: int) -> None:
        """A ring that ran stopped with logging on: everything it wrote is logged by now (a
        migration's last sync comes next). At debug level, which pages, for telling who wrote
        a page a migration left stale."""
        if self.log is not None and log.isEnabledFor(logging.DEBUG):
            log.debug(
                "vring %d stopped; pages marked in the dirty log: %s",
                index,
                page_ranges(self.log.marked_pages()),
            )

    def release(self) -> None:
        self.replace(None)
        if self.fd is not None:
            self.fd.close()
            self.fd = None
