#!/usr/bin/env python3
"""Where a handshake's time goes in the back-end, per message: `vvu bench blk --handshake-runs`'s
front-end (another process) against a blk `BackendEngine` served in this process, instrumented.

For each request of QEMU's vhost-user-blk start, medians over RUNS sessions, in µs:
- `wake`: from the request's last byte read (the socket's reader callback, or the task) to its
  handling starting;
- `handle`: the handling, reply sent included (wall clock: on a busy machine it also holds the
  time the woken front-end took the CPU from us);
- `cpu`: the same handling in this thread's CPU time (what the engine costs);
- `fe gap`: from our previous reply to this request's last byte: the front-end's turn.
Then the sums per session. `--baseline-tree DIR` runs the same in a child process from another
tree's python/ dir (e.g. main's), alternating the two RUNS times in rounds of `--round` sessions.

    python benches/handshake_timeline.py --runs 150 --baseline-tree /work/main/python
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vvu.backends.blk import BlkBackend
from vvu.engine import BackendEngine
from vvu.protocol import FrontendRequest
from vvu.transport import stream
from vvu.transport.unix import UnixListener

Event = tuple[str, int, int]  # kind, perf_counter_ns, request


def instrument() -> tuple[list[Event], dict[int, list[float]]]:
    """Wrap the stream's frame reads and the engine's dispatch with timestamps."""
    events: list[Event] = []
    cpu: dict[int, list[float]] = collections.defaultdict(list)
    ns = time.perf_counter_ns
    advance = stream.FdStream._advance

    def timed_advance(self: Any, pending: Any) -> bool:
        done = advance(self, pending)
        if done and pending.frame is not None:
            events.append(("frame", ns(), 0))
        return done

    dispatch = BackendEngine._dispatch

    async def timed_dispatch(self: Any, session: Any, raw: Any) -> None:
        events.append(("start", ns(), raw.request))
        started = time.thread_time_ns()
        try:
            await dispatch(self, session, raw)
        finally:
            events.append(("end", ns(), raw.request))
            cpu[raw.request].append((time.thread_time_ns() - started) / 1e3)

    stream.FdStream._advance = timed_advance  # type: ignore[method-assign]
    BackendEngine._dispatch = timed_dispatch  # type: ignore[method-assign]
    return events, cpu


def measure(runs: int) -> dict[str, dict[str, list[float]]]:
    """RUNS handshakes against an instrumented engine; per request name, the samples."""
    events, cpu = instrument()
    with tempfile.TemporaryDirectory() as tmp:
        image, sock = Path(tmp) / "disk.img", Path(tmp) / "blk.sock"
        image.write_bytes(bytes(1 << 20))

        async def serve() -> None:
            engine = BackendEngine(BlkBackend(str(image), num_queues=1))
            server = asyncio.ensure_future(engine.serve_forever(UnixListener(str(sock))))
            code = (
                f"from vvu.bench import handshake_samples; handshake_samples({str(sock)!r}, {runs})"
            )
            proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code)
            await proc.wait()
            server.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await server
            engine.backend.close()

        asyncio.run(serve())
    samples: dict[str, dict[str, list[float]]] = collections.defaultdict(
        lambda: {"wake": [], "handle": [], "gap": [], "cpu": []}
    )
    frame = last_end = start = 0
    for kind, t, request in events:
        if kind == "frame":
            frame = t
        elif kind == "start":
            start = t
            s = samples[FrontendRequest(request).name]
            s["wake"].append((t - frame) / 1e3)
            if last_end:
                s["gap"].append((frame - last_end) / 1e3)
        else:
            samples[FrontendRequest(request).name]["handle"].append((t - start) / 1e3)
            last_end = t
    for request, values in cpu.items():
        samples[FrontendRequest(request).name]["cpu"] = values
    return samples


def child(tree: str, runs: int) -> dict[str, dict[str, list[float]]]:
    env = {**os.environ, "PYTHONPATH": tree}
    argv = [sys.executable, __file__, "--runs", str(runs), "--json-out"]
    out = subprocess.run(argv, env=env, check=True, capture_output=True, text=True).stdout
    result: dict[str, dict[str, list[float]]] = json.loads(out)
    return result


def table(name: str, samples: dict[str, dict[str, list[float]]]) -> None:
    med = lambda v: statistics.median(v) if v else 0.0  # noqa: E731
    print(f"\n{name}\n")
    print("| request | wake µs | handle µs | cpu µs | fe gap µs |")
    print("|---|---:|---:|---:|---:|")
    sums = dict.fromkeys(("wake", "handle", "cpu"), 0.0)
    for request, s in samples.items():
        print(
            f"| {request} | {med(s['wake']):.1f} | {med(s['handle']):.1f} | "
            f"{med(s['cpu']):.1f} | {med(s['gap']):.1f} |"
        )
        for k in sums:
            sums[k] += med(s[k])
    print(f"| **per session** | {sums['wake']:.0f} | {sums['handle']:.0f} | {sums['cpu']:.0f} | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--round", type=int, default=25, help="sessions per turn")
    parser.add_argument("--baseline-tree", metavar="PYTHON_DIR")
    parser.add_argument("--json-out", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.json_out:
        print(json.dumps(measure(args.runs)))
        return
    here = str(Path(__file__).resolve().parents[1] / "python")
    trees = {"this tree": os.environ.get("PYTHONPATH", here)}
    if args.baseline_tree:
        trees["baseline"] = args.baseline_tree
    merged: dict[str, dict[str, dict[str, list[float]]]] = {name: {} for name in trees}
    done = 0
    while done < args.runs:
        n = min(args.round, args.runs - done)
        for name, tree in trees.items():
            for request, s in child(tree, n).items():
                into = merged[name].setdefault(request, {k: [] for k in s})
                for k, v in s.items():
                    into[k] += v
        done += n
    for name, samples in merged.items():
        table(f"{name} ({trees[name]}), {args.runs} sessions, medians", samples)


if __name__ == "__main__":
    main()
