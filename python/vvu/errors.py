"""Exceptions raised by vvu. The native core raises these same classes."""

from __future__ import annotations

__all__ = ["GuestMemoryError", "IotlbMiss", "ProtocolError", "QueueError", "VvuError"]


class VvuError(Exception):
    """Base class of every error vvu raises on purpose."""


class GuestMemoryError(VvuError):
    """An address outside guest memory, a bad region, or a region still in use."""


class QueueError(VvuError):
    """A virtqueue is misconfigured, full, or broken by a malformed ring."""


class IotlbMiss(QueueError):
    """Under VIRTIO_F_ACCESS_PLATFORM, a ring has no IOTLB translation yet: ask the front-end
    (BACKEND_IOTLB_MSG MISS for `iova` with IOTLB permission `perm`) and retry."""

    def __init__(self, message: str, iova: int, perm: int) -> None:
        super().__init__(message)
        self.iova = iova
        self.perm = perm


class ProtocolError(VvuError):
    """A vhost-user message violates the protocol (header, size, fds, payload)."""
