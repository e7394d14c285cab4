"""The back-end VM rig, shared by tests/test_backend_vm.py and benches/e2e/test_backend_vm.py:
`vvu device --frontend-memory FILE` on the host and a QEMU 11 guest serving blk through it with
vvu's VFIO driver (`vvu serve blk --vvu-pci`); optionally a second device for DPDK testpmd
(`NetLeg`), served by `vvu serve net --vvu-pci --loopback` in the same guest. See
tests/test_backend_vm.py for the picture.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from daemons import Daemon
from guest import (
    HOST_ROOT_ARGS,
    HOST_ROOT_SETUP,
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
from test_net import HugepageFileError, PmdMemory, dpdk_hugepage_file, hugepages_unavailable

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
SERVING_NET = "vvu: serving net"
#: The net device (testpmd's front-end) at q35 slot 5.
NET_SLOT = "05.0"
NET_BDF = f"0000:00:{NET_SLOT}"
#: testpmd's memory, all of it preallocated in the net device's --frontend-memory file.
NET_MEMORY = 64 * MiB
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


class NetLeg:
    """The back-end VM's second VVU device: `vvu device --frontend-memory` on testpmd's hugepage
    file (tests/test_net.py, dpdk_hugepage_file), at slot NET_SLOT, driven in the guest by
    `vvu serve net --vvu-pci --loopback`."""

    def __init__(self, workdir: Path, memory_file: Path, memory: PmdMemory) -> None:
        self.memory = memory
        self.frontend_socket = workdir / "net-fe.sock"
        self.device_socket = workdir / "net-vvu.sock"
        self.device = Daemon(
            [
                "--socket-path", str(self.frontend_socket),
                "--vfio-user", str(self.device_socket),
                "--frontend-memory", str(memory_file),
            ],
            self.device_socket,
            workdir / "net-device.log",
            command="device",
        )  # fmt: skip


class BackendVm:
    """`vvu device --frontend-memory` on the host, and a QEMU 11 guest serving blk through it.

    The disk is an image file on the host, in a directory the back-end VM mounts read-write
    over virtio-9p at the same path: it outlives a back-end VM restart, and the host can check
    what the front-end wrote in it. `net`: testpmd's hugepage file and memory, for a NetLeg.
    """

    def __init__(self, workdir: Path, shm: Path, net: tuple[Path, PmdMemory] | None = None) -> None:
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
        self.net: NetLeg | None = None
        if net is not None:
            try:
                self.net = NetLeg(workdir, *net)
            except BaseException:
                self.device.stop()
                raise
        #: Why there is no NetLeg, when one was asked for and there is none.
        self.no_net = ""
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
        serve_net, net_args = "", []
        if self.net is not None:
            serve_net = f"host {vvu} -v serve net --vvu-pci {NET_BDF} --vvu-pci-bind --loopback"
            serve_net += " 2>&1 &"
            net_args = vfio_user_pci_args(self.net.device_socket, addr=NET_SLOT)
        script = f"""{HOST_ROOT_SETUP}
mkdir -p /host{self.data}
{mount_data} /host{self.data} || exit 93
echo 16 > /proc/sys/vm/nr_hugepages
{garbage_step}
host {vvu} -v serve blk --vvu-pci {VVU_BDF} --vvu-pci-bind --image {self.image} 2>&1 &
{serve_net}
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
                *net_args,
            ],
        )  # fmt: skip
        try:
            self.guest.wait_for(SERVING, timeout=BOOT_TIMEOUT)
            if self.net is not None:
                self.guest.wait_for(SERVING_NET, timeout=BOOT_TIMEOUT)
        except BaseException as err:
            raise AssertionError(f"{err}\n{self.logs()}") from err

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
        text = f"--- back-end VM console ---\n{serial}\n--- device log ---\n{self.device.log()}"
        if self.net is not None:
            text += f"\n--- net device log ---\n{self.net.device.log()}"
        return text

    def stop(self) -> None:
        if self.guest is not None:
            self.guest.stop()
        self.device.stop()
        if self.net is not None:
            self.net.device.stop()


@contextlib.contextmanager
def backend_vm_rig(
    workdir: Path, *, garbage: bool = False, net: bool = False
) -> Iterator[BackendVm]:
    """A booted back-end VM (see `BackendVm.boot`); everything stopped and removed after.
    `net`: with a NetLeg when testpmd can have its hugepage file here (else `vm.no_net` says
    why not, and the VM serves blk alone)."""
    guest_image("vm")
    qemu11()
    shm = Path(tempfile.mkdtemp(prefix=f"vvu-test-{os.getpid()}-", dir="/dev/shm"))
    vm: BackendVm | None = None
    # The hugepage file outlives the VM and its devices (stopped first) as the stack unwinds.
    with contextlib.ExitStack() as stack:
        try:
            no_net = ""
            net_memory: tuple[Path, PmdMemory] | None = None
            if net:
                no_net = hugepages_unavailable() or ""
                if not no_net:
                    prefix = f"vvu-test-{os.getpid()}-vm-net"
                    try:
                        file = dpdk_hugepage_file(workdir, NET_MEMORY, prefix)
                        net_memory = stack.enter_context(file)
                    except HugepageFileError as err:
                        no_net = str(err)
            vm = BackendVm(workdir, shm, net_memory)
            vm.no_net = no_net
            vm.boot(garbage=garbage)
            yield vm
        finally:
            if vm is not None:
                vm.stop()
            shutil.rmtree(shm, ignore_errors=True)
    sockets = [vm.frontend_socket, vm.device_socket]
    if vm.net is not None:
        sockets += [vm.net.frontend_socket, vm.net.device_socket]
    assert not any(s.exists() for s in sockets), vm.logs()
