"""The QEMU guest harness (tests/guest.py) proven with QEMU's own virtio devices.

No vvu back-end is involved: these tests show that the guest boots, gets its script, sees
virtio-blk and virtio-rng devices, reports output and exit status, and that every QEMU is
stopped and cleaned up, also on timeout. Select or skip them with ``-m guest`` / ``-m 'not guest'``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest import (
    BEGIN,
    GuestError,
    GuestResult,
    GuestTimeout,
    child_pids,
    live_guests,
    parse_serial,
    qemu_escape,
    run_guest,
    run_guest_async,
    start_guest,
)

# Each guest run boots in a few seconds under TCG; these bound a hung run well below pytest's.
TIMEOUT = 90.0


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    """Every test must leave no QEMU running and no guest temp directory behind."""
    tmp = Path(tempfile.gettempdir())
    before, dirs_before = child_pids(), set(tmp.glob(f"vvu-guest-{os.getpid()}-*"))
    yield
    assert live_guests() == []
    assert child_pids() - before == set()
    assert set(tmp.glob(f"vvu-guest-{os.getpid()}-*")) - dirs_before == set()


def _ok(result: GuestResult) -> GuestResult:
    assert result.exit_status == 0, result.serial
    return result


def test_parse_serial_exact_output() -> None:
    log = "[ 1.0] boot\nVVU-RESULT-BEGIN\nabc\n\nVVU-RESULT-END\nVVU-EXIT 3\n[ 2.0] reboot\n"
    assert parse_serial(log) == ("abc\n", 3)
    assert parse_serial("VVU-RESULT-BEGIN\nno-newline\nVVU-RESULT-END\nVVU-EXIT 0\n") == (
        "no-newline",
        0,
    )
    assert parse_serial("VVU-RESULT-BEGIN\n\nVVU-RESULT-END\nVVU-EXIT 0\n") == ("", 0)
    assert parse_serial("VVU-RESULT-BEGIN\nhalf way") == ("half way", None)
    assert parse_serial("[ 0.1] Linux version\n") == ("", None)


def test_qemu_escape_doubles_commas() -> None:
    assert qemu_escape("/tmp/a,b/disk.img") == "/tmp/a,,b/disk.img"


@pytest.mark.guest
def test_guest_runs_script_and_reports_output_and_status() -> None:
    # A script far beyond the kernel command line's 2048 bytes, with quotes, commas and '$':
    # it reaches the guest byte for byte through fw_cfg.
    payload = "".join(f"line {i}: 'quoted', \"double\", $HOME, \\back\n" for i in range(200))
    script = (
        'echo "hello from $(uname -s) $(uname -r)"\n'
        "cat > /tmp/payload <<'VVU_EOF'\n"
        f"{payload}"
        "VVU_EOF\n"
        "md5sum /tmp/payload\n"
        "echo to-stderr >&2\n"
        "printf 'last line without newline'\n"
        "exit 7\n"
    )
    assert len(script) > 4096
    result = run_guest(script, timeout=TIMEOUT)

    assert result.exit_status == 7
    lines = result.output.split("\n")
    assert lines[0].startswith("hello from Linux 6.")
    assert lines[1] == f"{hashlib.md5(payload.encode()).hexdigest()}  /tmp/payload"
    assert lines[2] == "to-stderr"
    assert lines[3] == "last line without newline"
    assert len(lines) == 4
    assert "Linux version" in result.serial
    assert result.boot_seconds is not None
    assert 0 < result.boot_seconds < result.duration


@pytest.mark.guest
def test_virtio_blk_pattern_round_trips_through_the_image_file(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    size = 8 << 20
    header = b"vvu-host-wrote-this"
    with disk.open("wb") as f:
        f.write(header)
        f.truncate(size)
    offset, length = 1 << 20, 1 << 20
    unit = b"vvu-guest-pattern-0123456789abcdef\n"
    pattern = (unit * (length // len(unit) + 1))[:length]

    script = f"""
set -e
test "$(cat /sys/block/vda/size)" = {size // 512}
head -c {len(header)} /dev/vda; echo
yes {unit.decode().strip()} | head -c {length} > /tmp/pattern
md5sum < /tmp/pattern
dd if=/tmp/pattern of=/dev/vda bs=4096 seek={offset // 4096} conv=fsync 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda bs=4096 skip={offset // 4096} count={length // 4096} 2>/dev/null | md5sum
"""
    drive = f"file={qemu_escape(str(disk))},if=none,id=d0,format=raw"
    result = _ok(
        run_guest(
            script,
            qemu_args=["-drive", drive, "-device", "virtio-blk-pci,drive=d0"],
            timeout=TIMEOUT,
        )
    )

    expected_md5 = hashlib.md5(pattern).hexdigest()
    got_header, written_md5, read_md5 = result.output.split("\n")[:3]
    assert got_header == header.decode()
    assert written_md5.split()[0] == expected_md5
    assert read_md5.split()[0] == expected_md5
    data = disk.read_bytes()
    assert len(data) == size
    assert data[offset : offset + length] == pattern
    assert data[: len(header)] == header
    assert data[len(header) : offset].count(0) == offset - len(header)
    assert data[offset + length :].count(0) == size - offset - length


@pytest.mark.guest
def test_virtio_rng_gives_64_bytes() -> None:
    script = """
set -e
cat /sys/class/misc/hw_random/rng_current
head -c 64 /dev/hwrng > /tmp/r
wc -c < /tmp/r
od -An -v -tx1 /tmp/r | tr -d ' \\n'; echo
"""
    result = _ok(run_guest(script, qemu_args=["-device", "virtio-rng-pci"], timeout=TIMEOUT))
    current, count, hexdata = result.output.split("\n")[:3]
    assert current.startswith("virtio_rng")
    assert int(count) == 64
    data = bytes.fromhex(hexdata)
    assert len(data) == 64
    assert len(set(data)) > 16  # not a constant fill


@pytest.mark.guest
def test_timeout_stops_qemu_and_reports_the_serial_log() -> None:
    with start_guest("echo guest-is-up; sleep 600", timeout=TIMEOUT) as guest:
        pid, workdir = guest.pid, guest.workdir
        guest.wait_for("guest-is-up")
        assert guest.running()
        t0 = time.monotonic()
        with pytest.raises(GuestTimeout) as info:
            guest.wait(timeout=1.0)
        assert time.monotonic() - t0 < 1.0 + 5.0 + 2.0  # timeout + terminate grace + slack
    assert not guest.running()
    assert not workdir.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    err = info.value
    assert "Linux version" in err.serial
    assert "guest-is-up" in err.serial
    assert f"pid {pid}" in str(err)
    assert "--- serial console" in str(err) and "guest-is-up" in str(err)


@pytest.mark.guest
def test_qemu_failing_to_start_is_reported() -> None:
    with pytest.raises(GuestError) as info:
        run_guest("true", qemu_args=["-device", "no-such-device"], timeout=TIMEOUT)
    assert "no-such-device" in info.value.stderr
    assert "no-such-device" in str(info.value)


@pytest.mark.guest
@pytest.mark.asyncio
async def test_two_guests_run_concurrently_while_the_event_loop_keeps_running() -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        first = start_guest("echo one; sleep 2", timeout=TIMEOUT)
        try:
            # The first guest is up (as a test would wait for its device) when the second starts.
            await first.wait_for_async(BEGIN)
            second = run_guest_async("echo two", timeout=TIMEOUT)
            a, b = await asyncio.gather(first.wait_async(), second)
        finally:
            first.stop()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert (_ok(a).output, _ok(b).output) == ("one\n", "two\n")
    assert ticks > 50  # the loop was never blocked for long
