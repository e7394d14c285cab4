"""Aggregate IOPS of 1, 4 and 16 active devices in one `vvu daemon`, against one device, beside
qemu-storage-daemon with as many vhost-user-blk exports, in the same run (RESULTS.md, "Daemon").

    python benches/daemon_iops.py [--requests 4000]

Each active device has its own front-end process (vvu's `BlkDriver`, 4 KiB random reads at queue
depth 16 from a 64 MiB image of random bytes, just written, so in the page cache); the
front-ends start together and the aggregate is all requests over the time until the last ends.
On a 2-vCPU machine the Python front-ends compete with the back-ends for the same CPUs, so the
figures compare the two daemons driven the same way, not either daemon's ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vvu.frontend import BlkDriver

DEPTH = 16
DISK = 64 << 20
COUNTS = (1, 4, 16)


def wait_sockets(proc: subprocess.Popen[bytes], sockets: list[Path]) -> None:
    deadline = time.monotonic() + 60
    while not all(s.exists() for s in sockets):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args!r} did not create its sockets")
        time.sleep(0.05)


async def drive(sock: str, requests: int, seed: int, barrier: object) -> tuple[float, float]:
    blk = await BlkDriver.open(sock, depth=DEPTH, max_request=4096)
    try:
        rng = random.Random(seed)
        offsets = [rng.randrange(0, DISK // 512 - 8) & ~7 for _ in range(requests)]
        barrier.wait()  # type: ignore[attr-defined]
        start = time.perf_counter()

        async def lane() -> None:
            while offsets:
                await blk.read(offsets.pop(), 4096)

        await asyncio.gather(*(lane() for _ in range(DEPTH)))
        return start, time.perf_counter()
    finally:
        await blk.close()


def worker(sock: str, requests: int, seed: int, barrier: object, out: object) -> None:
    out.put(asyncio.run(drive(sock, requests, seed, barrier)))  # type: ignore[attr-defined]


def aggregate(sockets: list[Path], requests: int) -> float:
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(len(sockets)), ctx.Queue()
    procs = [
        ctx.Process(target=worker, args=(str(s), requests, i, barrier, out))
        for i, s in enumerate(sockets)
    ]
    for p in procs:
        p.start()
    spans = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join()
    start, end = min(s for s, _ in spans), max(e for _, e in spans)
    return requests * len(sockets) / (end - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=4000, help="per device")
    requests = parser.parse_args().requests
    n = max(COUNTS)
    with tempfile.TemporaryDirectory(prefix="vvu-iops-") as name:
        tmp = Path(name)
        disks = []
        for i in range(n):
            disk = tmp / f"disk{i}.img"
            disk.write_bytes(random.Random(i).randbytes(DISK))  # allocated, in the page cache
            disks.append(disk)
        vvu_socks = [tmp / f"vvu{i}.sock" for i in range(n)]
        config = tmp / "vvu.toml"
        config.write_text(
            f'[api]\nsocket = "{tmp}/api.sock"\n'
            + "".join(
                f'[[device]]\nid = "d{i}"\ntype = "blk"\nsocket = "{s}"\nblk-file = "{d}"\n'
                for i, (s, d) in enumerate(zip(vvu_socks, disks, strict=True))
            )
        )
        qsd_socks = [tmp / f"qsd{i}.sock" for i in range(n)]
        qsd_argv = [shutil.which("qemu-storage-daemon") or "qemu-storage-daemon"]
        for i, (s, d) in enumerate(zip(qsd_socks, disks, strict=True)):
            qsd_argv += [
                "--blockdev", f"driver=file,node-name=f{i},filename={d}",
                "--blockdev", f"driver=raw,node-name=r{i},file=f{i}",
                "--export", f"type=vhost-user-blk,id=e{i},addr.type=unix,addr.path={s},"
                f"node-name=r{i},writable=on",
            ]  # fmt: skip
        procs = {
            "vvu daemon": subprocess.Popen(
                [sys.executable, "-m", "vvu", "-q", "daemon", "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ),
            "qemu-storage-daemon": subprocess.Popen(qsd_argv, stdin=subprocess.DEVNULL),
        }
        socks = {"vvu daemon": vvu_socks, "qemu-storage-daemon": qsd_socks}
        try:
            for label, proc in procs.items():
                wait_sockets(proc, socks[label])
            results: dict[str, dict[int, float]] = {k: {} for k in procs}
            for count in COUNTS:
                for label in procs:
                    results[label][count] = aggregate(socks[label][:count], requests)
        finally:
            for proc in procs.values():
                proc.send_signal(signal.SIGTERM)
                proc.wait(20)
    print(f"{'active devices':>14} " + " ".join(f"{k:>28}" for k in procs) + "  vvu / qsd")
    for count in COUNTS:
        cells = []
        for label in procs:
            iops, one = results[label][count], results[label][1]
            cells.append(f"{iops / 1000:8.1f} k IOPS ({iops / one:4.2f}x one)")
        ratio = results["vvu daemon"][count] / results["qemu-storage-daemon"][count]
        print(f"{count:>14} " + " ".join(f"{c:>28}" for c in cells) + f"  {ratio:8.2f}")


if __name__ == "__main__":
    main()
