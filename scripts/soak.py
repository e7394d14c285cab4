#!/usr/bin/env python3
"""Soak and fault injection against `vvu serve blk` (scripts/soak.sh runs this).

Front-ends connect one after another, each doing one kind of session, chosen at random
(seeded, so a run can be repeated):

- io: write a few 4 KiB blocks (each carries its block number, a version and bytes derived
  from both), read each back and compare;
- abrupt: start writes and hang up without waiting for them (their blocks may hold either
  version afterwards);
- kill: start writes, SIGKILL the back-end while they are in flight, start it again; the
  front-end reconnects with its inflight region (QEMU's `reconnect=`) and every write must
  complete, exactly once;
- garbage: a raw connection that sends random bytes or a well-framed request with a random
  payload and random fds, then hangs up;
- shrink (only with --shrink; scripts/soak.sh turns it on): the front-end's memory is a plain
  file, which it truncates under the back-end and then kicks; the back-end must log the fault
  and survive it.

Every `--verify-every` sessions, and at the end, every block is read and compared with what
was acknowledged: a block that does not hold its last acknowledged version is a lost write; a
block that held it and later holds an older one is a duplicated (replayed) write. Both must
be 0. Around each back-end instance's life (before a kill, and at the end) its fds and
mappings are compared with what it had after its first session, once its sessions have been
released (waited for, up to 10 s): they must be equal. RSS growth is reported.

    scripts/soak.py --seconds 600            # ten minutes
    scripts/soak.py --seconds 45 --short     # the CI variant
Exit status 0 when nothing was lost, duplicated or leaked and every session behaved.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from vvu._core import EventFd
from vvu.frontend import BlkDriver

BLOCK = 4096
SECTORS_PER_BLOCK = BLOCK // 512
TIMEOUT = 15.0
# In both lines the back-end may log when its mapping of a front-end's memory faulted: the
# queue that faulted, and the session dropped for it (unless the front-end hung up first).
SHRANK = "the front-end shrank"


def block_data(index: int, version: int) -> bytes:
    """Block `index` at `version`: its number and version, then bytes derived from both."""
    seed = hashlib.sha256(struct.pack("<QQ", index, version)).digest()
    body = (seed * (BLOCK // len(seed) + 1))[: BLOCK - 16]
    return struct.pack("<QQ", index, version) + body


def version_of(index: int, data: bytes) -> int | None:
    """The version `data` is of block `index`, or None when it is no version of it."""
    if len(data) != BLOCK:
        return None
    got_index, version = struct.unpack_from("<QQ", data)
    if got_index != index or data != block_data(index, version):
        return None if any(data) else 0  # 0: never written (zeros)
    return int(version)


@dataclass
class Block:
    latest: int = 0  # last acknowledged version (0: zeros)
    seen: bool = True  # the latest was observed on the disk
    maybe: set[int] = field(default_factory=set)  # versions a hung-up write may have left


@dataclass
class Stats:
    sessions: dict[str, int] = field(default_factory=dict)
    kills: int = 0
    verified_bytes: int = 0
    writes_acked: int = 0
    lost: int = 0
    duplicated: int = 0
    corrupt: int = 0
    failures: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    rss_kib: list[tuple[int, int]] = field(default_factory=list)  # (baseline, later) per check


def wait_for_path(path: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args!r} did not create {path}")
        time.sleep(0.02)


def stop(proc: subprocess.Popen[bytes] | None) -> int:
    """SIGTERM and wait (SIGKILL after TIMEOUT); the exit status."""
    if proc is None:
        return 0
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return -9
    return proc.returncode


def proc_counts(pid: int) -> tuple[int, int, int]:
    """(open fds, mappings, VmRSS KiB) of `pid`."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with open(f"/proc/{pid}/maps") as f:
        maps = sum(1 for _ in f)
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return fds, maps, rss


class Backend:
    """`vvu serve blk` as a child process, restartable. With `vvu`, it is the driver of a
    `vvu device` (started once, never killed) and front-ends connect to the device."""

    def __init__(self, workdir: Path, image: Path, *, vvu: bool = False) -> None:
        self.socket = workdir / ("frontend.sock" if vvu else "blk.sock")
        self.image = image
        self.workdir = workdir
        self.instances = 0
        self.log = workdir / "backend-0.log"
        self.sessions = 0  # front-ends that connected to this instance
        self.proc: subprocess.Popen[bytes] | None = None
        self.device: subprocess.Popen[bytes] | None = None
        self.vfio_user = workdir / "vvu.sock"
        self.vvu = vvu
        #: (fds, mappings, VmRSS KiB) per process after the instance's first session.
        self.baseline: dict[int, tuple[int, int, int]] | None = None

    def pids(self) -> list[int]:
        procs = [self.proc, self.device]
        return [p.pid for p in procs if p is not None]

    def start_device(self) -> None:
        with (self.workdir / "device.log").open("ab") as log:
            self.device = subprocess.Popen(
                [sys.executable, "-m", "vvu", "device", "--socket-path", str(self.socket),
                 "--vfio-user", str(self.vfio_user), "--max-queues", "2"],
                stdout=log, stderr=log,
            )  # fmt: skip
        wait_for_path(self.vfio_user, self.device)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def start(self) -> None:
        if self.vvu and self.device is None:
            self.start_device()
        if not self.vvu:
            with contextlib.suppress(FileNotFoundError):
                self.socket.unlink()
        self.instances += 1
        self.log = self.workdir / f"backend-{self.instances}.log"
        self.sessions = 0
        with self.log.open("ab") as log:
            where = (
                ["--vvu", str(self.vfio_user)] if self.vvu else ["--socket-path", str(self.socket)]
            )
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vvu", "serve", "blk", *where,
                 "--blk-file", str(self.image)],
                stdout=log, stderr=log,
            )  # fmt: skip
        wait_for_path(self.socket, self.proc)
        # Over VVU the socket is the device's: wait for the driver to say it serves.
        deadline = time.monotonic() + 60
        while self.vvu and "serving" not in self.log_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the VVU driver did not come up:\n{self.log_text()}")
            time.sleep(0.05)
        self.baseline = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(TIMEOUT)

    def stop(self) -> int:
        code = stop(self.proc)
        device, self.device = self.device, None
        device_code = stop(device)
        return code or device_code

    async def check_leaks(self, stats: Stats, when: str) -> None:
        """Compare with the baseline once the back-end has released its sessions: the fd and
        mapping counts come back down when it has (polled; it announces nothing)."""
        if self.baseline is None:
            return
        for pid, (fds0, maps0, rss0) in self.baseline.items():
            deadline = time.monotonic() + 10
            while True:
                fds, maps, rss = proc_counts(pid)
                # Fewer mappings than at the baseline is the allocator giving memory back.
                if (fds <= fds0 and maps <= maps0) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            name = "device" if self.device is not None and pid == self.device.pid else "back-end"
            if fds > fds0 or maps > maps0:
                stats.leaks.append(f"{when}, {name}: fds {fds0}->{fds}, maps {maps0}->{maps}")
            stats.rss_kib.append((rss0, rss))


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.rng = random.Random(args.seed)
        self.blocks = [Block() for _ in range(args.blocks)]
        self.version = 0
        self.stats = Stats()
        image = workdir / "disk.img"
        with image.open("wb") as f:
            f.truncate(args.blocks * BLOCK)
        self.backend = Backend(workdir, image, vvu=args.vvu)

    def count(self, kind: str) -> None:
        self.stats.sessions[kind] = self.stats.sessions.get(kind, 0) + 1

    def pick_blocks(self, n: int) -> list[int]:
        return self.rng.sample(range(len(self.blocks)), n)

    async def open(self, memory_path: Path | None = None) -> BlkDriver:
        self.backend.sessions += 1
        return await asyncio.wait_for(
            BlkDriver.open(
                str(self.backend.socket),
                depth=8,
                max_request=BLOCK,
                timeout=TIMEOUT,
                memory_path=None if memory_path is None else str(memory_path),
            ),
            TIMEOUT,
        )

    async def write(self, blk: BlkDriver, index: int) -> int:
        self.version += 1
        version = self.version
        await blk.write(index * SECTORS_PER_BLOCK, block_data(index, version))
        return version

    def acked(self, index: int, version: int) -> None:
        block = self.blocks[index]
        block.latest, block.seen, block.maybe = version, False, set()
        self.stats.writes_acked += 1

    def observe(self, index: int, data: bytes) -> None:
        """Compare what block `index` holds with what it must hold."""
        block = self.blocks[index]
        got = version_of(index, data)
        self.stats.verified_bytes += len(data)
        if got is None:
            self.stats.corrupt += 1
            self.stats.failures.append(f"block {index}: neither zeros nor any version of it")
        elif got == block.latest or got in block.maybe:
            block.latest, block.maybe = got, set()
            block.seen = True
            return
        elif block.seen:
            self.stats.duplicated += 1
            self.stats.failures.append(f"block {index}: v{got} after v{block.latest} was seen")
        else:
            self.stats.lost += 1
            self.stats.failures.append(f"block {index}: v{got}, v{block.latest} was acknowledged")
        block.latest, block.seen, block.maybe = got or 0, True, set()

    async def verify_all(self) -> None:
        blk = await self.open()
        try:
            for index in range(len(self.blocks)):
                data = await asyncio.wait_for(blk.read(index * SECTORS_PER_BLOCK, BLOCK), TIMEOUT)
                self.observe(index, data)
        finally:
            await blk.close()
        self.count("verify")

    # -- session kinds --------------------------------------------------------------------------

    async def session_io(self) -> None:
        blk = await self.open()
        try:
            indexes = self.pick_blocks(self.rng.randint(1, 8))
            versions = await asyncio.wait_for(
                asyncio.gather(*(self.write(blk, i) for i in indexes)), TIMEOUT
            )
            for index, version in zip(indexes, versions, strict=True):
                self.acked(index, version)
            for index in indexes:
                data = await asyncio.wait_for(blk.read(index * SECTORS_PER_BLOCK, BLOCK), TIMEOUT)
                self.observe(index, data)
        finally:
            await blk.close()

    async def session_abrupt(self) -> None:
        blk = await self.open()
        indexes = self.pick_blocks(self.rng.randint(1, 8))
        tasks = []
        for index in indexes:
            self.version += 1
            self.blocks[index].maybe.add(self.version)
            data = block_data(index, self.version)
            tasks.append(asyncio.ensure_future(blk.write(index * SECTORS_PER_BLOCK, data)))
        await asyncio.sleep(0)  # let them reach the ring
        blk.frontend.channel.close()  # hang up, writes in flight
        for task in tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await blk.close()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for index, result in zip(indexes, results, strict=True):
            if result is None:  # acknowledged before the hang-up
                self.acked(index, max(self.blocks[index].maybe))

    async def session_kill(self) -> None:
        await self.backend.check_leaks(self.stats, f"before kill {self.stats.kills + 1}")
        blk = await self.open()
        try:
            indexes = self.pick_blocks(self.rng.randint(4, 8))
            writes = [asyncio.ensure_future(self.write(blk, i)) for i in indexes]
            await asyncio.sleep(0)  # in the ring, some taken by the back-end
            self.backend.kill()
            self.stats.kills += 1
            self.backend.start()
            self.backend.sessions += 1
            await asyncio.wait_for(blk.reconnect(timeout=TIMEOUT), TIMEOUT)
            versions = await asyncio.wait_for(asyncio.gather(*writes), TIMEOUT)
            for index, version in zip(indexes, versions, strict=True):
                self.acked(index, version)
            for index in indexes:
                data = await asyncio.wait_for(blk.read(index * SECTORS_PER_BLOCK, BLOCK), TIMEOUT)
                self.observe(index, data)
        finally:
            await blk.close()

    async def session_garbage(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        efd = EventFd()
        try:
            self.backend.sessions += 1
            sock.connect(str(self.backend.socket))
            if self.rng.random() < 0.5:
                data = self.rng.randbytes(self.rng.randint(1, 300))
            else:  # well framed: request id, flags 0x1, a random payload of the stated size
                body = self.rng.randbytes(self.rng.randint(0, 64))
                data = struct.pack("<III", self.rng.randint(0, 60), 1, len(body)) + body
            fds = [efd.fileno()] if self.rng.random() < 0.5 else []
            with contextlib.suppress(OSError):
                socket.send_fds(sock, [data], fds)
        finally:
            sock.close()
            efd.close()

    async def session_shrink(self) -> None:
        # A plain file, as a VMM's memory-backend-file gives: unlike our memfds, it cannot be
        # sealed against shrinking, so only the back-end's SIGBUS handling stands in the way.
        memory = self.workdir / "shrinking-memory"
        memory.unlink(missing_ok=True)
        faults = self.backend.log_text().count(SHRANK)
        blk = await self.open(memory)
        try:
            os.truncate(memory, 0)
            blk.queue.kick.signal()  # the back-end reads the ring: its mapping faults
            # Before we hang up, or the session may end before the worker reads the ring.
            deadline = time.monotonic() + TIMEOUT
            while self.backend.alive() and self.backend.log_text().count(SHRANK) <= faults:
                if time.monotonic() > deadline:
                    self.stats.failures.append(
                        f"shrink session {self.backend.sessions}: no fault logged by the back-end"
                    )
                    break
                await asyncio.sleep(0.02)
        finally:
            with contextlib.suppress(Exception):
                await blk.close()
        if not self.backend.alive():
            self.stats.failures.append("the back-end died when a front-end shrank its memory")
            self.backend.start()

    # -- the run --------------------------------------------------------------------------------

    async def run(self) -> None:
        kinds = {"io": 6, "abrupt": 2, "garbage": 2, "kill": 1}
        if self.args.shrink:
            kinds["shrink"] = 1
        self.backend.start()
        await self.session_io()  # warm up: lazily made fds and mappings exist from here on
        self.count("io")
        self.backend.baseline = await self.settled_counts()
        deadline = time.monotonic() + self.args.seconds
        n = 0
        while time.monotonic() < deadline:
            kind = self.rng.choices(list(kinds), weights=list(kinds.values()))[0]
            try:
                await getattr(self, f"session_{kind}")()
            except Exception as err:
                self.stats.failures.append(f"{kind} session {n}: {type(err).__name__}: {err}")
                if not self.backend.alive():
                    self.stats.failures.append(f"the back-end died in {kind} session {n}")
                    self.backend.start()
            self.count(kind)
            n += 1
            if self.backend.baseline is None and kind == "io":
                # The first io session of this instance: its baseline, once released.
                self.backend.baseline = await self.settled_counts()
            if n % self.args.verify_every == 0:
                await self.verify_all()
        await self.verify_all()
        await self.backend.check_leaks(self.stats, "at the end")
        code = self.backend.stop()
        if code != 0:
            self.stats.failures.append(f"the back-end exited {code} on SIGTERM")

    async def settled_counts(self) -> dict[int, tuple[int, int, int]]:
        """The back-end's counts once its last session is released: its log says so (one
        "session released" line per session), then the counts hold still for 0.2 s."""
        deadline = time.monotonic() + 10
        while self.backend.log_text().count("session released") < self.backend.sessions:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        pids = self.backend.pids()
        last = {pid: proc_counts(pid) for pid in pids}
        for _ in range(50):
            await asyncio.sleep(0.2)
            now = {pid: proc_counts(pid) for pid in pids}
            if all(now[pid][:2] == last[pid][:2] for pid in pids):
                return now
            last = now
        return last


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--blocks", type=int, default=1024, help="4 KiB blocks on the disk")
    parser.add_argument("--verify-every", type=int, default=50)
    parser.add_argument("--shrink", action="store_true", help="also shrink front-end memory")
    parser.add_argument("--short", action="store_true", help="the CI variant: fewer blocks")
    parser.add_argument("--vvu", action="store_true", help="through `vvu device` (the driver)")
    parser.add_argument("--keep", action="store_true", help="keep the logs (a directory)")
    args = parser.parse_args()
    if args.short:
        args.blocks, args.verify_every = 256, 25
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vvu-soak-") as scratch:
        workdir = tempfile.mkdtemp(prefix="vvu-soak-") if args.keep else scratch
        if args.keep:
            print(f"logs in {workdir}", file=sys.stderr)
        soak = Soak(args, Path(workdir))
        try:
            asyncio.run(soak.run())
        finally:
            soak.backend.stop()
        log = soak.backend.log_text()
    s = soak.stats
    summary = {
        "seed": args.seed,
        "transport": "vvu" if args.vvu else "unix",
        "seconds": round(time.monotonic() - start, 1),
        "sessions": sum(v for k, v in s.sessions.items() if k != "verify"),
        "by_kind": s.sessions,
        "kills": s.kills,
        "writes_acked": s.writes_acked,
        "verified_mib": round(s.verified_bytes / 2**20, 1),
        "lost": s.lost,
        "duplicated": s.duplicated,
        "corrupt": s.corrupt,
        "leaks": s.leaks,
        "rss_kib_first_instance": list(s.rss_kib[0]) if s.rss_kib else None,
        "rss_growth_kib_max": max((b - a for a, b in s.rss_kib), default=0),
        "leak_checks": len(s.rss_kib),
        "failures": s.failures[:20],
    }
    print(json.dumps(summary, indent=2))
    bad = s.lost or s.duplicated or s.corrupt or s.leaks or s.failures
    if bad:
        print(log[-4000:], file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
