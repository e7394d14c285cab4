"""AF_UNIX transport: framing across short reads, fds, caps, EOF, listener and client."""

from __future__ import annotations

import array
import asyncio
import itertools
import os
import socket
import stat
import struct
import time
from pathlib import Path

import pytest

from vvu.protocol.codec import Header
from vvu.transport.base import RawMessage, TransportError
from vvu.transport.unix import (
    UnixChannel,
    UnixConnector,
    UnixListener,
    connect_unix,
    listening_socket,
    socketpair_channels,
)


def encode_header(request: int, flags: int, size: int) -> bytes:
    return Header(request, flags, size).pack()


def _fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.mark.asyncio
async def test_message_with_fds_round_trips() -> None:
    a, b = socketpair_channels()
    r, w = os.pipe()
    try:
        await a.send(encode_header(13, 1, 8) + struct.pack("<Q", 3), [w])
        msg = await b.recv()
        assert msg is not None
        assert (msg.request, msg.flags, msg.payload) == (13, 1, struct.pack("<Q", 3))
        assert len(msg.fds) == 1
        os.write(msg.fds[0], b"x")  # the received fd is the same pipe
        assert os.read(r, 1) == b"x"
        msg.close_fds()
    finally:
        os.close(r)
        os.close(w)
        a.close()
        b.close()


@pytest.mark.asyncio
async def test_short_reads_are_reassembled_and_fds_kept() -> None:
    raw_a, raw_b = socket.socketpair()
    chan = UnixChannel(raw_b)
    r, w = os.pipe()
    data = encode_header(5, 1, 40) + bytes(range(40))
    try:
        raw_a.sendmsg(
            [data[:1]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [w]).tobytes())]
        )
        recv_task = asyncio.ensure_future(chan.recv())
        for i in range(1, len(data)):
            await asyncio.sleep(0)
            raw_a.send(data[i : i + 1])
        msg = await asyncio.wait_for(recv_task, 5)
        assert msg is not None and msg.payload == bytes(range(40)) and len(msg.fds) == 1
        msg.close_fds()
    finally:
        os.close(r)
        os.close(w)
        raw_a.close()
        chan.close()


@pytest.mark.asyncio
async def test_a_waiting_session_keeps_its_reader_and_drops_it_when_nobody_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A front-end waiting for each reply: every message after the first wait is read through
    the reader registered then (no epoll registration per message). Data that arrives while
    nobody reads unregisters it (a level-triggered reader would otherwise run on every loop
    iteration), and is read whole by the next recv."""
    loop = asyncio.get_running_loop()
    registered: list[int] = []
    add_reader = loop.add_reader

    def counting_add_reader(fd: int, *args: object) -> None:
        registered.append(fd)
        add_reader(fd, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(loop, "add_reader", counting_add_reader)
    raw_a, raw_b = socket.socketpair()
    chan = UnixChannel(raw_b)
    try:
        for i in range(5):
            recv_task = asyncio.ensure_future(chan.recv())
            for _ in range(3):
                await asyncio.sleep(0)  # recv is waiting now
            raw_a.send(encode_header(i, 1, 4) + b"abcd")
            msg = await asyncio.wait_for(recv_task, 5)
            assert msg is not None and (msg.request, msg.payload) == (i, b"abcd")
        assert registered == [raw_b.fileno()]
        raw_a.send(encode_header(9, 1, 0))  # nobody reads now
        for _ in range(3):
            await asyncio.sleep(0)
        assert not loop.remove_reader(raw_b.fileno()), "still watched while nobody reads"
        msg = await asyncio.wait_for(chan.recv(), 5)
        assert msg is not None and msg.request == 9
    finally:
        raw_a.close()
        chan.close()


@pytest.mark.asyncio
async def test_close_fails_a_waiting_recv() -> None:
    a, b = socketpair_channels()
    recv_task = asyncio.ensure_future(b.recv())
    await asyncio.sleep(0)
    b.close()
    with pytest.raises(TransportError, match="closed"):
        await asyncio.wait_for(recv_task, 5)
    a.close()


@pytest.mark.asyncio
async def test_clean_eof_between_messages_is_none() -> None:
    a, b = socketpair_channels()
    a.close()
    assert await b.recv() is None
    b.close()


@pytest.mark.asyncio
async def test_eof_mid_message_is_an_error_and_closes_fds() -> None:
    raw_a, raw_b = socket.socketpair()
    chan = UnixChannel(raw_b)
    r, w = os.pipe()
    os.close(r)
    raw_a.sendmsg(
        [encode_header(5, 1, 40) + b"abc"],
        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [w]).tobytes())],
    )
    os.close(w)
    raw_a.close()
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(TransportError, match="mid-message"):
        await chan.recv()
    after = set(os.listdir("/proc/self/fd"))
    assert after <= before, "the fds of a broken message must be closed"
    chan.close()


@pytest.mark.asyncio
async def test_oversized_payload_is_refused_before_reading_it() -> None:
    a, b = socketpair_channels()
    await a.send(encode_header(1, 1, 4097))
    with pytest.raises(TransportError, match="4096-byte cap"):
        await b.recv()
    a.close()
    b.close()


@pytest.mark.asyncio
async def test_large_send_completes_across_partial_writes() -> None:
    raw_a, raw_b = socket.socketpair()
    raw_a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # forces partial writes
    a, b = UnixChannel(raw_a), UnixChannel(raw_b)
    payload = os.urandom(4096)
    messages = [encode_header(i, 1, len(payload)) + payload for i in range(50)]

    async def sender() -> None:
        for m in messages:
            await a.send(m)

    task = asyncio.ensure_future(sender())
    for i in range(50):
        msg = await asyncio.wait_for(b.recv(), 5)
        assert msg is not None and msg.request == i and msg.payload == payload
    await task
    a.close()
    b.close()


@pytest.mark.asyncio
async def test_listener_creates_private_socket_and_cleans_up(tmp_path: Path) -> None:
    path = str(tmp_path / "vhost.sock")
    listener = UnixListener(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    client_task = asyncio.ensure_future(connect_unix(path, timeout=5))
    server_side = await asyncio.wait_for(listener.accept(), 5)
    client = await client_task
    await client.send(encode_header(3, 1, 0))
    msg = await server_side.recv()
    assert isinstance(msg, RawMessage) and msg.request == 3
    client.close()
    server_side.close()
    listener.close()
    assert not os.path.exists(path)


@pytest.mark.asyncio
async def test_client_retries_until_server_appears(tmp_path: Path) -> None:
    path = str(tmp_path / "late.sock")
    client_task = asyncio.ensure_future(connect_unix(path, timeout=5, retry_interval=0.02))
    await asyncio.sleep(0.1)
    listener = UnixListener(path)
    server_side = await asyncio.wait_for(listener.accept(), 5)
    client = await client_task
    client.close()
    server_side.close()
    listener.close()


@pytest.mark.asyncio
async def test_client_gives_up_with_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="cannot connect"):
        await connect_unix(str(tmp_path / "nobody.sock"), timeout=0.05, retry_interval=0.01)


def test_stale_socket_is_replaced_but_live_one_and_files_are_not(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # file stays, nobody listens
    listener = UnixListener(path)
    with pytest.raises(FileExistsError):
        UnixListener(path)  # a live server owns it
    listener.close()
    regular = tmp_path / "file"
    regular.write_text("data")
    with pytest.raises(FileExistsError):
        UnixListener(str(regular))
    assert regular.read_text() == "data"


@pytest.mark.asyncio
async def test_backend_channel_from_received_socket() -> None:
    front, back = socketpair_channels()
    x, y = socket.socketpair()
    await front.send(encode_header(21, 1 | 8, 0), [y.fileno()])
    y.close()
    msg = await back.recv()
    assert msg is not None and len(msg.fds) == 1
    backend_channel = back.open_backend_channel(msg.fds[0])
    await backend_channel.send(encode_header(2, 1, 0))
    assert x.recv(12) == encode_header(2, 1, 0)
    backend_channel.close()
    x.close()
    front.close()
    back.close()
    r, w = os.pipe()
    os.close(w)
    with pytest.raises(TransportError, match="not a socket"):
        back.open_backend_channel(r)
    assert not _fd_is_open(r)


@pytest.mark.asyncio
async def test_connector_backs_off_from_a_front_end_that_drops_at_once(tmp_path: Path) -> None:
    """Client mode does not hammer a front-end that accepts and closes at once: the waits
    between connections double up to `retry_max`; a session that lasted long starts them
    short again."""
    path = tmp_path / "fe.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(16)
    connector = UnixConnector(str(path), retry_first=0.02, retry_max=0.16)
    times = []
    for _ in range(6):
        channel = await connector.accept()
        times.append(time.monotonic())
        channel.close()
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps[0] >= 0.02 and gaps[-1] >= 0.16, gaps
    assert gaps[-1] < 0.5, gaps  # capped
    channel = await connector.accept()
    await asyncio.sleep(0.2)  # a session longer than retry_max
    channel.close()
    started = time.monotonic()
    (await connector.accept()).close()
    assert time.monotonic() - started < 0.1
    server.close()


def test_a_socket_path_that_cannot_be_bound_is_named_in_the_error(tmp_path: Path) -> None:
    path = str(tmp_path / "missing-dir" / "vhost.sock")
    with pytest.raises(FileNotFoundError) as err:
        listening_socket(path)
    assert path in str(err.value)


# --- serve_each: messages handled from the reader callback ---------------------------------


@pytest.mark.asyncio
async def test_serve_each_handles_in_order_as_the_serving_task_and_waits_for_a_waiting_one() -> (
    None
):
    """Each handling runs as part of the task that called serve_each (also when it runs from
    the socket's reader callback, which is the point: no task wake-up per message); one that
    waits holds the next message back until it is done; a clean EOF ends serve_each."""
    a, b = socketpair_channels()
    release = asyncio.Event()
    seen: list[tuple[int, bool, str]] = []

    async def handle(raw: RawMessage) -> None:
        seen.append((raw.request, asyncio.current_task() is serving, "start"))
        if raw.request == 2:
            await release.wait()
        seen.append((raw.request, asyncio.current_task() is serving, "end"))

    serving = asyncio.ensure_future(b.serve_each(handle))
    try:
        await asyncio.sleep(0)  # serving waits for a first message: the callback handles it
        await a.send(encode_header(1, 1, 0))
        for request in (2, 3):
            await a.send(encode_header(request, 1, 0))
        while len(seen) < 3:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.01)  # 3 is in the socket, held back while 2 waits
        assert seen == [(1, True, "start"), (1, True, "end"), (2, True, "start")]
        release.set()
        a.close()  # EOF after 3
        await asyncio.wait_for(serving, 5)
        assert seen[3:] == [(2, True, "end"), (3, True, "start"), (3, True, "end")]
    finally:
        serving.cancel()
        a.close()
        b.close()


@pytest.mark.asyncio
async def test_serve_each_raises_what_a_handling_raised_and_a_cancel_reaches_a_waiting_one() -> (
    None
):
    a, b = socketpair_channels()

    async def fail(raw: RawMessage) -> None:
        raise ValueError(f"request {raw.request}")

    serving = asyncio.ensure_future(b.serve_each(fail))
    await asyncio.sleep(0)
    await a.send(encode_header(7, 1, 0))
    with pytest.raises(ValueError, match="request 7"):
        await asyncio.wait_for(serving, 5)

    cancelled = asyncio.Event()

    async def wait_forever(raw: RawMessage) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    serving = asyncio.ensure_future(b.serve_each(wait_forever))
    await a.send(encode_header(8, 1, 0))
    await asyncio.sleep(0.01)
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving
    assert cancelled.is_set()
    a.close()
    b.close()
