"""virtio-net throughput with DPDK testpmd front-ends: `vvu serve net` against DPDK's own vhost
PMD (`net_vhost`), same run, alternating (issue 14).

Each case runs one back-end and one or two `dpdk-testpmd` front-ends (`net_virtio_user`, split
rings, 1 queue pair, `--no-huge` memfd memory, `io` forwarding with `--tx-first`: one burst of
32 frames per front-end circulates for as long as the case runs) and reports the front-end's
receive rate (the median of testpmd's per-second `Rx-pps` after a warm-up) and the back-end's
CPU use (utime + stime of its process over the same window).

Back-ends:
- `vvu`: `python -m vvu serve net --loopback` (one front-end) or peer mode (two), from the
  `vvu` package this interpreter imports; `--label NAME=PYTHONPATH` adds another build of vvu
  (e.g. main's) to compare against in the same run. `--poll-us N` adds a busy-polling variant.
- `dpdk`: `dpdk-testpmd` with `net_vhost` ports, `macswap` for the loop (one front-end), `io`
  between two `net_vhost` ports for peer mode (DPDK's nearest to a two-port switch).

CPU budget: the back-end is pinned to CPU 0 (`taskset`, all its threads), the front-ends to
CPU 1 (testpmd lcores 0 and 1 both on that CPU).

    python benches/net_testpmd.py --label main=/work/main/python --rounds 2 --seconds 8

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


def rx_pps(log: Path) -> list[int]:
    """Port 0's per-second `Rx-pps` samples so far."""
    text = log.read_text(errors="replace")
    stats = text.split("NIC statistics for port 0")
    return [int(m) for block in stats[1:] for m in re.findall(r"Rx-pps: +(\d+)", block)[:1]]


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
) -> tuple[float, float]:
    first_log = fronts[0][1]
    wait_for(lambda: len(rx_pps(first_log)) >= 2, f"forwarding ({first_log})")
    time.sleep(2)  # warm-up (a benchmark window, not synchronisation)
    start_samples = len(rx_pps(first_log))
    cpu0 = cpu_seconds(backend.pid)
    t0 = time.monotonic()
    time.sleep(seconds)
    cpu1 = cpu_seconds(backend.pid)
    elapsed = time.monotonic() - t0
    samples = rx_pps(first_log)[start_samples:]
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


def run_case(
    case: str,
    backend: str,
    *,
    frame_len: int,
    seconds: float,
    workdir: Path,
    vvu: dict[str, tuple[str | None, list[str]]],
) -> Result:
    sock = workdir / "net.sock"
    peer = Path(f"{sock}.peer")
    for p in (sock, peer):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    two = case.startswith("peer")
    front_vdev = "net_virtio_user0,path={},queues=1"
    with contextlib.ExitStack() as stack:
        if backend in vvu:
            pythonpath, extra = vvu[backend]
            mode = [] if two else ["--loopback"]
            back = vvu_backend(sock, pythonpath, [*mode, *extra], workdir)
            stack.callback(stop, back, signal.SIGTERM)
            if two:
                wait_for(peer.exists, "peer socket")
        else:
            vdevs = [f"net_vhost0,iface={sock},queues=1"]
            if two:
                vdevs.append(f"net_vhost1,iface={peer},queues=1")
            back, _ = stack.enter_context(
                testpmd("back", 0, vdevs, "io" if two else "macswap", workdir)
            )
            wait_for(lambda: sock.exists() and (not two or peer.exists()), "vhost sockets")
        fronts = [
            stack.enter_context(
                testpmd(f"front{i}", 1, [front_vdev.format(path)], "io", workdir,
                        tx_first=True, frame_len=frame_len)
            )
            for i, path in enumerate([sock, peer] if two else [sock])
        ]  # fmt: skip
        mpps, cpu = measure(back, fronts, seconds)
    return Result(f"{case} {frame_len} B", backend, mpps, cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--sizes", default="64,1500")
    parser.add_argument("--cases", default="loop,peer")
    parser.add_argument("--label", action="append", default=[], metavar="NAME=PYTHONPATH")
    parser.add_argument("--poll-us", type=int, default=0)
    parser.add_argument("--no-dpdk", action="store_true")
    args = parser.parse_args()
    vvu: dict[str, tuple[str | None, list[str]]] = {}
    for label in args.label:
        name, _, path = label.partition("=")
        vvu[name] = (path, [])
    vvu["vvu"] = (None, [])
    if args.poll_us:
        vvu[f"vvu --poll-us {args.poll_us}"] = (None, ["--poll-us", str(args.poll_us)])
    backends = [*vvu, *([] if args.no_dpdk else ["dpdk"])]
    print("| case | back-end | Mpps (front-end RX) | back-end CPU | CPU s per M frames |")
    print("|---|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="vvu-bench-net-") as tmp:
        for case in args.cases.split(","):
            for size in (int(s) for s in args.sizes.split(",")):
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
                            )
                            print(result.row(), flush=True)
                        except (RuntimeError, TimeoutError) as err:
                            print(
                                f"| {case} {size} B | {backend} | failed: {err} | | |", flush=True
                            )


if __name__ == "__main__":
    main()
