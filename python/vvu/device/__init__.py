"""The virtio-vhost-user device (what a VMM hosts): `VvuDevice`, per docs/vvu-device.md."""

from __future__ import annotations

from vvu.device.vvu import (
    BACKEND_UP,
    FRONTEND_UP,
    PROTOCOL_FEATURES_ALLOWED,
    VVU_VIRTIO_ID,
    VvuDevice,
)

__all__ = [
    "BACKEND_UP",
    "FRONTEND_UP",
    "PROTOCOL_FEATURES_ALLOWED",
    "VVU_VIRTIO_ID",
    "VvuDevice",
]
