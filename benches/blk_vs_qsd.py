#!/usr/bin/env python3
"""`vvu serve blk` beside qemu-storage-daemon (`aio=io_uring`), measured by `vvu bench blk`.

Both back-ends serve their own copy-free view of the same image file and are measured
alternately in the same run (A B, then B A for the next workload, ...), so the ratios hold on a
busy machine even where the absolute figures drift. Workloads: 4 KiB random read and write at QD
1/32/128 on 1 and 2 queues, on tmpfs and on a file on the machine's disk with the page cache
dropped before every measurement (`sync; echo 3 > /proc/sys/vm/drop_caches`, needs root; qsd
with `cache.direct=on` there, `cache.direct=off` on tmpfs which has no O_DIRECT). Prints a
Markdown table of IOPS, p99 latency and back-end CPU per I/O with the ratios vvu / qsd, and
writes every raw result as JSON (--json).

    python benches/blk_vs_qsd.py                        # the whole matrix, 5 s per measurement
    python benches/blk_vs_qsd.py --vvu-args "--aio io_uring --cache none"   # after issue 10
    python benches/blk_vs_qsd.py --handshake 30         # connect → first 512-byte read, 30 runs
    python benches/blk_vs_qsd.py --storage disk --qd 1,32 --vvu-args "--cache none" \
        --rounds 3 --fio                                # medians of 3, fio on the image beside

`--rounds N` repeats the matrix (back-end order flipping every measurement) and the table shows
medians and every round's IOPS ratio; `--fio` adds fio straight at the disk image (O_DIRECT,
io_uring, same queue depth, one job per queue): the storage's own reach, so a ratio to qsd can
be read against what the disk allows at all.

`--vvu-args` is appended to `vvu serve blk` as given, so the same script measures the engine's
options once they exist. `--baseline-tree DIR` adds a third back-end, `base`: `vvu serve blk`
(same options) from another tree's python/ directory, e.g. main's, measured in turn with the
others, so the table also shows what a change did (vvu/base) in the same run:

    python benches/blk_vs_qsd.py --storage disk --rw randwrite --qd 32 --queues 1,2 \
        --vvu-args "--cache none" --rounds 2 --keep-images --baseline-tree /work/main/python

A kept disk image (`--keep-images`) is reused only while it is still fully written (no hole, no
unwritten extent, checked with FIEMAP), so every back-end overwrites allocated blocks.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shlex
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from daemons import wait_for_socket
from vvu.bench import backend_cpu, handshake_samples, latency_stats

MiB = 1 << 20
VVU = [sys.executable, "-m", "vvu"]


@dataclass
class Backend:
    name: str
    proc: subprocess.Popen[bytes]
    socket: Path


FS_IOC_FIEMAP = 0xC020660B
FIEMAP_EXTENT_UNWRITTEN = 0x800
FIEMAP_EXTENT_LAST = 0x1


def fully_written(path: Path) -> bool:
    """Whether every byte of `path` lies in a written extent (FIEMAP): no hole, no unwritten
    (fallocated) extent. Direct writes into either cost the file system an allocation or an
    extent conversion, so a reused image in that state would make the write figures depend on
    which back-end ran first. `True` where FIEMAP is not supported (nothing to check)."""
    size = path.stat().st_size
    count = 64
    with path.open("rb") as f:
        start = covered = 0
        while True:
            req = bytearray(struct.pack("=QQIIII", start, size - start, 0, 0, count, 0))
            req += bytes(56 * count)
            try:
                fcntl.ioctl(f.fileno(), FS_IOC_FIEMAP, req)
            except OSError:
                return True
            mapped = struct.unpack_from("=I", req, 20)[0]
            if mapped == 0:
                return covered >= size
            for i in range(mapped):
                logical, _, length, _, _, flags = struct.unpack_from("=QQQQQI", req, 32 + 56 * i)
                if flags & FIEMAP_EXTENT_UNWRITTEN or logical != start:
                    return False
                start = covered = logical + length
                if flags & FIEMAP_EXTENT_LAST:
                    return covered >= size


def fill_image(path: Path, size: int) -> None:
    """A fully written image (no holes or unwritten extents: reads must reach the medium, and
    direct writes must overwrite allocated blocks for every back-end alike). A kept image is
    reused only if it still is one."""
    if path.exists() and path.stat().st_size == size and fully_written(path):
        return
    chunk = os.urandom(16 * MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for offset in range(0, size, len(chunk)):
            os.pwrite(fd, chunk[: size - offset], offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


@contextmanager
def running(
    name: str, argv: list[str], socket: Path, log: Path, env: dict[str, str] | None = None
) -> Iterator[Backend]:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env)
    try:
        wait_for_socket(socket, proc, timeout=30)
        yield Backend(name, proc, socket)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:  # a loaded machine: the figures are in, go on
            print(f"{name} did not stop within 30 s of SIGTERM; killed", file=sys.stderr)
            proc.kill()
            proc.wait()


def vvu_argv(image: Path, socket: Path, queues: int, extra: str) -> list[str]:
    return [*VVU, "-q", "serve", "blk", "--socket-path", str(socket), "--blk-file", str(image),
            "--num-queues", str(queues), *shlex.split(extra)]  # fmt: skip


def qsd_argv(image: Path, socket: Path, queues: int, direct: bool, aio: str) -> list[str]:
    qsd = shutil.which("qemu-storage-daemon")
    if qsd is None:
        sys.exit("qemu-storage-daemon is not installed (scripts/setup.sh: qemu-system-common)")
    cache = "on" if direct else "off"
    return [qsd,
            "--blockdev", f"driver=file,node-name=file0,filename={image},cache.direct={cache},"
            f"aio={aio}",
            "--blockdev", "driver=raw,node-name=disk0,file=file0",
            "--export", f"type=vhost-user-blk,id=exp0,addr.type=unix,addr.path={socket},"
            f"node-name=disk0,writable=on,num-queues={queues}"]  # fmt: skip


def bench(backend: Backend, rw: str, qd: int, queues: int, runtime: float) -> dict[str, Any]:
    argv = [*VVU, "-q", "bench", "blk", "--socket-path", str(backend.socket), "--json",
            "--rw", rw, "--bs", "4k", "--iodepth", str(qd), "--queues", str(queues),
            "--runtime", str(runtime), "--backend-pid", str(backend.proc.pid)]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=runtime + 120, check=False)
    if out.returncode != 0:
        raise SystemExit(
            f"{backend.name}: {' '.join(argv)} failed (exit status {out.returncode}):\n"
            f"{out.stderr}{out.stdout}"
        )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def fio_direct(image: Path, rw: str, qd: int, queues: int, runtime: float) -> dict[str, float]:
    """fio straight at the image (`--direct=1 --ioengine=io_uring`, one job per queue, no
    vhost-user, no virtqueue): what the storage itself reaches at this queue depth."""
    out = subprocess.run(
        ["fio", "--name=ref", f"--filename={image}", "--direct=1", "--ioengine=io_uring",
         f"--rw={rw}", "--bs=4k", f"--iodepth={qd}", f"--numjobs={queues}", "--group_reporting",
         f"--runtime={runtime}", "--time_based", "--output-format=json"],
        capture_output=True, text=True, timeout=runtime + 120, check=True,
    ).stdout  # fmt: skip
    job = json.loads(out)["jobs"][0]
    d = job["read" if rw.endswith("read") else "write"]
    return {"iops": d["iops"], "p99_us": d["clat_ns"]["percentile"]["99.000000"] / 1000,
            "p50_us": d["clat_ns"]["percentile"]["50.000000"] / 1000,
            "cpu_us_per_io": float("nan")}  # fmt: skip


def figures(result: dict[str, Any], rw: str) -> dict[str, float]:
    d = result["read" if rw.endswith("read") else "write"]
    return {
        "iops": d["iops"],
        "p99_us": d["lat_us"]["p99"],
        "p50_us": d["lat_us"]["p50"],
        "cpu_us_per_io": result["cpu"].get("backend_us_per_io", float("nan")),
    }


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def load_matrix(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    turn = 0
    for storage in args.storage:
        on_disk = storage == "disk"
        directory = Path(args.disk_dir if on_disk else args.tmpfs_dir)
        size = args.disk_size if on_disk else args.tmpfs_size
        image = directory / f"vvu-bench-{storage}.img"
        print(f"# {storage}: {image} ({size // MiB} MiB)", file=sys.stderr, flush=True)
        fill_image(image, size)
        try:
            stack = contextlib.ExitStack()
            with stack:
                backends = [
                    stack.enter_context(running("vvu", vvu_argv(image, work / "vvu.sock", 2,
                        args.vvu_args), work / "vvu.sock", work / f"vvu-{storage}.log")),
                    stack.enter_context(running("qsd", qsd_argv(image, work / "qsd.sock", 2,
                        on_disk, args.qsd_aio), work / "qsd.sock", work / f"qsd-{storage}.log")),
                ]  # fmt: skip
                if args.baseline_tree is not None:
                    env = {**os.environ, "PYTHONPATH": str(args.baseline_tree)}
                    argv = vvu_argv(image, work / "base.sock", 2, args.vvu_args)
                    log = work / f"base-{storage}.log"
                    base_ = running("base", argv, work / "base.sock", log, env)
                    backends.append(stack.enter_context(base_))
                for rnd, rw, queues, qd in (
                    (rnd, rw, queues, qd)
                    for rnd in range(args.rounds)
                    for rw in args.rw
                    for queues in args.queues
                    for qd in args.qd
                ):
                    measured: dict[str, dict[str, float]] = {}
                    # Every back-end goes first in turn (A B C, B C A, ...) and, with two, the
                    # order flips every measurement.
                    order = backends[turn % len(backends) :] + backends[: turn % len(backends)]
                    turn += 1
                    for backend in order:
                        if on_disk:
                            drop_caches()
                        result = bench(backend, rw, qd, queues, args.runtime)
                        measured[backend.name] = figures(result, rw)
                    if on_disk and args.fio:
                        drop_caches()
                        measured["fio"] = fio_direct(image, rw, qd, queues, args.runtime)
                    row = {"storage": storage, "rw": rw, "qd": qd, "queues": queues,
                           "round": rnd, "order": [x.name for x in order], **measured}  # fmt: skip
                    rows.append(row)
                    v, q = measured["vvu"], measured["qsd"]
                    fio = f", fio {measured['fio']['iops']:.0f}" if "fio" in measured else ""
                    base = (f", base {measured['base']['iops']:.0f} (vvu/base "
                            f"{ratio(v['iops'], measured['base']['iops'])})"
                            if "base" in measured else "")  # fmt: skip
                    print(f"{storage} {rw} qd={qd} queues={queues}: vvu {v['iops']:.0f} IOPS, "
                          f"qsd {q['iops']:.0f} IOPS{fio}{base}, "
                          f"ratio {ratio(v['iops'], q['iops'])}",
                          file=sys.stderr, flush=True)  # fmt: skip
        finally:
            if not args.keep_images:
                image.unlink(missing_ok=True)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    """One line per workload: medians over the rounds, the IOPS ratio of every round, and fio
    straight at the image (the storage's own reach) where it was measured."""
    fio = any("fio" in r for r in rows)
    base = any("base" in r for r in rows)
    print("| storage | rw | QD | queues | vvu IOPS | qsd IOPS | **IOPS vvu/qsd** "
          "| per round | vvu p99 µs | qsd p99 µs | p99 vvu/qsd | vvu CPU µs/IO | qsd CPU µs/IO "
          "| CPU/IO vvu/qsd |" + (" fio IOPS | vvu/fio |" if fio else "")
          + (" base IOPS | **vvu/base** (per round) | CPU/IO vvu/base |"
             if base else ""))  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"
          + ("---:|---:|" if fio else "") + ("---:|---|---:|" if base else ""))  # fmt: skip
    groups: dict[tuple[str, str, int, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["storage"], r["rw"], r["qd"], r["queues"]), []).append(r)
    for (storage, rw, qd, queues), runs in groups.items():

        def med(name: str, key: str, runs: list[dict[str, Any]] = runs) -> float:
            return statistics.median(r[name][key] for r in runs if name in r)

        v = {k: med("vvu", k) for k in ("iops", "p99_us", "cpu_us_per_io")}
        q = {k: med("qsd", k) for k in ("iops", "p99_us", "cpu_us_per_io")}
        rounds = " / ".join(ratio(r["vvu"]["iops"], r["qsd"]["iops"]) for r in runs)
        line = (f"| {storage} | {rw} | {qd} | {queues} "
                f"| {v['iops'] / 1000:.1f} k | {q['iops'] / 1000:.1f} k "
                f"| **{ratio(v['iops'], q['iops'])}** | {rounds} "
                f"| {v['p99_us']:.0f} | {q['p99_us']:.0f} | {ratio(v['p99_us'], q['p99_us'])} "
                f"| {v['cpu_us_per_io']:.2f} | {q['cpu_us_per_io']:.2f} "
                f"| {ratio(v['cpu_us_per_io'], q['cpu_us_per_io'])} |")  # fmt: skip
        if fio:
            f = med("fio", "iops") if any("fio" in r for r in runs) else float("nan")
            line += f" {f / 1000:.1f} k | {ratio(v['iops'], f)} |"
        if base:
            b = {k: med("base", k) for k in ("iops", "cpu_us_per_io")}
            per = " / ".join(ratio(r["vvu"]["iops"], r["base"]["iops"]) for r in runs)
            line += (f" {b['iops'] / 1000:.1f} k | **{ratio(v['iops'], b['iops'])}** ({per}) "
                     f"| {ratio(v['cpu_us_per_io'], b['cpu_us_per_io'])} |")  # fmt: skip
        print(line)


def handshake(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Connect → first 512-byte read served, one run per back-end in turn, args.handshake runs
    each, on a small image in tmpfs. With --baseline-tree, a second `vvu serve blk` runs from
    that tree's python/ directory (e.g. main's, to see what a change to the engine did)."""
    image = Path(args.tmpfs_dir) / "vvu-bench-handshake.img"
    fill_image(image, 64 * MiB)
    with contextlib.ExitStack() as stack:
        stack.callback(image.unlink, missing_ok=True)
        backends = [
            stack.enter_context(running("vvu", vvu_argv(image, work / "vvu.sock", 1,
                                args.vvu_args), work / "vvu.sock", work / "vvu-hs.log")),
            stack.enter_context(running("qsd", qsd_argv(image, work / "qsd.sock", 1, False,
                                args.qsd_aio), work / "qsd.sock", work / "qsd-hs.log")),
        ]  # fmt: skip
        if args.baseline_tree is not None:
            env = {**os.environ, "PYTHONPATH": str(args.baseline_tree)}
            argv = vvu_argv(image, work / "base.sock", 1, args.vvu_args)
            base = running("vvu-baseline", argv, work / "base.sock", work / "base-hs.log", env)
            backends.append(stack.enter_context(base))
        samples: dict[str, list[dict[str, float]]] = {b.name: [] for b in backends}
        # The back-ends' CPU time per session (utime+stime, all threads, over all the runs; an
        # idle back-end uses none): less at the mercy of a busy machine than the latency.
        cpu = {b.name: -backend_cpu(b.proc.pid) for b in backends}
        for i in range(args.handshake):
            # The order turns every round: the first of a round pays for something (its
            # connect step took 0.3-0.5 ms more, whichever back-end it was).
            for backend in backends[i % len(backends) :] + backends[: i % len(backends)]:
                samples[backend.name] += handshake_samples(str(backend.socket), 1)
        for backend in backends:
            cpu[backend.name] += backend_cpu(backend.proc.pid)
    report: dict[str, dict[str, Any]] = {
        name: {
            "total": latency_stats([s["total"] for s in runs]),
            "steps": {k: latency_stats([s[k] for s in runs]) for k in runs[0] if k != "total"},
        }
        for name, runs in samples.items()
    }
    for name, seconds in cpu.items():
        report[name]["cpu_ms_per_session"] = round(seconds * 1e3 / args.handshake, 3)
    names = list(report)
    print("| step | " + " | ".join(f"{n} median ms | {n} p90 ms" for n in names) + " |")
    print("|---|" + "---:|---:|" * len(names))
    for step in [*report["vvu"]["steps"], "total"]:
        cells = []
        for name in names:
            s = report[name]["steps"].get(step) or report[name]["total"]
            cells.append(f"{s['median_ms']:.2f} | {s['p90_ms']:.2f}")
        print(f"| {step} | " + " | ".join(cells) + " |")
    print("| back-end CPU ms per session | " + " | ".join(
        f"{report[n]['cpu_ms_per_session']:.2f} | " for n in names) + " |")  # fmt: skip
    # What the back-ends answer: the step medians after `connect` (the front-end's own).
    steps = {n: sum(s["median_ms"] for k, s in report[n]["steps"].items() if k != "connect")
             for n in names}  # fmt: skip
    for name in names:
        report[name]["steps_after_connect_ms"] = round(steps[name], 3)
    print("| steps after connect, sum of medians | " + " | ".join(
        f"{steps[n]:.2f} | " for n in names) + " |")  # fmt: skip
    v, q = report["vvu"]["total"], report["qsd"]["total"]
    print(f"\nmedian vvu/qsd: {ratio(v['median_ms'], q['median_ms'])}, "
          f"p90 vvu/qsd: {ratio(v['p90_ms'], q['p90_ms'])}, "
          f"steps after connect vvu/qsd: {ratio(steps['vvu'], steps['qsd'])}")  # fmt: skip
    if "vvu-baseline" in report:
        b = report["vvu-baseline"]["total"]
        c, cb = report["vvu"]["cpu_ms_per_session"], report["vvu-baseline"]["cpu_ms_per_session"]
        print(f"median vvu/vvu-baseline: {ratio(v['median_ms'], b['median_ms'])}, "
              f"steps after connect: {ratio(steps['vvu'], steps['vvu-baseline'])}, "
              f"back-end CPU vvu/vvu-baseline: {ratio(c, cb)}")  # fmt: skip
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    words = lambda s: s.split(",")  # noqa: E731
    parser.add_argument("--runtime", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--rw", type=words, default=["randread", "randwrite"])
    parser.add_argument("--qd", type=ints, default=[1, 32, 128])
    parser.add_argument("--queues", type=ints, default=[1, 2])
    parser.add_argument("--storage", type=words, default=["tmpfs", "disk"])
    parser.add_argument("--tmpfs-dir", default="/dev/shm")
    parser.add_argument("--disk-dir", default="/var/tmp", help="a directory on a real disk")
    parser.add_argument("--tmpfs-size", type=lambda s: int(s) * MiB, default=1024 * MiB,
                        help="MiB (1024)")  # fmt: skip
    parser.add_argument("--disk-size", type=lambda s: int(s) * MiB, default=4096 * MiB,
                        help="MiB (4096)")  # fmt: skip
    parser.add_argument("--keep-images", action="store_true", help="reuse them next time")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the whole matrix; the table shows medians (1)")  # fmt: skip
    parser.add_argument("--fio", action="store_true",
                        help="on disk, also fio --direct=1 --ioengine=io_uring on the image: "
                        "what the storage itself reaches, no vhost-user")  # fmt: skip
    parser.add_argument("--vvu-args", default="", help="extra `vvu serve blk` options, quoted")
    parser.add_argument("--qsd-aio", default="io_uring", help="qsd's aio= (io_uring)")
    parser.add_argument("--handshake", type=int, metavar="RUNS",
                        help="measure connect → first read instead, RUNS per back-end")  # fmt: skip
    parser.add_argument("--baseline-tree", type=Path, metavar="PYTHON_DIR",
                        help="also a vvu from this python/ dir (e.g. main's), measured in turn "
                        "with the others, as `base`")  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    args = parser.parse_args()
    base = args.baseline_tree
    if base is not None and not (base / "vvu" / "__init__.py").is_file():
        # Else PYTHONPATH would name nothing and `base` would quietly be the installed vvu.
        sys.exit(f"--baseline-tree {args.baseline_tree}: no vvu package in it")
    if "disk" in args.storage and args.handshake is None and os.geteuid() != 0:
        sys.exit("dropping the page cache needs root (or --storage tmpfs)")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with tempfile.TemporaryDirectory(prefix="vvu-bench-") as tmp:
        work = Path(tmp)
        data: Any
        if args.handshake is not None:
            data = handshake(args, work)
        else:
            rows = load_matrix(args, work)
            print(f"\n{started}, {os.getloadavg()[0]:.1f} load average at the end, "
                  f"vvu-args {args.vvu_args!r}\n")  # fmt: skip
            print_table(rows)
            data = rows
    if args.json is not None:
        args.json.write_text(json.dumps({"started": started, "argv": sys.argv, "data": data},
                                        indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
