"""What the blk statistics cost on the data path: `vvu serve blk` of a tree without them (e.g.
main) against this tree's, driven by the same front-end in the same run, alternating.

    python benches/stats_cost.py --baseline /work/main/python [--rounds 5]

Each round: 8192 random 4 KiB reads at queue depth 32 (vvu's `BlkDriver`, as benches/e2e) from
each back-end on its own 256 MiB in-memory disk; the best round of each is printed. The
statistics are counted per request in the native worker (one clock read and a few relaxed
atomic additions); everything else is read only when asked for.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vvu.frontend import BlkDriver

REQUESTS = 8192
DEPTH = 32
SECTORS = (256 << 20) // 512


def start(pythonpath: str, sock: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": pythonpath}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vvu", "-q", "serve", "blk", "--socket-path", str(sock),
         "--size", "256"],
        env=env, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 15
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"vvu serve blk ({pythonpath}) did not start")
        time.sleep(0.02)
    return proc


async def iops(sock: Path) -> float:
    blk = await BlkDriver.open(str(sock), depth=DEPTH, max_request=4096)
    rng = random.Random(7)
    offsets = [rng.randrange(0, SECTORS - 8) & ~7 for _ in range(REQUESTS)]
    try:
        start = time.perf_counter()

        async def lane() -> None:
            while offsets:
                await blk.read(offsets.pop(), 4096)

        await asyncio.gather(*(lane() for _ in range(DEPTH)))
        return REQUESTS / (time.perf_counter() - start)
    finally:
        await blk.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--baseline", required=True, help="PYTHONPATH of the tree to compare to")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    here = str(Path(__file__).resolve().parents[1] / "python")
    with tempfile.TemporaryDirectory(prefix="vvu-stats-") as name:
        socks = {"baseline": Path(name) / "base.sock", "this tree": Path(name) / "this.sock"}
        procs = {
            "baseline": start(args.baseline, socks["baseline"]),
            "this tree": start(here, socks["this tree"]),
        }
        results: dict[str, list[float]] = {k: [] for k in procs}
        try:
            for _ in range(args.rounds):
                for label, sock in socks.items():
                    results[label].append(asyncio.run(iops(sock)))
        finally:
            for proc in procs.values():
                proc.send_signal(signal.SIGTERM)
                proc.wait(10)
    best = {k: max(v) for k, v in results.items()}
    for label, values in results.items():
        print(f"{label:10} best {best[label] / 1000:6.1f} k IOPS  rounds: "
              + " ".join(f"{v / 1000:.1f}" for v in values))  # fmt: skip
    print(f"this tree / baseline: {best['this tree'] / best['baseline']:.3f}")


if __name__ == "__main__":
    main()
