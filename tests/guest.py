"""Boot a tiny Linux guest under QEMU (TCG) and run a shell script in it, for integration tests.

The image (Debian's cloud kernel, static busybox, the virtio modules and an /init) is built by
``scripts/guest-image.sh`` into ``.cache/guest/``. The test's script reaches the guest as a QEMU
fw_cfg file (``opt/vvu/script``); /init runs it with ``sh``, prints its stdout and stderr on the
serial console between ``VVU-RESULT-BEGIN`` and ``VVU-RESULT-END``, then ``VVU-EXIT <status>``,
and powers off. Guest RAM is a shared memfd (``share=on``), as vhost-user back-ends need.

Typical use::

    result = run_guest("md5sum /dev/vda", qemu_args=["-device", "virtio-blk-pci,drive=d0", ...])
    assert result.exit_status == 0, result.serial

To run a back-end and one or more guests concurrently, use :func:`start_guest` (returns a running
:class:`Guest`; ``wait()``/``await wait_async()`` collect the result; ``stop()`` or the context
manager always ends QEMU) or :func:`run_guest_async`.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import pytest

REPO = Path(__file__).resolve().parent.parent
IMAGE_SCRIPT = REPO / "scripts" / "guest-image.sh"
QEMU11_SCRIPT = REPO / "scripts" / "qemu11.sh"
QEMU = "qemu-system-x86_64"
FW_CFG_NAME = "opt/vvu/script"
BEGIN = "VVU-RESULT-BEGIN"
END = "VVU-RESULT-END"
EXIT = "VVU-EXIT"
DEFAULT_MEMORY = "512M"
STOP_GRACE = 5.0
# Lines of serial log quoted in error messages (the full log is on the exception).
LOG_TAIL_LINES = 60

_EXIT_RE = re.compile(rf"^{EXIT} (\d+)$", re.MULTILINE)
_BEGIN_RE = re.compile(rf"^{BEGIN}\n", re.MULTILINE)


#: Image flavours of scripts/guest-image.sh: "small" (cloud kernel) for front-end guests, "vm"
#: (generic kernel with virtio-9p and VFIO) for guests that run the host's vvu (host_root_args).
FLAVOUR_CACHE = {"small": "guest", "vm": "guest-vm"}


def _cache_dir(flavour: str) -> Path:
    if flavour == "small" and "VVU_GUEST_CACHE" in os.environ:
        return Path(os.environ["VVU_GUEST_CACHE"])
    return REPO / ".cache" / FLAVOUR_CACHE[flavour]


@dataclass(frozen=True)
class GuestImage:
    """What ``scripts/guest-image.sh`` built."""

    kernel: Path
    initrd: Path
    kernel_version: str
    modules: tuple[str, ...]


@dataclass(frozen=True)
class GuestResult:
    """One finished guest run."""

    output: str
    """Everything the script wrote (stdout and stderr), exactly, with ``\\n`` line ends."""
    exit_status: int
    """The script's exit status as the guest reported it."""
    serial: str
    """The whole serial console log (kernel boot messages included)."""
    stderr: str
    """QEMU's own stderr."""
    duration: float
    """Seconds from starting QEMU until it exited."""
    boot_seconds: float | None
    """Seconds from starting QEMU until the script started."""

    def check(self) -> Self:
        """Return self if the script succeeded, else raise :class:`GuestError`."""
        if self.exit_status != 0:
            raise GuestError(
                f"guest script exited with status {self.exit_status}",
                serial=self.serial,
                stderr=self.stderr,
            )
        return self


class GuestError(Exception):
    """The guest did not report a result (or ``check()`` found a failure)."""

    def __init__(self, message: str, *, serial: str, stderr: str) -> None:
        super().__init__(message)
        self.message = message
        self.serial = serial
        self.stderr = stderr

    def __str__(self) -> str:
        lines = self.serial.splitlines()
        tail = "\n".join(lines[-LOG_TAIL_LINES:])
        cut = ""
        if len(lines) > LOG_TAIL_LINES:
            cut = f" (last {LOG_TAIL_LINES} of {len(lines)} lines)"
        text = f"{self.message}\n--- serial console{cut} ---\n{tail}\n--- end of serial console ---"
        if self.stderr.strip():
            text += f"\n--- qemu stderr ---\n{self.stderr.rstrip()}"
        return text


class GuestTimeout(GuestError):
    """The guest ran past its timeout; QEMU was stopped."""


class GuestUnavailable(Exception):
    """QEMU or the guest image cannot be had on this machine."""


# --- the image ------------------------------------------------------------------------------


def build_image(flavour: str = "small") -> GuestImage:
    """Run ``scripts/guest-image.sh`` (instant when cached) and describe its outputs."""
    if shutil.which(QEMU) is None:
        raise GuestUnavailable(f"{QEMU} not found (scripts/setup.sh installs qemu-system-x86)")
    env = dict(os.environ)
    if flavour != "small":
        env.pop("VVU_GUEST_CACHE", None)
    _run_setup_script(IMAGE_SCRIPT, "--flavour", flavour, env=env)
    cache = _cache_dir(flavour)
    built = _read_env(cache / "image.env")
    return GuestImage(
        kernel=cache / "vmlinuz",
        initrd=cache / "initramfs.cpio.gz",
        kernel_version=built.get("KERNEL_VERSION", ""),
        modules=tuple(built.get("MODULES", "").split()),
    )


def _read_env(path: Path) -> dict[str, str]:
    """KEY=value lines (values optionally double-quoted), as the set-up scripts write them."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key] = value.strip('"')
    return values


@functools.cache
def _image_once(flavour: str) -> GuestImage | GuestUnavailable:
    try:
        return build_image(flavour)
    except GuestUnavailable as exc:
        return exc


def _run_setup_script(script: Path, *args: str, env: dict[str, str] | None = None) -> None:
    """Run one of the cached set-up scripts; GuestUnavailable with its stderr if it fails."""
    proc = subprocess.run(
        ["bash", str(script), *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        raise GuestUnavailable(
            f"scripts/{script.name} failed with status {proc.returncode}: "
            f"{proc.stderr.strip()[-2000:]}"
        )


def build_qemu11() -> str:
    """Run ``scripts/qemu11.sh`` (instant when cached): the QEMU 11 launcher's path."""
    _run_setup_script(QEMU11_SCRIPT)
    return str(REPO / ".cache" / "qemu11" / "qemu-system-x86_64")


@functools.cache
def _qemu11_once() -> str | GuestUnavailable:
    try:
        return build_qemu11()
    except GuestUnavailable as exc:
        return exc


def qemu11() -> str:
    """QEMU 11 (the first line with a ``vfio-user-pci`` client), from the trixie root that
    ``scripts/qemu11.sh`` builds; skips (fails in CI) like :func:`guest_image`."""
    found = _qemu11_once()
    if isinstance(found, GuestUnavailable):
        if _must_have_guest():
            pytest.fail(f"QEMU 11 required but unavailable: {found}", pytrace=False)
        pytest.skip(f"no QEMU 11: {found}")
    return found


def _must_have_guest() -> bool:
    """In CI (``CI`` set) or with ``VVU_GUEST_REQUIRED=1`` a missing guest fails, not skips."""
    return bool(os.environ.get("CI")) or os.environ.get("VVU_GUEST_REQUIRED") == "1"


def guest_image(flavour: str = "small") -> GuestImage:
    """The guest image, built once per session; skips the calling test if it cannot be had.

    Where the guest is required (CI), the test fails instead, so a broken set-up is not hidden.
    """
    image = _image_once(flavour)
    if isinstance(image, GuestUnavailable):
        if _must_have_guest():
            pytest.fail(f"guest image required but unavailable: {image}", pytrace=False)
        pytest.skip(f"no QEMU guest: {image}")
    return image


# --- running QEMU ---------------------------------------------------------------------------


def qemu_escape(value: str) -> str:
    """Escape a value for a QEMU ``key=value,...`` option (commas are doubled)."""
    return value.replace(",", ",,")


def qemu_command(
    image: GuestImage,
    script_file: Path,
    qemu_args: Sequence[str],
    *,
    memory: str = DEFAULT_MEMORY,
    append: str = "",
    qemu: str = QEMU,
    memory_file: Path | None = None,
) -> list[str]:
    """The full QEMU command line for one guest run (without the pdeathsig wrapper).

    Guest RAM is a shared memfd, or the file `memory_file` (shared) when given.
    """
    cmdline = f"console=ttyS0 panic=-1 {append}".strip()
    backend = f"memory-backend-memfd,id=mem,size={memory},share=on"
    if memory_file is not None:
        backend = (
            f"memory-backend-file,id=mem,size={memory},share=on,"
            f"mem-path={qemu_escape(str(memory_file))}"
        )
    return [
        qemu,
        "-accel", "tcg",
        "-nodefaults", "-no-user-config",
        "-nographic", "-serial", "stdio",
        "-no-reboot",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initrd),
        "-append", cmdline,
        "-object", backend,
        "-numa", "node,memdev=mem",
        "-m", memory,
        "-fw_cfg", f"name={FW_CFG_NAME},file={qemu_escape(str(script_file))}",
        *qemu_args,
    ]  # fmt: skip


#: A "vm" flavour guest that runs the host's own programs (vvu's venv, fio): QEMU shares the
#: host's whole file system read-only over virtio-9p, and the script starts with HOST_ROOT_SETUP,
#: which mounts it at /host with the guest's own /proc, /sys, /dev and /tmp on top and defines
#: `host CMD...` (run CMD there, chrooted). Nothing is written to the host through it.
HOST_ROOT_ARGS = (
    "-virtfs",
    "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
)
HOST_ROOT_SETUP = """\
mkdir -p /host
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000 hostroot /host || exit 90
mount -t proc proc /host/proc && mount -t sysfs sysfs /host/sys &&
    mount -t devtmpfs devtmpfs /host/dev && mount -t tmpfs tmpfs /host/tmp || exit 91
host() {
    chroot /host env PYTHONDONTWRITEBYTECODE=1 HOME=/tmp PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"
}
"""
#: A q35 machine with a vIOMMU, so the guest can give a PCI function to a userspace driver
#: through VFIO type1 (Debian's kernels have no VFIO no-IOMMU mode); pass VIOMMU_APPEND too.
VIOMMU_ARGS = ("-machine", "q35", "-device", "intel-iommu,intremap=on,caching-mode=on")
VIOMMU_APPEND = "intel_iommu=on"


def vfio_user_pci_args(socket_path: Path, *, addr: str | None = None) -> list[str]:
    """QEMU ≥ 10.1's vfio-user client for the vfio-user server on `socket_path` (its `socket`
    property is a SocketAddress, hence the JSON form), at PCI slot `addr` when given."""
    device: dict[str, Any] = {
        "driver": "vfio-user-pci",
        "socket": {"path": str(socket_path), "type": "unix"},
    }
    if addr is not None:
        device["addr"] = addr
    return ["-device", json.dumps(device)]


_LIVE: set[Guest] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_all() -> None:
    for guest in live_guests():
        guest.stop()


def live_guests() -> list[Guest]:
    """Guests started and not yet stopped (for leak checks in tests)."""
    with _LIVE_LOCK:
        return list(_LIVE)


class _Reader(threading.Thread):
    """Drains one of QEMU's pipes so QEMU never blocks on it; notifies waiters.

    Notes the time ``watch`` first went by (for :attr:`GuestResult.boot_seconds`).
    """

    def __init__(
        self, pipe: IO[bytes], cond: threading.Condition, name: str, watch: bytes = b""
    ) -> None:
        super().__init__(name=name, daemon=True)
        self._pipe = pipe
        self._cond = cond
        self._chunks: list[bytes] = []
        self._watch = watch
        self._tail = b""
        self.watch_seen_at: float | None = None

    def run(self) -> None:
        fd = self._pipe.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            if chunk and self._watch and self.watch_seen_at is None:
                window = self._tail + chunk
                if self._watch in window:
                    self.watch_seen_at = time.monotonic()
                self._tail = window[-len(self._watch) :]
            with self._cond:
                if chunk:
                    self._chunks.append(chunk)
                self._cond.notify_all()
            if not chunk:
                return

    def text(self) -> str:
        with self._cond:
            data = b"".join(self._chunks)
        return data.decode("utf-8", errors="replace").replace("\r\n", "\n")


class Guest:
    """One running QEMU guest. Made by :func:`start_guest`; always ends in :meth:`stop`."""

    def __init__(
        self,
        script: str,
        *,
        qemu_args: Sequence[str] = (),
        timeout: float = 120.0,
        memory: str = DEFAULT_MEMORY,
        append: str = "",
        image: GuestImage | None = None,
        qemu: str = QEMU,
        memory_file: Path | None = None,
    ) -> None:
        self.image = image if image is not None else guest_image()
        self.timeout = timeout
        self.workdir = Path(tempfile.mkdtemp(prefix=f"vvu-guest-{os.getpid()}-"))
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self._stopped = False
        self._finished: float | None = None
        try:
            script_file = self.workdir / "script.sh"
            script_file.write_text(script)
            self.command = qemu_command(
                self.image,
                script_file,
                qemu_args,
                memory=memory,
                append=append,
                qemu=qemu,
                memory_file=memory_file,
            )
            argv = list(self.command)
            setpriv = shutil.which("setpriv")
            if setpriv is not None:
                # QEMU gets SIGKILL if this (thread of the) test process dies without cleaning up.
                # setpriv execs QEMU, so the PID below is QEMU's.
                argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
            self.started = time.monotonic()
            self.deadline = self.started + timeout
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except BaseException:
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise
        assert self.proc.stdout is not None and self.proc.stderr is not None
        with _LIVE_LOCK:
            _LIVE.add(self)
        self._out = _Reader(self.proc.stdout, self._cond, f"qemu-{self.pid}-serial", BEGIN.encode())
        self._err = _Reader(self.proc.stderr, self._cond, f"qemu-{self.pid}-stderr")
        self._out.start()
        self._err.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def serial(self) -> str:
        """The serial console so far."""
        return self._out.text()

    @property
    def stderr(self) -> str:
        """QEMU's stderr so far."""
        return self._err.text()

    def running(self) -> bool:
        return self.proc.poll() is None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _remaining(self, timeout: float | None) -> float:
        if timeout is None:
            return self.deadline - time.monotonic()
        return min(timeout, self.deadline - time.monotonic())

    def _seen(self, text: str) -> bool:
        return text in self._out.text()

    def wait_for(self, text: str, timeout: float | None = None) -> None:
        """Block until ``text`` appears on the serial console.

        Raises :class:`GuestTimeout` (after stopping QEMU) when the timeout (default: what is left
        of the guest's own) runs out, and :class:`GuestError` if QEMU exits first.
        """
        end = time.monotonic() + self._remaining(timeout)
        with self._cond:
            while not self._seen(text):
                if not self._out.is_alive():
                    break
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.5))
        if self._seen(text):
            return
        if self.running():
            self._fail_timeout(f"{text!r} did not appear on the serial console in time")
        self.stop()  # QEMU has exited: this also drains the last of its output
        if self._seen(text):
            return
        raise GuestError(
            f"QEMU exited (status {self.proc.returncode}) before {text!r} appeared",
            serial=self.serial,
            stderr=self.stderr,
        )

    async def wait_for_async(self, text: str, timeout: float | None = None) -> None:
        """:meth:`wait_for` without blocking the event loop."""
        end = time.monotonic() + self._remaining(timeout)
        while not self._seen(text) and self.running() and time.monotonic() < end:
            await asyncio.sleep(0.05)
        self.wait_for(text, timeout=0)

    def wait(self, timeout: float | None = None) -> GuestResult:
        """Wait for QEMU to exit and parse the result; QEMU is stopped whatever happens.

        ``timeout`` defaults to what is left of the guest's own timeout.
        """
        try:
            self.proc.wait(timeout=max(self._remaining(timeout), 0))
        except subprocess.TimeoutExpired:
            self._fail_timeout(self._still_running())
        finally:
            self.stop()
        return self._result()

    async def wait_async(self, timeout: float | None = None) -> GuestResult:
        """:meth:`wait` without blocking the event loop (QEMU is stopped on cancellation too)."""
        end = time.monotonic() + self._remaining(timeout)
        try:
            while self.running() and time.monotonic() < end:
                await asyncio.sleep(0.05)
            if self.running():
                self._fail_timeout(self._still_running())
        finally:
            self.stop()
        return self._result()

    def _still_running(self) -> str:
        return f"guest still running after {time.monotonic() - self.started:.1f}s"

    def _fail_timeout(self, message: str) -> None:
        self.stop()
        raise GuestTimeout(
            f"{message}; QEMU (pid {self.pid}) was stopped",
            serial=self.serial,
            stderr=self.stderr,
        )

    def stop(self, grace: float = STOP_GRACE) -> None:
        """End QEMU by its PID (SIGTERM, then SIGKILL after ``grace`` s) and remove temp files.

        Idempotent; safe from any thread.
        """
        with self._lock:
            if self._stopped:
                return
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self._out.join(timeout=grace)
            self._err.join(timeout=grace)
            for pipe in (self.proc.stdout, self.proc.stderr):
                if pipe is not None:
                    pipe.close()
            self._finished = time.monotonic()
            shutil.rmtree(self.workdir, ignore_errors=True)
            self._stopped = True
            with _LIVE_LOCK:
                _LIVE.discard(self)

    def _result(self) -> GuestResult:
        serial, stderr = self.serial, self.stderr
        output, status = parse_serial(serial)
        boot_at = self._out.watch_seen_at
        if status is None:
            raise GuestError(
                f"guest reported no result (QEMU exit status {self.proc.returncode})",
                serial=serial,
                stderr=stderr,
            )
        return GuestResult(
            output=output,
            exit_status=status,
            serial=serial,
            stderr=stderr,
            duration=(self._finished or time.monotonic()) - self.started,
            boot_seconds=None if boot_at is None else boot_at - self.started,
        )


def parse_serial(serial: str) -> tuple[str, int | None]:
    """Extract (script output, exit status) from a serial log; status is None if not reported."""
    begin = _BEGIN_RE.search(serial)
    if begin is None:
        return "", None
    rest = serial[begin.end() :]
    end = rest.rfind(f"\n{END}\n")
    if end < 0:
        return rest, None
    match = _EXIT_RE.search(rest, end)
    return rest[:end], None if match is None else int(match.group(1))


def start_guest(
    script: str,
    *,
    qemu_args: Sequence[str] = (),
    timeout: float = 120.0,
    memory: str = DEFAULT_MEMORY,
    append: str = "",
    image: GuestImage | None = None,
    qemu: str = QEMU,
    memory_file: Path | None = None,
) -> Guest:
    """Start QEMU running ``script`` in the guest and return at once (see :class:`Guest`).

    `qemu`: the QEMU binary (e.g. :func:`qemu11`); `memory_file`: back guest RAM with this
    file (shared) instead of a memfd, for a device that must be told the file up front.
    """
    return Guest(
        script,
        qemu_args=qemu_args,
        timeout=timeout,
        memory=memory,
        append=append,
        image=image,
        qemu=qemu,
        memory_file=memory_file,
    )


def run_guest(
    script: str,
    *,
    qemu_args: Sequence[str] = (),
    timeout: float = 120.0,
    memory: str = DEFAULT_MEMORY,
    append: str = "",
    image: GuestImage | None = None,
) -> GuestResult:
    """Boot a guest, run ``script`` (a ``sh`` script) in it, return its output and status.

    ``qemu_args`` are the test's devices etc. Raises :class:`GuestTimeout` after ``timeout`` s
    and :class:`GuestError` if the guest reports no result; QEMU is stopped in every case.
    """
    with start_guest(
        script, qemu_args=qemu_args, timeout=timeout, memory=memory, append=append, image=image
    ) as guest:
        return guest.wait()


async def run_guest_async(
    script: str,
    *,
    qemu_args: Sequence[str] = (),
    timeout: float = 120.0,
    memory: str = DEFAULT_MEMORY,
    append: str = "",
    image: GuestImage | None = None,
) -> GuestResult:
    """:func:`run_guest` for asyncio tests: the event loop (e.g. a back-end) keeps running."""
    with start_guest(
        script, qemu_args=qemu_args, timeout=timeout, memory=memory, append=append, image=image
    ) as guest:
        return await guest.wait_async()


def vhost_user_net_args(index: int, socket_path: str, mac: str, options: str = "") -> list[str]:
    """QEMU arguments for virtio-net device `index` on a vhost-user back-end at `socket_path`
    (`options`: more virtio-net-pci properties, e.g. ``guest_tso4=off``). INTx only
    (vectors=0): Debian 12's QEMU 7.2 crashes starting a vhost-user netdev with MSI-X."""
    device = f"virtio-net-pci,netdev=n{index},mac={mac},vectors=0"
    if options:
        device += f",{options}"
    return [
        "-chardev", f"socket,id=c{index},path={qemu_escape(socket_path)}",
        "-netdev", f"vhost-user,id=n{index},chardev=c{index}",
        "-device", device,
    ]  # fmt: skip


#: Shell for a guest with two virtio-net devices (eth0, eth1) on one link: eth1 goes into a new
#: network namespace (its holder's pid in $NS) so that traffic between 10.0.0.2 (eth0) and
#: 10.0.0.3 (eth1) crosses the link, and busybox httpd serves /tmp/www on port 8080 on both.
NET_PAIR_SETUP = """
mkdir -p /tmp/www
unshare -n sleep 600 &
NS=$!
# Until unshare has made the new namespace (a check, not a delay).
while [ "$(readlink /proc/$NS/ns/net)" = "$(readlink /proc/self/ns/net)" ]; do :; done
ip link set eth1 netns $NS
nsenter -t $NS -n sh -c 'ip link set lo up; ip link set eth1 up; ip addr add 10.0.0.3/24 dev eth1'
ip link set eth0 up
ip addr add 10.0.0.2/24 dev eth0
httpd -p 10.0.0.2:8080 -h /tmp/www
nsenter -t $NS -n httpd -p 10.0.0.3:8080 -h /tmp/www
"""


class QmpError(Exception):
    """QEMU answered a QMP command with an error (or the monitor went away)."""


class Qmp:
    """A minimal client for QEMU's QMP monitor on a unix socket (``-qmp unix:PATH,server=on,
    wait=off``): one command at a time, answers returned, asynchronous events kept in
    :attr:`events`. Every read is bounded by ``timeout``."""

    def __init__(self, path: Path, *, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        self.events: list[dict[str, Any]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            while True:  # QEMU creates the socket shortly after it starts
                try:
                    self._sock.connect(str(path))
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            self._file = self._sock.makefile("rwb")
            greeting = self._read()
            if "QMP" not in greeting:
                raise QmpError(f"not a QMP greeting: {greeting}")
            self.execute("qmp_capabilities")
        except BaseException:
            self._sock.close()
            raise

    def _read(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise QmpError("QEMU closed the QMP connection")
        message: dict[str, Any] = json.loads(line)
        return message

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run one command; returns its ``return`` value or raises :class:`QmpError`."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._file.write(json.dumps(request).encode() + b"\n")
        self._file.flush()
        while True:
            message = self._read()
            if "event" in message:
                self.events.append(message)
            elif "error" in message:
                raise QmpError(f"{command}: {message['error'].get('desc', message['error'])}")
            elif "return" in message:
                return message["return"]

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def child_pids(parent: int | None = None) -> set[int]:
    """PIDs of the live children of `parent` (this process by default; for tests that must
    leave none behind)."""
    me = str(os.getpid() if parent is None else parent)
    children: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        if stat.rsplit(")", 1)[1].split()[1] == me:
            children.add(int(entry.name))
    return children
