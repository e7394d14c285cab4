#!/usr/bin/env python3
"""What waking a sleeping peer costs on this machine: a 1-byte ping-pong over an AF_UNIX stream
socketpair between two processes, the echoing side either blocked in recv (the kernel wakes it)
or spinning on a non-blocking recv (never asleep, its CPU never idle), the pinging side pausing
`--think` µs before each ping (a front-end's own turn between two requests). Round trip medians
and p90 in µs, the two modes alternating `--rounds` times.

If a back-end that sleeps between a front-end's requests paid for being woken (a halted vCPU,
caches gone cold), the blocked mode would be slower than the spinning one:

    python benches/wakeup_pingpong.py --think 0,50,150
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time


def echo(sock: socket.socket, spin: bool) -> None:
    """The echoing child: until EOF."""
    sock.setblocking(not spin)
    while True:
        try:
            data = sock.recv(64)
        except BlockingIOError:
            continue
        if not data:
            os._exit(0)
        sock.sendall(data)


def round_trips(spin: bool, think_us: int, count: int) -> list[float]:
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        ours.close()
        echo(theirs, spin)
    theirs.close()
    samples = []
    try:
        for _ in range(count):
            until = time.perf_counter_ns() + think_us * 1000
            while time.perf_counter_ns() < until:
                pass
            start = time.perf_counter_ns()
            ours.sendall(b"x")
            ours.recv(64)
            samples.append((time.perf_counter_ns() - start) / 1e3)
    finally:
        ours.close()
        os.waitpid(pid, 0)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--think", default="0,50,150", help="µs before each ping, comma-separated")
    parser.add_argument("--count", type=int, default=3000, help="round trips per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two modes")
    args = parser.parse_args()
    print("| think µs | blocked median | blocked p90 | spinning median | spinning p90 |")
    print("|---:|---:|---:|---:|---:|")
    for think in (int(t) for t in args.think.split(",")):
        got: dict[bool, list[float]] = {False: [], True: []}
        for i in range(args.rounds):
            for spin in (bool(i % 2), not i % 2):
                got[spin] += round_trips(spin, think, args.count)
        cells = []
        for spin in (False, True):
            ordered = sorted(got[spin])
            cells += [statistics.median(ordered), ordered[len(ordered) * 9 // 10]]
        print(f"| {think} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
