"""DEVICE_STATE between two back-end processes: a migration of blk's internal state.

Two `vvu serve blk` processes serve the same image (shared storage, as in a migration). Our
front-end sets the source's cache mode (SET_CONFIG, CONFIG_WCE), writes, stops the ring, saves
the state through a pipe, and loads it into the destination, which then serves the guest's view:
the cache mode and the serial (and the data, through the shared image).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemons import stop_process, wait_for_socket
from vvu.frontend import BlkDriver, Frontend, FrontendError
from vvu.protocol import U64, Config, FrontendRequest, ProtocolFeature, encode_reply
from vvu.transport.unix import socketpair_channels

pytestmark = pytest.mark.timeout(60)

VVU = [sys.executable, "-m", "vvu"]
MiB = 1 << 20
TIMEOUT = 10.0
WRITEBACK = 32  # virtio_blk_config.writeback


class Servers:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, *args: str) -> str:
        path = self.tmp_path / f"{name}.sock"
        log = (self.tmp_path / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            [*VVU, "-v", "serve", "blk", "--socket-path", str(path), *args],
            stdout=log,
            stderr=log,
        )
        log.close()
        self.procs.append(proc)
        wait_for_socket(path, proc)
        return str(path)

    def log(self, name: str) -> str:
        return (self.tmp_path / f"{name}.log").read_text()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    servers = Servers(tmp_path)
    try:
        yield servers
    finally:
        for proc in servers.procs:
            assert stop_process(proc) == 0


@pytest.mark.asyncio
async def test_blk_state_moves_between_two_backend_processes(
    tmp_path: Path, servers: Servers
) -> None:
    image = tmp_path / "shared.img"
    with image.open("wb") as f:
        f.truncate(8 * MiB)
    source = servers.start("source", "--image", str(image), "--serial", "source-disk")
    destination = servers.start("destination", "--image", str(image), "--serial", "dest-disk")

    blk = await BlkDriver.open(source, depth=4, max_request=64 * 1024, queue_size=64)
    assert blk.frontend.protocol_features & ProtocolFeature.DEVICE_STATE.mask
    frontend = blk.frontend
    await frontend.request(FrontendRequest.SET_CONFIG, Config(WRITEBACK, 0, b"\0"))
    assert await frontend.get_config(WRITEBACK, 1) == b"\0"  # the guest chose writethrough
    data = os.urandom(16 * 1024)
    await asyncio.wait_for(blk.write(64, data), TIMEOUT)
    with pytest.raises(FrontendError, match="refused to save"):  # the ring still runs
        await frontend.save_device_state()
    base = await frontend.stop_queue(0)
    assert base == 1
    state = await asyncio.wait_for(frontend.save_device_state(), TIMEOUT)
    await blk.close()

    # The destination's defaults differ (writeback on, its own serial) until the load.
    target = await Frontend.connect(destination, memory_size=4 * MiB)
    try:
        await target.negotiate()
        await target.set_mem_table()
        assert await target.get_config(WRITEBACK, 1) == b"\1"
        await asyncio.wait_for(target.load_device_state(state), TIMEOUT)
        assert await target.get_config(WRITEBACK, 1) == b"\0"
        capacity = 8 * MiB // 512
        moved = BlkDriver(
            target, await target.start_queue(0, 64), capacity, depth=4, max_request=64 * 1024
        )
        assert await asyncio.wait_for(moved.get_id(), TIMEOUT) == b"source-disk"
        assert await asyncio.wait_for(moved.read(64, len(data)), TIMEOUT) == data
    finally:
        await target.close()
    assert "device state saved" in servers.log("source")
    assert "device state loaded" in servers.log("destination")


@pytest.mark.asyncio
async def test_our_frontend_uses_the_fd_a_backend_returns() -> None:
    """A back-end may answer SET_DEVICE_STATE_FD with its own fd (bit 8 clear): the front-end
    must then read (save) or write (load) that one instead of its pipe. Scripted back-end."""
    client, backend = socketpair_channels()
    frontend = Frontend(client, memory_size=MiB)

    async def answer(transfer_data: bytes | None) -> bytes:
        """Serve one SET_DEVICE_STATE_FD + CHECK_DEVICE_STATE; return what was loaded."""
        raw = await asyncio.wait_for(backend.recv(), TIMEOUT)
        assert raw is not None and raw.request == FrontendRequest.SET_DEVICE_STATE_FD
        raw.close_fds()  # the front-end's pipe end: not used
        read_end, write_end = os.pipe()
        ours, theirs = (write_end, read_end) if transfer_data is not None else (read_end, write_end)
        reply = encode_reply(FrontendRequest.SET_DEVICE_STATE_FD, U64(0), nfds=1)
        await backend.send(reply, [theirs])
        os.close(theirs)
        loaded = b""
        if transfer_data is not None:
            os.write(ours, transfer_data)
        else:
            while chunk := await asyncio.to_thread(os.read, ours, 4096):
                loaded += chunk
        os.close(ours)
        raw = await asyncio.wait_for(backend.recv(), TIMEOUT)
        assert raw is not None and raw.request == FrontendRequest.CHECK_DEVICE_STATE
        await backend.send(encode_reply(FrontendRequest.CHECK_DEVICE_STATE, U64(0)))
        return loaded

    try:
        served = asyncio.ensure_future(answer(b"state from the back-end's own pipe"))
        state = await asyncio.wait_for(frontend.save_device_state(), TIMEOUT)
        assert state == b"state from the back-end's own pipe"
        await served
        served = asyncio.ensure_future(answer(None))
        await asyncio.wait_for(frontend.load_device_state(b"state for the back-end"), TIMEOUT)
        assert await served == b"state for the back-end"
    finally:
        await frontend.close()
        backend.close()
