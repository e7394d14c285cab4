"""`vvu bench blk`: a vhost-user-blk benchmark front-end, like fio for a socket.

vvu's own front-end (`vvu.frontend`) does the vhost-user handshake and lays out the rings, then
hands them to a native loop (`_core.blk_bench`) that keeps `iodepth` requests in flight per
queue, one thread per queue, without the GIL. Any vhost-user-blk back-end can be measured:
`vvu serve blk`, qemu-storage-daemon, SPDK... Also measures the handshake itself: connect →
first 512-byte read served (`--handshake-runs`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import resource
import statistics
import struct
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from vvu._core import blk_bench
from vvu.errors import VvuError
from vvu.frontend import BlkDriver, Frontend
from vvu.frontend.core import FrontendQueue
from vvu.protocol import ProtocolFeature

log = logging.getLogger(__name__)

__all__ = [
    "BenchError",
    "BlkJob",
    "handshake_latency",
    "handshake_report",
    "handshake_samples",
    "latency_stats",
    "parse_size",
    "run_blk",
    "summary",
]

SECTOR = 512
MiB = 1 << 20
PATTERNS = ("read", "write", "randread", "randwrite", "randrw")
#: The most requests in flight per queue: each takes 3 descriptors and qemu-storage-daemon
#: (libvhost-user) takes rings of at most 1024.
MAX_IODEPTH = 1024
#: --verify remembers each block's last write (8 bytes) and whether it is in flight (1 byte).
MAX_VERIFY_BLOCKS = 1 << 26
_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}


class BenchError(VvuError):
    """Bad options, or a back-end that cannot run the job."""


def parse_size(text: str) -> int:
    """Bytes from `4096`, `4k`, `1M`, `2GiB` (binary units, as fio)."""
    match = _SIZE.match(text)
    if match is None:
        raise BenchError(f"size {text!r}: expected a number with an optional k/m/g/t suffix")
    return int(match.group(1)) << _SHIFT[match.group(2).lower()]


@dataclass(frozen=True)
class BlkJob:
    """What to run; the options of `vvu bench blk`."""

    socket_path: str
    rw: str = "randread"
    bs: int = 4096
    iodepth: int = 32
    queues: int = 1
    runtime: float = 10.0
    size: int | None = None  # bytes from the start of the disk; None: all of it
    verify: bool = False
    rwmix_read: int = 50
    backend_pid: int | None = None
    queue_size: int | None = None  # None: the smallest power of two ≥ 256 that holds iodepth
    packed: bool = False
    seed: int = 1
    timeout: float = 10.0  # no completion for this long while requests are in flight: fail
    connect_timeout: float = 5.0

    def check(self) -> None:
        """Raise BenchError for options no back-end could run."""
        if self.rw not in PATTERNS:
            raise BenchError(f"--rw {self.rw!r}: expected one of {', '.join(PATTERNS)}")
        if self.bs <= 0 or self.bs % SECTOR:
            raise BenchError(f"--bs {self.bs}: must be a positive multiple of 512 bytes")
        if self.bs > 16 * MiB:
            raise BenchError(f"--bs {self.bs}: at most 16 MiB")
        if not 1 <= self.iodepth <= MAX_IODEPTH:
            raise BenchError(f"--iodepth {self.iodepth}: must be 1..{MAX_IODEPTH}")
        if self.queues < 1:
            raise BenchError(f"--queues {self.queues}: must be at least 1")
        if not self.runtime > 0:
            raise BenchError(f"--runtime {self.runtime}: must be positive")
        if not self.timeout > 0:
            raise BenchError(f"--timeout {self.timeout}: must be positive")
        if not 0 <= self.rwmix_read <= 100:
            raise BenchError(f"--rwmixread {self.rwmix_read}: must be 0..100")
        if self.size is not None and self.size < self.bs * self.queues:
            raise BenchError(f"--size {self.size}: less than one --bs block ({self.bs}) per queue")
        if self.queue_size is not None and not 3 * self.iodepth <= self.queue_size <= 32768:
            raise BenchError(
                f"--queue-size {self.queue_size}: must hold 3 descriptors per request in "
                f"flight ({3 * self.iodepth}) and be at most 32768"
            )
        if self.backend_pid is not None:
            backend_cpu(self.backend_pid)  # the pid must exist and be readable

    def ring_size(self) -> int:
        if self.queue_size is not None:
            return self.queue_size
        size = 256
        while size < 3 * self.iodepth:
            size *= 2
        return size


def backend_cpu(pid: int) -> float:
    """utime + stime of process `pid` (all its threads), in seconds."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            stat = f.read()
    except OSError as err:
        raise BenchError(f"--backend-pid {pid}: {err.strerror}") from err
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class _Setup:
    frontend: Frontend
    queues: list[FrontendQueue]
    capacity: int  # bytes
    offered_queues: int


async def _setup(job: BlkJob) -> _Setup:
    """QEMU's vhost-user-blk start with `job.queues` rings, and request memory per ring."""
    ring = job.ring_size()
    per_queue = job.iodepth * (job.bs + 32) + 16 * ring + 8 * ring + 3 * 4096
    memory = 2 * MiB + job.queues * (per_queue + 8192)
    frontend = await Frontend.connect(
        job.socket_path,
        memory_size=memory,
        timeout=job.connect_timeout,
        packed=job.packed,
    )
    try:
        await frontend.negotiate()
        if job.queues > frontend.num_queues:
            raise BenchError(
                f"--queues {job.queues}: the back-end offers {frontend.num_queues} queue(s)"
            )
        await frontend.set_mem_table()
        if not frontend.protocol_features & ProtocolFeature.CONFIG.mask:
            if job.size is None:
                raise BenchError("the back-end has no config space (CONFIG): give --size")
            capacity = job.size
        else:
            (sectors,) = struct.unpack("<Q", await frontend.get_config(0, 8))
            capacity = int(sectors) * SECTOR
        size = capacity if job.size is None else job.size
        if size > capacity:
            raise BenchError(f"--size {size}: the disk has {capacity} bytes")
        if size < job.bs * job.queues:
            raise BenchError(f"the disk ({capacity} bytes) is smaller than --bs times --queues")
        if job.verify and size // job.bs > MAX_VERIFY_BLOCKS:
            raise BenchError(
                f"--verify keeps 9 bytes per block: {size // job.bs} blocks of --bs is more than "
                f"{MAX_VERIFY_BLOCKS}; give a smaller --size"
            )
        await frontend.setup_inflight(job.queues, ring)
        queues = [await frontend.start_queue(i, ring) for i in range(job.queues)]
    except BaseException:
        await frontend.close()
        raise
    return _Setup(frontend, queues, capacity, frontend.num_queues)


def _lat_us(lat_ns: dict[str, Any]) -> dict[str, float]:
    return {k: round(float(v) / 1000, 3) for k, v in lat_ns.items()}


def _result(job: BlkJob, setup: _Setup, raw: dict[str, Any], cpu: dict[str, Any]) -> dict[str, Any]:
    elapsed = float(raw["elapsed"]) or 1e-9
    out: dict[str, Any] = {
        "job": {**asdict(job), "queue_size": job.ring_size()},
        "backend": {
            "socket": job.socket_path,
            "pid": job.backend_pid,
            "capacity": setup.capacity,
            "queues_offered": setup.offered_queues,
            "features": f"{setup.frontend.features:#x}",
        },
        "elapsed_s": round(elapsed, 6),
    }
    total_ios = total_bytes = total_errors = 0
    for name in ("read", "write"):
        d = raw[name]
        total_ios += d["ios"]
        total_bytes += d["bytes"]
        total_errors += d["errors"]
        out[name] = {
            "ios": d["ios"],
            "bytes": d["bytes"],
            "errors": d["errors"],
            "iops": round(d["ios"] / elapsed, 1),
            "mib_s": round(d["bytes"] / elapsed / MiB, 2),
            "lat_us": _lat_us(d["lat_ns"]),
        }
    out["total"] = {
        "ios": total_ios,
        "errors": total_errors,
        "iops": round(total_ios / elapsed, 1),
        "mib_s": round(total_bytes / elapsed / MiB, 2),
    }
    out["verify"] = {
        "enabled": job.verify,
        "verified": raw["verified"],
        "errors": raw["verify_errors"],
        "mismatches": raw["mismatches"],
        "prefill_ios": raw["prefill_ios"],
    }
    per_io = max(total_ios, 1)
    cpu_out: dict[str, Any] = {
        "bench_s": round(cpu["bench"], 3),
        "bench_us_per_io": round(cpu["bench"] * 1e6 / per_io, 3),
    }
    if "backend" in cpu:
        cpu_out["backend_s"] = round(cpu["backend"], 3)
        cpu_out["backend_us_per_io"] = round(cpu["backend"] * 1e6 / per_io, 3)
    out["cpu"] = cpu_out
    out["faults"] = raw["faults"]
    out["interrupted"] = raw["interrupted"]
    out["ok"] = not (raw["faults"] or total_errors or raw["verify_errors"] or raw["interrupted"])
    return out


def run_blk(job: BlkJob) -> dict[str, Any]:
    """Run `job` against its back-end; the results (see `vvu bench blk --help`)."""
    job.check()
    loop = asyncio.new_event_loop()
    try:
        setup = loop.run_until_complete(_setup(job))
        try:
            size = setup.capacity if job.size is None else job.size
            spb = job.bs // SECTOR
            per_queue = (size // SECTOR // job.queues) // spb * spb
            args = []
            for i, queue in enumerate(setup.queues):
                alloc = setup.frontend.allocator
                headers = alloc.alloc(16 * job.iodepth, 16)
                statuses = alloc.alloc(job.iodepth, 64)
                data = alloc.alloc(job.bs * job.iodepth, 4096)
                args.append(
                    (queue.driver, queue.kick, queue.call, headers, statuses, data,
                     i * per_queue, per_queue)
                )  # fmt: skip
            channel_fd = getattr(setup.frontend.channel, "fileno", None)
            cpu0 = backend_cpu(job.backend_pid) if job.backend_pid is not None else 0.0
            own0 = _own_cpu()

            def started() -> None:
                log.info(
                    "running %s bs=%d iodepth=%d on %d queue(s) of %s for %.1f s",
                    job.rw, job.bs, job.iodepth, job.queues, job.socket_path, job.runtime,
                )  # fmt: skip

            raw = blk_bench(
                args,
                rw=job.rw,
                block_size=job.bs,
                iodepth=job.iodepth,
                runtime=job.runtime,
                backend_fd=channel_fd() if channel_fd is not None else None,
                rwmix_read=job.rwmix_read,
                verify=job.verify,
                seed=job.seed,
                timeout=job.timeout,
                on_start=started,
            )
            cpu = {"bench": _own_cpu() - own0}
            if job.backend_pid is not None:
                with contextlib.suppress(BenchError):  # it may have died: then no figure
                    cpu["backend"] = backend_cpu(job.backend_pid) - cpu0
            result = _result(job, setup, raw, cpu)
            if not raw["faults"]:  # stop the rings as QEMU does (GET_VRING_BASE)
                with contextlib.suppress(VvuError, OSError, TimeoutError):
                    for queue in setup.queues:
                        loop.run_until_complete(
                            asyncio.wait_for(setup.frontend.stop_queue(queue.index), 5)
                        )
        finally:
            loop.run_until_complete(setup.frontend.close())
    finally:
        loop.close()
    return result


def _fmt_rate(value: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


def summary(result: dict[str, Any]) -> str:
    """The short human-readable report."""
    job = result["job"]
    lines = [
        f"vvu bench blk: {job['rw']} bs={job['bs']} iodepth={job['iodepth']} "
        f"queues={job['queues']} on {job['socket_path']} ({result['elapsed_s']:.2f} s)"
    ]
    for name in ("read", "write"):
        d = result[name]
        if not d["ios"] and not d["errors"]:
            continue
        lat = d["lat_us"]
        lines.append(
            f"  {name:5}: IOPS={_fmt_rate(d['iops'])}, BW={d['mib_s']:.1f} MiB/s, "
            f"{d['ios']} I/Os, {d['errors']} errors"
        )
        lines.append(
            f"    lat (us): min={lat['min']:.1f} mean={lat['mean']:.1f} max={lat['max']:.1f}  "
            f"p50={lat['p50']:.1f} p90={lat['p90']:.1f} p99={lat['p99']:.1f} "
            f"p99.9={lat['p99.9']:.1f}"
        )
    cpu = result["cpu"]
    text = f"  cpu: bench {cpu['bench_s']:.2f} s ({cpu['bench_us_per_io']:.2f} us/IO)"
    if "backend_s" in cpu:
        text += f", back-end {cpu['backend_s']:.2f} s ({cpu['backend_us_per_io']:.2f} us/IO)"
    lines.append(text)
    verify = result["verify"]
    if verify["enabled"]:
        lines.append(f"  verify: {verify['verified']} reads checked, {verify['errors']} errors")
        for m in verify["mismatches"]:
            lines.append(
                f"    sector {m['sector']}: expected generation {m['expected_generation']}, "
                f"found sector {m['found_sector']} generation {m['found_generation']}"
            )
    for fault in result["faults"]:
        lines.append(f"  error: {fault}")
    if result["interrupted"]:
        lines.append("  interrupted: stopped before --runtime was over")
    return "\n".join(lines)


# --- handshake latency -------------------------------------------------------------------------

#: The steps of QEMU's vhost-user-blk start, as `BlkDriver.start` does them, then one read.
HANDSHAKE_STEPS = ("connect", "negotiate", "mem_table", "config", "inflight", "queue", "read")


async def _one_handshake(path: str, timeout: float) -> dict[str, float]:
    times: dict[str, float] = {}
    t0 = last = time.perf_counter()

    def step(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        times[name] = now - last
        last = now

    frontend = await Frontend.connect(path, memory_size=4 * MiB, timeout=timeout)
    step("connect")
    try:
        await frontend.negotiate()
        step("negotiate")
        await frontend.set_mem_table()
        step("mem_table")
        capacity = 0
        if frontend.protocol_features & ProtocolFeature.CONFIG.mask:
            (capacity,) = struct.unpack("<Q", await frontend.get_config(0, 8))
        step("config")
        await frontend.setup_inflight(1, 256)
        step("inflight")
        queue = await frontend.start_queue(0, 256)
        step("queue")
        driver = BlkDriver(frontend, queue, capacity, depth=1, max_request=4096)
        data = await asyncio.wait_for(driver.read(0, SECTOR), timeout)
        step("read")
        if len(data) != SECTOR:
            raise BenchError(f"first read returned {len(data)} bytes")
        times["total"] = time.perf_counter() - t0
    finally:
        await frontend.close()
    return times


def handshake_samples(path: str, runs: int, *, timeout: float = 5.0) -> list[dict[str, float]]:
    """Connect → handshake → first 512-byte read served, `runs` times (each a new session,
    closed before the next): seconds per run, in all ("total") and per step."""
    if runs < 1:
        raise BenchError(f"--handshake-runs {runs}: must be at least 1")

    async def all_runs() -> list[dict[str, float]]:
        return [await _one_handshake(path, timeout) for _ in range(runs)]

    return asyncio.run(all_runs())


def latency_stats(seconds: list[float]) -> dict[str, float]:
    """Median, p90 (nearest rank), min and max of `seconds`, in milliseconds."""
    ordered = sorted(seconds)
    p90 = ordered[max(0, -(-9 * len(ordered) // 10) - 1)]
    return {
        "median_ms": round(statistics.median(ordered) * 1e3, 3),
        "p90_ms": round(p90 * 1e3, 3),
        "min_ms": round(ordered[0] * 1e3, 3),
        "max_ms": round(ordered[-1] * 1e3, 3),
    }


def handshake_report(path: str, samples: list[dict[str, float]]) -> dict[str, Any]:
    return {
        "socket": path,
        "runs": len(samples),
        "total": latency_stats([s["total"] for s in samples]),
        "steps": {name: latency_stats([s[name] for s in samples]) for name in HANDSHAKE_STEPS},
    }


def handshake_latency(path: str, runs: int, *, timeout: float = 5.0) -> dict[str, Any]:
    """`handshake_samples`, summed up: median and p90 in milliseconds, in all and per step."""
    return handshake_report(path, handshake_samples(path, runs, timeout=timeout))


def handshake_summary(result: dict[str, Any]) -> str:
    total = result["total"]
    lines = [
        f"vvu bench blk --handshake-runs {result['runs']} on {result['socket']}: connect → "
        f"first 512-byte read: median {total['median_ms']:.2f} ms, p90 {total['p90_ms']:.2f} ms "
        f"(min {total['min_ms']:.2f}, max {total['max_ms']:.2f})"
    ]
    for name, s in result["steps"].items():
        lines.append(f"  {name:10} median {s['median_ms']:7.3f} ms  p90 {s['p90_ms']:7.3f} ms")
    return "\n".join(lines)


# --- command line ------------------------------------------------------------------------------

DESCRIPTION = (
    "A vhost-user-blk benchmark front-end, like fio for a socket: connect to any vhost-user-blk "
    "back-end (vvu serve blk, qemu-storage-daemon, SPDK...) as QEMU would, set up --queues "
    "rings and keep --iodepth requests of --bs bytes in flight on each for --runtime seconds, "
    "from native threads (one per queue, no GIL). Requests complete in any order; reports "
    "IOPS, MiB/s, errors and latency (min/mean/max, p50/p90/p99/p99.9/p99.99, from a histogram "
    "precise to 1.6 %) per direction, and with --backend-pid the back-end's CPU time "
    "(utime+stime from /proc/PID/stat) per I/O. Each queue works on its own slice of the first "
    "--size bytes. --verify writes a pattern naming the sector, the write (generation) and the "
    "run into every 512-byte sector and checks every read against the last write of that "
    "block; read-only patterns first write the whole --size, and every block written is read "
    "back at the end (neither is timed). A back-end that closes the connection, or completes "
    "nothing for --timeout seconds, fails the requests in flight and the command exits 1; "
    "Ctrl-C stops (requests in flight complete), reports and exits 130. "
    "--handshake-runs N measures instead how long a new session takes: connect, QEMU's "
    "vhost-user-blk start (features, memory table, config, inflight, one ring) and one 512-byte "
    "read, N times; median and p90 in all and per step. "
    "Exit status: 0 when every request succeeded (and verified), 1 otherwise, 2 for bad options."
)


def add_parser(commands: Any) -> None:
    """`vvu bench` and its `blk` subcommand, on the `vvu` command's subparsers."""
    bench = commands.add_parser(
        "bench",
        help="benchmark a vhost-user back-end from a native front-end (like fio for a socket)",
        description="Benchmark front-ends for vhost-user back-ends. `vvu bench blk --help`.",
    )
    kinds = bench.add_subparsers(dest="bench_kind", required=True, metavar="KIND")
    blk = kinds.add_parser(
        "blk", help="a vhost-user-blk back-end: IOPS, latency, CPU", description=DESCRIPTION
    )
    blk.add_argument("--socket-path", required=True, help="the back-end's socket")
    blk.add_argument("--rw", default="randread", help=f"{'|'.join(PATTERNS)} (randread)")
    blk.add_argument("--bs", default="4k", help="bytes per request: 4096, 4k, 64k, 1m (4k)")
    blk.add_argument("--iodepth", type=int, default=32, help="requests in flight per queue (32)")
    blk.add_argument(
        "--queues", "--numjobs", type=int, default=1, help="queues, one thread each (1)"
    )
    blk.add_argument("--runtime", type=float, default=10.0, help="seconds (10)")
    blk.add_argument("--size", help="use the first SIZE bytes of the disk (default: all)")
    blk.add_argument("--rwmixread", type=int, default=50, help="%% reads with randrw (50)")
    blk.add_argument("--verify", action="store_true", help="write a pattern, check every read")
    blk.add_argument("--backend-pid", type=int, help="report this process's CPU time per I/O")
    blk.add_argument(
        "--queue-size", type=int, help="ring size (default: ≥ 256 and ≥ 3 x --iodepth)"
    )
    blk.add_argument("--packed", action="store_true", help="packed rings (the back-end's offer)")
    blk.add_argument("--seed", type=int, default=1, help="random offsets and data seed (1)")
    blk.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="fail when nothing completes for this many seconds (10)",
    )
    blk.add_argument(
        "--connect-timeout", type=float, default=5.0, help="wait this long for the socket (5)"
    )
    blk.add_argument(
        "--handshake-runs",
        type=int,
        metavar="N",
        help="measure connect → first 512-byte read served, N times, instead of a load",
    )
    blk.add_argument("--json", action="store_true", help="print the results as JSON")
    blk.set_defaults(func=cmd_bench_blk)


def _job(args: argparse.Namespace) -> BlkJob:
    job = BlkJob(
        socket_path=args.socket_path,
        rw=args.rw,
        bs=parse_size(args.bs),
        iodepth=args.iodepth,
        queues=args.queues,
        runtime=args.runtime,
        size=None if args.size is None else parse_size(args.size),
        verify=args.verify,
        rwmix_read=args.rwmixread,
        backend_pid=args.backend_pid,
        queue_size=args.queue_size,
        packed=args.packed,
        seed=args.seed,
        timeout=args.timeout,
        connect_timeout=args.connect_timeout,
    )
    job.check()
    return job


def cmd_bench_blk(args: argparse.Namespace) -> int:
    try:
        if args.handshake_runs is not None:
            hs = handshake_latency(
                args.socket_path, args.handshake_runs, timeout=args.connect_timeout
            )
            print(json.dumps(hs, indent=2) if args.json else handshake_summary(hs))
            return 0
        result = run_blk(_job(args))
    except BenchError as err:
        print(f"vvu bench blk: {err}", file=sys.stderr)
        return 2
    except (VvuError, OSError, TimeoutError) as err:
        print(f"vvu bench blk: {args.socket_path}: {err}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2) if args.json else summary(result))
    if result["interrupted"]:
        return 130
    return 0 if result["ok"] else 1
