"""Exceptions raised by vvu. The native core raises these same classes."""

from __future__ import annotations

__all__ = ["GuestMemoryError", "ProtocolError", "QueueError", "VvuError"]


class VvuError(Exception):
    """Base class of every error vvu raises on purpose."""


class GuestMemoryError(VvuError):
    """An address outside guest memory, a bad region, or a region still in use."""


class QueueError(VvuError):
    """A virtqueue is misconfigured, full, or broken by a malformed ring."""


class ProtocolError(VvuError):
    """A vhost-user message violates the protocol (header, size, fds, payload)."""
