"""virtio-net throughput with DPDK testpmd front-ends: `vvu serve net` against DPDK's own vhost
PMD (`net_vhost`), same run, alternating (issue 14).

Each case runs one back-end and one `dpdk-testpmd` front-end (`net_virtio_user` ports, split
rings, `--no-huge` memfd memory, bursts of 32) and reports one rate of the front-end (the median
of testpmd's per-second `Rx-pps` or `Tx-pps` of port 0 after a warm-up) and the back-end's CPU
use (utime + stime of its process over the same window), also per million frames.

Cases (`--cases`), each with `--queue-pairs` 1 and/or 2 and `--sizes`:
- `loop`: `io --tx-first`, one burst per queue circulates through a back-end that returns every
  frame: `vvu serve net --loopback` vs `net_vhost` with `macswap`. Reported: front-end RX.
- `peer`: one front-end with two ports, `io --tx-first` between them; the back-end links the
  two: `vvu serve net` peer mode (a two-port switch) vs two `net_vhost` ports in `io` mode
  (DPDK's nearest to a two-port switch, no MAC learning). Reported: port 0 RX.
- `tx`: the front-end only transmits (`txonly`); the back-end takes every frame: vvu's loopback
  into a receive ring nobody drains (frames are copied and then dropped in the full switch queue,
  so vvu does more than a sink) vs `net_vhost` `rxonly`. Reported: front-end TX (what the
  back-end takes).
- `rx`: the front-end only receives (`rxonly`); the back-end is the frame source: `vvu serve
  net --generate LEN` vs `net_vhost` with `txonly --txpkts=LEN`. Reported: front-end RX.

Back-ends: `vvu` (`python -m vvu serve net`, from the `vvu` package this interpreter imports);
`--label NAME=PYTHONPATH` adds another build of vvu (e.g. main's) to the same run; `--poll-us N`
adds a busy-polling variant (of every build); `dpdk` unless `--no-dpdk`. Back-ends alternate
within each round.

CPU budget: the back-end is pinned to CPU 0 (`taskset`, all its threads; DPDK: both lcores),
the front-end to CPU 1 (testpmd lcores 0 and 1 both on that CPU).

    python benches/net_testpmd.py --label main=/work/main/python --rounds 2 --seconds 6 \
        --poll-us 50 --cases loop,peer,tx,rx --queue-pairs 1,2

Prints one Markdown table row per case and round. Needs root (testpmd), dpdk-testpmd and taskset.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TESTPMD = shutil.which("dpdk-testpmd") or "dpdk-testpmd"
BURST = 32
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of process `pid` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def wait_for(predicate: object, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGINT) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, sig)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def testpmd(
    name: str,
    cpu: int,
    vdevs: list[str],
    mode: str,
    workdir: Path,
    *,
    tx_first: bool = False,
    frame_len: int = 64,
    queues: int = 1,
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    log = workdir / f"{name}.log"
    runtime = Path(tempfile.mkdtemp(prefix="vvu-bench-dpdk-"))
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                "stdbuf", "-oL",  # line-buffered: the log is read while it runs
                TESTPMD,
                "--lcores", f"0@{cpu},1@{cpu}",
                "--no-huge", "-m", "512", "--single-file-segments",
                "--no-pci", "--no-shconf", "--file-prefix", f"vvu-bench-{name}",
                "--log-level", "lib.eal:warning",
                *(arg for vdev in vdevs for arg in ("--vdev", vdev)),
                "--",
                "--stats-period", "1",
                f"--rxq={queues}", f"--txq={queues}",
                f"--forward-mode={mode}",
                f"--burst={BURST}",
                f"--txpkts={frame_len}",
                *(["--tx-first"] if tx_first else []),
                "--no-flush-rx",
                "--total-num-mbufs=4096",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "RUNTIME_DIRECTORY": str(runtime)},
        )  # fmt: skip
        try:
            yield proc, log
        finally:
            stop(proc)
            shutil.rmtree(runtime, ignore_errors=True)


def port_pps(log: Path, port: int, direction: str) -> list[int]:
    """Port `port`'s per-second `Rx-pps` or `Tx-pps` samples so far."""
    text = log.read_text(errors="replace")
    stats = text.split(f"NIC statistics for port {port}")
    return [
        int(m) for block in stats[1:] for m in re.findall(rf"{direction}-pps: +(\d+)", block)[:1]
    ]


def rx_pps(log: Path) -> list[int]:
    """Port 0's per-second `Rx-pps` samples so far."""
    return port_pps(log, 0, "Rx")


@dataclass
class Result:
    case: str
    backend: str
    mpps: float
    cpu: float  # back-end CPU seconds per second

    def row(self) -> str:
        per_m = self.cpu / self.mpps if self.mpps else float("nan")
        return (
            f"| {self.case} | {self.backend} | {self.mpps:.3f} | {self.cpu * 100:.0f} % | "
            f"{per_m:.2f} |"
        )


def measure(
    backend: subprocess.Popen[bytes],
    fronts: list[tuple[subprocess.Popen[bytes], Path]],
    seconds: float,
    metric: tuple[int, str] = (0, "Rx"),
) -> tuple[float, float]:
    """Median of the first front-end's per-second rate of `metric` (port, "Rx"/"Tx") and the
    back-end's CPU share over `seconds`."""
    first_log = fronts[0][1]

    def samples_so_far() -> list[int]:
        return port_pps(first_log, *metric)

    wait_for(lambda: len(samples_so_far()) >= 2, f"forwarding ({first_log})")
    time.sleep(2)  # warm-up (a benchmark window, not synchronisation)
    start_samples = len(samples_so_far())
    cpu0 = cpu_seconds(backend.pid)
    t0 = time.monotonic()
    time.sleep(seconds)
    cpu1 = cpu_seconds(backend.pid)
    elapsed = time.monotonic() - t0
    samples = samples_so_far()[start_samples:]
    for proc, log in fronts:
        if proc.poll() is not None:
            raise RuntimeError(f"testpmd exited:\n{log.read_text(errors='replace')[-2000:]}")
    mpps = statistics.median(samples) / 1e6 if samples else 0.0
    return mpps, (cpu1 - cpu0) / elapsed


def vvu_backend(
    sock: Path, pythonpath: str | None, extra: list[str], workdir: Path
) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    log = open(workdir / "vvu.log", "ab")  # noqa: SIM115 (inherited by the child, closed below)
    proc = subprocess.Popen(
        ["taskset", "-c", "0", sys.executable, "-m", "vvu", "-q", "serve", "net",
         "--socket-path", str(sock), *extra],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
    )  # fmt: skip
    log.close()
    wait_for(lambda: sock.exists() or proc.poll() is not None, "vvu socket")
    if proc.poll() is not None:
        raise RuntimeError(f"vvu exited: {(workdir / 'vvu.log').read_text()[-2000:]}")
    return proc


@dataclass(frozen=True)
class Case:
    """How one case wires the front-end and the back-ends."""

    #: Two back-end ports (vvu peer mode; DPDK two `net_vhost` ports forwarding to each other)
    #: and one front-end with a port on each; else one port (vvu loopback).
    two_ports: bool
    #: The front-end's forwarding mode.
    front: str
    #: DPDK back-end's forwarding mode.
    dpdk: str
    #: What is reported: the front-end's port and direction.
    metric: tuple[int, str]
    tx_first: bool
    #: vvu's mode: `--loopback`, `--generate` (with the frame length) or, with two ports, peer.
    vvu_mode: str = "--loopback"


CASES = {
    # Frames circulate: front-end TX → back-end → front-end RX → front-end TX ...
    "loop": Case(two_ports=False, front="io", dpdk="macswap", metric=(0, "Rx"), tx_first=True),
    # One front-end with two ports, io forwarding between them; the back-end links the ports.
    "peer": Case(two_ports=True, front="io", dpdk="io", metric=(0, "Rx"), tx_first=True),
    # The front-end only transmits; the back-end takes and discards what it cannot deliver
    # (vvu: loopback into an RX ring nobody drains, frames dropped in the switch queue; DPDK:
    # `rxonly`). Reported: the front-end's TX rate, i.e. what the back-end takes.
    "tx": Case(two_ports=False, front="txonly", dpdk="rxonly", metric=(0, "Tx"), tx_first=False),
    # The front-end only receives; the back-end generates (vvu `--generate LEN`; DPDK `txonly`
    # with the same `--txpkts`). Reported: the front-end's RX rate.
    "rx": Case(
        two_ports=False,
        front="rxonly",
        dpdk="txonly",
        metric=(0, "Rx"),
        tx_first=False,
        vvu_mode="--generate",
    ),
}


def run_case(
    case: str,
    backend: str,
    *,
    frame_len: int,
    seconds: float,
    workdir: Path,
    vvu: dict[str, tuple[str | None, list[str]]],
    queues: int = 1,
) -> Result:
    spec = CASES[case]
    sock = workdir / "net.sock"
    peer = Path(f"{sock}.peer")
    for p in (sock, peer):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    two = spec.two_ports
    paths = [sock, peer] if two else [sock]
    with contextlib.ExitStack() as stack:
        if backend in vvu:
            pythonpath, extra = vvu[backend]
            if two:
                mode = []
            elif spec.vvu_mode == "--generate":
                mode = ["--generate", str(frame_len)]
            else:
                mode = [spec.vvu_mode]
            qp = ["--num-queue-pairs", str(queues)] if queues > 1 else []
            back = vvu_backend(sock, pythonpath, [*mode, *qp, *extra], workdir)
            stack.callback(stop, back, signal.SIGTERM)
            if two:
                wait_for(peer.exists, "peer socket")
        else:
            vdevs = [f"net_vhost{i},iface={path},queues={queues}" for i, path in enumerate(paths)]
            back, _ = stack.enter_context(
                testpmd("back", 0, vdevs, spec.dpdk, workdir, frame_len=frame_len, queues=queues)
            )
            wait_for(lambda: all(p.exists() for p in paths), "vhost sockets")
        front_vdevs = [
            f"net_virtio_user{i},path={path},queues={queues}" for i, path in enumerate(paths)
        ]
        front = stack.enter_context(
            testpmd("front", 1, front_vdevs, spec.front, workdir,
                    tx_first=spec.tx_first, frame_len=frame_len, queues=queues)
        )  # fmt: skip
        mpps, cpu = measure(back, [front], seconds, spec.metric)
    qp_label = f", {queues} qp" if queues > 1 else ""
    return Result(f"{case} {frame_len} B{qp_label}", backend, mpps, cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--sizes", default="64,1500")
    parser.add_argument("--cases", default="loop,peer,tx,rx", help=f"of {','.join(CASES)}")
    parser.add_argument("--queue-pairs", default="1", help="comma-separated, e.g. 1,2")
    parser.add_argument("--label", action="append", default=[], metavar="NAME=PYTHONPATH")
    parser.add_argument("--poll-us", type=int, default=0)
    parser.add_argument("--no-dpdk", action="store_true")
    args = parser.parse_args()
    vvu: dict[str, tuple[str | None, list[str]]] = {}
    poll = ["--poll-us", str(args.poll_us)] if args.poll_us else []
    for label in args.label:
        name, _, path = label.partition("=")
        vvu[name] = (path, [])
        if poll:
            vvu[f"{name} --poll-us {args.poll_us}"] = (path, poll)
    vvu["vvu"] = (None, [])
    if poll:
        vvu[f"vvu --poll-us {args.poll_us}"] = (None, poll)
    backends = [*vvu, *([] if args.no_dpdk else ["dpdk"])]
    print("| case | back-end | Mpps (front-end) | back-end CPU | CPU s per M frames |")
    print("|---|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="vvu-bench-net-") as tmp:
        combos = [
            (case, queues, size)
            for case in args.cases.split(",")
            for queues in (int(q) for q in args.queue_pairs.split(","))
            for size in (int(s) for s in args.sizes.split(","))
        ]
        for case, queues, size in combos:
            for _ in range(args.rounds):
                for backend in backends:
                    try:
                        result = run_case(
                            case,
                            backend,
                            frame_len=size,
                            seconds=args.seconds,
                            workdir=Path(tmp),
                            vvu=vvu,
                            queues=queues,
                        )
                        print(result.row(), flush=True)
                    except (RuntimeError, TimeoutError) as err:
                        print(f"| {case} {size} B | {backend} | failed: {err} | | |", flush=True)


if __name__ == "__main__":
    main()
