"""The `vvu` command as a user runs it: serve, probe, trace, demo."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemons import notify_socket, socket_activated, stop_process, wait_for_socket
from vvu.frontend import BlkDriver, Frontend, RngDriver
from vvu.protocol import FrontendRequest
from vvu.transport.unix import UnixChannel

VVU = [sys.executable, "-m", "vvu"]


@pytest.fixture
def blk_server(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "blk.sock"
    proc = subprocess.Popen(
        [*VVU, "-q", "serve", "blk", "--socket-path", str(path), "--size", "8"],
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_socket(path, proc)
        yield path
    finally:
        assert stop_process(proc) == 0
    assert not path.exists(), "the socket file must be removed on SIGTERM"


def test_help_explains_every_command() -> None:
    out = subprocess.run([*VVU, "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("serve", "probe", "trace", "demo"):
        assert command in out
    serve = subprocess.run(
        [*VVU, "serve", "blk", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for option in (
        "--socket-path",
        "--fd",
        "--print-capabilities",
        "--blk-file",
        "--image",
        "--read-only",
    ):
        assert option in serve
    assert "SIGHUP" in " ".join(serve.split())  # how to resize a served disk


def test_print_capabilities_is_json() -> None:
    out = subprocess.run(
        [*VVU, "serve", "blk", "--print-capabilities"], capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out) == {"type": "block", "features": ["read-only", "blk-file"]}
    rng = subprocess.run(
        [*VVU, "serve", "rng", "--print-capabilities"], capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(rng)["type"] == "rng"


@pytest.mark.parametrize(
    ("backend", "expected"),
    [
        ("blk", {"type": "block", "features": ["read-only", "blk-file"]}),
        ("net", {"type": "net"}),
        ("rng", {"type": "rng"}),
    ],
)
def test_print_capabilities_ignores_every_other_option(
    backend: str, expected: dict[str, object], tmp_path: Path
) -> None:
    """vhost-user.rst, back-end program conventions: with --print-capabilities the program
    prints its capabilities and exits, whatever else is on the command line (libvirt passes
    its usual options, and unknown ones must not make it fail)."""
    out = subprocess.run(
        [*VVU, "serve", backend, "--socket-path", str(tmp_path / "s"), "--fd", "3",
         "--print-capabilities", "--no-such-option", "--blk-file=/nonexistent"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == expected
    assert not (tmp_path / "s").exists()


def test_blk_file_is_the_conventional_name_of_image(tmp_path: Path) -> None:
    """Every feature --print-capabilities advertises is an option that works: `blk-file`."""
    image = tmp_path / "disk.img"
    image.write_bytes(b"\xcd" * 4096)
    path = tmp_path / "blk.sock"
    proc = subprocess.Popen(
        [*VVU, "-q", "serve", "blk", "--socket-path", str(path), f"--blk-file={image}",
         "--read-only"],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_for_socket(path, proc)

        async def use() -> None:
            async with await BlkDriver.open(str(path)) as blk:
                assert await blk.read(0, 4096) == b"\xcd" * 4096

        asyncio.run(use())
    finally:
        assert stop_process(proc) == 0


def test_bad_arguments_fail_clearly(tmp_path: Path) -> None:
    both = subprocess.run([*VVU, "serve", "blk"], capture_output=True, text=True, check=False)
    assert both.returncode == 2 and "exactly one of --socket-path and --fd" in both.stderr
    missing = subprocess.run(
        [*VVU, "serve", "blk", "--socket-path", str(tmp_path / "s"), "--image", "/nonexistent"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing.returncode == 1 and "No such file" in missing.stderr
    probe = subprocess.run(
        [*VVU, "probe", "--socket-path", str(tmp_path / "nobody"), "--timeout", "0.1"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert probe.returncode == 1 and "cannot connect" in probe.stderr


def test_socket_is_private(blk_server: Path) -> None:
    assert oct(blk_server.stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("command", ["serve", "device", "daemon"])
def test_sigterm_the_moment_the_socket_appears_still_stops_cleanly(
    tmp_path: Path, command: str
) -> None:
    """Whoever waits for a command's socket (libvirt, a script, these tests' fixtures) may
    signal it at once. The socket is bound before the event loop's handlers exist, so SIGTERM
    must be held until then: exit 0 and the socket removed, never death by the signal."""
    sock = tmp_path / "vhost.sock"
    argv = {
        "serve": ["serve", "rng", "--socket-path", str(sock)],
        "device": ["device", "--socket-path", str(sock), "--vfio-user", str(tmp_path / "d")],
        "daemon": ["daemon", "--config", str(tmp_path / "vvu.toml")],
    }[command]
    (tmp_path / "vvu.toml").write_text(
        f'[api]\nsocket = "{tmp_path}/api.sock"\n'
        f'[[device]]\nid = "a"\ntype = "rng"\nsocket = "{sock}"\n'
    )
    for _ in range(3):  # the window is short: try a few times
        proc = subprocess.Popen([*VVU, "-q", *argv], stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            while not sock.exists():  # no sleep: signal the moment it appears
                assert proc.poll() is None and time.monotonic() < deadline, (
                    f"{command}: exited ({proc.poll()}) or no socket in 30 s"
                )
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0, proc.stderr.read() if proc.stderr else None
        finally:
            stop_process(proc)
            if proc.stderr is not None:
                proc.stderr.close()
        assert not sock.exists()


def test_probe_decodes_a_blk_backend(blk_server: Path) -> None:
    out = subprocess.run(
        [*VVU, "probe", "--socket-path", str(blk_server), "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    report = json.loads(out)
    assert "VERSION_1" in report["feature_names"]
    assert "REPLY_ACK" in report["protocol_feature_names"]
    assert report["queues"] == 1
    capacity = int.from_bytes(bytes.fromhex(report["config"])[:8], "little")
    assert capacity == 8 * 2048  # 8 MiB in sectors


@contextlib.contextmanager
def vvu_device(tmp_path: Path, *args: str) -> Iterator[Path]:
    """`vvu device` with `args` as a process; yields its vfio-user socket, stopped after."""
    device_socket = tmp_path / "dev.sock"
    device = subprocess.Popen(
        [*VVU, "-q", "device", "--socket-path", str(tmp_path / "fe.sock"),
         "--vfio-user", str(device_socket), *args],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_for_socket(device_socket, device)
        yield device_socket
    finally:
        assert stop_process(device) == 0


def probe_json(device_socket: Path) -> dict[str, Any]:
    out = subprocess.run(
        [*VVU, "probe", "--vvu", str(device_socket), "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    report: dict[str, Any] = json.loads(out)
    return report


def test_probe_a_vvu_device(tmp_path: Path) -> None:
    uuid = "12345678-9abc-def0-1234-56789abcdef0"
    with vvu_device(tmp_path, "--max-queues", "4", "--uuid", uuid) as device_socket:
        report = probe_json(device_socket)
        assert report["pci_id"] == "1af4:107f"
        assert report["virtio_device_id"] == 63
        assert report["device_feature_names"] == ["VERSION_1"]
        assert report["status_names"] == [] and report["max_vhost_queues"] == 4
        assert report["uuid"] == "12345678-9abc-def0-1234-56789abcdef0"
        caps = {(c["type"], c.get("shmid")): c for c in report["capabilities"]}
        assert caps[("DEVICE_AUX_NOTIFY", None)]["multiplier"] == 4
        assert caps[("DEVICE_AUX_NOTIFY", None)]["length"] == 4 * (2 * 4 + 1)
        assert caps[("DRIVER_AUX_NOTIFY", None)]["offset"] == 0x4000
        assert caps[("SHARED_MEMORY", 1)]["length"] == 16 << 30
        assert caps[("SHARED_MEMORY", 2)]["offset"] == 16 << 30
        assert report["bar_sizes"]["2"] == 32 << 10 and report["bar_sizes"]["4"] == 32 << 30
        assert report["msix_vectors"] == 3 + 4
        text = subprocess.run(
            [*VVU, "probe", "--vvu", str(device_socket)],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
        assert "SHARED_MEMORY" in text and "shmid 2" in text and "BAR4 32 GiB" in text
    both = subprocess.run(
        [*VVU, "probe", "--vvu", "a", "--socket-path", "b"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert both.returncode == 2 and "not allowed with" in both.stderr


def test_serve_blk_on_an_image_file_and_read_only(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"\xab" * 4096 + bytes(1 << 20))
    path = tmp_path / "ro.sock"
    proc = subprocess.Popen(
        [
            *VVU,
            "-q",
            "serve",
            "blk",
            "--socket-path",
            str(path),
            "--image",
            str(image),
            "--read-only",
        ],
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_socket(path, proc)

        async def use() -> None:
            async with await BlkDriver.open(str(path)) as blk:
                assert await blk.read(0, 4096) == b"\xab" * 4096
                with pytest.raises(Exception, match="IOERR"):
                    await blk.write(0, bytes(512))

        asyncio.run(use())
    finally:
        assert stop_process(proc) == 0
    assert image.read_bytes()[:4096] == b"\xab" * 4096


def test_serve_on_an_inherited_fd(tmp_path: Path) -> None:
    path = tmp_path / "inherited.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    fd = listener.fileno()
    proc = subprocess.Popen(
        [*VVU, "-q", "serve", "rng", "--fd", str(fd)], pass_fds=[fd], stderr=subprocess.PIPE
    )
    listener.close()
    try:

        async def use() -> None:
            rng = await RngDriver.open(str(path))
            try:
                data = await rng.read(64)
                assert len(data) == 64 and data != bytes(64)
            finally:
                await rng.close()

        asyncio.run(use())
    finally:
        assert stop_process(proc) == 0


def _features_over(sock: socket.socket) -> int:
    """GET_FEATURES as a front-end on an already connected socket (closed after)."""

    async def ask() -> int:
        sock.setblocking(False)
        frontend = Frontend(UnixChannel(sock), memory_size=1 << 20)
        try:
            return await frontend.request_u64(FrontendRequest.GET_FEATURES)
        finally:
            await frontend.close()

    return asyncio.run(ask())


def test_serve_on_an_inherited_connected_socket(tmp_path: Path) -> None:
    """--fd N may be a connected socket (what libvirt passes for some device types): that is
    one front-end session, served, after which the back-end exits 0."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = theirs.fileno()
    proc = subprocess.Popen(
        [*VVU, "serve", "rng", "--fd", str(fd)], pass_fds=[fd], stderr=subprocess.PIPE
    )
    theirs.close()
    try:
        assert _features_over(ours) & 1 << 32  # VIRTIO_F_VERSION_1
        assert proc.wait(10) == 0
    finally:
        stop_process(proc)
    err = proc.stderr.read().decode() if proc.stderr else ""
    assert "Traceback" not in err, err
    assert "vvu: stopped after 1 front-end session(s)" in err, err


def test_client_mode_connects_and_reconnects(tmp_path: Path) -> None:
    """--connect: the back-end is the socket client of a listening front-end (QEMU
    `server=on`, DPDK client mode). It keeps trying while nobody listens yet, and connects
    again after each session, until SIGTERM."""
    path = tmp_path / "frontend.sock"
    proc = subprocess.Popen(
        [*VVU, "serve", "rng", "--socket-path", str(path), "--connect"], stderr=subprocess.PIPE
    )
    try:
        time.sleep(0.5)  # a few refused attempts: nobody listens yet
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen()
        listener.settimeout(10)
        for _ in range(2):  # the first session, and the one after the reconnection
            conn, _ = listener.accept()
            assert _features_over(conn) & 1 << 32
        listener.close()
    finally:
        assert stop_process(proc) == 0
    err = proc.stderr.read().decode() if proc.stderr else ""
    assert "Traceback" not in err, err
    assert f"vvu: serving rng (device id 4, 1 queue(s)) on {path} (client)" in err, err
    assert "vvu: stopped after 2 front-end session(s)" in err, err
    assert path.exists(), "the front-end's socket file is not the back-end's to remove"


def _listening(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen()
    return sock


@pytest.mark.parametrize("named", [False, True], ids=["one-fd", "named-among-two"])
def test_socket_activation_and_readiness(tmp_path: Path, named: bool) -> None:
    """As systemd starts a Type=notify service from a .socket unit: the listening sockets are
    fds 3, 4, ... with LISTEN_FDS, LISTEN_PID (this very process) and LISTEN_FDNAMES; the
    service says READY=1 once it serves and STOPPING=1 on SIGTERM to NOTIFY_SOCKET."""
    notify = notify_socket(tmp_path / "notify")
    served = _listening(tmp_path / "vhost.sock")
    sockets = [_listening(tmp_path / "other.sock"), served] if named else [served]
    extra = ["--fd-name", "vhost"] if named else []
    proc = socket_activated(
        [*VVU, "serve", "rng", *extra],
        sockets,
        ["other", "vhost"] if named else None,
        {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")},
        stderr=subprocess.PIPE,
    )
    for sock in sockets:
        sock.close()
    try:
        assert notify.recv(4096).decode().split("\n")[0] == "READY=1"

        async def use() -> None:
            rng = await RngDriver.open(str(tmp_path / "vhost.sock"))
            try:
                assert len(await rng.read(16)) == 16
            finally:
                await rng.close()

        asyncio.run(use())
    finally:
        assert stop_process(proc) == 0
    assert notify.recv(4096).decode().split("\n")[0] == "STOPPING=1"
    err = proc.stderr.read().decode() if proc.stderr else ""
    assert "vvu: serving rng (device id 4, 1 queue(s)) on socket-activated fd" in err, err
    assert "vvu: stopped after 1 front-end session(s)" in err, err


def test_trace_relays_and_decodes_everything(blk_server: Path, tmp_path: Path) -> None:
    trace_path = tmp_path / "trace.sock"
    tracer = subprocess.Popen(
        [*VVU, "trace", "--socket-path", str(trace_path), "--backend-socket", str(blk_server)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_socket(trace_path, tracer)

        async def use() -> None:
            async with await BlkDriver.open(str(trace_path)) as blk:
                await blk.write(1, b"traced!!" * 64)
                assert await blk.read(1, 512) == b"traced!!" * 64

        asyncio.run(use())
    finally:
        stop_process(tracer)
    out = tracer.stdout.read().decode() if tracer.stdout else ""
    for expected in ("GET_FEATURES reply", "SET_MEM_TABLE", "SET_VRING_KICK", "GET_CONFIG reply"):
        assert expected in out, out
    assert " us)" in out  # reply latencies are shown
    assert not trace_path.exists()


def test_demo_runs_end_to_end() -> None:
    result = subprocess.run(
        [*VVU, "demo", "--size", "8", "--request-size", "256"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("verified every byte of 32 requests") == 2  # AF_UNIX, then VVU
    assert "device process CPU time" in result.stdout
    assert "VVU / AF_UNIX: write" in result.stdout
    assert "both paths verified; all good" in result.stdout


def test_device_with_frontend_memory(tmp_path: Path) -> None:
    """`vvu device --frontend-memory PATH`: BAR4 and shmid 1 are the file's size, shmid 3 (the
    device's inflight memfd) is BAR3 (4 MiB for 64 queues); a file that cannot back BAR4 is a
    clear error at start."""
    mem = tmp_path / "guest-ram"
    with open(mem, "wb") as f:
        f.truncate(3 << 20)
    with vvu_device(tmp_path, "--frontend-memory", str(mem)) as device_socket:
        report = probe_json(device_socket)
    shm = [c for c in report["capabilities"] if c["type"] == "SHARED_MEMORY"]
    assert [(c["shmid"], c["offset"], c["length"]) for c in shm] == [
        (1, 0, 3 << 20),
        (3, 0, 4 << 20),
    ]
    assert report["bar_sizes"]["4"] == 4 << 20 and report["bar_sizes"]["3"] == 4 << 20
    (tmp_path / "odd").write_bytes(b"x" * 100)
    for bad, why in ((tmp_path / "missing", "No such file"), (tmp_path / "odd", "its size")):
        run = subprocess.run(
            [*VVU, "device", "--socket-path", str(tmp_path / "fe2.sock"),
             "--vfio-user", str(tmp_path / "dev2.sock"), "--frontend-memory", str(bad)],
            check=False, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert run.returncode == 1 and f"--frontend-memory {bad}: {why}" in run.stderr


def test_each_event_is_logged_once(tmp_path: Path) -> None:
    """One line per event on stderr: the summary lines scripts read ("vvu: serving", "vvu:
    stopped after") are not repeated through logging."""
    path = tmp_path / "rng.sock"
    proc = subprocess.Popen(
        [*VVU, "serve", "rng", "--socket-path", str(path)], stderr=subprocess.PIPE
    )
    try:
        wait_for_socket(path, proc)

        async def use() -> None:
            rng = await RngDriver.open(str(path))
            await rng.close()

        asyncio.run(use())
    finally:
        assert stop_process(proc) == 0
    err = proc.stderr.read().decode() if proc.stderr else ""
    assert err.count("serving rng") == 1, err
    assert err.count("vvu: serving rng") == 1, err
    assert err.count("stopped after 1 front-end session(s)") == 1, err
    assert err.count("session released") == 1, err
