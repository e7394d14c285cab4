"""vfio-user: a PCI device served over an AF_UNIX socket (QEMU docs/interop/vfio-user.rst).

The link between the VVU device (served by a VMM-like process) and the VVU driver (a userspace
virtio-pci driver in the back-end's process). This package is the generic layer:

- `protocol`: the wire format as typed values;
- `device`: the `PciDevice` contract a served device implements, and helpers (`ConfigSpace`,
  `IrqBindings`, `PciDeviceBase`); `echo.EchoDevice` is a small test device;
- `server`: `VfioUserServer`, one client at a time, nothing trusted;
- `client`: `VfioUserClient`; `access`: `PciAccess`, the driver-facing seam, with
  `VfioUserPciAccess` (a Linux VFIO implementation can sit beside it).

Wire-level choices and limits: docs/vfio-user.md.
"""

from __future__ import annotations

from vvu.vfio_user.access import BarInfo, PciAccess, VfioUserPciAccess
from vvu.vfio_user.client import (
    ClientOptions,
    IoRegionFd,
    MappableArea,
    Region,
    VfioUserClient,
)
from vvu.vfio_user.connection import VfioUserListener
from vvu.vfio_user.device import (
    UNUSED_REGION,
    ConfigSpace,
    DmaMapping,
    DmaSpace,
    IoEventFd,
    IrqBindings,
    IrqRequest,
    IrqSpec,
    MmapArea,
    PciDevice,
    PciDeviceBase,
    RegionSpec,
)
from vvu.vfio_user.echo import EchoDevice
from vvu.vfio_user.protocol import IrqIndex, RegionIndex, VfioUserError
from vvu.vfio_user.server import ServerLimits, VfioUserServer

__all__ = [
    "UNUSED_REGION",
    "BarInfo",
    "ClientOptions",
    "ConfigSpace",
    "DmaMapping",
    "DmaSpace",
    "EchoDevice",
    "IoEventFd",
    "IoRegionFd",
    "IrqBindings",
    "IrqIndex",
    "IrqRequest",
    "IrqSpec",
    "MappableArea",
    "MmapArea",
    "PciAccess",
    "PciDevice",
    "PciDeviceBase",
    "Region",
    "RegionIndex",
    "RegionSpec",
    "ServerLimits",
    "VfioUserClient",
    "VfioUserError",
    "VfioUserListener",
    "VfioUserPciAccess",
    "VfioUserServer",
]
