"""Modern virtio-pci: a device model (`VirtioPciDevice`, served over vfio-user) and a userspace
driver (`VirtioPciDriver`, on any `PciAccess`). Layout and validation: docs/virtio-pci.md."""

from __future__ import annotations

from vvu.pci.virtio_device import (
    NO_VECTOR,
    CfgType,
    Common,
    Status,
    VirtioPciDevice,
    VirtQueueState,
)
from vvu.pci.virtio_driver import DriverQueue, VirtioCap, VirtioPciDriver, VirtioPciError

__all__ = [
    "NO_VECTOR",
    "CfgType",
    "Common",
    "DriverQueue",
    "Status",
    "VirtQueueState",
    "VirtioCap",
    "VirtioPciDevice",
    "VirtioPciDriver",
    "VirtioPciError",
]
