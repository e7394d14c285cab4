"""vvu: virtio-vhost-user and a vhost-user toolkit with a Rust data path.

The typed public API lives here; the native module ``vvu._core`` is private.
"""

from __future__ import annotations

from vvu._core import GuestBuffer, GuestMemory, RegionInfo, memfd
from vvu.errors import GuestMemoryError, ProtocolError, QueueError, VvuError

__all__ = [
    "GuestBuffer",
    "GuestMemory",
    "GuestMemoryError",
    "ProtocolError",
    "QueueError",
    "RegionInfo",
    "VvuError",
    "memfd",
]
