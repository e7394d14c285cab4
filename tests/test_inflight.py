"""Inflight I/O tracking (INFLIGHT_SHMFD): a back-end killed with SIGKILL at random points and
restarted on the same socket finishes what was in flight, exactly once where it shows.

The region's layout and recovery logic (incl. hostile regions) are unit-tested in Rust
(`rust/core/src/inflight/tests.rs`, `queue::split::tests`, `queue::packed::tests`); here the
engine's GET/SET_INFLIGHT_FD, then `vvu serve blk` as a real process under a verified write
stream from vvu's front-end, and from a Linux guest in QEMU (`reconnect=1`), over split and
packed rings; last, one kill at an exact point (strace): after a completion is published and
before its call is signalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import re
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from daemons import need_tool, stop_process, wait_for_socket
from guest import (
    Guest,
    GuestResult,
    child_pids,
    guest_image,
    live_guests,
    qemu_escape,
    start_guest,
)
from vvu._core import GuestMemory, InflightRegion, PackedQueue, SplitQueue, memfd
from vvu.backends import BlkBackend, RngBackend
from vvu.device.vvu import inflight_memory_size
from vvu.engine import BackendEngine
from vvu.errors import GuestMemoryError
from vvu.frontend import BlkDriver, RngDriver
from vvu.frontend.core import Frontend, FrontendError
from vvu.protocol import FrontendRequest, Inflight, ProtocolFeature
from vvu.transport.unix import socketpair_channels
from vvu_harness import tmpfs_file

VVU = [sys.executable, "-m", "vvu"]
KiB, MiB = 1 << 10, 1 << 20
_F = FrontendRequest
pytestmark = pytest.mark.timeout(30)


def test_region_layouts_and_each_ring_format_takes_only_its_own_layout() -> None:
    split = InflightRegion.allocate(2, 128)
    packed = InflightRegion.allocate(2, 128, packed=True)
    assert (split.mmap_size, split.packed) == (2 * (16 + 16 * 128 + 48), False)
    assert (packed.mmap_size, packed.packed) == (2 * (32 + 32 * 128 + 32), True)
    assert os.fstat(packed.fileno()).st_size == packed.mmap_size
    memory = GuestMemory()
    fd = memfd(MiB)
    try:
        memory.add_region(fd, 0, MiB)
        queue = SplitQueue(128, 0x1000, 0x2000, 0x3000)
        queue.attach(memory)
        with pytest.raises(GuestMemoryError, match="laid out for packed rings"):
            queue.set_inflight(packed, 0)
        with pytest.raises(GuestMemoryError, match="queue 2 beyond"):
            queue.set_inflight(split, 2)
        assert queue.set_inflight(split, 1) == (0, None)
        packed_queue = PackedQueue(128, 0x1000, 0x2000, 0x3000)
        packed_queue.attach(memory)
        with pytest.raises(GuestMemoryError, match="laid out for split rings"):
            packed_queue.set_inflight(split, 0)
        assert packed_queue.set_inflight(packed, 1) == (0, None)
    finally:
        os.close(fd)


# --- the engine ------------------------------------------------------------------------------


def test_only_devices_whose_queues_track_inflight_offer_it() -> None:
    blk = BackendEngine(BlkBackend(size=MiB))
    rng = BackendEngine(RngBackend())
    assert blk.offered_protocol_features() & ProtocolFeature.INFLIGHT_SHMFD.mask
    assert not rng.offered_protocol_features() & ProtocolFeature.INFLIGHT_SHMFD.mask


async def _session() -> tuple[Frontend, BackendEngine, asyncio.Task[None]]:
    ours, theirs = socketpair_channels()
    engine = BackendEngine(BlkBackend(size=MiB, num_queues=2))
    task = asyncio.ensure_future(engine.serve(theirs))
    frontend = Frontend(ours, memory_size=4 * MiB)
    await frontend.negotiate()
    return frontend, engine, task


@pytest.mark.asyncio
async def test_get_inflight_fd_returns_a_zeroed_region_of_the_spec_size() -> None:
    frontend, engine, task = await _session()
    try:
        assert await frontend.setup_inflight(2, 128)
        assert frontend.inflight is not None
        # Per queue: 16-byte header + 16 bytes per descriptor, 64-byte aligned.
        assert frontend.inflight.mmap_size == 2 * (16 + 16 * 128 + 48)
        assert frontend.inflight.mmap_offset == 0
        fd = frontend._inflight_fd
        assert os.fstat(fd).st_size == frontend.inflight.mmap_size
        assert os.pread(fd, frontend.inflight.mmap_size, 0) == bytes(frontend.inflight.mmap_size)
        assert engine.session is not None and engine.session.inflight is not None
    finally:
        await frontend.close()
        await task


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (Inflight(0, 0, 3, 128), "for 3 queues"),  # the device has 2
        (Inflight(0, 0, 0, 128), "for 0 queues"),
        (Inflight(0, 0, 1, 0), "queue size 0"),
        (Inflight(0, 0, 1, 65535), "queue size 65535"),
    ],
)
async def test_get_inflight_fd_refuses_bad_geometry(
    payload: Inflight, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Refused with the failure form QEMU knows (mmap_size 0, no fd); the session goes on."""
    frontend, engine, task = await _session()
    try:
        fds: list[int] = []
        reply = await frontend.request(_F.GET_INFLIGHT_FD, payload, reply_fds=fds)
        assert isinstance(reply, Inflight) and reply.mmap_size == 0 and fds == []
        assert why in caplog.text
        assert engine.session is not None and engine.session.inflight is None
    finally:
        await frontend.close()
        await task


@pytest.mark.asyncio
async def test_the_region_handed_back_stays_mapped_and_the_next_session_gets_a_fresh_one() -> None:
    """SET_INFLIGHT_FD with the region GET_INFLIGHT_FD just gave keeps that mapping (the same
    file); another region is mapped. The next session's GET_INFLIGHT_FD of the same geometry
    gets a region allocated ahead, as fresh (zeroed) as one allocated on request."""
    frontend, engine, task = await _session()
    other = InflightRegion.allocate(2, 128)
    try:
        fds: list[int] = []
        reply = await frontend.request(_F.GET_INFLIGHT_FD, Inflight(0, 0, 2, 128), reply_fds=fds)
        assert isinstance(reply, Inflight) and len(fds) == 1
        assert engine.session is not None
        given = engine.session.inflight
        assert given is not None
        await frontend.request(_F.SET_INFLIGHT_FD, reply, fds)
        assert engine.session.inflight is given  # its own region back: not mapped again
        os.pwrite(fds[0], b"\x01", 0)  # the front-end's writes land in what the engine maps
        await frontend.request(_F.SET_INFLIGHT_FD, Inflight(other.mmap_size, 0, 2, 128), [
            other.fileno()
        ])  # fmt: skip
        assert engine.session.inflight not in (None, given)
        os.close(fds[0])
    finally:
        await frontend.close()
        await task

    ours, theirs = socketpair_channels()
    task = asyncio.ensure_future(engine.serve(theirs))
    frontend = Frontend(ours, memory_size=4 * MiB)
    try:
        await frontend.negotiate()
        assert engine.session is not None
        spare = engine.session.inflight_tracking.spare  # made while the front-end started
        assert spare is not None
        assert await frontend.setup_inflight(2, 128)
        assert engine.session.inflight is spare
        assert frontend.inflight is not None and frontend.inflight.mmap_size == spare.mmap_size
        size = frontend.inflight.mmap_size
        assert os.pread(frontend._inflight_fd, size, 0) == bytes(size)
    finally:
        await frontend.close()
        await task


@pytest.mark.asyncio
async def test_set_inflight_fd_refuses_a_region_too_small_or_misplaced() -> None:
    frontend, engine, task = await _session()
    region = InflightRegion.allocate(1, 128)
    try:
        size = region.mmap_size
        for payload in (Inflight(size - 64, 0, 1, 128), Inflight(size, 64, 1, 128)):
            with pytest.raises(FrontendError, match="refused SET_INFLIGHT_FD"):
                await frontend.request(_F.SET_INFLIGHT_FD, payload, [region.fileno()])
        await frontend.request(_F.SET_INFLIGHT_FD, Inflight(size, 0, 1, 128), [region.fileno()])
        assert engine.session is not None and engine.session.inflight is not None
    finally:
        await frontend.close()
        await task


@pytest.mark.asyncio
async def test_a_garbage_region_means_nothing_in_flight_and_the_ring_works(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A region full of random bytes handed back by SET_INFLIGHT_FD: refused as "nothing in
    flight" with the reason logged, then reset and used; I/O works and is tracked."""
    frontend, _engine, task = await _session()
    region = InflightRegion.allocate(1, 64)
    try:
        os.pwrite(region.fileno(), random.Random(7).randbytes(region.mmap_size), 0)
        payload = Inflight(region.mmap_size, 0, 1, 64)
        await frontend.request(_F.SET_INFLIGHT_FD, payload, [region.fileno()])
        await frontend.set_mem_table()
        queue = await frontend.start_queue(0, 64)
        blk = BlkDriver(frontend, queue, MiB // 512, depth=4, max_request=64 * KiB)
        data = random.Random(8).randbytes(8192)
        await asyncio.wait_for(blk.write(8, data), 10)
        assert await asyncio.wait_for(blk.read(8, 8192), 10) == data
        assert "inflight region discarded: version" in caplog.text
        header = os.pread(region.fileno(), 16, 0)
        # Reset by the back-end (version 1, desc_num 64) and tracking: used_idx == 2 completions.
        assert struct.unpack_from("<HHHH", header, 8)[::3] == (1, 2)
        assert struct.unpack_from("<H", header, 10) == (64,)
    finally:
        await frontend.close()
        await task


# --- vvu serve blk, SIGKILLed under a verified write stream ----------------------------------

KILLS = 20
WRITERS = 8
SLOTS_PER_WRITER = 2
# Large requests keep the back-end busy long enough for random kills to catch some in flight.
CHUNK = MiB
REQUEST_TIMEOUT = 60.0
QUEUE_SIZE = 128


def _serve(
    socket_path: Path,
    image: Path | None,
    log: Path,
    *,
    verbose: bool = False,
    vvu: Path | None = None,
    wrapper: Sequence[str] = (),
) -> subprocess.Popen[bytes]:
    """`vvu serve blk` on `image`, or `vvu serve rng` without one; with `vvu`, behind the VVU
    device whose vfio-user socket that is (`_device_for`) instead of on `socket_path`.
    `wrapper`: the command that runs it (strace …)."""
    where = ["--socket-path", str(socket_path)] if vvu is None else ["--vvu", str(vvu)]
    args = ["serve", "rng", *where]
    if image is not None:
        args = ["serve", "blk", *where, "--image", str(image)]
    with log.open("ab") as err:
        return subprocess.Popen(
            [*wrapper, *VVU, *(["-v"] if verbose else []), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def _device_for(
    transport: str, frontend_socket: Path, tmp_path: Path, frontend_memory: Path | None = None
) -> tuple[Path | None, list[subprocess.Popen[bytes]]]:
    """For "vvu" (and "vvu-file"), a running `vvu device` whose front-ends connect to
    `frontend_socket`: its vfio-user socket (the back-end's `--vvu`) and [its process]; for
    "unix", (None, []). `frontend_memory`: the device's `--frontend-memory` file."""
    if not transport.startswith("vvu"):
        return None, []
    device_socket = tmp_path / "device.sock"
    memory = [] if frontend_memory is None else ["--frontend-memory", str(frontend_memory)]
    with (tmp_path / "device.log").open("ab") as err:
        proc = subprocess.Popen(
            [*VVU, "-v", "device", "--socket-path", str(frontend_socket),
             "--vfio-user", str(device_socket), "--max-queues", "4", *memory],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    try:
        wait_for_socket(device_socket, proc)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return device_socket, [proc]


@pytest.fixture
def memory_file() -> Iterator[Path]:
    """A 16 MiB tmpfs file without a name (`tmpfs_file`), for a front-end's RAM that is the
    device's `--frontend-memory` (transport "vvu-file"): nothing stays in /dev/shm, even when
    the run is killed."""
    with tmpfs_file(16 * MiB) as path:
        yield path


@pytest.fixture(autouse=True, scope="module")
def _no_shm_left_behind() -> Iterator[None]:
    """Regression check: this module once left a 16 MiB /dev/shm/vvu-test-inflight-* file per
    run that did not end cleanly. No new such file may be there after the module."""
    shm = Path("/dev/shm")
    before = set(shm.glob("vvu-test-inflight-*"))
    yield
    assert set(shm.glob("vvu-test-inflight-*")) - before == set()


@contextlib.contextmanager
def _reaped(procs: list[subprocess.Popen[bytes]]) -> Iterator[None]:
    try:
        yield
    finally:
        for proc in procs:
            if proc.poll() is None:
                # A wrapper's (strace's) child first: killing the tracer alone leaves it running.
                for child in child_pids(proc.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child, signal.SIGKILL)
                proc.kill()
                proc.wait()


def _marked_in_flight(region_fd: int, queue_size: int, packed: bool) -> int:
    """How many chains queue 0 of the inflight region marks in flight (the spec's layouts:
    version at 8, desc_num at 10, then DescStateSplit[i].inflight at 16 + 16 i, or
    DescStatePacked[i].inflight at 32 + 32 i)."""
    start, entry = (32, 32) if packed else (16, 16)
    data = os.pread(region_fd, start + entry * queue_size, 0)
    assert struct.unpack_from("<HH", data, 8) == (1, queue_size), "version 1, desc_num"
    return sum(data[start + entry * i] for i in range(queue_size))


async def _kill_point(
    rng: random.Random, aim: bool, region_fd: int, queue_size: int, packed: bool
) -> None:
    """A random moment; when aiming, the first moment after it (up to 0.5 s) at which the
    region shows requests in flight, so that some kills certainly catch the back-end mid-work."""
    await asyncio.sleep(rng.uniform(0.02, 0.3))
    if aim:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 0.5
        while loop.time() < deadline and not _marked_in_flight(region_fd, queue_size, packed):
            await asyncio.sleep(0)


def _block(slot: int, generation: int, rng: random.Random) -> bytes:
    # Every 4 KiB differs per write (cheap to make, a stale or torn block cannot match).
    page = rng.randbytes(4 * KiB - 16)
    return b"".join(
        struct.pack("<QII", slot, generation, i) + page for i in range(CHUNK // (4 * KiB))
    )


class WriteStream:
    """Writers that each own a few slots, rewrite them with new data and read acknowledged
    ones back: a stale write applied again, a torn one or a lost one shows as a mismatch (or
    a request that never completes)."""

    def __init__(self, blk: BlkDriver, rng: random.Random) -> None:
        self.blk = blk
        self.rng = rng
        self.acked: dict[int, bytes] = {}  # slot -> the last write the device acknowledged
        self.writes = self.reads = 0
        self.done = asyncio.Event()

    async def _read(self, slot: int) -> bytes:
        return await asyncio.wait_for(self.blk.read(slot * CHUNK // 512, CHUNK), REQUEST_TIMEOUT)

    async def writer(self, w: int) -> None:
        rng = random.Random(self.rng.randrange(1 << 32))
        generation = 0
        mine = range(w * SLOTS_PER_WRITER, (w + 1) * SLOTS_PER_WRITER)
        while not self.done.is_set():
            slot = rng.choice(mine)
            if slot in self.acked and rng.random() < 0.25:
                got = await self._read(slot)
                assert got == self.acked[slot], f"slot {slot} does not hold its last acked write"
                self.reads += 1
                continue
            generation += 1
            data = _block(slot, generation, rng)
            await asyncio.wait_for(self.blk.write(slot * CHUNK // 512, data), REQUEST_TIMEOUT)
            self.acked[slot] = data
            self.writes += 1

    async def progress(self, at_least: int) -> None:
        target = self.writes + at_least
        while self.writes < target:
            await asyncio.sleep(0.01)

    async def verify(self) -> None:
        for slot, data in self.acked.items():
            assert await self._read(slot) == data, f"slot {slot}"

    def verify_image(self, image: Path) -> None:
        with image.open("rb") as f:
            for slot, data in self.acked.items():
                f.seek(slot * CHUNK)
                assert f.read(CHUNK) == data, f"slot {slot} in the image"


@pytest.mark.timeout(300)
@pytest.mark.asyncio
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("transport", ["unix", "vvu", "vvu-file"])
async def test_serve_blk_killed_20_times_loses_and_repeats_nothing(
    tmp_path: Path, packed: bool, transport: str, memory_file: Path
) -> None:
    """Over "vvu" the device and the front-end stay; `vvu serve blk --vvu` is killed and
    restarted behind the device, and the region is the device's shmid 3. "vvu-file": the
    device runs with `--frontend-memory` (the front-end's RAM is that file), and shmid 3 is
    the device's own inflight memfd (BAR3), which the front-end hands back on every
    reconnect."""
    seed = random.randrange(1 << 32)
    print(f"seed {seed}")
    rng = random.Random(seed)
    image, sock, log = tmp_path / "disk.img", tmp_path / "blk.sock", tmp_path / "serve.log"
    with image.open("wb") as f:
        f.truncate(WRITERS * SLOTS_PER_WRITER * CHUNK)
    memory = memory_file if transport == "vvu-file" else None
    device_socket, daemons = _device_for(transport, sock, tmp_path, memory)
    procs = [_serve(sock, image, log, vvu=device_socket)]
    with _reaped(daemons), _reaped(procs):
        wait_for_socket(sock, procs[0] if device_socket is None else daemons[0])
        blk = await BlkDriver.open(
            str(sock),
            depth=WRITERS,
            max_request=CHUNK,
            queue_size=QUEUE_SIZE,
            timeout=10,
            packed=packed,
            memory_path=None if memory is None else str(memory),
        )
        assert blk.frontend.inflight is not None, "blk must offer INFLIGHT_SHMFD"
        if memory is not None:  # the device's own inflight memfd (BAR3), sized for 4 queues
            assert os.fstat(blk.frontend._inflight_fd).st_size == inflight_memory_size(4)
        layout = InflightRegion.allocate(
            blk.frontend.inflight.num_queues, QUEUE_SIZE, packed=packed
        )
        assert blk.frontend.inflight.mmap_size == layout.mmap_size, "laid out for the ring format"
        stream = WriteStream(blk, rng)
        tasks = [asyncio.ensure_future(stream.writer(w)) for w in range(WRITERS)]
        try:
            await asyncio.wait_for(stream.progress(WRITERS), REQUEST_TIMEOUT)
            for kill in range(KILLS):
                await _kill_point(rng, kill % 2 == 1, blk.frontend._inflight_fd, QUEUE_SIZE, packed)
                procs[-1].send_signal(signal.SIGKILL)
                procs[-1].wait()
                procs.append(_serve(sock, image, log, vvu=device_socket))
                await blk.reconnect(timeout=30)
                # Every incarnation serves some writes before it dies.
                await asyncio.wait_for(stream.progress(WRITERS), REQUEST_TIMEOUT)
                assert not any(t.done() for t in tasks), [t for t in tasks if t.done()]
        finally:
            stream.done.set()
            await asyncio.gather(*tasks)
        await stream.verify()
        await blk.close()
        assert stop_process(procs[-1]) == 0
        for daemon in daemons:
            assert stop_process(daemon) == 0
    # The image itself, read without any back-end: every acknowledged block is there.
    stream.verify_image(image)
    text = log.read_text()
    resubmitted = [int(n) for n in re.findall(r"resubmitting (\d+) request", text)]
    print(
        f"{stream.writes} writes, {stream.reads} reads over {KILLS} kills; "
        f"resubmissions after kills: {resubmitted}"
    )
    assert "inflight region discarded" not in text
    # The proof needs kills that caught requests in flight, not only idle moments.
    assert len(resubmitted) >= 2, "too few kills caught requests in flight"
    assert stream.writes > KILLS * WRITERS


@pytest.mark.asyncio
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
async def test_reconnect_without_a_region_resumes_at_the_used_position(
    tmp_path: Path, packed: bool
) -> None:
    """rng offers no INFLIGHT_SHMFD: the restarted back-end starts where the driver saw the
    last completion (for a packed ring both positions, past a wrap of the 64-slot ring) and
    takes the request queued while no back-end ran."""
    sock, log = tmp_path / "rng.sock", tmp_path / "serve.log"
    procs = [_serve(sock, None, log)]
    with _reaped(procs):
        wait_for_socket(sock, procs[0])
        rng = await RngDriver.open(str(sock), packed=packed)
        try:
            assert rng.frontend.inflight is None
            for _ in range(70):  # past the end of the ring: a packed ring's wrap counter flips
                assert len(await asyncio.wait_for(rng.read(16), 10)) == 16
            procs[-1].send_signal(signal.SIGKILL)
            procs[-1].wait()
            queued = asyncio.ensure_future(rng.read(32))
            await asyncio.sleep(0.05)
            assert not queued.done()
            procs.append(_serve(sock, None, log))
            await rng.frontend.reconnect(timeout=10)
            assert len(await asyncio.wait_for(queued, 10)) == 32
            assert len(await asyncio.wait_for(rng.read(8), 10)) == 8
        finally:
            await rng.close()
        assert stop_process(procs[-1]) == 0
    assert "broken" not in log.read_text()


# --- QEMU with a Linux guest, reconnect=1 ----------------------------------------------------

GUEST_KILLS = 20
GUEST_QUEUE_SIZE = 128
GUEST_SLOTS = 8
GUEST_SLOT_KIB = 256
# The host stops the stream by writing "stop" into the block after the slots (through the image
# file: the guest reads it back with direct I/O every round).
GUEST_STOP_BLOCK = GUEST_SLOTS * GUEST_SLOT_KIB // 4
GUEST_TIMEOUT = 240.0
# Rewrite slot r % SLOTS each round (direct I/O: acked means written), read it back at once;
# at the end report what every slot must hold.
GUEST_STREAM = f"""
set -e
r=1
while true; do
    stop=$(dd if=/dev/vda bs=4k skip={GUEST_STOP_BLOCK} count=1 iflag=direct 2>/dev/null \\
        | head -c 4)
    if [ "$stop" = "stop" ]; then break; fi
    s=$((r % {GUEST_SLOTS}))
    head -c {GUEST_SLOT_KIB * KiB} /dev/urandom > /tmp/p$s
    dd if=/tmp/p$s of=/dev/vda bs={GUEST_SLOT_KIB}k seek=$s oflag=direct conv=fsync 2>/dev/null
    set -- $(md5sum < /tmp/p$s)
    want=$1
    set -- $(dd if=/dev/vda bs={GUEST_SLOT_KIB}k skip=$s count=1 iflag=direct 2>/dev/null | md5sum)
    if [ "$1" != "$want" ]; then echo "round $r slot $s BAD"; exit 1; fi
    echo "round $r ok"
    r=$((r + 1))
done
s=0
while [ $s -lt {GUEST_SLOTS} ]; do
    set -- $(md5sum < /tmp/p$s)
    echo "slot $s $1"
    s=$((s + 1))
done
"""


def _qemu_blk(socket_path: Path, packed: bool) -> list[str]:
    """QEMU's arguments for a vhost-user-blk-pci device on `socket_path` that reconnects."""
    chardev = f"socket,id=vu0,path={qemu_escape(str(socket_path))},reconnect=1"  # QEMU 7.2
    device = f"vhost-user-blk-pci,chardev=vu0,num-queues=1,queue-size={GUEST_QUEUE_SIZE}"
    if packed:
        device += ",packed=on"
    return ["-chardev", chardev, "-device", device]


def _last_round(guest: Guest) -> int:
    return max(map(int, re.findall(r"round (\d+) ok", guest.serial)), default=0)


def _stop_stream(guest: Guest, image: Path) -> GuestResult:
    """Ask the guest's stream to stop (through the image file) and wait for its result."""
    with image.open("r+b") as f:
        f.seek(GUEST_STOP_BLOCK * 4 * KiB)
        f.write(b"stop")
    return guest.wait()


def _check_slots(result: GuestResult, image: Path) -> None:
    """Every slot in the image holds what the guest last wrote there (its md5 sums)."""
    sums = re.findall(r"^slot (\d+) ([0-9a-f]{32})$", result.output, re.MULTILINE)
    assert len(sums) == GUEST_SLOTS, result.output
    with image.open("rb") as f:
        for slot, md5 in sums:
            f.seek(int(slot) * GUEST_SLOT_KIB * KiB)
            assert hashlib.md5(f.read(GUEST_SLOT_KIB * KiB)).hexdigest() == md5, f"slot {slot}"


def _aim_at_requests_in_flight(pid: int, timeout: float, packed: bool) -> None:
    """Return once the back-end's inflight region (found among its fds) marks a request in
    flight, or after `timeout`: QEMU's copy of the region is not ours to read, the back-end's
    mapping of the same memfd is."""
    fd_dir = Path(f"/proc/{pid}/fd")
    for entry in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(entry).startswith("/memfd:vvu-inflight"):
                region = os.open(entry, os.O_RDONLY | os.O_CLOEXEC)
                break
    else:
        return
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not _marked_in_flight(
            region, GUEST_QUEUE_SIZE, packed
        ):
            pass
    finally:
        os.close(region)


RING_RUNNING = "vring 0 running"  # the engine's debug line when QEMU (re)started the ring


def _wait_for_count(log: Path, line: str, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while log.read_text().count(line) < count:
        if time.monotonic() > deadline:
            tail = "\n".join(log.read_text().splitlines()[-60:])
            raise AssertionError(f"{line!r} not {count} times in the log in time:\n{tail}")
        time.sleep(0.05)


@pytest.mark.guest
@pytest.mark.timeout(int(GUEST_TIMEOUT) + 60)
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("transport", ["unix", "vvu"])
def test_qemu_guest_write_stream_survives_serve_blk_sigkilled(
    tmp_path: Path, packed: bool, transport: str
) -> None:
    """Over "vvu" QEMU is connected to a `vvu device` that stays; the back-end behind it is
    killed and restarted, and the region is the device's shmid 3."""
    guest_image()  # skip before booting when there is no guest
    rng = random.Random()
    image, sock, log = tmp_path / "disk.img", tmp_path / "blk.sock", tmp_path / "serve.log"
    with image.open("wb") as f:
        f.truncate((GUEST_STOP_BLOCK + 1) * 4 * KiB)
    device_socket, daemons = _device_for(transport, sock, tmp_path)
    procs = [_serve(sock, image, log, verbose=True, vvu=device_socket)]
    devices = _qemu_blk(sock, packed)
    with _reaped(daemons), _reaped(procs):
        wait_for_socket(sock, procs[0] if device_socket is None else daemons[0])
        with start_guest(GUEST_STREAM, qemu_args=devices, timeout=GUEST_TIMEOUT) as guest:
            for kill in range(GUEST_KILLS):
                # Each incarnation serves QEMU for two more rounds, then dies at a random moment.
                guest.wait_for(f"round {_last_round(guest) + 2} ok")
                time.sleep(rng.uniform(0.0, 0.3))
                if kill % 2 == 1:  # every other kill waits for requests in flight
                    _aim_at_requests_in_flight(procs[-1].pid, 1.0, packed)
                procs[-1].send_signal(signal.SIGKILL)
                procs[-1].wait()
                started = log.read_text().count(RING_RUNNING)
                procs.append(_serve(sock, image, log, verbose=True, vvu=device_socket))
                _wait_for_count(log, RING_RUNNING, started + 1, 30)
            result = _stop_stream(guest, image)
        text = log.read_text()
        assert result.exit_status == 0, f"{result.serial}\n{guest.stderr}\n{text[-4000:]}"
        assert stop_process(procs[-1]) == 0
        for daemon in daemons:
            assert stop_process(daemon) == 0
    _check_slots(result, image)
    # QEMU fetched a region (again after a guest reset) and handed it to every incarnation.
    assert "<- GET_INFLIGHT_FD" in text
    assert f"{RING_RUNNING} ({'packed' if packed else 'split'}," in text, "QEMU's ring format"
    assert text.count("<- SET_INFLIGHT_FD") >= GUEST_KILLS + 1
    resubmitted = re.findall(r"resubmitting (\d+) request", text)
    print(f"{GUEST_KILLS} kills; resubmissions after kills: {resubmitted}")
    assert "inflight region discarded" not in text
    assert resubmitted, "no kill caught a request in flight"
    assert live_guests() == []


# The write(2) of a thread at which strace kills `vvu serve blk`. The worker's writes are its
# call signals (over 50 a second in the guest's stream); the main thread's, log lines and the
# VVU transport's doorbells, stay far below (53 in a 40-second VVU run, 8 over AF_UNIX).
CALL_TO_DIE_AT = 200
# A write(2) to an eventfd that the SIGKILL cut short, as strace -y shows it.
_CUT_SHORT_WRITE = re.compile(
    r"^(?P<tid>\d+) +write\(\d+<anon_inode:\[eventfd\]>, \"(?P<data>[^\"]*)\", (?P<size>\d+)"
    r"(?: <unfinished \.\.\.>|\) = \?)$",
    re.MULTILINE,
)


@pytest.mark.guest
@pytest.mark.timeout(int(GUEST_TIMEOUT) + 60)
@pytest.mark.parametrize(
    ("transport", "packed"), [("unix", False), ("vvu", True)], ids=["unix-split", "vvu-packed"]
)
def test_qemu_guest_goes_on_when_serve_blk_dies_as_it_signals_a_completion(
    tmp_path: Path, transport: str, packed: bool
) -> None:
    """strace SIGKILLs `vvu serve blk` as its worker enters the write(2) of a call signal: the
    used entry is in the ring, the guest's interrupt is never sent. Unless the next back-end
    signals the call when the ring starts, the guest waits for that completion forever (the
    random kills above once hit this window in CI, and the guest stalled)."""
    strace = need_tool("strace")
    guest_image()  # skip before booting when there is no guest
    image, sock, log = tmp_path / "disk.img", tmp_path / "blk.sock", tmp_path / "serve.log"
    trace = tmp_path / "strace.txt"
    with image.open("wb") as f:
        f.truncate((GUEST_STOP_BLOCK + 1) * 4 * KiB)
    device_socket, daemons = _device_for(transport, sock, tmp_path)
    # Injection counts per thread: the thread that reaches its CALL_TO_DIE_AT-th write first has
    # it skipped (EIO) and the process gets SIGKILL before the call returns.
    killer = [
        strace, "-f", "-qq", "-y", "-o", str(trace), "-e", "trace=write",
        "-e", f"inject=write:error=EIO:signal=SIGKILL:when={CALL_TO_DIE_AT}",
    ]  # fmt: skip
    procs = [_serve(sock, image, log, vvu=device_socket, wrapper=killer)]
    with _reaped(daemons), _reaped(procs):
        wait_for_socket(sock, procs[0] if device_socket is None else daemons[0])
        with start_guest(
            GUEST_STREAM, qemu_args=_qemu_blk(sock, packed), timeout=GUEST_TIMEOUT
        ) as guest:
            assert procs[0].wait(GUEST_TIMEOUT) == -signal.SIGKILL, log.read_text()
            # It died where it should: a worker thread (not the main one, which the trace starts
            # with) signalling an eventfd.
            text = trace.read_text()
            main_thread = int(text.split(maxsplit=1)[0])
            assert any(
                int(write["tid"]) != main_thread
                and (write["data"], write["size"]) == (r"\1\0\0\0\0\0\0\0", "8")
                for write in _CUT_SHORT_WRITE.finditer(text)
            ), f"no worker's call signal was cut short:\n{text[-3000:]}"
            procs.append(_serve(sock, image, log, vvu=device_socket))
            # On, and until every slot was written once.
            guest.wait_for(f"round {max(_last_round(guest) + 2, GUEST_SLOTS)} ok")
            result = _stop_stream(guest, image)
        assert result.exit_status == 0, f"{result.serial}\n{guest.stderr}\n{log.read_text()}"
        assert stop_process(procs[-1]) == 0
        for daemon in daemons:
            assert stop_process(daemon) == 0
    _check_slots(result, image)
    assert live_guests() == []
