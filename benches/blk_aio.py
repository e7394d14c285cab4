"""4 KiB random reads through `vvu serve blk` and qemu-storage-daemon, alternated in one run.

    python benches/blk_aio.py --dir /var/tmp --size-mib 2048 --drop-caches \\
        --depths 1 32 --seconds 5 --rounds 2

Each case starts its back-end on the same image, (optionally) drops the page cache, drives it
with vvu's own front-end (`BlkDriver`, one queue, QD lanes of random 4 KiB reads for
`--seconds`), and reports IOPS and the back-end's CPU seconds per 1000 requests (utime + stime
from /proc). Cases alternate round by round, so a busy machine hurts every case alike. The
front-end is Python (~6 µs per request of its own), which caps what it can show.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vvu.bench import backend_cpu
from vvu.frontend import BlkDriver

CASES = {
    "vvu io_uring": ["--aio", "io_uring"],
    "vvu io_uring poll50": ["--aio", "io_uring", "--poll-us", "50"],
    "vvu threads": ["--aio", "threads"],
    "vvu sync": ["--aio", "sync"],
}


def start(cmd: list[str], socket: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not socket.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{cmd!r} did not start")
        time.sleep(0.02)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def drive(socket: str, depth: int, seconds: float, sectors: int) -> int:
    # 3 descriptors per request: a ring large enough for `depth` of them.
    queue_size = max(256, 1 << (3 * depth - 1).bit_length())
    blk = await BlkDriver.open(socket, depth=depth, max_request=4096, queue_size=queue_size)
    rng = random.Random(depth)
    done = 0
    deadline = time.monotonic() + seconds

    async def lane() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            await blk.read(rng.randrange(0, sectors - 8) & ~7, 4096)
            done += 1

    try:
        await asyncio.gather(*(lane() for _ in range(depth)))
    finally:
        await blk.close()
    return done


def backend(case: str, image: Path, socket: Path, cache: str) -> list[str]:
    if case.startswith("vvu"):
        return [sys.executable, "-m", "vvu", "-q", "serve", "blk", "--socket-path", str(socket),
                "--blk-file", str(image), "--cache", cache, *CASES[case]]  # fmt: skip
    qsd = shutil.which("qemu-storage-daemon")
    assert qsd is not None
    direct = "on" if cache == "none" else "off"
    return [qsd,
            "--blockdev", f"driver=file,node-name=f0,filename={image},cache.direct={direct},"
            "aio=io_uring",
            "--blockdev", "driver=raw,node-name=d0,file=f0",
            "--export", f"type=vhost-user-blk,id=e0,addr.type=unix,addr.path={socket},"
            "node-name=d0,writable=on"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="/var/tmp", help="where the image goes")
    parser.add_argument("--size-mib", type=int, default=2048)
    parser.add_argument("--cache", default="none", choices=("none", "writeback"))
    parser.add_argument("--drop-caches", action="store_true")
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cases", nargs="+", default=["vvu io_uring", "vvu sync", "qsd"])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vvu-bench-", dir=args.dir))
    image = work / "disk.img"
    # Real data, so that reads hit the disk (a sparse file or unwritten extents read as zeros
    # without any I/O).
    with image.open("wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(args.size_mib):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    sectors = args.size_mib * 2048
    results: list[dict[str, object]] = []
    try:
        for rnd in range(args.rounds):
            for depth in args.depths:
                for case in args.cases:
                    socket = work / "blk.sock"
                    proc = start(backend(case, image, socket, args.cache), socket)
                    try:
                        if args.drop_caches:
                            os.sync()
                            Path("/proc/sys/vm/drop_caches").write_text("3\n")
                        cpu0 = backend_cpu(proc.pid)
                        t0 = time.monotonic()
                        n = asyncio.run(drive(str(socket), depth, args.seconds, sectors))
                        elapsed = time.monotonic() - t0
                        cpu = backend_cpu(proc.pid) - cpu0
                    finally:
                        stop(proc)
                    row = {
                        "round": rnd,
                        "case": case,
                        "depth": depth,
                        "iops": round(n / elapsed),
                        "cpu_ms_per_1k": round(1000 * cpu / max(n, 1) * 1000, 3),
                    }
                    results.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
