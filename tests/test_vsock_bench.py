"""benches/vsock_vs_rustvmm.py without a guest or rust-vmm: the program the guest would run, run
here with its AF_VSOCK sockets mapped to unix sockets, against the bench's host side; the
checksum and echo checks catch a wrong peer; the table computes the ratios."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH_PATH = Path(__file__).resolve().parents[1] / "benches" / "vsock_vs_rustvmm.py"

pytestmark = pytest.mark.timeout(60)

#: Run before the guest program: AF_VSOCK sockets become unix sockets in DIR, the guest's
#: listener on port P at DIR/guest_P, its connections to the host's port P to DIR/host_P.
VSOCK_AS_UNIX = """
import socket as _socket
_Real = _socket.socket
class _VsockAsUnix(_Real):
    def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
        if family == _socket.AF_VSOCK:
            family = _socket.AF_UNIX
        super().__init__(family, type, proto, fileno)
    def bind(self, address):
        super().bind(f"{dir}/guest_{{address[1]}}")
    def connect(self, address):
        super().connect(f"{dir}/host_{{address[1]}}")
_socket.socket = _VsockAsUnix
"""


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("vsock_vs_rustvmm", BENCH_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look themselves up there)
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_the_guest_program_and_the_host_side_measure_intact_streams(
    bench: Any, tmp_path: Path
) -> None:
    size, pings, reps = 3 * bench.MiB + 17, 20, 2
    program = bench.guest_program(size, pings, reps, console="/dev/stdout")
    to_guest = os.urandom(size)
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(tmp_path / f"host_{bench.HOST_PORT}"))
        listener.listen()
        listener.settimeout(30)
        proc = subprocess.Popen(
            [sys.executable, "-c", VSOCK_AS_UNIX.format(dir=tmp_path) + program],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == f"{bench.READY}\n"
            for _ in range(reps):
                with socket.socket(socket.AF_UNIX) as conn:
                    conn.settimeout(30)
                    conn.connect(str(tmp_path / f"guest_{bench.GUEST_PORT}"))
                    assert bench.host_send(conn, to_guest) > 0
                    rtts = bench.ping_pong(conn, pings)
                    assert len(rtts) == pings and min(rtts) > 0
                accepted, _ = listener.accept()
                with accepted:
                    assert bench.host_receive(accepted, size) > 0
                    assert len(bench.ping_pong(accepted, pings)) == pings
            assert proc.stdout.readline() == f"{bench.DONE}\n"
            assert proc.wait(30) == 0
        finally:
            proc.kill()
            proc.wait()


def _peer(serve: Callable[[socket.socket], None]) -> tuple[socket.socket, threading.Thread]:
    ours, theirs = socket.socketpair()
    ours.settimeout(10)

    def run() -> None:
        with theirs:
            serve(theirs)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return ours, thread


def test_a_wrong_checksum_or_echo_is_an_error(bench: Any) -> None:
    data = os.urandom(100_000)

    def lossy_sink(sock: socket.socket) -> None:  # takes all but the last byte into its MD5
        got = bench.recv_exactly(sock, len(data))
        sock.sendall(b"!" + hashlib.md5(got[:-1]).hexdigest().encode())

    sock, thread = _peer(lossy_sink)
    with sock, pytest.raises(bench.BenchError, match="host → guest"):
        bench.host_send(sock, data)
    thread.join()

    def lying_source(sock: socket.socket) -> None:
        bench.recv_exactly(sock, 1)
        sock.sendall(data + hashlib.md5(b"other").hexdigest().encode())

    sock, thread = _peer(lying_source)
    with sock, pytest.raises(bench.BenchError, match="guest → host"):
        bench.host_receive(sock, len(data))
    thread.join()

    def wrong_echo(sock: socket.socket) -> None:
        bench.recv_exactly(sock, 1)
        sock.sendall(b"\xff")

    sock, thread = _peer(wrong_echo)
    with sock, pytest.raises(bench.BenchError, match="ping 0"):
        bench.ping_pong(sock, 10)
    thread.join()


@pytest.mark.parametrize(("answer", "ok"), [(b"OK 1024\n", True), (b"", False)])
def test_a_host_connection_needs_the_back_ends_ok(
    bench: Any, tmp_path: Path, answer: bytes, ok: bool
) -> None:
    uds = tmp_path / "v.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(uds))
        server.listen()
        got: list[bytes] = []

        def back_end() -> None:
            conn, _ = server.accept()
            with conn:
                got.append(bench.recv_exactly(conn, len(b"CONNECT 1234\n")))
                conn.sendall(answer)

        thread = threading.Thread(target=back_end, daemon=True)
        thread.start()
        if ok:
            bench.host_connect(uds, 1234).close()
        else:
            with pytest.raises(bench.BenchError, match="closed"):
                bench.host_connect(uds, 1234)
        thread.join()
    assert got == [b"CONNECT 1234\n"]


def test_the_table_gives_each_rounds_ratios(bench: Any) -> None:
    def result(backend: str, round_: int, seconds: float, rtt: float) -> Any:
        r = bench.BootResult(backend, round_, 32 * bench.MiB)
        r.to_guest_s = r.to_host_s = [seconds, seconds * 3]  # median: 2 * seconds
        r.rtt_host_conn_us = r.rtt_guest_conn_us = [rtt] * 99 + [rtt * 10]
        r.cpu_to_guest_s = r.cpu_to_host_s = [seconds / 10] * 2  # 1/320 of 32 MiB each
        r.cpu_rtt_s = [rtt * 150e-6] * 2  # 2 * 150 round trips, warm-ups included
        return r

    results = [result("vvu", 1, 0.5, 100.0), result("rust-vmm", 1, 1.0, 200.0)]
    assert results[0].figures() == {
        "to_guest_mib_s": 32.0,
        "to_host_mib_s": 32.0,
        "rtt_host_conn_p50_us": 100.0,
        "rtt_host_conn_p99_us": 100.0,  # the 99th of 100 samples
        "rtt_guest_conn_p50_us": 100.0,
        "rtt_guest_conn_p99_us": 100.0,
        "cpu_ms_per_mib_to_guest": pytest.approx(0.5 / 10 * 1000 / 32),
        "cpu_ms_per_mib_to_host": pytest.approx(0.5 / 10 * 1000 / 32),
        "cpu_us_per_rtt": pytest.approx(100.0),
    }
    assert bench.percentile([*range(1, 101)], 99.5) == 100
    rows = bench.table(results).splitlines()
    assert rows[2].startswith("| 1 | vvu | 32 | 32 | 100 | 100 | 100 | 100 | 1.56 | 1.56 | 100 |")
    faster, quicker = f"**2.00{bench.TIMES}**", f"**0.50{bench.TIMES}**"
    assert rows[-1] == f"| 1 | vvu / rust-vmm | {' | '.join([faster] * 2 + [quicker] * 7)} |"
