"""Done-when of `vvu daemon` (issue 12): a QEMU guest reads and writes a disk that was added at
runtime through `vvu ctl` to a running daemon, while that daemon already serves another
front-end, which keeps writing and reading back (verified) all the while the guest runs. One
small boot (tests/guest.py, TCG)."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from daemons import Daemon
from guest import GuestError, guest_image, qemu_escape, start_guest
from vvu.blocking import BlockingBlk

pytestmark = pytest.mark.guest

TIMEOUT = 60.0
MiB = 1 << 20
DISK_SIZE = 16 * MiB


def ctl(api: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "vvu", "ctl", "--api-socket", str(api), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


class KeepBusy:
    """Writes a block and reads it back, again and again, from a thread, until `stop()`; any
    failure is raised by `stop()`."""

    def __init__(self, blk: BlockingBlk) -> None:
        self.blk = blk
        self.rounds = 0
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="keep-busy")
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                data = self.rounds.to_bytes(8, "little").ljust(4096, b"\x5a")
                self.blk.write(16, data)
                assert self.blk.read(16, 4096) == data, f"round {self.rounds}"
                self.rounds += 1
        except BaseException as err:
            self._error = err

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive(), "the first front-end's I/O hangs"
        if self._error is not None:
            raise AssertionError(f"the first front-end failed: {self._error!r}")


def test_guest_reads_a_disk_added_at_runtime_beside_a_served_frontend(tmp_path: Path) -> None:
    guest_image()  # skip (or fail, in CI) before starting anything when there is no guest
    api = tmp_path / "api.sock"
    first_sock, second_sock = tmp_path / "first.sock", tmp_path / "second.sock"
    config = tmp_path / "vvu.toml"
    config.write_text(
        f'[api]\nsocket = "{api}"\n'
        f'[[device]]\nid = "first"\ntype = "blk"\nsocket = "{first_sock}"\nsize = 4\n'
    )
    image = tmp_path / "disk.img"
    content = random.Random(12).randbytes(MiB)
    with image.open("wb") as f:
        f.write(content)
        f.truncate(DISK_SIZE)
    daemon = Daemon(["--config", str(config)], api, tmp_path / "daemon.log", command="daemon")
    try:
        # The daemon already serves a front-end (vvu's own, in this process) ...
        other = BlockingBlk.open(str(first_sock))
        try:
            other.write(0, b"first".ljust(4096, b"\0"))
            # ... when the guest's disk is added through `vvu ctl`.
            added = ctl(api, "device-add", "second", "blk", "--socket-path", str(second_sock),
                        "-o", f"blk-file={image}")  # fmt: skip
            assert added.startswith("second: blk"), added
            chardev = f"socket,id=vu0,path={qemu_escape(str(second_sock))}"
            devices = ["-chardev", chardev, "-device", "vhost-user-blk-pci,chardev=vu0"]
            script = """
set -e
cat /sys/block/vda/size
dd if=/dev/vda bs=1M count=1 iflag=direct 2>/dev/null | md5sum
printf guest-wrote-this | dd of=/dev/vda bs=512 seek=8192 conv=fsync 2>/dev/null
"""
            # The first front-end goes on writing and reading back while the guest runs.
            busy = KeepBusy(other)
            try:
                with start_guest(script, qemu_args=devices, timeout=TIMEOUT) as guest:
                    try:
                        result = guest.wait()
                    except GuestError as err:
                        log = daemon.log()
                        raise AssertionError(f"{err}\n--- daemon log ---\n{log}") from err
                    rounds_during_guest = busy.rounds
            finally:
                busy.stop()
            assert rounds_during_guest > 0, "the first front-end was not served meanwhile"
            assert result.exit_status == 0, f"{result.serial}\n{daemon.log()}"
            lines = result.output.split("\n")
            assert lines[0] == str(DISK_SIZE // 512)
            assert lines[1].split()[0] == hashlib.md5(content).hexdigest()
            # The first front-end was served all along and still is.
            assert other.read(0, 4096) == b"first".ljust(4096, b"\0")
            stats = {s["id"]: s for s in json.loads(ctl(api, "--json", "stats"))}
            assert stats["first"]["connected"] is True
            assert stats["second"]["queues"][0]["reads"] > 0
        finally:
            other.close()
        assert image.read_bytes()[8192 * 512 :][:16] == b"guest-wrote-this"
    finally:
        assert daemon.stop() == 0, daemon.log()
    assert not second_sock.exists() and not api.exists()
