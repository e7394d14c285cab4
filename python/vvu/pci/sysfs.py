"""A PCI function as Linux's sysfs shows it, and the bind step that hands it to vfio-pci.

The VVU driver inside a guest reaches its device through Linux VFIO (`vvu.pci.vfio`). Before
that works, the function must be bound to vfio-pci, and Linux's `virtio_pci` claims every
1af4:1040-107f function first (the VVU device included: no virtio driver takes it, but
virtio_pci holds it). `bind_vfio()` is the explicit step users of `dpdk-devbind.py` or
`driverctl` expect: `driver_override` = vfio-pci, unbind the current driver, `drivers_probe`.
`check_vfio()` says, in one sentence each, what is missing when VFIO cannot work yet.

`SYSFS` and `DEVFS` are the roots every function reads by default; tests point them at a fake
tree.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from vvu.errors import VvuError

__all__ = [
    "VFIO_DRIVER",
    "VIRTIO_VENDOR",
    "VVU_PCI_DEVICE",
    "PciFunction",
    "PciSetupError",
    "bind_vfio",
    "check_vfio",
    "normalize_bdf",
    "pci_function",
]

log = logging.getLogger(__name__)

#: Roots of sysfs and devtmpfs (tests replace them).
SYSFS: str = "/sys"
DEVFS: str = "/dev"

VFIO_DRIVER: Final = "vfio-pci"
VIRTIO_VENDOR: Final = 0x1AF4
#: The VVU device's default PCI device id (virtio id 63; `vvu device --device-id` changes it).
VVU_PCI_DEVICE: Final = 0x107F
MODERN_VIRTIO_IDS: Final = range(0x1040, 0x1080)

_BDF = re.compile(r"^(?:([0-9a-fA-F]{4}):)?([0-9a-fA-F]{2}):([0-1][0-9a-fA-F])\.([0-7])$")

NO_IOMMU_HINT: Final = (
    "boot the guest with a vIOMMU (QEMU: -machine q35 -device "
    "intel-iommu,intremap=on,caching-mode=on) and the guest kernel with intel_iommu=on; "
    "vvu needs VFIO type1 (Debian's kernels have no VFIO no-IOMMU mode)"
)


class PciSetupError(VvuError):
    """The PCI function cannot be used through VFIO yet; the message says what to do."""


@dataclass(frozen=True, slots=True)
class PciFunction:
    """What sysfs says about one PCI function."""

    bdf: str
    path: Path
    vendor: int
    device: int
    class_code: int
    driver: str | None
    iommu_group: int | None

    @property
    def pci_id(self) -> str:
        return f"{self.vendor:04x}:{self.device:04x}"


def normalize_bdf(text: str) -> str:
    """`0000:00:04.0` from `0000:00:04.0` or `00:04.0` (lspci's short form)."""
    match = _BDF.match(text.strip())
    if match is None:
        raise PciSetupError(
            f"{text!r} is not a PCI address (DOMAIN:BUS:SLOT.FN, e.g. 0000:00:04.0)"
        )
    domain, bus, slot, fn = match.groups()
    return f"{(domain or '0000').lower()}:{bus.lower()}:{slot.lower()}.{fn}"


def _read_hex(path: Path) -> int:
    return int(path.read_text().strip(), 16)


def pci_function(bdf: str, *, sysfs: str | None = None) -> PciFunction:
    """Read `bdf` from sysfs; a clear error when there is no such function."""
    bdf = normalize_bdf(bdf)
    root = Path(sysfs or SYSFS) / "bus/pci/devices"
    path = root / bdf
    if not path.is_dir():
        raise PciSetupError(
            f"no PCI function {bdf} in {root} (`lspci -Dn` lists them; the VVU device is "
            f"{VIRTIO_VENDOR:04x}:{VVU_PCI_DEVICE:04x} unless its --device-id changed)"
        )
    driver_link = path / "driver"
    driver = os.path.basename(os.readlink(driver_link)) if driver_link.is_symlink() else None
    group_link = path / "iommu_group"
    group = int(os.path.basename(os.readlink(group_link))) if group_link.is_symlink() else None
    try:
        return PciFunction(
            bdf,
            path,
            _read_hex(path / "vendor"),
            _read_hex(path / "device"),
            _read_hex(path / "class"),
            driver,
            group,
        )
    except (OSError, ValueError) as err:
        raise PciSetupError(f"{path}: cannot read its ids: {err}") from err


def _virtio_users(fn: PciFunction) -> list[str]:
    """Virtio drivers (virtio_blk, virtio_net, ...) using the function through virtio_pci."""
    users = []
    for child in sorted(fn.path.glob("virtio*")):
        link = child / "driver"
        if link.is_symlink():
            users.append(f"{os.path.basename(os.readlink(link))} ({child.name})")
    return users


def _check_identity(fn: PciFunction) -> None:
    if fn.vendor != VIRTIO_VENDOR or fn.device not in MODERN_VIRTIO_IDS:
        raise PciSetupError(
            f"{fn.bdf} is {fn.pci_id}, not a modern virtio device "
            f"({VIRTIO_VENDOR:04x}:1040-107f; the VVU device is {VVU_PCI_DEVICE:04x} by default)"
        )
    users = _virtio_users(fn)
    if users:
        raise PciSetupError(
            f"{fn.bdf} ({fn.pci_id}) is in use by {', '.join(users)}: that is a virtio device "
            "this guest uses, not a virtio-vhost-user device"
        )
    if fn.device != VVU_PCI_DEVICE:
        log.warning(
            "%s is %s, not the default VVU id %04x:%04x (fine if the device was started with "
            "another --device-id)",
            fn.bdf,
            fn.pci_id,
            VIRTIO_VENDOR,
            VVU_PCI_DEVICE,
        )


def check_vfio(fn: PciFunction, *, sysfs: str | None = None, devfs: str | None = None) -> Path:
    """The VFIO group device of `fn` (`/dev/vfio/N`), or a `PciSetupError` naming the missing
    piece: an IOMMU, the vfio-pci module, the bind step."""
    _check_identity(fn)
    if fn.iommu_group is None:
        raise PciSetupError(f"{fn.bdf} has no IOMMU group: {NO_IOMMU_HINT}")
    dev = Path(devfs or DEVFS) / "vfio"
    if not (dev / "vfio").exists():
        raise PciSetupError(f"{dev / 'vfio'} does not exist: load VFIO (modprobe vfio-pci)")
    if fn.driver != VFIO_DRIVER:
        owner = f"bound to {fn.driver}" if fn.driver else "bound to no driver"
        raise PciSetupError(
            f"{fn.bdf} is {owner}, not {VFIO_DRIVER}: bind it first "
            f"(`vvu bind {fn.bdf}`, or add --vvu-pci-bind)"
        )
    group = dev / str(fn.iommu_group)
    if not group.exists():
        raise PciSetupError(f"{group} does not exist although {fn.bdf} is bound to {VFIO_DRIVER}")
    others = _group_outsiders(fn, sysfs)
    if others:
        raise PciSetupError(
            f"IOMMU group {fn.iommu_group} of {fn.bdf} also holds {', '.join(others)}: VFIO needs "
            f"every device of the group bound to {VFIO_DRIVER} (or to no driver)"
        )
    return group


def _group_outsiders(fn: PciFunction, sysfs: str | None) -> list[str]:
    """Other devices of fn's IOMMU group bound to a driver other than vfio-pci."""
    devices = Path(sysfs or SYSFS) / f"kernel/iommu_groups/{fn.iommu_group}/devices"
    out = []
    for dev in sorted(devices.glob("*")) if devices.is_dir() else []:
        if dev.name == fn.bdf:
            continue
        link = dev / "driver"
        driver = os.path.basename(os.readlink(link)) if link.is_symlink() else None
        if driver not in (None, VFIO_DRIVER, "pcieport"):
            out.append(f"{dev.name} ({driver})")
    return out


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except PermissionError as err:
        raise PciSetupError(f"cannot write {path}: {err.strerror} (run as root)") from err
    except OSError as err:
        raise PciSetupError(f"writing {text!r} to {path} failed: {err.strerror}") from err


def bind_vfio(bdf: str, *, sysfs: str | None = None) -> PciFunction:
    """Hand `bdf` to vfio-pci (`driver_override`, unbind, `drivers_probe`), as
    `dpdk-devbind.py -b vfio-pci` or `driverctl set-override` do. Refuses anything but a modern
    virtio function no virtio driver uses. A function already on vfio-pci is left alone."""
    fn = pci_function(bdf, sysfs=sysfs)
    _check_identity(fn)
    if fn.driver == VFIO_DRIVER:
        return fn
    if fn.iommu_group is None:  # vfio-pci would refuse it after virtio_pci let it go
        raise PciSetupError(f"{fn.bdf} has no IOMMU group: {NO_IOMMU_HINT}")
    root = Path(sysfs or SYSFS) / "bus/pci"
    if not (root / "drivers" / VFIO_DRIVER).is_dir():
        raise PciSetupError(f"the {VFIO_DRIVER} driver is not loaded (modprobe vfio-pci)")
    _write(fn.path / "driver_override", VFIO_DRIVER)
    if fn.driver is not None:
        _write(fn.path / "driver" / "unbind", fn.bdf)
    _write(root / "drivers_probe", fn.bdf)
    bound = pci_function(fn.bdf, sysfs=sysfs)
    if bound.driver != VFIO_DRIVER:
        raise PciSetupError(
            f"{fn.bdf} is bound to {bound.driver or 'no driver'} after drivers_probe, not "
            f"{VFIO_DRIVER} (dmesg says why; without an IOMMU group: {NO_IOMMU_HINT})"
        )
    log.info("%s (%s): %s -> %s", fn.bdf, fn.pci_id, fn.driver or "no driver", VFIO_DRIVER)
    return bound
