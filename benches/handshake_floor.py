#!/usr/bin/env python3
"""What bounds the handshake: vvu's engine beside two Python floors and qemu-storage-daemon.

The same front-end steps as `vvu bench blk --handshake-runs` (connect, features, memory table,
config, inflight, one ring; not the read, which the floors cannot serve) against, in turn:
- `floor-callback`: a back-end that answers each request with canned bytes from an asyncio
  reader callback (no engine, no codec, no task per message): the least Python can do;
- `floor-task`: the same canned answers from a task looping on vvu's `UnixChannel.recv()` /
  `send()`: what the transport and a task per message add;
- `vvu`: `vvu serve blk` from this tree, and with --baseline-tree another tree's;
- `qsd`: qemu-storage-daemon (aio=io_uring), which offers no INFLIGHT_SHMFD (2 round trips
  fewer).
One run per back-end in turn, RUNS each; medians per step in ms.

    python benches/handshake_floor.py --runs 100 [--baseline-tree /work/main/python]
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vvu._core import InflightRegion
from vvu.backends.blk import BlkBackend
from vvu.bench import MiB
from vvu.engine import BackendEngine
from vvu.frontend.core import Frontend
from vvu.protocol import NEED_REPLY, ProtocolFeature
from vvu.protocol import FrontendRequest as F
from vvu.transport.unix import UnixChannel, UnixListener

H = struct.Struct("<III")
FD_SPACE = socket.CMSG_SPACE(64 * 4)


class Canned:
    """The answers `vvu serve blk` gives to the bench's handshake, computed once."""

    def __init__(self, image: str) -> None:
        backend = BlkBackend(image, num_queues=1)
        engine = BackendEngine(backend)
        self.features = engine.offered_features()
        self.protocol_features = engine.offered_protocol_features()
        self.config = backend.config_space().ljust(256, b"\0")
        # One region for every session: the floor leaves out the allocation.
        self.inflight = InflightRegion.allocate(1, 256, packed=False)

    def answer(self, req: int, flags: int, payload: bytes) -> tuple[bytes, list[int]]:
        """The reply's bytes (none: no reply) and its fds."""
        u64 = {1: self.features, 15: self.protocol_features, 17: 1}
        if req in u64:
            body = struct.pack("<Q", u64[req])
        elif req == F.GET_CONFIG:
            off, size, cflags = struct.unpack_from("<III", payload)
            body = struct.pack("<III", off, size, cflags) + self.config[off : off + size]
        elif req == F.GET_INFLIGHT_FD:
            nq, qs = struct.unpack_from("<HH", payload, 16)
            body = struct.pack("<QQHH4x", self.inflight.mmap_size, 0, nq, qs)
            return H.pack(req, 0x5, len(body)) + body, [self.inflight.fileno()]
        elif flags & NEED_REPLY:
            body = struct.pack("<Q", 0)
        else:
            return b"", []
        return H.pack(req, 0x5, len(body)) + body, []


def close_received(ancdata: list[tuple[int, int, bytes]]) -> None:
    for _, _, data in ancdata:
        fds = array.array("i")
        fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        for fd in fds:
            os.close(fd)


def serve_callback(canned: Canned, conn: socket.socket) -> None:
    """Each request answered from the reader callback, as soon as it is readable."""
    loop = asyncio.get_running_loop()

    def readable() -> None:
        try:
            data, ancdata, _, _ = conn.recvmsg(12, FD_SPACE)
        except BlockingIOError:
            return
        if not data:
            loop.remove_reader(conn.fileno())
            conn.close()
            return
        req, flags, size = H.unpack(data)
        payload = b""
        while len(payload) < size:
            more, extra, _, _ = conn.recvmsg(size - len(payload), FD_SPACE)
            payload += more
            ancdata += extra
        close_received(ancdata)
        out, fds = canned.answer(req, flags, payload)
        if out:
            control = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            conn.sendmsg([out], control if fds else [])

    conn.setblocking(False)
    loop.add_reader(conn.fileno(), readable)


async def serve_task(canned: Canned, channel: UnixChannel) -> None:
    """Each request answered from a task looping on vvu's AF_UNIX channel."""
    while True:
        raw = await channel.recv()
        if raw is None:
            break
        raw.close_fds()
        out, fds = canned.answer(raw.request, raw.flags, raw.payload)
        if out:
            await channel.send(out, fds)
    channel.close()


async def floor_server(kind: str, path: str, image: str) -> None:
    canned = Canned(image)
    if kind == "task":
        listener = UnixListener(path)
        while True:
            await serve_task(canned, await listener.accept())
    lsock = socket.socket(socket.AF_UNIX)
    lsock.bind(path)
    lsock.listen(16)
    lsock.setblocking(False)
    loop = asyncio.get_running_loop()
    while True:
        conn, _ = await loop.sock_accept(lsock)
        serve_callback(canned, conn)


def client(paths: list[str], n: int) -> None:
    async def one(path: str) -> dict[str, float]:
        times: dict[str, float] = {}
        t0 = last = time.perf_counter()

        def step(name: str) -> None:
            nonlocal last
            now = time.perf_counter()
            times[name] = now - last
            last = now

        fe = await Frontend.connect(path, memory_size=4 * MiB, timeout=5)
        step("connect")
        try:
            await fe.negotiate()
            step("negotiate")
            await fe.set_mem_table()
            step("mem_table")
            if fe.protocol_features & ProtocolFeature.CONFIG.mask:
                await fe.get_config(0, 8)
            step("config")
            await fe.setup_inflight(1, 256)
            step("inflight")
            await fe.start_queue(0, 256)
            step("queue")
            times["total"] = time.perf_counter() - t0
            return times
        finally:
            await fe.close()

    async def runs() -> dict[str, list[dict[str, float]]]:
        out: dict[str, list[dict[str, float]]] = {p: [] for p in paths}
        for _ in range(n):
            for p in paths:
                out[p].append(await one(p))
        return out

    res = asyncio.run(runs())
    keys = list(next(iter(res.values()))[0])
    print("| step | " + " | ".join(Path(p).stem for p in paths) + " |")
    print("|---|" + "---:|" * len(paths))
    for k in keys:
        cells = " | ".join(f"{statistics.median(r[k] for r in res[p]) * 1e3:.3f}" for p in paths)
        print(f"| {k} | {cells} |")
    if any(Path(p).stem == "qsd" for p in paths):
        qsd = statistics.median(r["total"] for r in res[paths[-1]])
        ratios = ", ".join(
            f"{Path(p).stem} {statistics.median(r['total'] for r in res[p]) / qsd:.2f}"
            for p in paths[:-1]
        )
        print(f"\nmedian total / qsd's: {ratios}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--baseline-tree", type=Path, help="also a vvu from this python/ dir")
    parser.add_argument("--serve", nargs=3, metavar=("KIND", "SOCK", "IMG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        asyncio.run(floor_server(*args.serve))
        return
    qsd = shutil.which("qemu-storage-daemon")
    with tempfile.TemporaryDirectory(prefix="vvu-floor-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        img = work / "disk.img"
        with img.open("wb") as f:
            f.truncate(64 << 20)
        me = [sys.executable, __file__, "--serve"]
        vvu = [sys.executable, "-m", "vvu", "-q", "serve", "blk", "--blk-file", str(img),
               "--num-queues", "1", "--socket-path"]  # fmt: skip
        servers: list[tuple[str, list[str], dict[str, str] | None]] = [
            (
                "floor-callback",
                [*me, "callback", str(work / "floor-callback.sock"), str(img)],
                None,
            ),
            ("floor-task", [*me, "task", str(work / "floor-task.sock"), str(img)], None),
            ("vvu", [*vvu, str(work / "vvu.sock")], None),
        ]
        if args.baseline_tree is not None:
            env = {**os.environ, "PYTHONPATH": str(args.baseline_tree)}
            servers.append(("vvu-baseline", [*vvu, str(work / "vvu-baseline.sock")], env))
        if qsd is not None:
            file0 = f"driver=file,node-name=file0,filename={img},cache.direct=off,aio=io_uring"
            export = (f"type=vhost-user-blk,id=exp0,addr.type=unix,addr.path={work}/qsd.sock,"
                      "node-name=disk0,writable=on,num-queues=1")  # fmt: skip
            servers.append(("qsd", [qsd, "--blockdev", file0, "--blockdev",
                            "driver=raw,node-name=disk0,file=file0", "--export", export],
                            None))  # fmt: skip
        for name, argv, env in servers:
            proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)  # fmt: skip
            stack.callback(proc.wait)
            stack.callback(proc.terminate)
            sock = work / f"{name}.sock"
            deadline = time.monotonic() + 30
            while not sock.exists():
                if time.monotonic() > deadline or proc.poll() is not None:
                    sys.exit(f"{name} did not start")
                time.sleep(0.05)
        client([str(work / f"{name}.sock") for name, _, _ in servers], args.runs)


if __name__ == "__main__":
    main()
