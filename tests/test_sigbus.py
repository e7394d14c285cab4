"""A front-end that shrinks its memory file under our mappings cannot kill us (issue 11, part 1).

Touching a shared mapping past the end of its file raises SIGBUS; before the native SIGBUS
handler (`vvu_core::sigbus`, docs/architecture.md "Memory a peer cannot pull away") every path
below ended the whole process with status 135. The API-level reproductions run in a fresh
interpreter each, so a regression kills that child, not the test runner; the daemon tests check
that only the offending session goes, with one log line, and the next front-end is served.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from daemons import Daemon
from vvu.frontend.blk import BlkDriver
from vvu.frontend.rng import RngDriver

_PRELUDE = """
import os
from vvu._core import DirtyLog, GuestMemory, InflightRegion, SplitQueue, memory_faults
from vvu.errors import GuestMemoryError, QueueError

def hostile(size):
    # A careless front-end's memfd: sealing not allowed, so nothing stops a shrink.
    fd = os.memfd_create("hostile")
    os.ftruncate(fd, size)
    return fd
"""

# Each reproduction touches memory whose file was shrunk to 0 bytes and must get an exception.
_PATHS = {
    "GuestMemory.read": """
fd = hostile(0x10000)
mem = GuestMemory()
mem.add_region(fd, 0, 0x10000)
os.ftruncate(fd, 0)
try:
    mem.read(0x100, 16)
except GuestMemoryError as err:
    assert mem.poisoned and "SIGBUS" in str(err), err
""",
    "SplitQueue.pop": """
fd = hostile(0x10000)
mem = GuestMemory()
mem.add_region(fd, 0, 0x10000)
mem.store_u16(0x1002, 1)  # avail.idx: one chain waits
q = SplitQueue(16, 0, 0x1000, 0x2000)
q.attach(mem)
os.ftruncate(fd, 0)
try:
    q.pop(8)
except (GuestMemoryError, QueueError) as err:
    assert q.broken_reason is not None and "SIGBUS" in str(err), err
""",
    "set_inflight": """
mem = GuestMemory()
ring = hostile(0x10000)
mem.add_region(ring, 0, 0x10000)
q = SplitQueue(16, 0, 0x1000, 0x2000)
q.attach(mem)
size = 0x10000
fd = hostile(size)
region = InflightRegion.map(fd, size, 0, 1, 16)
os.ftruncate(fd, 0)
try:
    q.set_inflight(region, 0)
except (GuestMemoryError, QueueError) as err:
    assert region.poisoned and "SIGBUS" in str(err), err
""",
    "DirtyLog.mark": """
fd = hostile(0x1000)
log = DirtyLog(fd, 0x1000)
os.ftruncate(fd, 0)
try:
    log.mark(0, 0x10000)
except GuestMemoryError as err:
    assert log.poisoned and "SIGBUS" in str(err), err
""",
}


@pytest.mark.parametrize("path", sorted(_PATHS))
def test_a_shrunk_file_raises_instead_of_killing_the_process(path: str) -> None:
    script = _PRELUDE + _PATHS[path] + "\nassert memory_faults() >= 1\nprint('survived')\n"
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},  # as under pytest: faulthandler first
    )
    assert proc.returncode == 0 and "survived" in proc.stdout, (
        f"{path}: exit status {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    )


def test_a_fault_outside_guest_memory_still_reaches_faulthandler() -> None:
    """The handler only owns faults inside guest mappings: any other SIGBUS still reaches the
    handler installed before it (faulthandler prints its traceback) and kills the process."""
    script = _PRELUDE + textwrap.dedent("""
        import mmap
        mem = GuestMemory()
        mem.add_region(hostile(0x1000), 0, 0x1000)  # installs the handler (after faulthandler)
        fd = hostile(0x1000)
        m = mmap.mmap(fd, 0x1000)
        os.ftruncate(fd, 0)
        m[0]
        print("survived")
        """)
    proc = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == -7, f"{proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Fatal Python error: Bus error" in proc.stderr


async def _dropped_lines(daemon: Daemon) -> list[str]:
    """The daemon's lines about dropping a session for a shrunk file, once there is one (it
    is logged after the session's socket closed, which is what the test saw)."""
    log = await asyncio.to_thread(daemon.wait_for_log, "shrank the file")
    return [line for line in log.splitlines() if "shrank the file" in line]


@pytest.mark.asyncio
async def test_python_handler_session_is_dropped_and_the_next_front_end_served(
    tmp_path: Path,
) -> None:
    sock = tmp_path / "rng.sock"
    daemon = Daemon(["rng", "--socket-path", str(sock)], sock, tmp_path / "rng.log")
    try:
        memory = tmp_path / "guest-ram"
        hostile = await RngDriver.open(str(sock), memory_path=str(memory))
        try:
            assert len(await hostile.read(16)) == 16
            os.truncate(memory, 0)
            hostile.queue.kick.signal()  # the back-end reads the ring: SIGBUS in its process
            # The daemon hangs up on this front-end (EOF), and only on this one.
            assert await hostile.frontend.channel.recv() is None
        finally:
            await hostile.close()
        assert daemon.running()
        assert len(await _dropped_lines(daemon)) == 1, daemon.log()
        nice = await RngDriver.open(str(sock))
        try:
            assert len(await nice.read(32)) == 32
        finally:
            await nice.close()
        assert daemon.running()
    finally:
        daemon.stop()


@pytest.mark.asyncio
async def test_native_worker_session_is_dropped_and_the_next_front_end_served(
    tmp_path: Path,
) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    sock = tmp_path / "blk.sock"
    daemon = Daemon(
        ["blk", "--socket-path", str(sock), f"--blk-file={image}"], sock, tmp_path / "blk.log"
    )
    try:
        memory = tmp_path / "guest-ram"
        hostile = await BlkDriver.open(str(sock), memory_path=str(memory))
        try:
            await hostile.write(0, b"\x5a" * 512)
            os.truncate(memory, 0)
            hostile.queue.kick.signal()  # the native worker thread reads the ring
            assert await hostile.frontend.channel.recv() is None
        finally:
            await hostile.close()
        assert daemon.running()
        assert len(await _dropped_lines(daemon)) == 1, daemon.log()
        nice = await BlkDriver.open(str(sock))
        try:
            assert await nice.read(0, 512) == b"\x5a" * 512
        finally:
            await nice.close()
        assert daemon.running()
    finally:
        daemon.stop()
