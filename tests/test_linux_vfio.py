"""The Linux VFIO driver path (`vvu serve --vvu-pci`) as far as it runs without a guest: the
ioctl structs against the kernel's own header, and what the CLI says for each missing piece
(on a fake sysfs/devfs tree). The guest end to end lives with the VM harness."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from vvu import cli
from vvu.pci import sysfs
from vvu.pci.sysfs import PciSetupError, bind_vfio, normalize_bdf
from vvu.pci.vfio import IOEVENTFD_SIZE_FLAGS, LAYOUTS, Ioctl, VfioError, VfioPciAccess
from vvu.pci.virtio_device import queue_ring_sizes
from vvu.pci.virtio_driver import _Arena
from vvu.transport.vvu import BUFFER_STRIDE, dma_area_size

HEADER = Path("/usr/include/linux/vfio.h")
BDF = "0000:00:04.0"


def _offsets(layout: struct.Struct) -> tuple[list[int], int]:
    """Offsets of the non-padding items of a '='-format struct, and its size."""
    fmt = layout.format[1:]
    offsets = []
    prefix = "="
    for count, code in re.findall(r"(\d*)([a-zA-Z])", fmt):
        if code != "x":
            offsets.append(struct.calcsize(prefix))
        prefix += count + code
    return offsets, layout.size


# --- the uapi structs --------------------------------------------------------------------------


def test_ioctl_numbers_are_the_abi() -> None:
    # _IO(';', 100 + n): stable ABI since Linux 3.6.
    assert int(Ioctl.GET_API_VERSION) == 0x3B64
    assert int(Ioctl.GROUP_GET_DEVICE_FD) == 0x3B6A
    assert int(Ioctl.DEVICE_GET_REGION_INFO) == 0x3B6C
    assert int(Ioctl.DEVICE_SET_IRQS) == 0x3B6E
    assert int(Ioctl.IOMMU_MAP_DMA) == 0x3B71
    assert int(Ioctl.DEVICE_IOEVENTFD) == 0x3B74


@pytest.mark.skipif(
    shutil.which("cc") is None or not HEADER.exists(), reason="needs cc and linux/vfio.h"
)
def test_structs_and_numbers_match_the_kernel_header(tmp_path: Path) -> None:
    """Compile a probe against <linux/vfio.h>: every struct's size and every field's offset, and
    every ioctl number and flag we use, must be the header's."""
    lines = [
        "#include <stddef.h>",
        "#include <stdio.h>",
        "#include <linux/vfio.h>",
        "int main(void) {",
    ]
    for name, (_layout, fields) in LAYOUTS.items():
        lines.append(f'printf("sizeof {name} %zu\\n", sizeof(struct {name}));')
        for fld in fields:
            lines.append(f'printf("{name} {fld} %zu\\n", offsetof(struct {name}, {fld}));')
    constants = {f"VFIO_{op.name}": int(op) for op in Ioctl}
    constants |= {
        "VFIO_API_VERSION": 0,
        "VFIO_TYPE1_IOMMU": 1,
        "VFIO_TYPE1v2_IOMMU": 3,
        "VFIO_GROUP_FLAGS_VIABLE": 1,
        "VFIO_DEVICE_FLAGS_RESET": 1,
        "VFIO_DEVICE_FLAGS_PCI": 2,
        "VFIO_REGION_INFO_FLAG_MMAP": 4,
        "VFIO_REGION_INFO_FLAG_CAPS": 8,
        "VFIO_REGION_INFO_CAP_SPARSE_MMAP": 1,
        "VFIO_IOMMU_INFO_CAPS": 2,
        "VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE": 1,
        "VFIO_PCI_CONFIG_REGION_INDEX": 7,
        "VFIO_PCI_MSIX_IRQ_INDEX": 2,
        "VFIO_IRQ_INFO_EVENTFD": 1,
        "VFIO_IRQ_SET_DATA_NONE": 1,
        "VFIO_IRQ_SET_DATA_EVENTFD": 4,
        "VFIO_IRQ_SET_ACTION_TRIGGER": 32,
        "VFIO_DMA_MAP_FLAG_READ": 1,
        "VFIO_DMA_MAP_FLAG_WRITE": 2,
        "VFIO_DEVICE_IOEVENTFD_8": IOEVENTFD_SIZE_FLAGS[1],
        "VFIO_DEVICE_IOEVENTFD_16": IOEVENTFD_SIZE_FLAGS[2],
        "VFIO_DEVICE_IOEVENTFD_32": IOEVENTFD_SIZE_FLAGS[4],
        "VFIO_DEVICE_IOEVENTFD_64": IOEVENTFD_SIZE_FLAGS[8],
    }
    for macro in constants:
        lines.append(f'printf("{macro} %lu\\n", (unsigned long)({macro}));')
    lines += ["return 0;", "}"]
    src = tmp_path / "probe.c"
    src.write_text("\n".join(lines) + "\n")
    exe = tmp_path / "probe"
    subprocess.run(["cc", "-o", str(exe), str(src)], check=True, capture_output=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    got = {" ".join(line.split()[:-1]): int(line.split()[-1]) for line in out.splitlines()}
    for name, (layout, fields) in LAYOUTS.items():
        offsets, size = _offsets(layout)
        assert len(offsets) == len(fields), name
        # A newer header may add explicit padding fields; the size never changes.
        assert size == got[f"sizeof {name}"], name
        for fld, offset in zip(fields, offsets, strict=True):
            assert offset == got[f"{name} {fld}"], f"{name}.{fld}"
    for macro, value in constants.items():
        assert got[macro] == value, macro


# --- sysfs and the CLI -------------------------------------------------------------------------


def _fake_tree(
    tmp_path: Path,
    *,
    driver: str | None = "virtio-pci",
    group: int | None = 3,
    ids: tuple[int, int] = (0x1AF4, 0x107F),
    vfio_loaded: bool = True,
    dev_vfio: bool = True,
    virtio_user: str | None = None,
) -> tuple[Path, Path]:
    """A /sys and /dev with one PCI function BDF, as Linux lays them out."""
    sys_root, dev_root = tmp_path / "sys", tmp_path / "dev"
    pci = sys_root / "bus/pci"
    fn = sys_root / "devices/pci0000:00" / BDF
    fn.mkdir(parents=True)
    (pci / "devices").mkdir(parents=True)
    (pci / "devices" / BDF).symlink_to(fn)
    (fn / "vendor").write_text(f"{ids[0]:#06x}\n")
    (fn / "device").write_text(f"{ids[1]:#06x}\n")
    (fn / "class").write_text("0xff0000\n")
    (fn / "driver_override").write_text("(null)\n")
    (pci / "drivers_probe").write_text("")
    for name in ("virtio-pci", "vfio-pci") if vfio_loaded else ("virtio-pci",):
        (pci / "drivers" / name).mkdir(parents=True)
        (pci / "drivers" / name / "unbind").write_text("")
    if driver is not None:
        (fn / "driver").symlink_to(pci / "drivers" / driver)
    if group is not None:
        groups = sys_root / "kernel/iommu_groups" / str(group)
        (groups / "devices").mkdir(parents=True)
        (groups / "devices" / BDF).symlink_to(fn)
        (fn / "iommu_group").symlink_to(groups)
    if virtio_user is not None:
        (sys_root / "bus/virtio/drivers" / virtio_user).mkdir(parents=True)
        (fn / "virtio0").mkdir()
        (fn / "virtio0" / "driver").symlink_to(sys_root / "bus/virtio/drivers" / virtio_user)
    if dev_vfio:
        (dev_root / "vfio").mkdir(parents=True)
        (dev_root / "vfio/vfio").write_text("")
        if group is not None:
            (dev_root / "vfio" / str(group)).write_text("")
    return sys_root, dev_root


def _probe(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    roots: tuple[Path, Path],
    *args: str,
) -> tuple[int, str]:
    monkeypatch.setattr(sysfs, "SYSFS", str(roots[0]))
    monkeypatch.setattr(sysfs, "DEVFS", str(roots[1]))
    code = cli.main(["probe", "--vvu-pci", *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "case",
    [
        ({}, "0000:00:09.0", "no PCI function 0000:00:09.0"),
        ({}, "00:04", "is not a PCI address"),
        ({"group": None}, BDF, "boot the guest with a vIOMMU"),
        ({"dev_vfio": False}, BDF, "modprobe vfio-pci"),
        ({}, BDF, "is bound to virtio-pci, not vfio-pci: bind it first (`vvu bind"),
        ({"driver": None}, BDF, "bound to no driver"),
        ({"ids": (0x8086, 0x100E)}, BDF, "8086:100e, not a modern virtio device"),
        ({"virtio_user": "virtio_blk"}, BDF, "in use by virtio_blk (virtio0)"),
    ],
)
def test_probe_says_what_is_missing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    case: tuple[dict[str, object], str, str],
) -> None:
    tree, bdf, expected = case
    roots = _fake_tree(tmp_path, **tree)  # type: ignore[arg-type]
    code, err = _probe(monkeypatch, capsys, roots, bdf)
    assert code == 1
    assert err.startswith("vvu probe: ") and expected in err, err


def test_a_group_device_that_is_no_vfio_group_fails_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Everything in place on paper, but /dev/vfio/vfio is a plain file: the first ioctl fails
    with a message, and nothing leaks."""
    roots = _fake_tree(tmp_path, driver="vfio-pci")
    before = len(os.listdir("/proc/self/fd"))
    code, err = _probe(monkeypatch, capsys, roots, BDF)
    assert code == 1
    assert "vvu probe: GET_API_VERSION" in err, err
    assert len(os.listdir("/proc/self/fd")) == before


def test_serve_vvu_pci_refuses_direct_kicks(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["serve", "rng", "--vvu-pci", BDF, "--vvu-kick-mode", "direct"])
    assert code == 2
    assert "--vvu-pci needs --vvu-kick-mode msix" in capsys.readouterr().err
    assert cli.main(["serve", "rng", "--socket-path", "x", "--vvu-pci-bind"]) == 2
    assert "--vvu-pci-bind goes with --vvu-pci" in capsys.readouterr().err


def test_serve_vvu_pci_reports_setup_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    sys_root, dev_root = _fake_tree(tmp_path, group=None)
    monkeypatch.setattr(sysfs, "SYSFS", str(sys_root))
    monkeypatch.setattr(sysfs, "DEVFS", str(dev_root))
    assert cli.main(["serve", "rng", "--vvu-pci", BDF]) == 1
    assert "has no IOMMU group: boot the guest with a vIOMMU" in capsys.readouterr().err


def test_bind_writes_override_unbind_and_probe(tmp_path: Path) -> None:
    """The sysfs writes of the bind step, in order; a fake kernel never rebinds, so the step
    ends by saying the function did not arrive on vfio-pci."""
    sys_root, _ = _fake_tree(tmp_path)
    with pytest.raises(PciSetupError, match="bound to virtio-pci after drivers_probe"):
        bind_vfio("00:04.0", sysfs=str(sys_root))
    fn = sys_root / "bus/pci/devices" / BDF
    assert (fn / "driver_override").read_text() == "vfio-pci"
    assert (sys_root / "bus/pci/drivers/virtio-pci/unbind").read_text() == BDF
    assert (sys_root / "bus/pci/drivers_probe").read_text() == BDF


def test_bind_touches_nothing_it_cannot_finish(tmp_path: Path) -> None:
    for tree, expected in (
        ({"vfio_loaded": False}, "modprobe vfio-pci"),
        ({"group": None}, "intel_iommu=on"),
        ({"virtio_user": "virtio_net"}, "in use by virtio_net"),
    ):
        root = tmp_path / str(len(list(tmp_path.iterdir())))
        sys_root, _ = _fake_tree(root, **tree)
        with pytest.raises(PciSetupError, match=re.escape(expected)):
            bind_vfio(BDF, sysfs=str(sys_root))
        assert (sys_root / "bus/pci/devices" / BDF / "driver_override").read_text() == "(null)\n"
        assert (sys_root / "bus/pci/drivers_probe").read_text() == ""


def test_bind_leaves_a_vfio_function_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sys_root, _ = _fake_tree(tmp_path, driver="vfio-pci")
    fn = bind_vfio(BDF, sysfs=str(sys_root))
    assert fn.driver == "vfio-pci" and fn.iommu_group == 3
    assert (sys_root / "bus/pci/drivers_probe").read_text() == ""


def test_bind_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    sys_root, _ = _fake_tree(tmp_path, driver="vfio-pci")
    monkeypatch.setattr(sysfs, "SYSFS", str(sys_root))
    assert cli.main(["bind", "00:04.0"]) == 0
    assert "0000:00:04.0 (1af4:107f) is bound to vfio-pci, IOMMU group 3" in capsys.readouterr().out
    assert cli.main(["bind", "0000:00:05.0"]) == 1
    assert "vvu bind: no PCI function 0000:00:05.0" in capsys.readouterr().err


def test_normalize_bdf() -> None:
    assert normalize_bdf("00:04.0") == BDF
    assert normalize_bdf("0000:0A:1f.7") == "0000:0a:1f.7"
    for bad in ("0000:00:04", "00:20.0", "zz:04.0", ""):
        with pytest.raises(PciSetupError):
            normalize_bdf(bad)


def test_open_errors_are_vvu_errors(tmp_path: Path) -> None:
    sys_root, dev_root = _fake_tree(tmp_path, driver="vfio-pci")
    with pytest.raises(VfioError, match="GET_API_VERSION"):
        asyncio.run(VfioPciAccess.open(BDF, sysfs=str(sys_root), devfs=str(dev_root)))


@pytest.mark.parametrize("sizes", [(256, 256), (128, 128), (1024, 64), (2, 2)])
def test_the_vvu_dma_area_holds_the_worst_case(sizes: tuple[int, int]) -> None:
    """Everything VvuDriver.init and a full txq allocate, in its order and alignments, fits the
    area it asks for (the area is kept tight: each page may be a vIOMMU DMA mapping)."""
    arena = _Arena(0x1000_0000, dma_area_size(*sizes))
    for qsize in sizes:
        for part in queue_ring_sizes(qsize, event_idx=True):
            arena.alloc(part, 4096)
    for _ in range(sum(sizes)):
        arena.alloc(BUFFER_STRIDE)
    assert arena.size - arena.next < 4096 + 3 * 4096 * 2  # no more than alignment slack
