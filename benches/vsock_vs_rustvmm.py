#!/usr/bin/env python3
"""vsock between host programs and a Linux guest: `vvu serve vsock` beside rust-vmm's
`vhost-device-vsock` (crates.io), on the same guest image, in the same run (issue 13).

Each back-end serves QEMU 7.2's `vhost-user-vsock-pci` in its own guest boot (a TCG guest, the
"vm" image of tests/guest.py running the host's python3 over virtio-9p), with the same
`--uds-path` layout; the back-ends alternate (round 1: vvu then rust-vmm, round 2: rust-vmm then
vvu, ...). In every boot, `--reps` times:

- host → guest: a host program connects to the uds path, `CONNECT 1234`, sends `--mib` MiB of
  random bytes; the guest takes them all, answers one byte (the clock stops there), then their
  MD5, which must match;
- 1-byte ping-pong on that (host-initiated) connection: the host sends one byte, the guest echoes
  it, `--pings` round trips timed on the host (after `WARMUP` untimed ones);
- guest → host: the guest connects to the host's port 5000 (`<uds path>_5000`, where the bench
  listens); on a go byte from the host it sends `--mib` MiB and their MD5; the clock runs from
  the go byte to the last data byte on the host;
- the same ping-pong on that (guest-initiated) connection.

Printed: a Markdown table, one row per boot (throughput: median of the reps; latency: median and
p99 of all round trips of the boot; the back-end's CPU time (user + system, /proc/PID/stat) per
MiB moved and per round trip), and the ratios vvu / rust-vmm of each round.

    nice -n 10 python benches/vsock_vs_rustvmm.py --rounds 2 --mib 32 --pings 1000

rust-vmm's back-end is a benchmark dependency only: when `.cache/rust-vmm/bin/vhost-device-vsock`
is missing, the bench builds it (`cargo install --locked vhost-device-vsock --version
RUSTVMM_VERSION --root .cache/rust-vmm`, under `nice -n 10`; a few minutes, once);
`--rustvmm PATH` uses another binary, `--only vvu` measures vvu alone.

Caveat: the guest runs under TCG (an emulated CPU, about 10-50 times slower than the host): the
guest's kernel and python3 dominate every figure, so absolute numbers say little about either
back-end; only the same-run ratios compare them.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import json
import math
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vvu.bench import backend_cpu

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from daemons import wait_for_socket  # noqa: E402
from guest import (  # noqa: E402
    HOST_ROOT_ARGS,
    HOST_ROOT_SETUP,
    Guest,
    GuestError,
    GuestImage,
    build_image,
    qemu_escape,
    start_guest,
)

MiB = 1 << 20
RUSTVMM_VERSION = "0.3.0"
RUSTVMM_ROOT = REPO / ".cache" / "rust-vmm"
RUSTVMM_BIN = RUSTVMM_ROOT / "bin" / "vhost-device-vsock"
GUEST_CID = 3
GUEST_PORT = 1234  # the guest listens here: host-initiated connections (CONNECT 1234)
HOST_PORT = 5000  # the bench listens on <uds path>_5000: guest-initiated connections
READY = "vvu-vsock-bench-ready"
DONE = "vvu-vsock-bench-done"
DIGEST_LEN = 32  # an MD5 in hex
ACK = b"!"
GO = b"g"
WARMUP = 50  # untimed round trips before each ping-pong
SOCKET_TIMEOUT = 120.0
TIMES = "\u00d7"  # the multiplication sign of the ratios


class BenchError(Exception):
    """A transfer did not arrive intact, or a peer went away."""


# --- what both sides run (the guest gets these functions' source) -----------------------------


def recv_exactly(sock: socket.socket, size: int) -> bytearray:
    """Exactly `size` bytes from `sock` (EOFError if it closes first)."""
    data = bytearray(size)
    view = memoryview(data)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:], min(size - got, 1 << 20))
        if n == 0:
            raise EOFError(f"connection closed after {got} of {size} bytes")
        got += n
    return data


def guest_sink(sock: socket.socket, size: int) -> None:
    """host → guest (guest side): take `size` bytes, acknowledge with one byte, send their MD5."""
    data = recv_exactly(sock, size)
    sock.sendall(b"!")
    sock.sendall(hashlib.md5(data).hexdigest().encode())


def guest_source(sock: socket.socket, data: bytes, digest: bytes) -> None:
    """guest → host (guest side): on the host's go byte, send `data`, then its MD5 `digest`."""
    recv_exactly(sock, 1)
    sock.sendall(data)
    sock.sendall(digest)


def echo(sock: socket.socket, count: int) -> None:
    """Ping-pong (guest side): send each of `count` bytes back as it comes."""
    for _ in range(count):
        sock.sendall(recv_exactly(sock, 1))


GUEST_FUNCTIONS = (recv_exactly, guest_sink, guest_source, echo)

GUEST_MAIN = """
size, rounds, reps = {size}, {rounds}, {reps}
data = os.urandom(size)
digest = hashlib.md5(data).hexdigest().encode()
listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
listener.bind((socket.VMADDR_CID_ANY, {guest_port}))
listener.listen()
with open("{console}", "w") as console:
    console.write("{ready}\\n")
for _ in range(reps):
    conn, _ = listener.accept()
    with conn:
        guest_sink(conn, size)
        echo(conn, rounds)
    out = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    out.connect((2, {host_port}))
    with out:
        guest_source(out, data, digest)
        echo(out, rounds)
print("{done}", flush=True)
"""


def guest_program(size: int, pings: int, reps: int, console: str = "/dev/console") -> str:
    """The python3 program the guest runs: the functions above and GUEST_MAIN; it writes READY
    to `console` once it listens (its stdout reaches the host only when it has ended)."""
    parts = ["import hashlib, os, socket"]
    parts += [inspect.getsource(function) for function in GUEST_FUNCTIONS]
    parts.append(
        GUEST_MAIN.format(
            size=size,
            rounds=WARMUP + pings,
            reps=reps,
            guest_port=GUEST_PORT,
            host_port=HOST_PORT,
            ready=READY,
            done=DONE,
            console=console,
        )
    )
    return "\n\n".join(parts)


# --- the host's side -----------------------------------------------------------------------------


def host_send(sock: socket.socket, data: bytes) -> float:
    """host → guest: seconds from the first byte sent to the guest's acknowledgement of the
    last; the guest's MD5 must match."""
    expected = hashlib.md5(data).hexdigest().encode()
    start = time.perf_counter()
    sock.sendall(data)
    ack = recv_exactly(sock, 1)
    seconds = time.perf_counter() - start
    digest = bytes(recv_exactly(sock, DIGEST_LEN))
    if ack != ACK or digest != expected:
        raise BenchError(f"host → guest: the guest got MD5 {digest!r}, expected {expected!r}")
    return seconds


def host_receive(sock: socket.socket, size: int) -> float:
    """guest → host: seconds from the go byte to the last of `size` bytes; their MD5 must match
    the one the guest sends after them."""
    start = time.perf_counter()
    sock.sendall(GO)
    data = recv_exactly(sock, size)
    seconds = time.perf_counter() - start
    digest = bytes(recv_exactly(sock, DIGEST_LEN))
    got = hashlib.md5(data).hexdigest().encode()
    if digest != got:
        raise BenchError(f"guest → host: received MD5 {got!r}, the guest sent {digest!r}")
    return seconds


def ping_pong(sock: socket.socket, pings: int, warmup: int = WARMUP) -> list[float]:
    """`warmup` untimed and `pings` timed 1-byte round trips; the timed ones in microseconds."""
    rtts: list[float] = []
    for i in range(warmup + pings):
        byte = bytes((i & 0xFF,))
        start = time.perf_counter_ns()
        sock.sendall(byte)
        back = recv_exactly(sock, 1)
        end = time.perf_counter_ns()
        if back != byte:
            raise BenchError(f"ping {i}: sent {byte!r}, got {bytes(back)!r} back")
        if i >= warmup:
            rtts.append((end - start) / 1000)
    return rtts


def host_connect(uds_path: Path, port: int) -> socket.socket:
    """A host-initiated connection: `CONNECT <port>`, then `OK <host port>` from the back-end."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(SOCKET_TIMEOUT)
    try:
        sock.connect(str(uds_path))
        sock.sendall(f"CONNECT {port}\n".encode())
        line = b""
        while not line.endswith(b"\n"):
            byte = sock.recv(1)
            if not byte:
                raise BenchError(f"CONNECT {port}: closed after {line!r}")
            line += byte
        if not line.startswith(b"OK "):
            raise BenchError(f"CONNECT {port}: answered {line!r}")
    except BaseException:
        sock.close()
        raise
    return sock


# --- figures -------------------------------------------------------------------------------------


def percentile(samples: Sequence[float], p: float) -> float:
    """The nearest-rank `p`-th percentile (p in (0, 100])."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


@dataclass
class BootResult:
    """What one guest boot measured with one back-end."""

    backend: str
    round: int
    size: int
    to_guest_s: list[float] = field(default_factory=list)
    to_host_s: list[float] = field(default_factory=list)
    rtt_host_conn_us: list[float] = field(default_factory=list)
    rtt_guest_conn_us: list[float] = field(default_factory=list)
    # The back-end's CPU time (user + system) in each transfer, in each ping-pong (with its
    # warm-up round trips).
    cpu_to_guest_s: list[float] = field(default_factory=list)
    cpu_to_host_s: list[float] = field(default_factory=list)
    cpu_rtt_s: list[float] = field(default_factory=list)

    def mib_s(self, seconds: list[float]) -> float:
        return self.size / MiB / statistics.median(seconds)

    def cpu_ms_per_mib(self, seconds: list[float]) -> float:
        return sum(seconds) * 1000 / (len(seconds) * self.size / MiB)

    def cpu_us_per_rtt(self) -> float:
        pings = len(self.rtt_host_conn_us) + len(self.rtt_guest_conn_us)
        warmups = len(self.cpu_rtt_s) * WARMUP
        return sum(self.cpu_rtt_s) * 1e6 / (pings + warmups)

    def figures(self) -> dict[str, float]:
        """Throughput (MiB/s, median of the reps), round trips (µs, median and p99), and the
        back-end's CPU time per MiB and per round trip."""
        return {
            "to_guest_mib_s": self.mib_s(self.to_guest_s),
            "to_host_mib_s": self.mib_s(self.to_host_s),
            "rtt_host_conn_p50_us": statistics.median(self.rtt_host_conn_us),
            "rtt_host_conn_p99_us": percentile(self.rtt_host_conn_us, 99),
            "rtt_guest_conn_p50_us": statistics.median(self.rtt_guest_conn_us),
            "rtt_guest_conn_p99_us": percentile(self.rtt_guest_conn_us, 99),
            "cpu_ms_per_mib_to_guest": self.cpu_ms_per_mib(self.cpu_to_guest_s),
            "cpu_ms_per_mib_to_host": self.cpu_ms_per_mib(self.cpu_to_host_s),
            "cpu_us_per_rtt": self.cpu_us_per_rtt(),
        }


COLUMNS = (
    ("to_guest_mib_s", "host → guest MiB/s"),
    ("to_host_mib_s", "guest → host MiB/s"),
    ("rtt_host_conn_p50_us", "RTT host-init. p50 µs"),
    ("rtt_host_conn_p99_us", "RTT host-init. p99 µs"),
    ("rtt_guest_conn_p50_us", "RTT guest-init. p50 µs"),
    ("rtt_guest_conn_p99_us", "RTT guest-init. p99 µs"),
    ("cpu_ms_per_mib_to_guest", "CPU ms/MiB → guest"),
    ("cpu_ms_per_mib_to_host", "CPU ms/MiB → host"),
    ("cpu_us_per_rtt", "CPU µs/RTT"),
)


def number(value: float) -> str:
    """Three significant digits, without an exponent."""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def table(results: Sequence[BootResult], baseline: str = "rust-vmm") -> str:
    """Markdown: a row per boot, then per round the ratios of every other back-end to
    `baseline` (throughput: > 1 is faster; round trips: < 1 is faster)."""
    lines = [
        "| round | back-end | " + " | ".join(title for _, title in COLUMNS) + " |",
        "|---|---|" + "---:|" * len(COLUMNS),
    ]
    for result in results:
        figures = result.figures()
        cells = " | ".join(number(figures[key]) for key, _ in COLUMNS)
        lines.append(f"| {result.round} | {result.backend} | {cells} |")
    for round_ in sorted({r.round for r in results}):
        base = [r for r in results if r.round == round_ and r.backend == baseline]
        if not base:
            continue
        reference = base[0].figures()
        for result in results:
            if result.round != round_ or result.backend == baseline:
                continue
            figures = result.figures()
            cells = " | ".join(
                f"**{figures[key] / reference[key]:.2f}{TIMES}**" for key, _ in COLUMNS
            )
            lines.append(f"| {round_} | {result.backend} / {baseline} | {cells} |")
    return "\n".join(lines)


# --- the back-ends -------------------------------------------------------------------------------


def ensure_rustvmm(binary: Path = RUSTVMM_BIN) -> Path:
    """rust-vmm's vhost-device-vsock, built from crates.io into .cache/rust-vmm when absent."""
    if binary.exists():
        return binary
    if binary != RUSTVMM_BIN:
        raise SystemExit(f"{binary} does not exist")
    cargo = shutil.which("cargo")
    if cargo is None:
        raise SystemExit("cargo is needed to build rust-vmm's vhost-device-vsock")
    command = ["nice", "-n", "10", cargo, "install", "--locked", "vhost-device-vsock",
               "--version", RUSTVMM_VERSION, "--root", str(RUSTVMM_ROOT)]  # fmt: skip
    print(f"# building rust-vmm's back-end: {' '.join(command)}", file=sys.stderr, flush=True)
    subprocess.run(command, check=True, stdin=subprocess.DEVNULL)
    return binary


def backend_argv(name: str, vhost: Path, uds: Path, args: argparse.Namespace) -> list[str]:
    """The command line of back-end `name` serving `vhost`, host side at `uds`."""
    if name == "vvu":
        return [sys.executable, "-m", "vvu", "serve", "vsock", "--socket-path", str(vhost),
                "--guest-cid", str(GUEST_CID), "--uds-path", str(uds),
                *shlex.split(args.vvu_args)]  # fmt: skip
    return [str(args.rustvmm), "--guest-cid", str(GUEST_CID), "--socket", str(vhost),
            "--uds-path", str(uds), *shlex.split(args.rustvmm_args)]  # fmt: skip


@contextmanager
def running(argv: list[str], vhost: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The back-end, stopped by PID (SIGTERM, SIGKILL after 10 s) whatever happens."""
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        wait_for_socket(vhost, proc, timeout=30)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def measure(
    result: BootResult,
    uds: Path,
    listener: socket.socket,
    to_guest: bytes,
    args: argparse.Namespace,
    *,
    backend_pid: int,
) -> None:
    """`args.reps` times: host → guest and ping-pong on a host-initiated connection, guest → host
    and ping-pong on a guest-initiated one; the back-end's CPU time of each phase."""
    cpu = backend_cpu(backend_pid)

    def used() -> float:
        nonlocal cpu
        before, cpu = cpu, backend_cpu(backend_pid)
        return cpu - before

    for _ in range(args.reps):
        with host_connect(uds, GUEST_PORT) as conn:
            used()
            result.to_guest_s.append(host_send(conn, to_guest))
            result.cpu_to_guest_s.append(used())
            result.rtt_host_conn_us += ping_pong(conn, args.pings)
            result.cpu_rtt_s.append(used())
        accepted, _ = listener.accept()
        with accepted:
            accepted.settimeout(SOCKET_TIMEOUT)
            used()
            result.to_host_s.append(host_receive(accepted, len(to_guest)))
            result.cpu_to_host_s.append(used())
            result.rtt_guest_conn_us += ping_pong(accepted, args.pings)
            result.cpu_rtt_s.append(used())


def boot(
    name: str, round_: int, args: argparse.Namespace, image: GuestImage, to_guest: bytes
) -> BootResult:
    """One guest boot served by back-end `name`: `args.reps` times each measurement."""
    result = BootResult(name, round_, len(to_guest))
    with tempfile.TemporaryDirectory(prefix="vvu-vsock-bench-") as tmp:
        vhost, uds, log = Path(tmp) / "vhost.sock", Path(tmp) / "v.sock", Path(tmp) / "backend.log"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(f"{uds}_{HOST_PORT}")
        listener.listen()
        listener.settimeout(SOCKET_TIMEOUT)
        program = guest_program(len(to_guest), args.pings, args.reps)
        script = f"{HOST_ROOT_SETUP}\nhost python3 - <<'PY'\n{program}\nPY\n"
        qemu_args = [
            *HOST_ROOT_ARGS,
            "-chardev", f"socket,id=vs,path={qemu_escape(str(vhost))}",
            "-device", "vhost-user-vsock-pci,chardev=vs",
        ]  # fmt: skip
        started: list[Guest] = []
        try:
            with (
                running(backend_argv(name, vhost, uds, args), vhost, log) as backend,
                start_guest(
                    script, image=image, qemu_args=qemu_args, memory="1G", timeout=args.timeout
                ) as guest,
            ):
                started.append(guest)
                try:
                    guest.wait_for(READY, timeout=args.timeout)
                    measure(result, uds, listener, to_guest, args, backend_pid=backend.pid)
                except (OSError, EOFError, BenchError):
                    listener.close()  # the guest's program fails too, and says why
                    with contextlib.suppress(GuestError):
                        guest.wait(timeout=60)
                    raise
                guest.wait_for(DONE, timeout=60)
        except BaseException:
            print(f"--- {name} log ---\n{log.read_text(errors='replace')[-4000:]}", file=sys.stderr)
            for guest in started:
                print(f"--- guest serial ---\n{guest.serial[-4000:]}", file=sys.stderr)
            raise
        finally:
            listener.close()
    return result


def run(args: argparse.Namespace) -> list[BootResult]:
    image = build_image("vm")
    to_guest = os.urandom(args.mib * MiB)
    names = ["vvu", "rust-vmm"] if args.only is None else [args.only]
    results: list[BootResult] = []
    for round_ in range(1, args.rounds + 1):
        order = names if round_ % 2 else names[::-1]
        for name in order:
            print(f"# round {round_}: {name}", file=sys.stderr, flush=True)
            results.append(boot(name, round_, args, image, to_guest))
            print(json.dumps({"backend": name, "round": round_, **results[-1].figures()}),
                  file=sys.stderr, flush=True)  # fmt: skip
    return results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="boots per back-end (alternating)")
    parser.add_argument("--reps", type=int, default=2, help="measurements per boot")
    parser.add_argument("--mib", type=int, default=32, help="MiB per stream")
    parser.add_argument("--pings", type=int, default=1000, help="timed round trips per ping-pong")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per guest boot")
    parser.add_argument("--rustvmm", type=Path, default=RUSTVMM_BIN, help="vhost-device-vsock")
    parser.add_argument("--vvu-args", default="", help="more `vvu serve vsock` options")
    parser.add_argument("--rustvmm-args", default="", help="more vhost-device-vsock options")
    parser.add_argument("--only", choices=["vvu", "rust-vmm"], help="one back-end alone")
    parser.add_argument("--json", type=Path, help="write every raw figure here")
    args = parser.parse_args(argv)
    if args.only != "vvu":
        args.rustvmm = ensure_rustvmm(args.rustvmm)
    results = run(args)
    print(table(results))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))


if __name__ == "__main__":
    main()
