"""Our back-ends against a real front-end: QEMU's vhost-user devices and a Linux guest's drivers.

`vvu serve blk` and `vvu serve rng` run as they would in production (a child process on a
socket); QEMU (tests/guest.py, TCG) plugs ``vhost-user-blk-pci`` / ``vhost-user-rng-pci`` into
them and the guest's virtio drivers do real I/O. The host checks what the guest reports against
the image file itself. Select or skip them with ``-m guest`` / ``-m 'not guest'``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import signal
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from daemons import Daemon
from guest import (
    QEMU,
    Guest,
    GuestError,
    Qmp,
    QmpError,
    child_pids,
    guest_image,
    live_guests,
    qemu11,
    qemu_escape,
    start_guest,
)

pytestmark = pytest.mark.guest

# A guest boots in ~3 s under TCG; this bounds a hung run well below pytest's own timeout.
TIMEOUT = 60.0
MiB = 1 << 20
DISK_SIZE = 16 * MiB


# --- leak checks ---------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    """No daemon or QEMU may outlive its test, nor any guest temp directory of this process."""
    guest_image()  # skip (or fail, in CI) before starting a daemon when there is no guest
    mine = f"vvu-guest-{os.getpid()}-*"  # other processes' guests are theirs to clean up
    tmp = Path(tempfile.gettempdir())
    before, dirs_before = child_pids(), set(tmp.glob(mine))
    yield
    assert live_guests() == []
    assert child_pids() - before == set()
    assert set(tmp.glob(mine)) - dirs_before == set()


# --- the back-end daemon -------------------------------------------------------------------


@pytest.fixture
def serve() -> Iterator[list[Daemon]]:
    """Daemons a test started (append); all are stopped and must remove their sockets."""
    daemons: list[Daemon] = []
    yield daemons
    for daemon in daemons:
        daemon.stop()
    for daemon in daemons:
        assert not daemon.socket_path.exists(), "the daemon must remove its socket on SIGTERM"


class VvuRig:
    """`vvu device` plus one `vvu serve BACKEND --vvu` (both `Daemon`s, stopped by PID). `name`
    prefixes the rig's sockets and logs, for several rigs in one directory; `device_args` go to
    `vvu device`."""

    def __init__(
        self,
        tmp_path: Path,
        backend: str,
        *args: str,
        name: str = "",
        device_args: Sequence[str] = (),
    ) -> None:
        prefix = f"{name}-" if name else ""
        self.frontend_socket = tmp_path / f"{prefix}fe.sock"
        self.device_socket = tmp_path / f"{prefix}dev.sock"
        self.daemons: list[Daemon] = []
        self.device = Daemon(
            ["--socket-path", str(self.frontend_socket), "--vfio-user", str(self.device_socket),
             "--max-queues", "4", *device_args],
            self.device_socket, tmp_path / f"{prefix}device.log", command="device",
        )  # fmt: skip
        self.daemons.append(self.device)
        self.backend = Daemon(
            [backend, "--vvu", str(self.device_socket), *args],
            self.device_socket, tmp_path / f"{prefix}{backend}.log",
        )  # fmt: skip
        self.daemons.append(self.backend)
        deadline = time.monotonic() + 10
        while not self.frontend_socket.exists():
            assert time.monotonic() < deadline, self.device.log()
            time.sleep(0.02)

    def logs(self) -> str:
        return "\n".join(f"--- {d.log_path.name} ---\n{d.log()}" for d in self.daemons)

    def stop(self) -> None:
        for daemon in reversed(self.daemons):
            daemon.stop()


@contextlib.contextmanager
def vvu_rig(
    tmp_path: Path, backend: str, *args: str, device_args: Sequence[str] = ()
) -> Iterator[VvuRig]:
    rig = VvuRig(tmp_path, backend, *args, device_args=device_args)
    try:
        yield rig
    finally:
        rig.stop()
    assert not rig.frontend_socket.exists() and not rig.device_socket.exists()


def _serve(daemons: list[Daemon], tmp_path: Path, name: str, *args: str) -> Daemon:
    socket_path = tmp_path / f"{name}.sock"
    daemon = Daemon(
        [name, "--socket-path", str(socket_path), *args], socket_path, tmp_path / f"{name}.log"
    )
    daemons.append(daemon)
    return daemon


def _blk_behind_a_device(
    daemons: list[Daemon], tmp_path: Path, name: str, *args: str
) -> tuple[Path, Daemon]:
    """`vvu device` and `vvu serve blk --vvu` behind it: the front-end socket and the back-end."""
    rig = VvuRig(tmp_path, "blk", *args, name=name)
    daemons.extend(rig.daemons)
    return rig.frontend_socket, rig.backend


def _blk_daemon(
    daemons: list[Daemon], tmp_path: Path, name: str, path: str, *args: str
) -> tuple[Path, Daemon]:
    """`vvu serve blk` on AF_UNIX ("unix") or behind a VVU device of its own ("vvu"): the
    socket front-ends connect to, and the daemon."""
    if path == "vvu":
        return _blk_behind_a_device(daemons, tmp_path, name, *args)
    socket_path = tmp_path / f"{name}.sock"
    daemon = Daemon(
        ["blk", "--socket-path", str(socket_path), *args], socket_path, tmp_path / f"{name}.log"
    )
    daemons.append(daemon)
    return socket_path, daemon


def _vhost_user(device: str, socket_path: Path, *props: str) -> list[str]:
    chardev = f"socket,id=vu0,path={qemu_escape(str(socket_path))}"
    return ["-chardev", chardev, "-device", ",".join([device, "chardev=vu0", *props])]


def _run_guest(
    script: str, qemu_args: Sequence[str], daemon: Daemon, *, append: str = "", qemu: str = QEMU
) -> list[str]:
    """Boot a guest running `script` (kernel arguments `append`) under the QEMU binary `qemu`;
    its output lines. Its QEMU and temp directory are gone on return."""
    with start_guest(
        script, qemu_args=qemu_args, timeout=TIMEOUT, append=append, qemu=qemu
    ) as guest:
        try:
            result = guest.wait()
        except GuestError as err:
            raise AssertionError(f"{err}\n--- daemon log ---\n{daemon.log()}") from err
    assert not guest.workdir.exists()
    assert result.exit_status == 0, f"{result.serial}\n--- daemon log ---\n{daemon.log()}"
    return result.output.split("\n")


def _md5(line: str) -> str:
    """The hash from a `md5sum` output line."""
    digest = line.split(maxsplit=1)[0]
    assert len(digest) == 32, line
    return digest


# --- vhost-user-blk ------------------------------------------------------------------------


def test_blk_guest_writes_and_a_second_guest_on_the_same_daemon_reads_back(
    tmp_path: Path, serve: list[Daemon]
) -> None:
    image = tmp_path / "disk.img"
    header = b"vvu-host-wrote-this\n"
    with image.open("wb") as f:
        f.write(header)
        f.truncate(DISK_SIZE)
    offset, length = 2 * MiB, 4 * MiB
    daemon = _serve(serve, tmp_path, "blk", "--image", str(image), "--num-queues", "1")
    devices = _vhost_user("vhost-user-blk-pci", daemon.socket_path, "num-queues=1")

    # Guest 1: random data (md5 printed) to the disk with O_DIRECT and an fsync (FLUSH), then
    # read back with O_DIRECT and once more through the page cache after dropping it.
    first = f"""
set -e
cat /sys/block/vda/size /sys/block/vda/ro
head -c {len(header)} /dev/vda
head -c {length} /dev/urandom > /tmp/pattern
md5sum /tmp/pattern
dd if=/tmp/pattern of=/dev/vda bs=1M seek={offset // MiB} oflag=direct conv=fsync 2>/dev/null
dd if=/dev/vda bs=1M skip={offset // MiB} count={length // MiB} iflag=direct 2>/dev/null | md5sum
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda bs=1M skip={offset // MiB} count={length // MiB} 2>/dev/null | md5sum
"""
    lines = _run_guest(first, devices, daemon)
    assert lines[0] == str(DISK_SIZE // 512)
    assert lines[1] == "0"
    assert lines[2] == header.decode().strip()
    written = _md5(lines[3])
    assert _md5(lines[4]) == written  # O_DIRECT read-back
    assert _md5(lines[5]) == written  # after drop_caches
    data = image.read_bytes()
    assert hashlib.md5(data[offset : offset + length]).hexdigest() == written
    assert data[: len(header)] == header
    assert data[len(header) : offset].count(0) == offset - len(header)
    assert data[offset + length :].count(0) == DISK_SIZE - offset - length

    # That QEMU is gone; the same daemon (still running) serves a second one.
    assert daemon.running(), daemon.log()
    second = f"""
set -e
cat /sys/block/vda/size
dd if=/dev/vda bs=1M skip={offset // MiB} count={length // MiB} iflag=direct 2>/dev/null | md5sum
"""
    lines = _run_guest(second, devices, daemon)
    assert lines[0] == str(DISK_SIZE // 512)
    assert _md5(lines[1]) == written

    assert daemon.stop() == 0
    log = daemon.log()
    assert log.count("session released") == 2, log
    assert "stopped after 2 front-end session(s)" in log


@contextlib.contextmanager
def _loop_device_or_file(image: Path) -> Iterator[str]:
    """A loop device over `image` (detached by name on exit), or the file itself where the
    machine has no loop devices."""
    try:
        dev = subprocess.run(
            ["losetup", "--find", "--show", str(image)], check=True, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        yield str(image)
        return
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@pytest.mark.parametrize(
    ("qemu_version", "engine"),
    [
        ("7.2", ("--cache", "none", "--aio", "io_uring")),
        ("11", ("--aio", "threads")),
    ],
    ids=["7.2-loop-direct-io_uring", "11-file-threads"],
)
def test_blk_guest_on_a_packed_ring_does_checksummed_io(
    tmp_path: Path, serve: list[Daemon], qemu_version: str, engine: tuple[str, ...]
) -> None:
    """`packed=on`: QEMU and the guest driver negotiate VIRTIO_F_RING_PACKED and the native blk
    worker runs a packed ring; the guest's data reaches the image and reads back intact. Run
    under Debian 12's QEMU 7.2 and under QEMU 11 (scripts/qemu11.sh), the front-end the
    back-end VM tests use: a two-version matrix of the same front-end test. The 7.2 run serves
    a loop device (where the machine has them) with direct I/O through io_uring, the 11 run a
    file through the thread pool; the guest writes with six writers at once, so requests
    complete out of order with several in flight."""
    qemu = QEMU if qemu_version == "7.2" else qemu11()
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(DISK_SIZE)
    offset, length = 1 * MiB, 6 * MiB
    with _loop_device_or_file(image) as disk:
        daemon = _serve(serve, tmp_path, "blk", "--blk-file", disk, "--num-queues", "1", *engine)
        devices = _vhost_user("vhost-user-blk-pci", daemon.socket_path, "num-queues=1", "packed=on")
        writers = "\n".join(
            f"dd if=/tmp/pattern of=/dev/vda bs=64k skip={k * 16} seek={offset // 65536 + k * 16}"
            " count=16 oflag=direct 2>/dev/null &"
            for k in range(length // MiB)
        )
        script = f"""
set -e
cut -c 35 /sys/block/vda/device/features
head -c {length} /dev/urandom > /tmp/pattern
md5sum /tmp/pattern
{writers}
wait
sync
dd if=/dev/vda bs=1M skip={offset // MiB} count={length // MiB} iflag=direct 2>/dev/null | md5sum
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda bs=4k skip={offset // 4096} count={length // 4096} 2>/dev/null | md5sum
"""
        lines = _run_guest(script, devices, daemon, qemu=qemu)
        assert f"aio {engine[-1]}" in daemon.log(), daemon.log()
        assert daemon.stop() == 0
    assert lines[0] == "1", "the guest driver did not negotiate VIRTIO_F_RING_PACKED (bit 34)"
    written = _md5(lines[1])
    assert _md5(lines[2]) == written  # O_DIRECT read-back
    assert _md5(lines[3]) == written  # through the page cache
    data = image.read_bytes()
    assert hashlib.md5(data[offset : offset + length]).hexdigest() == written
    assert data[:offset].count(0) == offset
    assert "running (packed," in daemon.log(), daemon.log()  # `vvu -v` logs each ring's format


def test_blk_read_only_daemon_gives_the_guest_a_read_only_disk(
    tmp_path: Path, serve: list[Daemon]
) -> None:
    image = tmp_path / "ro.img"
    content = random.Random(42).randbytes(MiB)
    with image.open("wb") as f:
        f.write(content)
        f.truncate(DISK_SIZE)
    daemon = _serve(serve, tmp_path, "blk", "--image", str(image), "--read-only")

    script = """
cat /sys/block/vda/ro
dd if=/dev/vda bs=1M count=1 iflag=direct 2>/dev/null | md5sum
if dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct 2>/dev/null; then
    echo write-succeeded
else
    echo write-failed
fi
"""
    devices = _vhost_user("vhost-user-blk-pci", daemon.socket_path, "num-queues=1")
    lines = _run_guest(script, devices, daemon)
    assert lines[0] == "1"
    assert _md5(lines[1]) == hashlib.md5(content).hexdigest()
    assert lines[2] == "write-failed"
    assert image.read_bytes()[:MiB] == content
    assert daemon.stop() == 0


def test_blk_client_mode_finds_qemu_and_reconnects_to_the_next_one(tmp_path: Path) -> None:
    """`vvu serve blk --connect`: QEMU listens (`-chardev socket,server=on,wait=off`) and the
    back-end connects, started before any QEMU so that it first retries; after the first
    guest's QEMU is gone it connects to the next QEMU on the same path by itself."""
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(DISK_SIZE)
    path = tmp_path / "qemu-vhost.sock"
    daemon = Daemon(
        ["blk", "--socket-path", str(path), "--connect", "--blk-file", str(image)],
        path, tmp_path / "blk.log", wait=False,
    )  # fmt: skip
    try:
        time.sleep(0.3)
        assert daemon.running(), daemon.log()
        chardev = f"socket,id=vu0,path={qemu_escape(str(path))},server=on,wait=off"
        devices = ["-chardev", chardev, "-device", "vhost-user-blk-pci,chardev=vu0,num-queues=1"]
        write = f"""
set -e
head -c {MiB} /dev/urandom > /tmp/pattern
md5sum /tmp/pattern
dd if=/tmp/pattern of=/dev/vda bs=1M seek=1 oflag=direct conv=fsync 2>/dev/null
dd if=/dev/vda bs=1M skip=1 count=1 iflag=direct 2>/dev/null | md5sum
"""
        lines = _run_guest(write, devices, daemon)
        written = _md5(lines[0])
        assert _md5(lines[1]) == written
        assert hashlib.md5(image.read_bytes()[MiB : 2 * MiB]).hexdigest() == written
        read = "dd if=/dev/vda bs=1M skip=1 count=1 iflag=direct 2>/dev/null | md5sum\n"
        assert _md5(_run_guest(read, devices, daemon)[0]) == written
        assert daemon.running(), daemon.log()
    finally:
        assert daemon.stop() == 0, daemon.log()
    log = daemon.log()
    assert "cannot connect" in log, log  # it was started before any QEMU listened
    assert log.count("disconnected; session released") == 2, log
    # A QEMU on its way out may still accept one connection before its socket file is gone;
    # that session ends at once (a transport error), and the back-end goes on retrying.
    cut_short = log.count("session released") - 2
    assert cut_short in (0, 1), log
    assert f"stopped after {2 + cut_short} front-end session(s)" in log, log


# --- vhost-user-blk through the virtio-vhost-user device ------------------------------------


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_blk_guest_through_the_vvu_device(
    tmp_path: Path, serve: list[Daemon], packed: bool
) -> None:
    """QEMU's vhost-user-blk-pci connects to `vvu device`; `vvu serve blk --vvu` behind it
    serves the disk through vfio-user. Then a second QEMU on the same device reads it back.
    `packed`: the guest's ring is packed (the device passes VIRTIO_F_RING_PACKED through)."""
    image = tmp_path / "vvu.img"
    with image.open("wb") as f:
        f.truncate(DISK_SIZE)
    rig = VvuRig(tmp_path, "blk", "--image", str(image))
    serve.extend(rig.daemons)
    frontend_socket, device, backend = rig.frontend_socket, rig.device, rig.backend
    offset, length = MiB, 2 * MiB
    props = ["num-queues=1", *(["packed=on"] if packed else [])]
    devices = _vhost_user("vhost-user-blk-pci", frontend_socket, *props)
    first = f"""
set -e
cat /sys/block/vda/size
cut -c 35 /sys/block/vda/device/features
head -c {length} /dev/urandom > /tmp/pattern
md5sum /tmp/pattern
dd if=/tmp/pattern of=/dev/vda bs=1M seek={offset // MiB} oflag=direct conv=fsync 2>/dev/null
dd if=/dev/vda bs=1M skip={offset // MiB} count={length // MiB} iflag=direct 2>/dev/null | md5sum
"""
    lines = _run_guest(first, devices, backend)
    assert lines[0] == str(DISK_SIZE // 512)
    assert lines[1] == ("1" if packed else "0"), "VIRTIO_F_RING_PACKED (bit 34) in the guest"
    written = _md5(lines[2])
    assert _md5(lines[3]) == written
    assert hashlib.md5(image.read_bytes()[offset : offset + length]).hexdigest() == written
    second = f"""
set -e
dd if=/dev/vda bs=1M skip={offset // MiB} count={length // MiB} iflag=direct 2>/dev/null | md5sum
"""
    lines = _run_guest(second, devices, backend)
    assert _md5(lines[0]) == written
    assert backend.stop() == 0, backend.log()
    assert device.stop() == 0, device.log()
    assert "device stopped after 2 front-end session(s)" in device.log(), device.log()


# --- live migration ------------------------------------------------------------------------

#: Where the migrating guest writes: 64 KiB slots from 64 KiB on. Sector 0 is the host's flag
#: to the guest: MIGR (migration under way: fill the page cache now), then STOP.
SLOT = 64 * 1024
SLOTS = 48
CACHED_MIB = (8, 4)  # offset, length in MiB of the region read through the page cache
MIGRATION_TIMEOUT = 150.0
#: The migrating guests. init_on_alloc=0: page cache pages must be written by DMA only, not
#: zeroed by the CPU first (which QEMU would track itself, hiding a missing dirty log).
GUEST_RAM_MIB, GUEST_APPEND = 256, "init_on_alloc=0"


def _migrating_writer() -> str:
    """A guest script. Each pass writes a random 64 KiB slot with O_DIRECT and reads it back (by
    DMA into guest RAM) and looks at the host's flag. At MIGR it reads a region, written with
    known data at the start, into the page cache: pages the back-end writes (DMA) and the
    guest's CPU never does, so only the back-end's dirty log can tell QEMU to copy them again.
    At STOP it checks that region through the page cache (still cached: no I/O), re-reads every
    slot, compares it with the copy kept in RAM, and prints each slot's md5."""
    offset, length = CACHED_MIB
    cached = f"dd if=/dev/vda bs=1M skip={offset} count={length} 2>/dev/null"
    return f"""
set -e
echo "ring packed=$(cut -c 35 /sys/block/vda/device/features)"
head -c {length << 20} /dev/urandom > /tmp/cached
dd if=/tmp/cached of=/dev/vda bs=1M seek={offset} oflag=direct 2>/dev/null
want=$(md5sum < /tmp/cached)
rm /tmp/cached
filled=
i=0
while :; do
  s=$((i % {SLOTS}))
  dd if=/dev/urandom of=/tmp/b$s bs={SLOT} count=1 2>/dev/null
  dd if=/tmp/b$s of=/dev/vda bs={SLOT} seek=$((s + 1)) oflag=direct 2>/dev/null
  dd if=/dev/vda of=/tmp/r bs={SLOT} skip=$((s + 1)) count=1 iflag=direct 2>/dev/null
  cmp /tmp/r /tmp/b$s
  i=$((i + 1))
  echo "pass $i"
  flag=$(dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | head -c 4)
  [ "$flag" = STOP ] && break
  if [ "$flag" = MIGR ] && [ -z "$filled" ]; then
    echo 1 > /proc/sys/vm/drop_caches
    {cached} > /dev/null
    filled=1
    echo filled
  fi
done
got=$({cached} | md5sum)
[ "$got" = "$want" ] && echo "page cache intact" || echo "page cache STALE"
k=0
while [ $k -lt {SLOTS} ] && [ $k -lt $i ]; do
  dd if=/dev/vda of=/tmp/r bs={SLOT} skip=$((k + 1)) count=1 iflag=direct 2>/dev/null
  cmp /tmp/r /tmp/b$k
  echo "slot $k $(md5sum < /tmp/b$k)"
  k=$((k + 1))
done
echo "verified $k slots after $i passes"
"""


def _passes(serial: str) -> list[int]:
    return [int(line.split()[1]) for line in serial.splitlines() if line.startswith("pass ")]


def _set_flag(image: Path, flag: bytes) -> None:
    with image.open("r+b") as disk:
        disk.write(flag)
        os.fsync(disk.fileno())


def _migration_status(qmp: Qmp) -> dict[str, Any]:
    info: dict[str, Any] = qmp.execute("query-migrate")
    assert info.get("status") not in ("failed", "cancelled"), info
    return info


def _migrate_while(qmp: Qmp, uri: str, during: Callable[[], None], timeout: float = 90) -> None:
    """Migrate the source QEMU behind `qmp` to `uri`. While the first copy of RAM is under way
    (slowly) and three quarters of it went by, run `during`: what the back-end writes then
    lands mostly in pages already copied, which only its dirty log gets copied again. Then
    let the migration converge and wait until it completed."""
    deadline = time.monotonic() + timeout
    qmp.execute("migrate-set-parameters", **{"downtime-limit": 0, "max-bandwidth": 8 << 20})
    qmp.execute("migrate", uri=uri)
    while True:
        info = _migration_status(qmp)
        assert info["status"] in ("setup", "active"), f"migration went on too early: {info}"
        ram = info.get("ram", {})
        if ram.get("remaining", 1) * 4 < ram.get("total", 0):
            assert ram["dirty-sync-count"] == 1, f"the first copy is over: {info}"
            break
        assert time.monotonic() < deadline, f"the first copy of RAM is too slow: {info}"
        time.sleep(0.05)
    during()
    info = _migration_status(qmp)
    assert info["status"] == "active", f"migration ended before it was released: {info}"
    # Under TCG a writing guest dirties pages faster than the default 300 ms stop could copy.
    qmp.execute("migrate-set-parameters", **{"downtime-limit": 5000, "max-bandwidth": 1 << 30})
    while (info := _migration_status(qmp)).get("status") != "completed":
        assert time.monotonic() < deadline, f"migration did not complete: {info}"
        time.sleep(0.1)
    assert qmp.execute("query-status")["status"] == "postmigrate"


def _guest_ram(pid: int, size: int) -> Path:
    """The guest RAM of QEMU `pid`: its memfd of `size` bytes (memory-backend-memfd)."""
    found = []
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(entry).startswith("/memfd:") and entry.stat().st_size == size:
                found.append(entry)
    assert len(found) == 1, f"QEMU {pid}: guest RAM memfds {found}"
    return found[0]


def _differing_pages(source: Path, dest: Path, size: int) -> list[int]:
    """Guest-physical addresses of the 4 KiB pages that differ between two RAM images."""
    chunk, page, pages = 1 << 20, 4096, []
    with source.open("rb") as a, dest.open("rb") as b:
        for offset in range(0, size, chunk):
            x, y = a.read(chunk), b.read(chunk)
            if x != y:
                pages += [
                    offset + p for p in range(0, chunk, page) if x[p : p + page] != y[p : p + page]
                ]
    return pages


def _differing_bytes(source: Path, dest: Path, gpa: int) -> int:
    """How many bytes of the 4 KiB page at `gpa` differ between two RAM images."""
    with source.open("rb") as a, dest.open("rb") as b:
        a.seek(gpa)
        b.seek(gpa)
        return sum(x != y for x, y in zip(a.read(4096), b.read(4096), strict=True))


def _describe_pages(source: Path, dest: Path, pages: list[int], limit: int = 8) -> str:
    """What differs in each of (the first `limit` of) `pages`: the differing byte runs and the
    first bytes of each on both sides. The shape tells the writer: 4 bytes at a packed ring's
    device event area, 16 at a used descriptor, a status byte, 512-byte multiples of data."""
    lines = []
    with source.open("rb") as a, dest.open("rb") as b:
        for gpa in pages[:limit]:
            a.seek(gpa)
            b.seek(gpa)
            x, y = a.read(4096), b.read(4096)
            runs: list[tuple[int, int]] = []
            for i in range(4096):
                if x[i] != y[i]:
                    if runs and runs[-1][1] == i:
                        runs[-1] = (runs[-1][0], i + 1)
                    else:
                        runs.append((i, i + 1))
            shown = ", ".join(
                f"[{lo:#x}, {hi:#x}) src {x[lo : min(hi, lo + 16)].hex()} dst "
                f"{y[lo : min(hi, lo + 16)].hex()}"
                for lo, hi in runs[:4]
            )
            lines.append(f"{gpa:#x}: {len(runs)} run(s): {shown}")
    return "\n".join(lines)


def _marked_by(daemon_log: str, gpa: int) -> str:
    """Whether the daemon marked page `gpa` in the dirty log, from the last "pages marked"
    line it wrote (at debug level, when a logging ring stopped)."""
    found = re.findall(r"pages marked in the dirty log: (\S+)( and \d+ more)?", daemon_log)
    if not found:
        return "unknown (no 'pages marked' line)"
    listed, cut = found[-1]
    for part in listed.split(","):
        first, _, last = part.partition("-")
        if part != "none" and int(first, 16) <= gpa <= int(last or first, 16):
            return "marked by the back-end"
    return "unknown (the list was cut)" if cut else "never marked by the back-end"


def _ring_pages(daemon_log: str) -> set[int]:
    """The pages the daemon's rings write (from its "vring N logging:" lines): the descriptor
    ring (packed: used descriptors) and the used ring or device event area, each taken as 2 KiB
    from its address (a 128-entry ring of 16-byte descriptors; a split used ring is smaller)."""
    pages = set()
    for line in re.findall(r"vring \d+ logging: .*", daemon_log):
        for address in re.findall(r" at (0x[0-9a-f]+)", line):
            first = int(address, 16)
            pages |= {first & ~0xFFF, (first + 2047) & ~0xFFF}
    return pages


def _assert_same_ram(src: Guest, dst: Guest, dst_qmp: Qmp, source: Daemon) -> None:
    """Once the destination loaded, with the source stopped and the destination not started:
    every page the source's back-end wrote after QEMU copied it must have been copied again
    (the back-end logged it), so the two RAM images are identical, page for page."""
    deadline = time.monotonic() + 30
    while dst_qmp.execute("query-migrate").get("status") != "completed":
        assert time.monotonic() < deadline, "the destination did not load"
        time.sleep(0.1)
    assert dst_qmp.execute("query-status")["status"] in ("paused", "prelaunch")
    size = GUEST_RAM_MIB << 20
    src_ram, dst_ram = _guest_ram(src.pid, size), _guest_ram(dst.pid, size)
    stale = _differing_pages(src_ram, dst_ram, size)
    daemon_log = source.log()
    marked = {gpa: _marked_by(daemon_log, gpa) for gpa in stale[:8]}
    rings = _ring_pages(daemon_log)
    assert rings, "the source daemon logged no ring addresses"
    found = (
        f"{len(stale)} stale pages: {[hex(p) for p in stale[:16]]}\n"
        f"{_describe_pages(src_ram, dst_ram, stale)}\n"
        f"{', '.join(f'{gpa:#x}: {how}' for gpa, how in marked.items())}; "
        f"ring pages {sorted(hex(p) for p in rings)}"
    )
    # QEMU 7.2's TCG itself now and then loses a guest store during a migration (CI, about 1
    # run in 20; more under load): its dirty tracking marks a page before the store lands, so
    # the migration thread can sync, copy the page and only then see the store, never marked
    # again. What is lost is a few bytes of the guest kernel's own data: slab freelist
    # pointers (a destination guest crashed in kmem_cache_alloc_bulk on one), page-table
    # entries the guest cleared (src zeros, dst 0x8000000009870867-like PTEs and the PMD entry
    # that pointed at them). Such a page may have been a DMA buffer the back-end wrote earlier
    # in the run: "marked" above means ever marked, not marked last. What the back-end writes
    # is data in whole sectors (hundreds of random bytes differ when one is lost; the page
    # cache and slot checks catch those too), status bytes and its rings; that it logs every
    # write, status bytes included, is proved exactly by test_dirty_log.py's emulated
    # migrations, where nothing but the back-end writes. So at most two pages outside the
    # rings that differ by at most 64 bytes are reported, not failed, and copied over from the
    # source before the destination runs, so that what the guest does next tests the
    # back-end, not TCG. More pages, larger differences or a ring page fail.
    vmm_side = len(stale) <= 2 and all(
        gpa not in rings and _differing_bytes(src_ram, dst_ram, gpa) <= 64 for gpa in stale
    )
    assert not stale or vmm_side, found
    if stale:
        warnings.warn(f"left behind by the VMM, not the back-end: {found}", stacklevel=1)
        with src_ram.open("rb") as a, dst_ram.open("r+b") as b:
            for gpa in stale:
                a.seek(gpa)
                b.seek(gpa)
                b.write(a.read(4096))
        assert not _differing_pages(src_ram, dst_ram, size), "the stale pages stayed stale"


def _migration_qemu_args(daemon_socket: Path, qmp: Path, ring: str, *extra: str) -> list[str]:
    return [
        *_vhost_user(
            "vhost-user-blk-pci",
            daemon_socket,
            "num-queues=1",
            "packed=on" if ring == "packed" else "packed=off",
        ),
        "-qmp", f"unix:{qemu_escape(str(qmp))},server=on,wait=off",
        *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("ring", ["split", "packed"])
@pytest.mark.parametrize("path", ["unix", "vvu"])
def test_blk_guest_live_migrates_while_writing_and_its_data_verifies_on_the_destination(
    tmp_path: Path, serve: list[Daemon], path: str, ring: str
) -> None:
    """A guest writes and reads back through `vvu serve blk` while QEMU live-migrates it to a
    second QEMU (`-incoming unix:`) on a second daemon over the same image. The source daemon
    logs every guest-memory write (read data, status bytes, used ring; with `packed=on` the
    used descriptors in the descriptor ring and the device event area) in QEMU's dirty log, so
    the destination guest sees them: the two RAM images are identical page for page, data read
    into its page cache during the migration is intact, its ring goes on, and every slot it
    wrote verifies against its RAM copy and the image file. "vvu": each daemon is behind a VVU
    device of its own (the log is the source device's shmid 2)."""
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(DISK_SIZE)
    blk_args = ("--image", str(image), "--num-queues", "1")
    source_socket, source = _blk_daemon(serve, tmp_path, "blk", path, *blk_args)
    dest_socket, dest = _blk_daemon(serve, tmp_path, "blk-dest", path, *blk_args)
    script = _migrating_writer()
    with tempfile.TemporaryDirectory(prefix="vvu-mig-") as sockets:  # short unix socket paths
        src_qmp_path, dst_qmp_path = Path(sockets, "src.qmp"), Path(sockets, "dst.qmp")
        incoming = f"unix:{Path(sockets, 'migrate.sock')}"
        src_args = _migration_qemu_args(source_socket, src_qmp_path, ring)
        # -S: the destination stays paused after the migration, so its RAM can be compared.
        dst_args = _migration_qemu_args(
            dest_socket, dst_qmp_path, ring, "-incoming", incoming, "-S"
        )

        def guest(args: list[str]) -> Guest:
            return start_guest(
                script,
                qemu_args=args,
                timeout=MIGRATION_TIMEOUT,
                memory=f"{GUEST_RAM_MIB}M",
                append=GUEST_APPEND,
            )

        with (
            guest(src_args) as src,
            guest(dst_args) as dst,
            Qmp(src_qmp_path) as src_qmp,
            Qmp(dst_qmp_path) as dst_qmp,
        ):
            try:
                src.wait_for("pass 3", timeout=60)
                assert dst_qmp.execute("query-status")["status"] == "inmigrate"

                def fill_page_cache() -> None:
                    _set_flag(image, b"MIGR")
                    src.wait_for("filled", timeout=60)

                _migrate_while(src_qmp, incoming, fill_page_cache)
                _assert_same_ram(src, dst, dst_qmp, source)
                dst_qmp.execute("cont")
                # The guest goes on on the destination, I/O included.
                deadline = time.monotonic() + 60
                while len(_passes(dst.serial)) < 3:
                    assert dst.running() and time.monotonic() < deadline, "no passes after"
                    time.sleep(0.1)
                _set_flag(image, b"STOP")
                deadline = time.monotonic() + 60
                while not re.search(r"^VVU-EXIT \d+$", dst.serial, re.MULTILINE):
                    assert dst.running() and time.monotonic() < deadline, "no exit status"
                    time.sleep(0.1)
            except (GuestError, QmpError, AssertionError) as err:
                raise AssertionError(
                    f"{err}\n--- source serial ---\n{src.serial[-3000:]}\n"
                    f"--- destination serial ---\n{dst.serial[-3000:]}\n{dst.stderr}\n"
                    f"--- source daemon ---\n{source.log()[-3000:]}\n"
                    f"--- destination daemon ---\n{dest.log()[-3000:]}"
                ) from err
            # One console stream: a line may be cut by the switch-over, never duplicated.
            console, dst_console = src.serial + dst.serial, dst.serial
    assert "VVU-EXIT 0" in dst_console, dst_console
    assert f"ring packed={int(ring == 'packed')}" in console, "VIRTIO_F_RING_PACKED (bit 34)"
    assert "page cache intact" in dst_console, dst_console
    passes = _passes(console)
    assert passes == list(range(1, len(passes) + 1)), "every pass once, none failed or repeated"
    slots = [line.split() for line in dst_console.splitlines() if line.startswith("slot ")]
    assert f"verified {len(slots)} slots after {passes[-1]} passes" in dst_console
    data = image.read_bytes()
    for _, index, digest, *_ in slots:
        start = (int(index) + 1) * SLOT
        assert hashlib.md5(data[start : start + SLOT]).hexdigest() == digest, f"slot {index}"
    # The source really logged into QEMU's dirty log, and lost nothing doing it.
    assert "dirty log mapped" in source.log(), source.log()
    assert "could not be logged" not in source.log() + dest.log()


@pytest.mark.parametrize("path", ["unix", "vvu"])
def test_blk_guest_sees_the_disk_grow_when_the_daemon_gets_sighup(
    tmp_path: Path, serve: list[Daemon], path: str
) -> None:
    """The image grows under a running guest; SIGHUP makes `vvu serve blk` re-read its size and
    send BACKEND_CONFIG_CHANGE_MSG (directly, or through the VVU device's txq); QEMU re-reads
    the config space and the guest's driver sees the new capacity, and reads the new end. Then
    the guest switches the write cache off (CONFIG_WCE: SET_CONFIG of `writeback`)."""
    image = tmp_path / "grow.img"
    with image.open("wb") as f:
        f.truncate(DISK_SIZE)
    grown = 2 * DISK_SIZE
    marker = b"vvu-beyond-the-old-end"
    if path == "unix":
        daemon = _serve(serve, tmp_path, "blk", "--image", str(image))
        frontend_socket = daemon.socket_path
    else:
        rig = VvuRig(tmp_path, "blk", "--image", str(image))
        serve.extend(rig.daemons)
        frontend_socket, daemon = rig.frontend_socket, rig.backend
    last = grown // 512 - 1
    script = f"""
cat /sys/block/vda/size
echo vvu-waiting-for-resize
i=0
while [ "$(cat /sys/block/vda/size)" = "{DISK_SIZE // 512}" ] && [ $i -lt 40 ]; do
    sleep 1; i=$((i + 1))
done
cat /sys/block/vda/size
dd if=/dev/vda bs=512 skip={last} count=1 iflag=direct 2>/dev/null | head -c {len(marker)}
echo
cat /sys/block/vda/cache_type
echo "write through" > /sys/block/vda/cache_type
cat /sys/block/vda/cache_type
"""
    devices = _vhost_user("vhost-user-blk-pci", frontend_socket, "num-queues=1")
    with start_guest(script, qemu_args=devices, timeout=TIMEOUT) as guest:
        try:
            guest.wait_for("vvu-waiting-for-resize")
            with image.open("r+b") as f:
                f.truncate(grown)
                f.seek(grown - 512)
                f.write(marker)
            daemon.proc.send_signal(signal.SIGHUP)
            result = guest.wait()
        except GuestError as err:
            raise AssertionError(f"{err}\n--- daemon log ---\n{daemon.log()}") from err
    assert result.exit_status == 0, f"{result.serial}\n--- daemon log ---\n{daemon.log()}"
    lines = result.output.split("\n")
    assert lines[0] == str(DISK_SIZE // 512)
    assert lines[2] == str(grown // 512), daemon.log()
    assert lines[3] == marker.decode()
    # CONFIG_WCE: the guest's cache mode change reaches the daemon as SET_CONFIG (blk state).
    assert lines[4:6] == ["write back", "write through"]
    assert "set the write cache to write through" in daemon.log()
    assert "front-end told" in daemon.log()
    assert daemon.stop() == 0, daemon.log()


# --- vhost-user-blk behind a vIOMMU ----------------------------------------------------------


# Whether bit 33 (VIRTIO_F_ACCESS_PLATFORM) was negotiated, whether vda sits behind the IOMMU,
# then a random pattern written with O_DIRECT and read back, as md5 sums.
_VIOMMU_SCRIPT = """
set -e
cut -c34 /sys/block/vda/device/features
test -d /sys/block/vda/device/../iommu_group && echo in-an-iommu-group
head -c {length} /dev/urandom > /tmp/pattern
md5sum /tmp/pattern
dd if=/tmp/pattern of=/dev/vda bs=64K seek={seek} oflag=direct conv=fsync 2>/dev/null
dd if=/dev/vda bs=64K skip={seek} count={count} iflag=direct 2>/dev/null | md5sum
"""
_VIOMMU_BLOCK = 64 * 1024


def _viommu_script(offset: int, length: int) -> str:
    return _VIOMMU_SCRIPT.format(
        length=length, seek=offset // _VIOMMU_BLOCK, count=length // _VIOMMU_BLOCK
    )


def _viommu_blk(socket_path: Path) -> list[str]:
    """q35 with an Intel IOMMU (device IOTLB, so QEMU relays the guest's invalidations) and
    vhost-user-blk-pci with iommu_platform and ATS behind a PCIe root port (PCI Express, as ATS
    needs, and modern-only)."""
    return [
        "-machine", "q35,kernel-irqchip=split",
        "-device", "intel-iommu,intremap=on,device-iotlb=on",
        "-device", "pcie-root-port,id=rp0,bus=pcie.0,chassis=1",
        *_vhost_user(
            "vhost-user-blk-pci", socket_path,
            "bus=rp0", "num-queues=1", "iommu_platform=on", "ats=on",
        ),
    ]  # fmt: skip


def test_blk_guest_behind_a_viommu_does_checksummed_io_through_the_iotlb(
    tmp_path: Path, serve: list[Daemon]
) -> None:
    """q35 with an emulated Intel IOMMU (device IOTLB) in front of vhost-user-blk-pci with
    iommu_platform and ATS: the guest's DMA addresses are IOVAs, so the daemon reaches the rings
    and every buffer through IOTLB updates (answers to its misses) and drops them at QEMU's
    invalidations. The guest writes a random pattern, reads it back, and the host checks the
    image."""
    image = tmp_path / "iommu.img"
    with image.open("wb") as f:
        f.truncate(DISK_SIZE)
    offset, length = MiB, 2 * MiB
    daemon = _serve(serve, tmp_path, "blk", "--image", str(image))
    script = _viommu_script(offset, length)
    devices = _viommu_blk(daemon.socket_path)
    lines = _run_guest(script, devices, daemon, append="intel_iommu=on")
    assert lines[0] == "1", "VIRTIO_F_ACCESS_PLATFORM (bit 33) was not negotiated"
    assert lines[1] == "in-an-iommu-group"
    written = _md5(lines[2])
    assert _md5(lines[3]) == written
    assert hashlib.md5(image.read_bytes()[offset : offset + length]).hexdigest() == written
    assert daemon.stop() == 0, daemon.log()
    log = daemon.log()
    # The translations came from the IOMMU, on demand, and were withdrawn again.
    assert "type=UPDATE" in log and "type=INVALIDATE" in log, log[-5000:]
    assert "IOTLB miss at iova" in log, log[-5000:]


def test_blk_guest_behind_a_viommu_through_the_vvu_device(
    tmp_path: Path, serve: list[Daemon]
) -> None:
    """The same vIOMMU guest on `vvu device`, with `vvu serve blk --vvu` behind it: IOTLB
    messages travel through the virtio-vhost-user device like any other (rxq), the misses the
    other way (txq to the front-end's back-end channel)."""
    image = tmp_path / "vvu-iommu.img"
    with image.open("wb") as f:
        f.truncate(DISK_SIZE)
    rig = VvuRig(tmp_path, "blk", "--image", str(image))
    serve.extend(rig.daemons)
    frontend_socket, device, backend = rig.frontend_socket, rig.device, rig.backend
    offset, length = MiB, MiB
    lines = _run_guest(
        _viommu_script(offset, length),
        _viommu_blk(frontend_socket),
        backend,
        append="intel_iommu=on",
    )
    assert lines[:2] == ["1", "in-an-iommu-group"]
    written = _md5(lines[2])
    assert _md5(lines[3]) == written
    assert hashlib.md5(image.read_bytes()[offset : offset + length]).hexdigest() == written
    assert backend.stop() == 0, backend.log()
    assert device.stop() == 0, device.log()
    assert "IOTLB miss at iova" in backend.log()


# --- vhost-user-rng ------------------------------------------------------------------------


def test_rng_guest_reads_hwrng_from_the_daemon(tmp_path: Path, serve: list[Daemon]) -> None:
    daemon = _serve(serve, tmp_path, "rng")
    script = """
set -e
cat /sys/class/misc/hw_random/rng_current
head -c 128 /dev/hwrng > /tmp/r
wc -c < /tmp/r
od -An -v -tx1 /tmp/r | tr -d ' \\n'; echo
"""
    # vhost-user-rng-pci is QEMU's name for it (`qemu-system-x86_64 -device help`).
    devices = _vhost_user("vhost-user-rng-pci", daemon.socket_path)
    lines = _run_guest(script, devices, daemon)
    assert lines[0].startswith("virtio_rng")  # the guest has no other hardware RNG
    assert int(lines[1]) == 128
    data = bytes.fromhex(lines[2])
    assert len(data) == 128
    assert len(set(data)) > 16  # neither zeros nor a constant fill
    assert daemon.stop() == 0
    assert "session released" in daemon.log()
