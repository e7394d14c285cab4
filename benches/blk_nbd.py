"""4 KiB random I/O on an NBD export: through `vvu serve blk --nbd`, through
qemu-storage-daemon's NBD client (`driver=nbd` + a vhost-user-blk export), and from fio's nbd
engine (libnbd) straight at the server; alternated in one run, medians over the rounds.

    python benches/blk_nbd.py --depths 1 32 --seconds 5 --rounds 5

The export is qemu-nbd serving a raw image of random data (`--dir`, tmpfs by default so the
server is not the bottleneck), one server for the whole run. The two vhost-user cases are
driven by `vvu bench blk` (the native front-end, one queue), so their ratio is what each
back-end's vhost-user + NBD client costs; fio (C, no vhost-user at all) is an NBD client
benchmark straight at the server: vvu / fio is what the vhost-user layer costs on top of a bare
NBD client. The order of the cases rotates every round; on a shared machine read the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from blk_vs_qsd import bench, figures, fill_image, running

MiB = 1 << 20


def backend(case: str, uri: str, nbd_sock: Path, socket: Path) -> list[str]:
    if case == "vvu":
        return [sys.executable, "-m", "vvu", "-q", "serve", "blk", "--socket-path", str(socket),
                "--nbd", uri]  # fmt: skip
    qsd = shutil.which("qemu-storage-daemon")
    if qsd is None:
        sys.exit("qemu-storage-daemon is not installed (scripts/setup.sh: qemu-system-common)")
    return [qsd,
            "--blockdev", f"driver=nbd,node-name=n0,server.type=unix,server.path={nbd_sock},"
            "export=disk",
            "--export", f"type=vhost-user-blk,id=e0,addr.type=unix,addr.path={socket},"
            "node-name=n0,writable=on"]  # fmt: skip


def fio_direct(uri: str, rw: str, depth: int, seconds: float) -> dict[str, float]:
    out = subprocess.run(
        ["fio", "--name=nbd", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", "--bs=4k",
         f"--iodepth={depth}", f"--runtime={seconds}", "--time_based", "--output-format=json"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    # The nbd engine prints "fio: connected to NBD server" before the JSON.
    job = json.loads(out[out.index("{") :])["jobs"][0]
    d = job["read" if rw.endswith("read") else "write"]
    return {"iops": d["iops"], "p99_us": d["clat_ns"]["percentile"]["99.000000"] / 1000}


def measure(case: str, args: argparse.Namespace, *, uri: str, nbd_sock: Path, work: Path,
            rw: str, depth: int) -> dict[str, float]:  # fmt: skip
    if case == "fio":
        return fio_direct(uri, rw, depth, args.seconds)
    socket = work / f"{case}.sock"
    with running(case, backend(case, uri, nbd_sock, socket), socket, work / f"{case}.log") as b:
        return figures(bench(b, rw, depth, 1, args.seconds), rw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="/dev/shm", help="where the image goes")
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--rw", nargs="+", default=["randread"], help="randread randwrite")
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", nargs="+", default=["vvu", "qsd", "fio"])
    parser.add_argument("--json", type=Path, help="write every measurement here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vvu-bench-nbd-", dir=args.dir))
    image = work / "disk.img"
    fill_image(image, args.size_mib * MiB)
    nbd_sock = work / "nbd.sock"
    uri = f"nbd+unix:///disk?socket={nbd_sock}"
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    server = subprocess.Popen(
        ["qemu-nbd", "-f", "raw", "-x", "disk", "-k", str(nbd_sock), "-t", "-e", "16",
         "--cache=writeback", "--aio=threads", str(image)],
    )  # fmt: skip
    rows: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + 10
        while not nbd_sock.exists():
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit("qemu-nbd did not start")
            time.sleep(0.02)
        for rnd in range(args.rounds):
            order = args.cases[rnd % len(args.cases) :] + args.cases[: rnd % len(args.cases)]
            for rw in args.rw:
                for depth in args.depths:
                    for case in order:
                        row = {"round": rnd, "rw": rw, "qd": depth, "case": case,
                               **measure(case, args, uri=uri, nbd_sock=nbd_sock, work=work,
                                          rw=rw, depth=depth)}  # fmt: skip
                        rows.append(row)
                        print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work)
    print(f"\n{started}, {args.rounds} rounds, {os.getloadavg()[0]:.1f} load average at the end\n")
    cases = args.cases
    print("| rw | QD | " + " | ".join(f"{c} IOPS (median)" for c in cases)
          + " | vvu/qsd IOPS (per round) | vvu/fio IOPS | "
          + " | ".join(f"{c} p99 µs" for c in cases) + " |")  # fmt: skip
    print("|---|---:|" + "---:|" * (2 * len(cases) + 2))
    for rw in args.rw:
        for depth in args.depths:
            mine = [r for r in rows if r["rw"] == rw and r["qd"] == depth]
            med = {c: statistics.median(r["iops"] for r in mine if r["case"] == c) for c in cases}
            p99 = {c: statistics.median(r["p99_us"] for r in mine if r["case"] == c) for c in cases}
            per_round = []
            for rnd in range(args.rounds):
                by = {r["case"]: r["iops"] for r in mine if r["round"] == rnd}
                if "vvu" in by and by.get("qsd"):
                    per_round.append(f"{by['vvu'] / by['qsd']:.2f}")
            vf = f"{med['vvu'] / med['fio']:.2f}" if "vvu" in med and med.get("fio") else "-"
            print(f"| {rw} | {depth} | "
                  + " | ".join(f"{med[c] / 1000:.1f} k" for c in cases)
                  + f" | {' / '.join(per_round) or '-'} | {vf} | "
                  + " | ".join(f"{p99[c]:.0f}" for c in cases) + " |")  # fmt: skip
    if args.json is not None:
        args.json.write_text(json.dumps({"started": started, "argv": sys.argv, "rows": rows}))


if __name__ == "__main__":
    main()
