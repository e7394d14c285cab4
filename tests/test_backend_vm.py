"""The back-end VM: a stock QEMU hosts the virtio-vhost-user device and a Linux guest runs the
back-end — the scenario virtio-vhost-user exists for.

    front-end (vvu's own on the host, or a front-end VM's vhost-user-blk-pci)
        │ AF_UNIX: vhost-user + fds                      ┌──── back-end VM (QEMU 11, TCG) ───┐
        ▼                                                │ vfio-user-pci ── guest: vfio-pci, │
    `vvu device --frontend-memory FILE` ── vfio-user ────┤ vIOMMU; `vvu serve blk --vvu-pci` │
                                                         └───────────────────────────────────┘

QEMU 11 (scripts/qemu11.sh) is the back-end VM's VMM: its `vfio-user-pci` client knows no vvu
extension, so the front-end's RAM must be a file the device is told up front
(`--frontend-memory`; the front-end VM's `memory-backend-file`) and BAR4 is that file, mapped
by QEMU at realize. The guest is the "vm" image flavour: it mounts the host's file system
read-only over virtio-9p and runs the host's own vvu in a chroot, with vvu's Linux VFIO driver
behind an Intel vIOMMU. One back-end VM boot serves every test of this module (sessions follow
one another as they do for any back-end), so the whole module costs one boot plus what each
test's front-end needs.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest import (
    HOST_ROOT_ARGS,
    HOST_ROOT_SETUP,
    QEMU,
    REPO,
    VIOMMU_APPEND,
    VIOMMU_ARGS,
    Guest,
    guest_image,
    qemu11,
    qemu_escape,
    start_guest,
    vfio_user_pci_args,
)
from test_qemu_peers import Daemon, _md5
from vvu.frontend import BlkDriver

pytestmark = pytest.mark.guest

MiB = 1 << 20
#: The front-end's RAM: the file `vvu device --frontend-memory` serves as BAR4.
FRONTEND_MEMORY = 256 * MiB
DISK_MIB = 64
#: Where the VVU device sits in the back-end VM (q35 slot 4).
VVU_SLOT = "04.0"
VVU_BDF = f"0000:00:{VVU_SLOT}"
#: The back-end VM boots, mounts the host over 9p and starts Python under TCG: generous.
BOOT_TIMEOUT = 240.0
SERVING = "vvu: serving blk"


class BackendVm:
    """`vvu device --frontend-memory` on the host, and a QEMU 11 guest serving blk through it."""

    def __init__(self, workdir: Path, shm: Path) -> None:
        self.workdir = workdir
        self.frontend_memory = shm / "frontend-ram"
        with self.frontend_memory.open("wb") as f:
            f.truncate(FRONTEND_MEMORY)
        self.frontend_socket = workdir / "fe.sock"
        self.device_socket = workdir / "vvu.sock"
        self.device = Daemon(
            [
                "--socket-path", str(self.frontend_socket),
                "--vfio-user", str(self.device_socket),
                "--frontend-memory", str(self.frontend_memory),
            ],
            self.device_socket,
            workdir / "device.log",
            command="device",
        )  # fmt: skip
        self.guest: Guest | None = None

    def boot(self) -> None:
        # The host's own interpreter and vvu tree (the editable install's source), run in the
        # guest's chroot of the host's file system.
        vvu = f"env PYTHONPATH={REPO / 'python'} {sys.executable} -m vvu"
        script = f"""{HOST_ROOT_SETUP}
echo 16 > /proc/sys/vm/nr_hugepages
host {vvu} -v serve blk --vvu-pci {VVU_BDF} --vvu-pci-bind --size {DISK_MIB} 2>&1 &
wait
"""
        self.guest = start_guest(
            script,
            qemu=qemu11(),
            image=guest_image("vm"),
            memory="768M",
            append=VIOMMU_APPEND,
            timeout=BOOT_TIMEOUT + 600,
            qemu_args=[
                *VIOMMU_ARGS,
                *HOST_ROOT_ARGS,
                *vfio_user_pci_args(self.device_socket, addr=VVU_SLOT),
            ],
        )
        try:
            self.guest.wait_for(SERVING, timeout=BOOT_TIMEOUT)
        except BaseException as err:
            raise AssertionError(f"{err}\n--- device log ---\n{self.device.log()}") from err

    def logs(self) -> str:
        serial = self.guest.serial if self.guest is not None else ""
        return f"--- back-end VM console ---\n{serial}\n--- device log ---\n{self.device.log()}"

    def stop(self) -> None:
        if self.guest is not None:
            self.guest.stop()
        self.device.stop()


@pytest.fixture(scope="module")
def backend_vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackendVm]:
    guest_image("vm")
    qemu11()
    workdir = tmp_path_factory.mktemp("backend-vm")
    shm = Path(tempfile.mkdtemp(prefix=f"vvu-test-{os.getpid()}-", dir="/dev/shm"))
    vm: BackendVm | None = None
    try:
        vm = BackendVm(workdir, shm)
        vm.boot()
        yield vm
    finally:
        if vm is not None:
            vm.stop()
        shutil.rmtree(shm, ignore_errors=True)
    assert not vm.frontend_socket.exists() and not vm.device_socket.exists(), vm.logs()


@pytest.mark.asyncio
async def test_host_frontend_writes_and_reads_back_through_the_backend_vm(
    backend_vm: BackendVm,
) -> None:
    """vvu's own front-end on the host, its RAM in the device's --frontend-memory file: the
    back-end VM serves checksummed writes and read-backs at several offsets."""
    rnd = random.Random(9)
    blk = await BlkDriver.open(
        str(backend_vm.frontend_socket), timeout=30, memory_path=str(backend_vm.frontend_memory)
    )
    try:
        written: dict[int, bytes] = {}
        for sector in (0, 1024, 4096, (DISK_MIB * MiB - 65536) // 512):
            data = rnd.randbytes(65536)
            await blk.write(sector, data)
            written[sector] = data
        for sector, data in written.items():
            got = await blk.read(sector, len(data))
            assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), backend_vm.logs()
    finally:
        await blk.close()


def test_two_vms_one_serves_the_others_disk(backend_vm: BackendVm) -> None:
    """The seed's picture: a front-end VM's vhost-user-blk-pci on the device's socket, its RAM
    the --frontend-memory file, fio writes and verifies in that guest; then the front-end VM is
    restarted (a second boot) while the back-end VM keeps running and reads the data back."""
    chardev = f"socket,id=vu0,path={qemu_escape(str(backend_vm.frontend_socket))}"
    devices = [
        *HOST_ROOT_ARGS,
        "-chardev", chardev,
        "-device", "vhost-user-blk-pci,chardev=vu0,num-queues=1",
    ]  # fmt: skip
    fio = (
        "host fio --name=verify --filename=/dev/vda --direct=1 --ioengine=psync --bs=4k"
        " --size=8M --offset=16M --verify=crc32c --verify_fatal=1 --randrepeat=1"
        " --verify_state_save=0 --output-format=terse"
    )
    first = f"""{HOST_ROOT_SETUP}
set -e
cat /sys/block/vda/size
{fio} --rw=randwrite --do_verify=1 >/dev/null
dd if=/dev/vda bs=1M skip=16 count=8 iflag=direct 2>/dev/null | md5sum
"""
    second = f"""{HOST_ROOT_SETUP}
set -e
{fio} --rw=randwrite --verify_only=1 >/dev/null
dd if=/dev/vda bs=1M skip=16 count=8 iflag=direct 2>/dev/null | md5sum
"""
    outputs: list[list[str]] = []
    for script in (first, second):
        with start_guest(
            script,
            qemu=QEMU,
            image=guest_image("vm"),
            qemu_args=devices,
            memory=f"{FRONTEND_MEMORY // MiB}M",
            memory_file=backend_vm.frontend_memory,
            timeout=BOOT_TIMEOUT,
        ) as guest:
            result = guest.wait()
        assert result.exit_status == 0, f"{result.serial}\n{backend_vm.logs()}"
        outputs.append(result.output.split("\n"))
    assert outputs[0][0] == str(DISK_MIB * MiB // 512), outputs
    # fio verified in each guest (exit status); the second VM reads what the first wrote.
    assert outputs[0][1:3] == outputs[1][0:2] == [outputs[0][1], ""], outputs
    assert _md5(outputs[0][1]) == _md5(outputs[1][0]), outputs
