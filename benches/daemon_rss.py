"""Idle memory per device: `vvu daemon` with 1 and N blk devices beside qemu-storage-daemon
with 1 and N vhost-user-blk exports, in the same run (benches/RESULTS.md, "Daemon").

    python benches/daemon_rss.py [--devices 64]

Each device is a sparse 16 MiB raw image in a temp directory, served read-write on its own
socket. RSS is VmRSS of the daemon process once every socket exists ("idle"), and for vvu once
more after one front-end session per device (vvu's own `BlkDriver`: handshake, a 4 KiB read,
close), which starts and stops each device's worker thread once ("after one session each").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vvu.frontend import BlkDriver

MiB = 1 << 20


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def wait_sockets(proc: subprocess.Popen[bytes], sockets: list[Path]) -> None:
    deadline = time.monotonic() + 60
    while not all(s.exists() for s in sockets):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args!r} did not create its sockets")
        time.sleep(0.05)
    time.sleep(0.5)  # let start-up garbage settle before reading RSS (not a synchronisation)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def images(tmp: Path, n: int) -> list[Path]:
    out = []
    for i in range(n):
        image = tmp / f"disk{i}.img"
        with image.open("wb") as f:
            f.truncate(16 * MiB)
        out.append(image)
    return out


async def one_session_each(sockets: list[Path]) -> None:
    for sock in sockets:
        blk = await BlkDriver.open(str(sock), depth=1, max_request=4096)
        try:
            await blk.read(0, 4096)
        finally:
            await blk.close()


def vvu(tmp: Path, disks: list[Path], *, sessions: bool) -> tuple[int, int | None]:
    sockets = [tmp / f"vvu{i}.sock" for i in range(len(disks))]
    config = tmp / f"vvu{len(disks)}.toml"
    lines = [f'[api]\nsocket = "{tmp}/api.sock"\n']
    for i, (disk, sock) in enumerate(zip(disks, sockets, strict=True)):
        lines.append(
            f'[[device]]\nid = "d{i}"\ntype = "blk"\nsocket = "{sock}"\nblk-file = "{disk}"\n'
        )
    config.write_text("".join(lines))
    proc = subprocess.Popen(
        [sys.executable, "-m", "vvu", "-q", "daemon", "--config", str(config)],
        stdin=subprocess.DEVNULL,
    )
    try:
        wait_sockets(proc, [*sockets, tmp / "api.sock"])
        idle = rss_kib(proc.pid)
        after = None
        if sessions:
            asyncio.run(one_session_each(sockets))
            time.sleep(0.5)
            after = rss_kib(proc.pid)
        return idle, after
    finally:
        stop(proc)


def qsd(tmp: Path, disks: list[Path]) -> int:
    binary = shutil.which("qemu-storage-daemon")
    if binary is None:
        raise SystemExit("qemu-storage-daemon is not installed")
    sockets = [tmp / f"qsd{i}.sock" for i in range(len(disks))]
    argv = [binary]
    for i, (disk, sock) in enumerate(zip(disks, sockets, strict=True)):
        argv += [
            "--blockdev", f"driver=file,node-name=file{i},filename={disk}",
            "--blockdev", f"driver=raw,node-name=disk{i},file=file{i}",
            "--export",
            f"type=vhost-user-blk,id=exp{i},addr.type=unix,addr.path={sock},"
            f"node-name=disk{i},writable=on",
        ]  # fmt: skip
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    try:
        wait_sockets(proc, sockets)
        return rss_kib(proc.pid)
    finally:
        stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=64)
    n = parser.parse_args().devices
    with tempfile.TemporaryDirectory(prefix="vvu-rss-") as name:
        tmp = Path(name)
        disks = images(tmp, n)
        v1, v1s = vvu(tmp, disks[:1], sessions=True)
        vn, vns = vvu(tmp, disks, sessions=True)
        q1 = qsd(tmp, disks[:1])
        qn = qsd(tmp, disks)
    assert v1s is not None and vns is not None
    print(f"{'':28} {'1 device':>10} {f'{n} devices':>12} {'per extra device':>18}")
    for label, one, many in (
        ("vvu daemon (idle)", v1, vn),
        ("vvu daemon (one session each)", v1s, vns),
        ("qemu-storage-daemon", q1, qn),
    ):
        per = (many - one) / (n - 1)
        print(f"{label:28} {one / 1024:8.1f} MiB {many / 1024:10.1f} MiB {per:12.1f} KiB")
    print(f"(pid {os.getpid()}; RSS = VmRSS of the daemon process)")


if __name__ == "__main__":
    main()
