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
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemons import Daemon
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
from test_qemu_peers import _md5
from vvu.frontend import BlkDriver
from vvu.frontend.core import FrontendError

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
STATS = "vvu: device stats "


#: Run in the back-end VM before the back-end starts: a hostile guest driver writes garbage all
#: over BAR0 (virtio common/ISR/device/notify) and BAR2 (doorbells, kick config) of the device
#: through sysfs, with 1-, 2- and 4-byte accesses; the device must survive it and serve after.
GARBAGE_WRITER = """
import mmap, os, random, struct, sys
bdf, count = sys.argv[1], int(sys.argv[2])
dev = f"/sys/bus/pci/devices/{bdf}"
if os.path.exists(f"{dev}/driver"):  # a BAR its driver claimed cannot be mapped (strict devmem)
    with open(f"{dev}/driver/unbind", "w") as f:
        f.write(bdf)
with open(f"{dev}/config", "r+b") as config:  # memory decoding on
    command = struct.unpack_from("<H", config.read(6), 4)[0]
    config.seek(4)
    config.write(struct.pack("<H", command | 0x2))
rnd = random.Random(1)
writes = 0
for bar in (0, 2):
    fd = os.open(f"{dev}/resource{bar}", os.O_RDWR | os.O_SYNC)
    size = os.fstat(fd).st_size
    with mmap.mmap(fd, size) as m:
        for _ in range(count):
            width = rnd.choice((1, 2, 4))
            span = 0x100 if rnd.random() < 0.5 else size  # half into the first registers
            offset = rnd.randrange(span) // width * width
            struct.pack_into({1: "<B", 2: "<H", 4: "<I"}[width], m, offset,
                             rnd.getrandbits(8 * width))
            writes += 1
            struct.unpack_from("<I", m, rnd.randrange(size) // 4 * 4)
    os.close(fd)
print(f"garbage: {writes} writes to BAR0 and BAR2 of {bdf}")
"""
GARBAGE_WRITES = 400


class BackendVm:
    """`vvu device --frontend-memory` on the host, and a QEMU 11 guest serving blk through it.

    The disk is an image file on the host, in a directory the back-end VM mounts read-write
    over virtio-9p at the same path: it outlives a back-end VM restart, and the host can check
    what the front-end wrote in it.
    """

    def __init__(self, workdir: Path, shm: Path) -> None:
        self.workdir = workdir
        self.frontend_memory = shm / "frontend-ram"
        with self.frontend_memory.open("wb") as f:
            f.truncate(FRONTEND_MEMORY)
        self.data = workdir / "data"
        self.data.mkdir()
        self.image = self.data / "disk.img"
        with self.image.open("wb") as f:
            f.truncate(DISK_MIB * MiB)
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
        self.boots = 0

    def boot(self, *, garbage: bool = False) -> None:
        """Start the back-end VM and wait until its back-end serves; `garbage`: first let the
        guest write garbage to the device's registers (GARBAGE_WRITER)."""
        self.boots += 1
        # The host's own interpreter and vvu tree (the editable install's source), run in the
        # guest's chroot of the host's file system.
        vvu = f"env PYTHONPATH={REPO / 'python'} {sys.executable} -m vvu"
        garbage_step = ""
        if garbage:
            writer = self.data / "garbage.py"  # /tmp is the guest's own in the chroot
            writer.write_text(GARBAGE_WRITER)
            garbage_step = f"host {sys.executable} {writer} {VVU_BDF} {GARBAGE_WRITES} || exit 92"
        # cache=loose: the back-end's buffers are BAR4, memory the guest kernel cannot pin, and
        # 9p's uncached I/O pins the caller's pages (EFAULT); the page cache copies instead.
        mount_data = "mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose data"
        script = f"""{HOST_ROOT_SETUP}
mkdir -p /host{self.data}
{mount_data} /host{self.data} || exit 93
echo 16 > /proc/sys/vm/nr_hugepages
{garbage_step}
host {vvu} -v serve blk --vvu-pci {VVU_BDF} --vvu-pci-bind --image {self.image} 2>&1 &
wait
"""
        data_share = f"local,path={qemu_escape(str(self.data))},mount_tag=data,security_model=none"
        self.guest = start_guest(
            script,
            qemu=qemu11(),
            image=guest_image("vm"),
            memory="768M",
            append=VIOMMU_APPEND,
            timeout=BOOT_TIMEOUT + 900,
            qemu_args=[
                *VIOMMU_ARGS,
                *HOST_ROOT_ARGS,
                "-virtfs", data_share,
                *vfio_user_pci_args(self.device_socket, addr=VVU_SLOT),
            ],
        )  # fmt: skip
        try:
            self.guest.wait_for(SERVING, timeout=BOOT_TIMEOUT)
        except BaseException as err:
            raise AssertionError(f"{err}\n--- device log ---\n{self.device.log()}") from err

    def kill(self) -> None:
        """SIGKILL the back-end VM's QEMU (the VMM dies mid-whatever), by its PID."""
        assert self.guest is not None
        self.guest.proc.kill()
        self.guest.stop()

    def device_stats(self) -> dict[str, Any]:
        """The device's statistics now (`vvu device` prints them as JSON on SIGUSR1)."""
        before = self.device.log().count(STATS)
        self.device.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while (log := self.device.log()).count(STATS) == before:
            assert time.monotonic() < deadline, log
            time.sleep(0.02)
        line = log[log.rindex(STATS) :].split("\n", 1)[0]
        stats: dict[str, Any] = json.loads(line[len(STATS) :])
        return stats

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
        vm.boot(garbage=True)
        yield vm
    finally:
        if vm is not None:
            vm.stop()
        shutil.rmtree(shm, ignore_errors=True)
    assert not vm.frontend_socket.exists() and not vm.device_socket.exists(), vm.logs()


def test_garbage_from_the_guest_driver_left_the_device_serving(backend_vm: BackendVm) -> None:
    """Before its back-end started, the back-end VM wrote garbage over the device's BAR0 and BAR2
    (GARBAGE_WRITER, as a broken or hostile guest driver would): the device process is alive,
    said what it ignored, and the back-end then came up through it (the tests below use it)."""
    assert backend_vm.guest is not None
    serial = backend_vm.guest.serial
    assert f"garbage: {2 * GARBAGE_WRITES} writes to BAR0 and BAR2 of {VVU_BDF}" in serial, (
        backend_vm.logs()
    )
    assert SERVING in serial.split("garbage:", 1)[1], backend_vm.logs()
    assert backend_vm.device.running(), backend_vm.logs()
    assert "Traceback" not in backend_vm.device.log(), backend_vm.logs()


@pytest.mark.asyncio
async def test_frontend_memory_the_device_cannot_map_is_refused(backend_vm: BackendVm) -> None:
    """A front-end whose RAM is not the --frontend-memory file (here a memfd) cannot be mapped by
    the back-end VM: the device refuses its memory table with a failure ack and one log line,
    and serves the next front-end as if nothing happened (the tests below)."""
    log_before = backend_vm.device.log()
    with pytest.raises(FrontendError):
        blk = await BlkDriver.open(str(backend_vm.frontend_socket), timeout=30)
        await blk.close()
    log = backend_vm.device.log()[len(log_before) :]
    assert "its fd is not the --frontend-memory file" in log, backend_vm.logs()
    assert backend_vm.device.running(), backend_vm.logs()


@pytest.mark.asyncio
async def test_host_frontend_writes_and_reads_back_through_the_backend_vm(
    backend_vm: BackendVm,
) -> None:
    """vvu's own front-end on the host, its RAM in the device's --frontend-memory file: the
    back-end VM serves checksummed writes and read-backs at several offsets."""
    rnd = random.Random(9)
    before = backend_vm.device_stats()
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
        await blk.flush()
    finally:
        await blk.close()
    with backend_vm.image.open("rb") as image:  # and it is on the disk, as the host sees it
        for sector, data in written.items():
            image.seek(sector * 512)
            assert image.read(len(data)) == data
    # QEMU mapped BAR4 (the front-end's RAM) into the back-end VM: not one access to it became a
    # vfio-user message. Each request's completion rang a doorbell by REGION_WRITE (QEMU has no
    # ioeventfds for a vfio-user device) and each kick was relayed to an MSI-X eventfd.
    after = backend_vm.device_stats()
    assert after["region_accesses"].get("BAR4", 0) == 0, after
    assert after["doorbell_writes"] - before["doorbell_writes"] >= len(written), (before, after)
    assert after["kicks_forwarded"] - before["kicks_forwarded"] >= 1, (before, after)


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
    with backend_vm.image.open("rb") as image:
        image.seek(16 * MiB)
        assert hashlib.md5(image.read(8 * MiB)).hexdigest() == _md5(outputs[0][1])


def test_backend_vm_killed_and_restarted_while_the_frontend_vm_keeps_its_session(
    backend_vm: BackendVm,
) -> None:
    """A front-end VM (QEMU `reconnect=1`) writes a verified stream; the back-end VM's QEMU is
    SIGKILLed mid-stream and a new back-end VM boots on the same device: the front-end VM
    reconnects by itself, its stream completes and every byte reads back, in the guest and in
    the image. Runs last: it replaces the module's back-end VM."""
    chunks, chunk_kib, first = 12, 256, 48  # 3 MiB from 12 MiB on, in 256 KiB writes
    script = f"""
set -e
head -c {chunks * chunk_kib * 1024} /dev/urandom > /tmp/pattern
md5sum /tmp/pattern
i=0
while [ $i -lt {chunks} ]; do
    dd if=/tmp/pattern of=/dev/vda bs={chunk_kib}k skip=$i seek=$(({first} + i)) count=1 \
        oflag=direct conv=fsync 2>/dev/null
    echo "chunk $i written"
    i=$((i + 1))
    sleep 1  # the stream outlasts the back-end VM's kill below by many seconds
done
dd if=/dev/vda bs={chunk_kib}k skip={first} count={chunks} iflag=direct 2>/dev/null | md5sum
"""
    chardev = f"socket,id=vu0,path={qemu_escape(str(backend_vm.frontend_socket))},reconnect=1"
    with start_guest(
        script,
        qemu_args=["-chardev", chardev, "-device", "vhost-user-blk-pci,chardev=vu0"],
        memory=f"{FRONTEND_MEMORY // MiB}M",
        memory_file=backend_vm.frontend_memory,
        timeout=BOOT_TIMEOUT * 2,
    ) as frontend:
        frontend.wait_for("chunk 2 written", timeout=BOOT_TIMEOUT)
        backend_vm.kill()
        assert f"chunk {chunks - 1} written" not in frontend.serial  # killed mid-stream
        backend_vm.boot()
        result = frontend.wait()
    assert result.exit_status == 0, f"{result.serial}\n{backend_vm.logs()}"
    lines = result.output.split("\n")[:-1]  # the output ends with a newline
    assert lines[-2] == f"chunk {chunks - 1} written", result.output
    written = _md5(lines[0])
    assert _md5(lines[-1]) == written, result.output
    with backend_vm.image.open("rb") as image:
        image.seek(first * chunk_kib * 1024)
        assert hashlib.md5(image.read(chunks * chunk_kib * 1024)).hexdigest() == written
    assert backend_vm.boots == 2 and backend_vm.device.running(), backend_vm.logs()
