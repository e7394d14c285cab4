"""`vvu serve blk --nbd URI` against real NBD servers: qemu-nbd serving a qcow2 image, nbdkit's
memory plugin, and an NBD server that dies mid-I/O and comes back.

Each test runs the NBD server and `vvu serve blk` as processes (stopped by PID even when the
test fails) and drives the disk with vvu's own front-end (`BlkDriver`, many requests in flight).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from daemons import Daemon, need_tool, stop_process
from vvu.backends.blk import BlkFeature
from vvu.frontend import BlkDriver, BlkIOError

MiB = 1 << 20


def _wait_for(
    what: str, cond: Callable[[], bool], proc: subprocess.Popen[bytes], timeout: float = 10
) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: timed out")
        time.sleep(0.02)


@contextlib.contextmanager
def nbd_server(argv: Sequence[str], socket: Path) -> Iterator[subprocess.Popen[bytes]]:
    """An NBD server process listening on `socket`; stopped by PID on exit."""
    socket.unlink(missing_ok=True)
    proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for(f"{argv[0]} listening on {socket}", socket.exists, proc)
        yield proc
    finally:
        stop_process(proc)


def nbdkit(socket: Path, *args: str) -> list[str]:
    return [need_tool("nbdkit"), "--foreground", "--exit-with-parent", "-U", str(socket), *args]


def _uri(socket: Path, export: str = "") -> str:
    return f"nbd+unix:///{export}?socket={socket}"


@contextlib.contextmanager
def serving(tmp_path: Path, *args: str) -> Iterator[Daemon]:
    socket = tmp_path / "blk.sock"
    daemon = Daemon(["blk", "--socket-path", str(socket), *args], socket, tmp_path / "blk.log")
    try:
        yield daemon
    finally:
        assert daemon.stop() == 0, daemon.log()


def _pattern(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def test_qcow2_through_qemu_nbd(tmp_path: Path) -> None:
    """A qcow2 image served by qemu-nbd: capacity from the export, 32 concurrent writes and
    reads verified, flush, discard and write-zeroes mapped to NBD commands (the zeroed range
    reads back as zeros), a request past the end is IOERR; the data is in the qcow2 file
    afterwards."""
    qemu_img, qemu_nbd = need_tool("qemu-img"), need_tool("qemu-nbd")
    image = tmp_path / "disk.qcow2"
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(image), "48M"], check=True)
    sock = tmp_path / "nbd.sock"
    extents = [(i * 512 + 8, _pattern(i, 16384)) for i in range(32)]
    server = [qemu_nbd, "-f", "qcow2", "-x", "disk", "-k", str(sock), "-t", "-e", "8"]
    with (
        nbd_server([*server, "--discard=unmap", str(image)], sock),
        serving(tmp_path, "--nbd", _uri(sock, "disk")) as daemon,
    ):

        async def main() -> None:
            async with await BlkDriver.open(str(daemon.socket_path), depth=32) as blk:
                features = blk.frontend.features
                for bit in (BlkFeature.FLUSH, BlkFeature.DISCARD, BlkFeature.WRITE_ZEROES):
                    assert features & (1 << bit), bit
                assert not features & (1 << BlkFeature.RO)
                config = await blk.frontend.get_config(0, 24)
                (capacity,) = struct.unpack_from("<Q", config)
                assert capacity == 48 * MiB // 512
                await asyncio.gather(*(blk.write(s, d) for s, d in extents))
                back = await asyncio.gather(*(blk.read(s, len(d)) for s, d in extents))
                assert back == [d for _, d in extents]
                await blk.flush()
                await blk.discard(extents[0][0], 32)
                await blk.write_zeroes(extents[1][0], 32)
                # (A discard is a hint: qcow2 keeps a partly discarded cluster's data.)
                assert await blk.read(extents[1][0], 16384) == bytes(16384)
                with pytest.raises(BlkIOError):
                    await blk.read(capacity - 8, 8192)
                await blk.flush()

        asyncio.run(main())
        assert "NBD export nbd+unix:///disk" in daemon.log(), daemon.log()
    raw = tmp_path / "disk.raw"
    subprocess.run([qemu_img, "convert", "-O", "raw", str(image), str(raw)], check=True)
    data = raw.read_bytes()
    for sector, expected in extents[2:]:
        assert data[sector * 512 :][: len(expected)] == expected
    assert data[extents[1][0] * 512 :][:16384] == bytes(16384)


def test_read_only_nbdkit_export_and_what_the_server_offers(tmp_path: Path) -> None:
    """nbdkit -r (a read-only export): RO is offered, writes are IOERR, reads return the
    export's data; an export without NBD_FLAG_SEND_WRITE_ZEROES (nbdkit's nozero filter) gets
    no WRITE_ZEROES feature while DISCARD (trim) stays."""
    sock = tmp_path / "nbd.sock"
    argv = nbdkit(sock, "--filter=nozero", "memory", "1M", "zeromode=none")
    with nbd_server(argv, sock), serving(tmp_path, "--nbd", _uri(sock)) as daemon:

        async def offered() -> int:
            async with await BlkDriver.open(str(daemon.socket_path), depth=4) as blk:
                return blk.frontend.features

        features = asyncio.run(offered())
        assert features & (1 << BlkFeature.DISCARD)
        assert not features & (1 << BlkFeature.WRITE_ZEROES)
    argv = nbdkit(sock, "-r", "data", "data=@0x1000 1 2 3 4", "size=1M")
    with nbd_server(argv, sock), serving(tmp_path, "--nbd", _uri(sock)) as daemon:

        async def main() -> None:
            async with await BlkDriver.open(str(daemon.socket_path), depth=4) as blk:
                features = blk.frontend.features
                assert features & (1 << BlkFeature.RO)
                assert not features & (1 << BlkFeature.WRITE_ZEROES)
                assert not features & (1 << BlkFeature.DISCARD)
                assert (await blk.read(8, 512))[:4] == b"\x01\x02\x03\x04"
                with pytest.raises(BlkIOError):
                    await blk.write(0, bytes(512))

        asyncio.run(main())
        assert "read-only" in daemon.log()


def test_block_size_constraints_are_respected(tmp_path: Path) -> None:
    """nbdkit's blocksize-policy filter advertises a 4 KiB minimum and a 64 KiB maximum payload
    (and errors on anything else): the guest is told BLK_SIZE 4096, a 256 KiB request is split
    into NBD requests the server accepts and round-trips, and a 512-byte write is IOERR."""
    sock = tmp_path / "nbd.sock"
    argv = nbdkit(sock, "--filter=blocksize-policy", "memory", "4M")
    policy = ["blocksize-minimum=4096", "blocksize-preferred=65536", "blocksize-maximum=65536"]
    with (
        nbd_server([*argv, *policy, "blocksize-error-policy=error"], sock),
        serving(tmp_path, "--nbd", _uri(sock)) as daemon,
    ):

        async def main() -> None:
            async with await BlkDriver.open(
                str(daemon.socket_path), depth=4, max_request=256 << 10
            ) as blk:
                config = await blk.frontend.get_config(0, 24)
                (blk_size,) = struct.unpack_from("<I", config, 20)
                assert blk_size == 4096
                data = _pattern(3, 256 << 10)
                await blk.write(64, data)
                assert await blk.read(64, len(data)) == data
                with pytest.raises(BlkIOError):
                    await blk.write(1, bytes(512))

        asyncio.run(main())


def test_nbd_server_killed_mid_io_then_restarted(tmp_path: Path) -> None:
    """nbdkit (memory plugin, reads delayed so they are in flight) is SIGKILLed while 16 reads
    wait on it: every one of them completes with IOERR (nothing hangs), new requests fail
    too while it is away, also after the front-end reconnects (queues start without the
    server); once it is back, vvu reconnects and writes and reads succeed."""
    sock = tmp_path / "nbd.sock"
    log = tmp_path / "nbdkit.log"
    argv = nbdkit(sock, "--filter=log", "--filter=delay", "memory", "8M", "rdelay=20")
    restarted: list[subprocess.Popen[bytes]] = []
    with contextlib.ExitStack() as stack:
        # nbdkit waits for its clients on SIGTERM: stop the new one after vvu is gone.
        stack.callback(lambda: [stop_process(p) for p in restarted])
        daemon, server = stack.enter_context(
            serving_and_server(tmp_path, [*argv, f"logfile={log}"], sock)
        )

        async def main() -> None:
            async with await BlkDriver.open(str(daemon.socket_path), depth=16) as blk:
                await blk.write(0, _pattern(1, 4096))
                reads = [asyncio.ensure_future(blk.read(i * 8, 4096)) for i in range(16)]
                # Kill the server once it has started on the reads.
                while "Read id=" not in (log.read_text() if log.exists() else ""):
                    await asyncio.sleep(0.02)
                server.kill()
                results = await asyncio.wait_for(asyncio.gather(*reads, return_exceptions=True), 10)
                assert all(isinstance(r, BlkIOError) for r in results), results
                with pytest.raises(BlkIOError):
                    await asyncio.wait_for(blk.write(0, bytes(4096)), 10)
                # A new vhost-user session (new queue workers) while the server is still away.
                await blk.reconnect()
                with pytest.raises(BlkIOError):
                    await asyncio.wait_for(blk.read(0, 4096), 10)
                sock.unlink(missing_ok=True)
                new = subprocess.Popen(
                    nbdkit(sock, "memory", "8M"), stdin=subprocess.DEVNULL, start_new_session=True
                )
                restarted.append(new)
                _wait_for("nbdkit restarted", sock.exists, new)
                data = _pattern(2, 8192)
                deadline = time.monotonic() + 10
                while True:  # the reconnect backoff is at most 2 s
                    try:
                        await blk.write(16, data)
                        break
                    except BlkIOError:
                        assert time.monotonic() < deadline, "vvu did not reconnect"
                        await asyncio.sleep(0.1)
                assert await blk.read(16, 8192) == data

        asyncio.run(main())


def test_unresponsive_nbd_server_times_out_as_ioerr(tmp_path: Path) -> None:
    """A server that accepts requests and never answers (nbdkit's delay filter, 60 s per read)
    with `--nbd-timeout 1`: the reads fail with IOERR after about a second instead of hanging,
    and the daemon still stops cleanly."""
    sock = tmp_path / "nbd.sock"
    argv = nbdkit(sock, "--filter=delay", "memory", "1M", "rdelay=60")
    with (
        nbd_server(argv, sock),
        serving(tmp_path, "--nbd", _uri(sock), "--nbd-timeout", "1") as daemon,
    ):

        async def main() -> None:
            async with await BlkDriver.open(str(daemon.socket_path), depth=4) as blk:
                start = time.monotonic()
                reads = [blk.read(i * 8, 4096) for i in range(4)]
                results = await asyncio.wait_for(asyncio.gather(*reads, return_exceptions=True), 10)
                assert all(isinstance(r, BlkIOError) for r in results), results
                assert 0.9 < time.monotonic() - start < 8

        asyncio.run(main())


@contextlib.contextmanager
def serving_and_server(
    tmp_path: Path, argv: Sequence[str], sock: Path
) -> Iterator[tuple[Daemon, subprocess.Popen[bytes]]]:
    with nbd_server(argv, sock) as server, serving(tmp_path, "--nbd", _uri(sock)) as daemon:
        yield daemon, server


def _serve_once(tmp_path: Path, uri: str) -> subprocess.CompletedProcess[str]:
    """`vvu serve blk --nbd URI`, expected to refuse at once."""
    argv = [sys.executable, "-m", "vvu", "serve", "blk", "--socket-path", str(tmp_path / "s")]
    return subprocess.run(
        [*argv, "--nbd", uri], capture_output=True, text=True, timeout=30, check=False
    )


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("/tmp/disk.img", "bad NBD URI"),
        ("nbd+unix:///disk", "needs ?socket=PATH"),
        ("nbd://host:0/disk", "bad port"),
        ("nbds://host/disk", "TLS (nbds) is not supported"),
        ("nbd+unix:///disk?socket=/nonexistent/nbd.sock", "connecting to /nonexistent/nbd.sock"),
    ],
)
def test_bad_nbd_uris_are_clear_errors(tmp_path: Path, uri: str, message: str) -> None:
    result = _serve_once(tmp_path, uri)
    assert result.returncode == 1, result.stderr
    assert message in result.stderr, result.stderr


def test_unknown_export_is_a_clear_error(tmp_path: Path) -> None:
    sock = tmp_path / "nbd.sock"
    qemu_nbd = need_tool("qemu-nbd")
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(MiB))
    with nbd_server([qemu_nbd, "-f", "raw", "-x", "disk", "-k", str(sock), "-t", str(image)], sock):
        result = _serve_once(tmp_path, _uri(sock, "other"))
    assert result.returncode == 1, result.stderr
    assert 'refused export "other"' in result.stderr, result.stderr
