"""`vvu daemon`: many devices in one process, its JSON-RPC management API, metrics, `vvu ctl`.

Most tests run the daemon in the test's own event loop (`Daemon` + `ManagementApi` on a unix
socket in tmp_path) and talk to it through the public `DaemonClient`, with vvu's own front-end
(`BlkDriver`) on the device sockets; raw JSON lines prove the error answers. The command-line
tests run `vvu daemon` and `vvu ctl` as child processes. No sleeps: every wait is on an event,
a reply or a file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import gzip
import http.client
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from daemons import Daemon as DaemonProcess
from daemons import notify_socket, socket_activated, stop_process
from vvu.backends import available_backends
from vvu.backends.blk import BlkFeature
from vvu.daemon import DaemonClient, DeviceSpec, RpcError, SpecError
from vvu.daemon.api import ManagementApi
from vvu.daemon.core import Daemon
from vvu.daemon.metrics import registry_for
from vvu.daemon.rpc import MAX_LINE
from vvu.daemon.spec import load_config
from vvu.frontend import BlkDriver
from vvu.frontend.blk import BlkIOError
from vvu.transport.unix import listening_socket

TIMEOUT = 20.0
MiB = 1 << 20


@dataclass
class Running:
    daemon: Daemon
    api: ManagementApi
    path: Path
    tmp: Path

    def sock(self, name: str) -> str:
        return str(self.tmp / f"{name}.sock")


@pytest_asyncio.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    daemon = Daemon()
    api = ManagementApi(daemon, registry_for(daemon, asyncio.get_running_loop()))
    path = tmp_path / "api.sock"
    server = await asyncio.start_unix_server(
        api.rpc.serve_client, sock=listening_socket(str(path)), limit=MAX_LINE
    )
    try:
        yield Running(daemon, api, path, tmp_path)
    finally:
        server.close()
        api.rpc.close()
        await daemon.close()


@pytest_asyncio.fixture
async def client(running: Running) -> AsyncIterator[DaemonClient]:
    async with await DaemonClient.connect(str(running.path)) as api:
        yield api


async def raw_call(path: Path, line: bytes) -> object:
    """One raw frame to the API and its decoded answer."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(line + b"\n")
        await writer.drain()
        return json.loads(await asyncio.wait_for(reader.readline(), TIMEOUT))
    finally:
        writer.close()


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


# --- devices, I/O and statistics ---------------------------------------------------------------


@pytest.mark.asyncio
async def test_add_serve_stats_remove(running: Running, client: DaemonClient) -> None:
    options = {"size": 4, "latency-histogram": True}
    info = await client.device_add("d0", "blk", running.sock("d0"), options)
    assert info["id"] == "d0" and not info["connected"]
    assert stat.S_IMODE(os.stat(running.sock("d0")).st_mode) == 0o600
    async with await BlkDriver.open(running.sock("d0")) as blk:
        assert blk.capacity == 4 * MiB // 512
        await blk.write(8, pattern(4096, 1))
        assert await blk.read(8, 4096) == pattern(4096, 1)
        [listed] = await client.device_list()
        assert listed["connected"] and listed["peer"]
        [stats] = await client.stats("d0")
    queue = stats["queues"][0]
    # Two data requests; the handshake itself sends no blk request.
    assert (queue["requests"], queue["reads"], queue["writes"]) == (2, 1, 1)  # type: ignore[typeddict-item]
    assert (queue["bytes_read"], queue["bytes_written"]) == (4096, 4096)
    assert queue["chains"] == 2 and queue["in_flight"] == 0 and queue["malformed"] == 0
    assert sum(queue["latency_us_buckets"]) == 2 and queue["latency_ns_sum"] > 0
    assert stats["totals"]["requests"] == 2
    await client.device_remove("d0")
    assert not os.path.exists(running.sock("d0"))
    assert await client.device_list() == []


@pytest.mark.asyncio
async def test_counters_survive_sessions(running: Running, client: DaemonClient) -> None:
    """Per-device counters add up over front-end sessions (rings start and stop each time)."""
    await client.device_add("d0", "blk", running.sock("d0"))
    for n in range(3):
        async with await BlkDriver.open(running.sock("d0")) as blk:
            await blk.read(n, 512)
    await wait_for(lambda: running.daemon.get("d0").engine.sessions_served == 3)
    [stats] = await client.stats("d0")
    assert stats["sessions"] == 3
    assert stats["queues"][0]["reads"] == 3 and stats["queues"][0]["chains"] == 3  # type: ignore[typeddict-item]


async def wait_for(condition: object, timeout: float = TIMEOUT) -> None:
    """Poll a condition on the event loop (a state the daemon reaches by itself)."""
    assert callable(condition)
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_rng_and_blk_in_one_daemon(running: Running, client: DaemonClient) -> None:
    from vvu.frontend import RngDriver  # noqa: PLC0415

    await client.device_add("disk", "blk", running.sock("disk"))
    await client.device_add("rng", "rng", running.sock("rng"))
    rng = await RngDriver.open(running.sock("rng"))
    try:
        assert len(await rng.read(64)) == 64
    finally:
        await rng.close()
    stats = {s["id"]: s for s in await client.stats()}
    assert stats["rng"]["queues"][0]["chains"] == 1
    assert "requests" not in stats["rng"]["queues"][0]  # blk's counters only on blk


# --- isolation -----------------------------------------------------------------------------------


async def garbage_frontend(path: str, stop: asyncio.Event) -> int:
    """Connect again and again and send garbage (bad headers, huge sizes, random bytes)."""
    sent = 0
    blobs = [b"\xff" * 12, os.urandom(4096), b"\x01\x00\x00\x00\x01\x00\x00\x00\xff\xff\xff\x7f"]
    while not stop.is_set():
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(blobs[sent % len(blobs)])
        with contextlib.suppress(ConnectionError):
            await writer.drain()
            await reader.read()  # the daemon drops us: EOF
        writer.close()
        sent += 1
    return sent


@pytest.mark.asyncio
async def test_hostile_frontend_does_not_stop_others(
    running: Running, client: DaemonClient
) -> None:
    await client.device_add("victim", "blk", running.sock("victim"))
    await client.device_add("good", "blk", running.sock("good"))
    await client.subscribe()
    stop = asyncio.Event()
    attacker = asyncio.ensure_future(garbage_frontend(running.sock("victim"), stop))
    try:
        async with await BlkDriver.open(running.sock("good")) as blk:
            for i in range(64):
                await blk.write(i * 8, pattern(4096, i))
                assert await blk.read(i * 8, 4096) == pattern(4096, i)
        # Meanwhile a ring fault on a third device's session breaks only that ring.
        await client.device_add("broken", "blk", running.sock("broken"))
        async with await BlkDriver.open(running.sock("broken")) as bad:
            bad.queue.submit([(1 << 45, 16)], [(0x1000, 1)])  # outside guest memory
            bad.queue.notify()
            event = await next_event(client, "ring-broken")
            assert event["device"] == "broken"
            [stats] = await client.stats("broken")
            assert stats["queues"][0]["fault"]
    finally:
        stop.set()
        sessions = await attacker
    assert sessions > 0
    [victim] = [s for s in await client.stats() if s["id"] == "victim"]
    assert victim["sessions"] >= sessions - 1
    # The attacked device still serves a well-behaved front-end.
    async with await BlkDriver.open(running.sock("victim")) as blk:
        await blk.write(0, pattern(512, 9))
        assert await blk.read(0, 512) == pattern(512, 9)


async def next_event(client: DaemonClient, name: str) -> dict[str, object]:
    async with asyncio.timeout(TIMEOUT):
        while True:
            event = await client.next_event()
            if event["event"] == name:
                return dict(event)


# --- runtime changes -------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_resize_tells_the_frontend(running: Running, client: DaemonClient) -> None:
    image = running.tmp / "disk.img"
    image.write_bytes(b"\0" * MiB)
    await client.device_add("d0", "blk", running.sock("d0"), {"blk-file": str(image)})
    async with await BlkDriver.open(running.sock("d0"), backend_channel=True) as blk:
        assert blk.capacity == 2048
        assert await client.resize("d0", 2 * MiB) is True
        await asyncio.wait_for(blk.resized.wait(), TIMEOUT)
        assert blk.capacity == 4096
        await blk.write(4095, pattern(512, 3))  # the new last sector
    assert image.stat().st_size == 2 * MiB
    with pytest.raises(RpcError) as err:
        await client.resize("d0", 0)
    assert err.value.code == -32602


@pytest.mark.asyncio
async def test_set_read_only(running: Running, client: DaemonClient) -> None:
    image = running.tmp / "disk.img"
    image.write_bytes(pattern(MiB, 5))
    await client.device_add("d0", "blk", running.sock("d0"), {"blk-file": str(image)})
    async with await BlkDriver.open(running.sock("d0")) as blk:
        await blk.write(0, b"\1" * 512)
        await client.set_read_only("d0", True)
        with pytest.raises(BlkIOError):
            await blk.write(1, b"\2" * 512)
        assert await blk.read(1, 512) == pattern(MiB, 5)[512:1024]
        await client.set_read_only("d0", False)
        await blk.write(1, b"\3" * 512)
    assert image.read_bytes()[:1024] == b"\1" * 512 + b"\3" * 512
    # VIRTIO_BLK_F_RO is negotiated once per session: the next front-end sees the disk's mode.
    # (Each change waits for the session before to be over: a change racing with a session's
    # end is not what this shows.)
    read_only_bit = 1 << BlkFeature.RO
    engine = running.daemon.get("d0").engine
    for read_only, sessions in ((True, 1), (False, 2)):
        await wait_for(lambda n=sessions: engine.sessions_served == n)
        await client.set_read_only("d0", read_only)
        async with await BlkDriver.open(running.sock("d0")) as blk:
            assert bool(blk.frontend.features & read_only_bit) is read_only
    with pytest.raises(RpcError) as err:
        await client.device_add("r", "rng", running.sock("r"))
        await client.set_read_only("r", True)
    assert err.value.code == 3  # not supported by rng


@pytest.mark.asyncio
async def test_disconnect_and_events(running: Running, client: DaemonClient) -> None:
    await client.subscribe()
    await client.device_add("d0", "blk", running.sock("d0"))
    assert (await next_event(client, "device-added"))["device"] == "d0"
    blk = await BlkDriver.open(running.sock("d0"))
    try:
        await next_event(client, "frontend-connected")
        assert await client.disconnect("d0") is True
        event = await next_event(client, "frontend-disconnected")
        assert event["reason"] == "disconnected by the management API"
        [listed] = await client.device_list()
        assert not listed["connected"]
    finally:
        await blk.close()
    assert await client.disconnect("d0") is False
    # The device listens again (it serves one front-end at a time: the first one is gone).
    async with await BlkDriver.open(running.sock("d0")) as again:
        await again.read(0, 512)
    await client.device_remove("d0")
    assert (await next_event(client, "device-removed"))["device"] == "d0"


# --- metrics -----------------------------------------------------------------------------------


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.mark.asyncio
async def test_metrics(running: Running, client: DaemonClient) -> None:
    await client.device_add("d0", "blk", running.sock("d0"), {"latency-histogram": True})
    await client.device_add("untimed", "blk", running.sock("untimed"))
    async with await BlkDriver.open(running.sock("d0")) as blk:
        await blk.write(0, pattern(8192, 2))
        await blk.read(0, 8192)
        await blk.read(0, 512)
    await wait_for(lambda: running.daemon.get("d0").engine.sessions_served == 1)
    text = await client.metrics()
    got = samples(text)
    q = (("device", "d0"), ("queue", "0"))
    assert got[("vvu_requests_total", q)] == 3
    assert got[("vvu_read_bytes_total", q)] == 8192 + 512
    assert got[("vvu_written_bytes_total", q)] == 8192
    assert got[("vvu_request_latency_seconds_count", q)] == 3
    assert got[("vvu_request_latency_seconds_bucket", (*q[:1], ("le", "+Inf"), q[1]))] == 3
    assert got[("vvu_device_sessions_total", (("device", "d0"), ("type", "blk")))] == 1
    # Without --latency-histogram no request is timed and there is no histogram.
    assert ("vvu_requests_total", (("device", "untimed"), ("queue", "0"))) in got
    assert not any(n.startswith("vvu_request_latency") and ("device", "untimed") in labels
                   for n, labels in got)  # fmt: skip
    [untimed] = await client.stats("untimed")
    assert "latency_us_buckets" not in untimed["queues"][0]
    om = await client.metrics("openmetrics")
    assert om.endswith("# EOF\n")


# --- validation: bad requests get a clear error and change nothing ----------------------------


BAD_FRAMES = [
    (b"{not json", -32700),
    (b"[]", -32600),
    (b'"hello"', -32600),
    (b'{"jsonrpc":"1.0","id":1,"method":"device-list"}', -32600),
    (b'{"jsonrpc":"2.0","id":1,"method":7}', -32600),
    (b'{"jsonrpc":"2.0","method":7}', -32600),  # no id, but not a valid notification either
    (b'{"jsonrpc":"2.0","id":{},"method":"device-list"}', -32600),
    (b'{"jsonrpc":"2.0","id":1,"method":"device-list","extra":1}', -32600),
    (b'{"jsonrpc":"2.0","id":1,"method":"reboot"}', -32601),
    (b'{"jsonrpc":"2.0","id":1,"method":"device-list","params":{"x":1}}', -32602),
    (b'{"jsonrpc":"2.0","id":1,"method":"device-remove"}', -32602),
    (b'{"jsonrpc":"2.0","id":1,"method":"device-remove","params":{"id":5}}', -32602),
    (b'{"jsonrpc":"2.0","id":1,"method":"device-remove","params":"d0"}', -32602),
    (b'{"jsonrpc":"2.0","id":1,"method":"resize","params":{"id":"d0","size":true}}', -32602),
    (b'{"jsonrpc":"2.0","id":1,"method":"resize","params":{"id":"d0","size":-1}}', -32602),
    (b'{"jsonrpc":"2.0","id":1,"method":"set-read-only","params":["d0",1]}', -32602),
    (b'{"jsonrpc":"2.0","id":1,"method":"metrics","params":{"format":"xml"}}', -32602),
    (b'{"jsonrpc":"2.0","id":1,"method":"device-remove","params":{"id":"nope"}}', 1),
    (b'{"jsonrpc":"2.0","id":1,"method":"stats","params":{"id":"nope"}}', 1),
]


def add_frame(**params: object) -> bytes:
    return json.dumps(
        {"jsonrpc": "2.0", "id": 1, "method": "device-add", "params": params}
    ).encode()


@pytest.mark.asyncio
async def test_bad_requests_change_nothing(running: Running, client: DaemonClient) -> None:
    await client.device_add("d0", "blk", running.sock("d0"), {"size": 1})
    (running.tmp / "file").write_text("not a socket")
    before = await client.device_list()
    files = sorted(os.listdir(running.tmp))
    frames = [
        *BAD_FRAMES,
        (add_frame(id="d0", type="blk", socket=running.sock("x")), 2),  # id taken
        (add_frame(id="d1", type="blk", socket=running.sock("d0")), 2),  # socket taken
        (add_frame(id="d1", type="disk", socket=running.sock("x")), -32602),  # unknown type
        (add_frame(id="-bad", type="blk", socket=running.sock("x")), -32602),  # bad id
        (add_frame(id="d1", type="blk", socket=running.sock("x"), options={"nope": 1}), -32602),
        (add_frame(id="d1", type="blk", socket=running.sock("x"), options={"size": True}), -32602),
        (
            add_frame(id="d1", type="blk", socket=running.sock("x"), options={"read-only": 1}),
            -32602,
        ),
        (add_frame(id="d1", type="blk", socket=running.sock("x"), options={"size": [1]}), -32602),
        (add_frame(id="d1", type="blk", socket=running.sock("x"), **{"socket-mode": "rw"}), -32602),
        (add_frame(id="d1", type="blk", socket="x" * 200), -32602),
        # Valid requests the back-end or the socket refuses: nothing is left behind either.
        (add_frame(id="d1", type="blk", socket=running.sock("x"), options={"blk-file": "/no"}), 4),
        (add_frame(id="d1", type="blk", socket=str(running.tmp / "file")), 4),
        (add_frame(id="d1", type="blk", socket=running.sock("x"), options={"size": 0}), 4),
    ]
    for frame, code in frames:
        answer = await raw_call(running.path, frame)
        assert isinstance(answer, dict), frame
        assert answer["error"]["code"] == code, (frame, answer)
        assert answer["error"]["message"], frame
    assert await client.device_list() == before
    assert sorted(os.listdir(running.tmp)) == files


@pytest.mark.asyncio
async def test_batch_and_notification(running: Running) -> None:
    frame = (
        b'[{"jsonrpc":"2.0","id":"a","method":"device-list"},'
        b'{"jsonrpc":"2.0","method":"device-list"},'
        b'{"jsonrpc":"2.0","id":"b","method":"nope"}]'
    )
    answer = await raw_call(running.path, frame)
    assert isinstance(answer, list) and [a["id"] for a in answer] == ["a", "b"]
    assert answer[0]["result"] == [] and answer[1]["error"]["code"] == -32601


@pytest.mark.asyncio
async def test_oversized_request_is_refused(running: Running, client: DaemonClient) -> None:
    """A request line over 1 MiB: a parse error, then that connection is ended; the daemon
    (and every other connection) goes on."""
    reader, writer = await asyncio.open_unix_connection(str(running.path))
    try:
        writer.write(b"[" + b" " * (MAX_LINE + 10) + b"]\n")
        await writer.drain()
        answer = json.loads(await asyncio.wait_for(reader.readline(), TIMEOUT))
        assert isinstance(answer, dict) and answer["error"]["code"] == -32700
        try:
            rest = await asyncio.wait_for(reader.read(), TIMEOUT)
        except ConnectionResetError:  # closed with the rest of the line unread
            rest = b""
        assert rest == b"", "the connection was not ended"
    finally:
        writer.close()
    assert await client.device_list() == []  # the daemon goes on


# --- no leaks ------------------------------------------------------------------------------------


def open_fds() -> list[str]:
    out = []
    for fd in sorted(os.listdir("/proc/self/fd")):
        with contextlib.suppress(OSError):
            out.append(f"{fd} {os.readlink(f'/proc/self/fd/{fd}')}")
    return out


@pytest.mark.asyncio
async def test_add_remove_leaks_nothing(running: Running, client: DaemonClient) -> None:
    async def cycle(n: int) -> None:
        """Odd cycles remove the device while its front-end is still connected."""
        await client.device_add(f"d{n}", "blk", running.sock(f"d{n}"))
        async with await BlkDriver.open(running.sock(f"d{n}")) as blk:
            await blk.write(0, pattern(512, n))
            if n % 2:
                await client.device_remove(f"d{n}")
                assert not os.path.exists(running.sock(f"d{n}"))
        if not n % 2:
            await client.device_remove(f"d{n}")

    await cycle(0)  # warm-up: the executor's threads, lazily imported modules
    gc.collect()
    fds, threads = open_fds(), threading.active_count()
    for n in range(1, 6):
        await cycle(n)

    def new_fds() -> list[str]:
        gc.collect()
        return sorted(set(open_fds()) - set(fds))

    # Nothing opened since (each entry is fd and target: a socket or pipe by its inode, a memfd
    # by its name). The baseline may still hold the warm-up front-end's fds (freed later), and
    # the last front-end's are freed once the loop has run its pending callbacks.
    with contextlib.suppress(TimeoutError):
        await wait_for(lambda: not new_fds(), 5.0)
    assert new_fds() == []
    assert threading.active_count() == threads
    assert [p.name for p in running.tmp.iterdir() if p.suffix == ".sock"] == ["api.sock"]


# --- config file ---------------------------------------------------------------------------------


def test_config_file(tmp_path: Path) -> None:
    path = tmp_path / "vvu.toml"
    path.write_text(
        '[api]\nsocket = "/run/api.sock"\nmetrics-http = "127.0.0.1:9101"\n'
        '[[device]]\nid = "a"\ntype = "blk"\nsocket = "/run/a.sock"\nblk-file = "/d.img"\n'
        "read-only = true\n"
        '[[device]]\nid = "b"\ntype = "rng"\nsocket = "/run/b.sock"\nsocket-mode = "660"\n'
    )
    config = load_config(path)
    assert config.api_socket == "/run/api.sock" and config.metrics_http == "127.0.0.1:9101"
    a, b = config.devices
    assert a.options == {"blk-file": "/d.img", "read-only": True}
    args = a.backend_arguments()
    assert (args.image, args.read_only) == ("/d.img", True)
    assert b.socket_mode == 0o660


_BLK = "[[device]]\nid = 'a'\ntype = 'blk'\nsocket = '/s'\n"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("[[device]]\nid = 'a'\ntype = 'blk'\n", "exactly one of 'socket' and 'vvu'"),
        ("[[device]]\nid='a'\ntype='blk'\nsocket='/s'\nsize='x'\n", "invalid int value"),
        (
            "[[device]]\nid='a'\ntype='blk'\nsocket='/s'\n[[device]]\nid='a'\ntype='rng'\n"
            "socket='/t'\n",
            "id used twice",
        ),
        ("[apis]\n", "unknown section"),
        ("[api]\nport = 1\n", "[api] takes"),
        ("not toml", "device"),
        # Back-end options: each refusal names the device and the option.
        (f"{_BLK}nope = 1\n", "device #1: blk has no option 'nope'"),
        (f"{_BLK}read-only = 'yes'\n", "device #1: option 'read-only' of blk takes true or false"),
        (f"{_BLK}size = true\n", "device #1: option 'size' of blk takes a value, not True"),
        (f"{_BLK}size = 1.5\n", "device #1: option 'size': a string, integer or boolean"),
        (f"{_BLK}{_BLK.replace('a', 'b', 1)}", "device socket used twice: /s"),
    ],
)
def test_config_errors(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "vvu.toml"
    path.write_text(text)
    with pytest.raises(SpecError) as err:
        load_config(path)
    if error != "device":
        assert error in str(err.value)


#: Options a back-end type cannot do without (`required=True` in its add_arguments).
_REQUIRED_OPTIONS: dict[str, dict[str, str | int | bool]] = {"vsock": {"guest-cid": 3}}


@pytest.mark.parametrize("kind", sorted(available_backends()))
def test_spec_of_every_backend_type(kind: str) -> None:
    """Any registered back-end type is configured by its `vvu serve TYPE` options: the same
    parser (the type's add_arguments), the same names without dashes; an option it does not
    have is refused, naming the ones it has."""
    options = _REQUIRED_OPTIONS.get(kind, {})
    spec = DeviceSpec.from_mapping({"id": "d", "type": kind, "socket": "/s", **options})
    parser = argparse.ArgumentParser()
    available_backends()[kind].add_arguments(parser)
    argv = [arg for key, value in options.items() for arg in (f"--{key}", str(value))]
    assert spec.backend_arguments() == parser.parse_args(argv)
    with pytest.raises(SpecError, match=f"{kind} has no option 'no-such-option' \\(options: "):
        DeviceSpec.from_mapping(
            {"id": "d", "type": kind, "socket": "/s", **options, "no-such-option": 1}
        )


# --- the command lines ----------------------------------------------------------------------


def ctl(api: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vvu", "ctl", "--api-socket", str(api), *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def test_cli_daemon_and_ctl(tmp_path: Path) -> None:
    api = tmp_path / "api.sock"
    config = tmp_path / "vvu.toml"
    with contextlib.closing(__import__("socket").socket()) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config.write_text(
        f'[api]\nsocket = "{api}"\nmetrics-http = "127.0.0.1:{port}"\n'
        f'[[device]]\nid = "a"\ntype = "blk"\nsocket = "{tmp_path}/a.sock"\nsize = 2\n'
    )
    daemon = DaemonProcess(["--config", str(config)], api, tmp_path / "log", command="daemon")
    try:
        assert stat.S_IMODE(api.stat().st_mode) == 0o600
        added = ctl(api, "device-add", "b", "rng", "--socket-path", str(tmp_path / "b.sock"))
        assert added.returncode == 0, added.stderr
        assert added.stdout.startswith("b: rng")
        listed = ctl(api, "--json", "device-list")
        assert [d["id"] for d in json.loads(listed.stdout)] == ["a", "b"]
        human = ctl(api, "device-list").stdout
        assert "a " in human and "idle" in human
        refused = ctl(api, "device-add", "c", "blk", "--socket-path", "/x", "-o", "nope=1")
        assert refused.returncode == 1 and "no option 'nope'" in refused.stderr
        events = subprocess.Popen(
            [sys.executable, "-m", "vvu", "ctl", "--api-socket", str(api), "--json", "events"],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert events.stdout is not None
            assert json.loads(events.stdout.readline()) == {"subscribed": True}
            assert ctl(api, "device-remove", "b").returncode == 0
            event = json.loads(events.stdout.readline())
            assert (event["event"], event["device"]) == ("device-removed", "b")
        finally:
            events.terminate()
            events.wait(TIMEOUT)
        assert not (tmp_path / "b.sock").exists()
        stats = json.loads(ctl(api, "--json", "stats", "a").stdout)
        assert stats[0]["queues"][0]["requests"] == 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT) as r:
            text = r.read().decode()
        assert 'vvu_device_connected{device="a",type="blk"} 0.0' in text
        assert "vvu_device_connected" in ctl(api, "metrics").stdout
    finally:
        assert daemon.stop() == 0
    assert not api.exists() and not (tmp_path / "a.sock").exists()


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over an AF_UNIX socket, as `curl --unix-socket PATH` speaks it."""

    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=TIMEOUT)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(str(self.path))


def scrape_unix(path: Path, accept: str | None = None, *, gzipped: bool = False) -> tuple[str, str]:
    """GET /metrics on the unix socket `path`: (Content-Type, body). `gzipped`: ask for gzip
    (Accept-Encoding) and check it came so."""
    headers = {"Accept": accept} if accept else {}
    if gzipped:
        headers["Accept-Encoding"] = "gzip"
    conn = UnixHTTPConnection(path)
    try:
        conn.request("GET", "/metrics", headers=headers)
        response = conn.getresponse()
        assert response.status == 200, response.status
        body = response.read()
        assert (response.getheader("Content-Encoding") == "gzip") is gzipped
        text = (gzip.decompress(body) if gzipped else body).decode()
        return response.getheader("Content-Type", ""), text
    finally:
        conn.close()


def blk_io(path: Path) -> None:
    """One 4 KiB write and its read-back through vvu's front-end: two requests."""

    async def use() -> None:
        async with await BlkDriver.open(str(path)) as blk:
            await blk.write(8, pattern(4096, 7))
            assert await blk.read(8, 4096) == pattern(4096, 7)

    asyncio.run(use())


def test_metrics_over_a_unix_socket(tmp_path: Path) -> None:
    """`--metrics-http unix:PATH`: prometheus_client's exposition over HTTP on an AF_UNIX
    socket of mode 0600, Prometheus text by default and OpenMetrics when the scraper asks
    (Accept; here gzipped, as asked), both parsed by prometheus_client's parsers; the socket
    goes with the daemon."""
    api, metrics = tmp_path / "api.sock", tmp_path / "metrics.sock"
    config = tmp_path / "vvu.toml"
    config.write_text(
        f'[[device]]\nid = "a"\ntype = "blk"\nsocket = "{tmp_path}/a.sock"\nsize = 1\n'
    )
    args = ["--config", str(config), "--api-socket", str(api), "--metrics-http", f"unix:{metrics}"]
    daemon = DaemonProcess(args, api, tmp_path / "log", command="daemon")
    try:
        assert stat.S_IMODE(metrics.stat().st_mode) == 0o600
        blk_io(tmp_path / "a.sock")
        kind, text = scrape_unix(metrics)
        assert kind.startswith("text/plain; version=0.0.4"), kind
        got = samples(text)
        q = (("device", "a"), ("queue", "0"))
        assert got[("vvu_requests_total", q)] == 2
        assert got[("vvu_written_bytes_total", q)] == got[("vvu_read_bytes_total", q)] == 4096
        kind, text = scrape_unix(
            metrics, "application/openmetrics-text; version=1.0.0", gzipped=True
        )
        assert kind.startswith("application/openmetrics-text"), kind
        families = openmetrics_families(text)  # type: ignore[no-untyped-call]
        [requests] = [f for f in families if f.name == "vvu_requests"]
        assert requests.type == "counter"
        assert [(s.labels, s.value) for s in requests.samples] == [
            ({"device": "a", "queue": "0"}, 2)
        ]
    finally:
        assert daemon.stop() == 0
    assert f"metrics on http+unix:{metrics}" in daemon.log()
    assert not metrics.exists() and not api.exists()


def test_daemon_under_systemd(tmp_path: Path) -> None:
    """As systemd starts contrib/systemd's vvu-daemon.service (Type=notify) with its sockets:
    the management socket (FileDescriptorName=api), a device's (its id) and the metrics'
    ("metrics") are fds 3, 4, 5 with LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES. The daemon serves
    each for what its name says, binds the sockets nobody passed (device "rng") before it says
    READY=1 (with STATUS=), says STOPPING=1 on SIGTERM, and leaves systemd's socket files."""
    notify = notify_socket(tmp_path / "notify")
    api, disk, metrics = tmp_path / "api.sock", tmp_path / "disk.sock", tmp_path / "metrics.sock"
    config = tmp_path / "vvu.toml"
    config.write_text(
        f'[[device]]\nid = "disk"\ntype = "blk"\nsocket = "{disk}"\nsize = 1\n'
        f'[[device]]\nid = "rng"\ntype = "rng"\nsocket = "{tmp_path}/rng.sock"\n'
    )
    sockets = [listening_socket(str(path)) for path in (api, disk, metrics)]
    with (tmp_path / "log").open("wb") as log:
        proc = socket_activated(
            [sys.executable, "-m", "vvu", "-v", "daemon", "--config", str(config)],
            sockets,
            ["api", "disk", "metrics"],
            {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")},
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
    for sock in sockets:
        sock.close()
    try:
        ready = notify.recv(4096).decode()
        assert (tmp_path / "rng.sock").exists(), "READY=1 before every device was served"
        assert ready.split("\n") == ["READY=1", "STATUS=serving 2 device(s)"]
        listed = json.loads(ctl(api, "--json", "device-list").stdout)
        assert [d["id"] for d in listed] == ["disk", "rng"]
        blk_io(disk)
        assert (
            samples(scrape_unix(metrics)[1])[
                ("vvu_requests_total", (("device", "disk"), ("queue", "0")))
            ]
            == 2
        )
        assert ctl(api, "device-remove", "disk").returncode == 0
        assert disk.exists(), "a passed socket is systemd's to remove"
    finally:
        assert stop_process(proc) == 0
    with notify:
        assert notify.recv(4096) == b"STOPPING=1"
    log_text = (tmp_path / "log").read_text()
    assert "management API on the socket systemd passed" in log_text, log_text
    assert "Traceback" not in log_text, log_text
    assert api.exists() and disk.exists() and metrics.exists()
    assert not (tmp_path / "rng.sock").exists()


@pytest.mark.parametrize("case", ["stray-name", "device-socket-elsewhere"])
def test_daemon_refuses_a_passed_socket_it_cannot_place(tmp_path: Path, case: str) -> None:
    """A socket passed under a name that is neither api, metrics nor a configured device's id,
    or a device's socket bound elsewhere than the device's `socket`, stops the start (exit 1)
    with a message saying what is wrong."""
    config = tmp_path / "vvu.toml"
    config.write_text(f'[[device]]\nid = "d"\ntype = "rng"\nsocket = "{tmp_path}/d.sock"\n')
    name, error = {
        "stray-name": ("nodevice", b"named nodevice: FileDescriptorName= must be 'api', 'metrics'"),
        "device-socket-elsewhere": (
            "d",
            f"bound to '{tmp_path}/x', not {tmp_path}/d.sock".encode(),
        ),
    }[case]
    sockets = [listening_socket(str(tmp_path / "api.sock")), listening_socket(str(tmp_path / "x"))]
    proc = socket_activated(
        [sys.executable, "-m", "vvu", "daemon", "--config", str(config)], sockets, ["api", name],
        stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    for sock in sockets:
        sock.close()
    try:
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        stop_process(proc)
    assert proc.returncode == 1, err
    assert error in err, err
    assert not (tmp_path / "d.sock").exists()


def test_daemon_takes_one_unnamed_socket_as_its_api(tmp_path: Path) -> None:
    """One socket passed without LISTEN_FDNAMES (sd_listen_fds without names) is the
    management socket: no --api-socket needed."""
    api = tmp_path / "api.sock"
    notify = notify_socket(tmp_path / "notify")
    sockets = [listening_socket(str(api))]
    proc = socket_activated(
        [sys.executable, "-m", "vvu", "daemon"], sockets, None,
        {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")},
        stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    sockets[0].close()
    try:
        with notify:
            assert notify.recv(4096).startswith(b"READY=1\n")
        assert json.loads(ctl(api, "--json", "device-list").stdout) == []
    finally:
        assert stop_process(proc) == 0


# --- a device behind a virtio-vhost-user device -------------------------------------------------


@pytest.mark.asyncio
async def test_device_behind_a_vvu_device(
    running: Running, client: DaemonClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`device-add` with `vvu`: the daemon drives a virtio-vhost-user device (over vfio-user)
    as `vvu serve --vvu` does; a front-end on the device's socket does I/O through it; removal
    lets the device go (BACKEND_UP cleared)."""
    from vvu.device.vvu import BACKEND_UP, VvuDevice  # noqa: PLC0415
    from vvu.transport.unix import UnixListener  # noqa: PLC0415
    from vvu.vfio_user.server import VfioUserServer  # noqa: PLC0415

    frontend_sock, vfio_sock = running.sock("fe"), running.sock("vfio")
    device = VvuDevice(UnixListener(frontend_sock), max_queues=8)
    server = VfioUserServer(device, vfio_sock)
    serving = asyncio.ensure_future(server.serve_forever())
    try:
        info = await client.device_add("v", "blk", None, {"size": 4}, vvu=vfio_sock)
        assert info.get("vvu") == vfio_sock and "socket" not in info
        async with await BlkDriver.open(frontend_sock) as blk:
            await blk.write(16, pattern(8192, 4))
            assert await blk.read(16, 8192) == pattern(8192, 4)
        [stats] = await client.stats("v")
        assert stats["queues"][0]["writes"] == 1  # type: ignore[typeddict-item]
        await client.device_remove("v")
        assert not device.vvu_status & BACKEND_UP
        monkeypatch.setattr("vvu.daemon.core.VVU_CONNECT_TIMEOUT", 0.2)
        with pytest.raises(RpcError) as err:  # nobody serves that vfio-user socket
            await client.device_add("w", "blk", None, vvu=running.sock("none"))
        assert err.value.code == 4
        assert await client.device_list() == []
    finally:
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving
        server.close()
        device.close()
