"""Inflight I/O tracking (INFLIGHT_SHMFD): a back-end killed with SIGKILL at random points and
restarted on the same socket finishes what was in flight, exactly once where it shows.

The region's layout and recovery logic (incl. hostile regions) are unit-tested in Rust
(`rust/core/src/inflight/tests.rs`, `queue::split::tests`); here the engine's GET/SET_INFLIGHT_FD,
then `vvu serve blk` as a real process under a verified write stream from vvu's front-end, and
from a Linux guest in QEMU (`reconnect=1`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemons import stop_process, wait_for_socket
from vvu._core import InflightRegion
from vvu.backends import BlkBackend, RngBackend
from vvu.engine import BackendEngine
from vvu.frontend import BlkDriver
from vvu.frontend.core import Frontend, FrontendError
from vvu.protocol import FrontendRequest, Inflight, ProtocolFeature
from vvu.transport.unix import socketpair_channels

VVU = [sys.executable, "-m", "vvu"]
KiB, MiB = 1 << 10, 1 << 20
_F = FrontendRequest
pytestmark = pytest.mark.timeout(30)


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
    frontend, _engine, task = await _session()
    try:
        with pytest.raises(FrontendError, match="closed the connection"):
            await frontend.request(_F.GET_INFLIGHT_FD, payload)
        await task
        assert why in caplog.text
    finally:
        await frontend.close()


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


# --- vvu serve blk, SIGKILLed under a verified write stream ----------------------------------

KILLS = 20
WRITERS = 8
SLOTS_PER_WRITER = 2
# Large requests keep the back-end busy long enough for random kills to catch some in flight.
CHUNK = MiB
REQUEST_TIMEOUT = 60.0
QUEUE_SIZE = 128


def _serve(socket_path: Path, image: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as err:
        return subprocess.Popen(
            [*VVU, "serve", "blk", "--socket-path", str(socket_path), "--image", str(image)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


@contextlib.contextmanager
def _reaped(procs: list[subprocess.Popen[bytes]]) -> Iterator[None]:
    try:
        yield
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _marked_in_flight(region_fd: int, queue_size: int) -> int:
    """How many heads queue 0 of the inflight region marks in flight (the spec's split layout:
    version at 8, DescStateSplit[i].inflight at 16 + 16 i)."""
    data = os.pread(region_fd, 16 + 16 * queue_size, 0)
    assert struct.unpack_from("<HH", data, 8) == (1, queue_size), "version 1, desc_num"
    return sum(data[16 + 16 * i] for i in range(queue_size))


async def _kill_point(rng: random.Random, aim: bool, region_fd: int, queue_size: int) -> None:
    """A random moment; when aiming, the first moment after it (up to 0.5 s) at which the
    region shows requests in flight, so that some kills certainly catch the back-end mid-work."""
    await asyncio.sleep(rng.uniform(0.02, 0.3))
    if aim:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 0.5
        while loop.time() < deadline and not _marked_in_flight(region_fd, queue_size):
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
async def test_serve_blk_killed_20_times_loses_and_repeats_nothing(tmp_path: Path) -> None:
    seed = random.randrange(1 << 32)
    print(f"seed {seed}")
    rng = random.Random(seed)
    image, sock, log = tmp_path / "disk.img", tmp_path / "blk.sock", tmp_path / "serve.log"
    with image.open("wb") as f:
        f.truncate(WRITERS * SLOTS_PER_WRITER * CHUNK)
    procs = [_serve(sock, image, log)]
    with _reaped(procs):
        wait_for_socket(sock, procs[0])
        blk = await BlkDriver.open(
            str(sock), depth=WRITERS, max_request=CHUNK, queue_size=QUEUE_SIZE, timeout=10
        )
        assert blk.frontend.inflight is not None, "blk must offer INFLIGHT_SHMFD"
        stream = WriteStream(blk, rng)
        tasks = [asyncio.ensure_future(stream.writer(w)) for w in range(WRITERS)]
        try:
            await asyncio.wait_for(stream.progress(WRITERS), REQUEST_TIMEOUT)
            for kill in range(KILLS):
                await _kill_point(rng, kill % 2 == 1, blk.frontend._inflight_fd, QUEUE_SIZE)
                procs[-1].send_signal(signal.SIGKILL)
                procs[-1].wait()
                procs.append(_serve(sock, image, log))
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
