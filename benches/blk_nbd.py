"""4 KiB random reads of an NBD export: through `vvu serve blk --nbd`, through
qemu-storage-daemon's NBD client (`driver=nbd` + a vhost-user-blk export), and from fio's nbd
engine straight at the server; alternated in one run.

    python benches/blk_nbd.py --dir /dev/shm --size-mib 256 --depths 1 32 --seconds 5 --rounds 3

The export is qemu-nbd serving a raw image of random data (`--dir`, tmpfs by default so the
server is not the bottleneck). The two vhost-user cases are driven by vvu's own Python front-end
(`BlkDriver`, one queue, QD lanes, as in benches/blk_aio.py), so their ratio is what each
back-end's vhost-user + NBD client costs; the fio case (C, no vhost-user at all) is the NBD
server's own ceiling on this machine, not a like-for-like comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from blk_aio import cpu_seconds, drive, start, stop


def backend(case: str, uri: str, nbd_sock: Path, socket: Path) -> list[str]:
    if case == "vvu":
        return [sys.executable, "-m", "vvu", "-q", "serve", "blk", "--socket-path", str(socket),
                "--nbd", uri]  # fmt: skip
    qsd = shutil.which("qemu-storage-daemon")
    assert qsd is not None
    return [qsd,
            "--blockdev", f"driver=nbd,node-name=n0,server.type=unix,server.path={nbd_sock},"
            "export=disk",
            "--export", f"type=vhost-user-blk,id=e0,addr.type=unix,addr.path={socket},"
            "node-name=n0,writable=on"]  # fmt: skip


def fio_direct(uri: str, depth: int, seconds: float) -> int:
    out = subprocess.run(
        ["fio", "--name=nbd", "--ioengine=nbd", f"--uri={uri}", "--rw=randread", "--bs=4k",
         f"--iodepth={depth}", f"--runtime={seconds}", "--time_based", "--output-format=json"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    # The nbd engine prints "fio: connected to NBD server" before the JSON.
    return round(json.loads(out[out.index("{") :])["jobs"][0]["read"]["iops"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="/dev/shm", help="where the image goes")
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cases", nargs="+", default=["vvu", "qsd", "fio"])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vvu-bench-nbd-", dir=args.dir))
    image = work / "disk.img"
    with image.open("wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(args.size_mib):
            f.write(chunk)
    sectors = args.size_mib * 2048
    nbd_sock = work / "nbd.sock"
    uri = f"nbd+unix:///disk?socket={nbd_sock}"
    server = subprocess.Popen(
        ["qemu-nbd", "-f", "raw", "-x", "disk", "-k", str(nbd_sock), "-t", "-e", "16",
         "--cache=writeback", "--aio=threads", str(image)],
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not nbd_sock.exists():
            assert server.poll() is None and time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.02)
        for rnd in range(args.rounds):
            for depth in args.depths:
                for case in args.cases:
                    row: dict[str, object] = {"round": rnd, "case": case, "depth": depth}
                    if case == "fio":
                        row["iops"] = fio_direct(uri, depth, args.seconds)
                    else:
                        socket = work / "blk.sock"
                        proc = start(backend(case, uri, nbd_sock, socket), socket)
                        try:
                            cpu0 = cpu_seconds(proc.pid)
                            t0 = time.monotonic()
                            n = asyncio.run(drive(str(socket), depth, args.seconds, sectors))
                            elapsed = time.monotonic() - t0
                            cpu = cpu_seconds(proc.pid) - cpu0
                        finally:
                            stop(proc)
                        row["iops"] = round(n / elapsed)
                        row["cpu_ms_per_1k"] = round(1000 * cpu / max(n, 1) * 1000, 3)
                    print(json.dumps(row), flush=True)
    finally:
        stop(server)
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
