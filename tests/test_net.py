"""virtio-net: the back-end, its ports, our NetDriver front-end, `vvu serve net`, and DPDK
testpmd as a real peer.

Two of our front-ends exchange frames through one back-end process (peer mode); testpmd's
virtio-user PMD talks to `vvu serve net` while our NetDriver sits on the other end of the link.
Synchronisation is awaited frames; timeouts only guard against hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from daemons import stop_process, wait_for_socket
from guest import (
    NET_PAIR_SETUP,
    guest_image,
    qemu_escape,
    run_guest_async,
    vhost_user_net_args,
)
from vvu._core import NetPort, Switch
from vvu.backends import NetBackend, available_backends
from vvu.backends.net import OFFLOAD_FEATURES, NetFeature, parse_mac, rarp_frame
from vvu.engine import BackendEngine
from vvu.frontend import Frontend, FrontendError
from vvu.frontend.core import WANTED_PROTOCOL_FEATURES
from vvu.frontend.net import NetDriver
from vvu.protocol import (
    U64,
    BackendRequest,
    FrontendRequest,
    ProtocolFeature,
    VirtioFeature,
    VringState,
)
from vvu.transport.unix import UnixListener
from vvu_harness import served

pytestmark = pytest.mark.timeout(60)

TIMEOUT = 5.0  # hang guard only
#: testpmd's frames per burst (`--burst`; also what `--tx-first` sends).
BURST = 32
VVU = [sys.executable, "-m", "vvu"]
ETHERTYPE = b"\x88\xb5"  # local experimental


def frame(seq: int, length: int, dst: bytes = b"\xff" * 6, src: bytes | None = None) -> bytes:
    src = src or b"\x02" + seq.to_bytes(5, "big")
    body = os.urandom(length - 14)
    return dst + src + ETHERTYPE + body


# --- the back-end on its own ------------------------------------------------------------------


def test_features_config_space_and_registration() -> None:
    a, b = NetBackend.peers(queue_pairs=2, mtu=9000)
    assert available_backends()["net"] is NetBackend
    assert (a.device_id, a.num_queues, a.queue_pairs) == (1, 4, 2)
    features = a.features()
    for bit in (NetFeature.MAC, NetFeature.STATUS, NetFeature.MRG_RXBUF, NetFeature.MTU):
        assert features & (1 << bit)
    assert features & (1 << NetFeature.MQ)
    assert features & VirtioFeature.VERSION_1.mask and features & VirtioFeature.EVENT_IDX.mask
    # Checksum, TSO, UFO and USO offloads both ways (none with offloads off), no ECN, no
    # control queue.
    offloads = OFFLOAD_FEATURES
    assert all(features & (1 << bit) for bit in offloads)
    for bit in (9, 13, NetFeature.CTRL_VQ):  # GUEST_ECN, HOST_ECN
        assert not features & (1 << bit)
    a.offloads = False
    assert not any(a.features() & (1 << bit) for bit in offloads)
    a.offloads = True
    assert a.protocol_features() & ProtocolFeature.CONFIG.mask
    rarp_mtu = ProtocolFeature.RARP.mask | ProtocolFeature.MTU.mask
    assert a.protocol_features() & rarp_mtu == rarp_mtu  # routed by the engine
    assert a.queue_num() == 2  # GET_QUEUE_NUM counts queue pairs for net, as QEMU expects
    mac, status, pairs, mtu = struct.unpack("<6sHHH", a.config_space())
    assert (mac, status, pairs, mtu) == (parse_mac("02:76:76:75:00:01"), 1, 2, 9000)
    assert b.config_space()[:6] == parse_mac("02:76:76:75:00:02")
    one = NetBackend.loopback()
    assert not one.features() & (1 << NetFeature.MQ | 1 << NetFeature.MTU)
    # Queue 2k is receiveq k+1, 2k+1 transmitq k+1.
    assert "net-rx" in repr(a.native_worker(2)) and "net-tx" in repr(a.native_worker(3))
    with pytest.raises(ValueError):
        parse_mac("02:00:00:00:00")
    with pytest.raises(ValueError):
        NetBackend.loopback(mtu=10)
    with pytest.raises(ValueError):
        a.net_set_mtu(70000)
    a.net_set_mtu(1500)
    assert a.config_space()[10:12] == struct.pack("<H", 1500)


def test_ports_link_and_count() -> None:
    a, b = NetPort.pair()
    assert (a.kind, a.name) == ("peer", None)
    f = frame(1, 60)
    assert a.send(f)
    assert b.recv() == f
    assert b.recv() is None
    with pytest.raises(OSError):
        a.send(b"short")
    assert a.stats["tx_packets"] == 1
    loop = NetPort.loopback()
    assert loop.send(f) and loop.recv() == f
    for _ in range(3):
        b.send(f)
    assert a.drain() == 3 and a.stats["rx_dropped"] == 3


def test_switch_ports_learn_flood_and_forget() -> None:
    sw = Switch("t")
    p0, p1, p2 = (sw.attach()[0] for _ in range(3))
    assert (p0.kind, p1.switch_port, sw.ports) == ("switch", 1, [0, 1, 2])
    m0, m1 = parse_mac("02:00:00:00:00:10"), parse_mac("02:00:00:00:00:11")
    hello = frame(1, 60, src=m0)
    assert p0.send(hello)
    assert (p1.recv(), p2.recv(), p0.recv()) == (hello, hello, None)
    assert sw.mac_table() == {m0: 0}
    reply = frame(2, 60, dst=m0, src=m1)
    assert p1.send(reply)
    assert (p0.recv(), p2.recv()) == (reply, None)
    del p2
    assert sw.ports == [0, 1]
    # A full queue drops (counted against the receiver), the sender's frame is still taken.
    (small,) = sw.attach(buffer_size=100)
    assert p0.send(frame(3, 60, src=m0)) and p0.send(frame(4, 60, src=m0))
    assert small.stats["rx_overflow"] == 1 and p0.stats["tx_dropped"] == 0
    assert small.drain() == 1


def test_busy_poll_is_set_per_port() -> None:
    b = NetBackend.loopback(queue_pairs=2)
    assert b.ports[0].busy_poll == 0
    b.set_busy_poll(50)
    assert [p.busy_poll for p in b.ports] == [pytest.approx(50e-6)] * 2
    with pytest.raises(ValueError):
        b.ports[0].busy_poll = 2.0


def test_send_rarp_announces_the_mac_on_the_link() -> None:
    a, b = NetBackend.peers()
    mac = parse_mac("52:54:00:12:34:56")
    a.send_rarp(mac + b"\0\0")
    got = b.ports[0].recv()
    assert got == rarp_frame(mac)
    assert got is not None and got[:6] == b"\xff" * 6 and got[6:12] == mac
    assert got[12:14] == b"\x80\x35" and len(got) == 60


# --- two of our front-ends through one back-end -------------------------------------------------


@contextlib.asynccontextmanager
async def serving(backends: tuple[NetBackend, ...], tmp_path: Path) -> AsyncIterator[list[str]]:
    """Serve each back-end on its own socket in this event loop."""
    paths = [str(tmp_path / f"net{i}.sock") for i in range(len(backends))]
    listeners = [UnixListener(p) for p in paths]
    tasks = [
        asyncio.ensure_future(BackendEngine(b).serve_forever(lis))
        for b, lis in zip(backends, listeners, strict=True)
    ]
    try:
        yield paths
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for lis in listeners:
            lis.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("transport", ["unix", "vvu"])
async def test_engine_routes_net_set_mtu_and_send_rarp(tmp_path: Path, transport: str) -> None:
    """Over AF_UNIX and through the virtio-vhost-user device (docs/protocol-support.md claims
    both): NET_SET_MTU reaches the back-end (and a bad MTU is refused), SEND_RARP puts the
    announcement on the link."""
    a, b = NetBackend.peers()
    async with served(BackendEngine(a), transport, tmp_path) as path:
        frontend = await Frontend.connect(path)
        try:
            wanted = WANTED_PROTOCOL_FEATURES | ProtocolFeature.MTU.mask | ProtocolFeature.RARP.mask
            await frontend.negotiate(protocol_features=wanted)
            assert frontend.reply_ack
            await frontend.request(FrontendRequest.NET_SET_MTU, U64(1500))
            assert a.mtu == 1500
            with pytest.raises(FrontendError, match="refused NET_SET_MTU"):
                await frontend.request(FrontendRequest.NET_SET_MTU, U64(10))
            mac = parse_mac("52:54:00:12:34:56")
            await frontend.request(
                FrontendRequest.SEND_RARP, U64(int.from_bytes(mac + b"\0\0", "little"))
            )
            assert b.ports[0].recv() == rarp_frame(mac)
        finally:
            await frontend.close()


@pytest.mark.asyncio
async def test_frames_longer_than_the_advertised_mtu_are_refused(tmp_path: Path) -> None:
    a, b = NetBackend.peers(mtu=1500)
    async with serving((a, b), tmp_path) as (path_a, path_b):
        da = await NetDriver.open(path_a)
        db = await NetDriver.open(path_b)
        try:
            too_long, longest = frame(1, 1500 + 18 + 1), frame(2, 1500 + 18)
            await da.send(too_long)
            await da.send(longest)
            assert await db.recv(TIMEOUT) == longest
        finally:
            await da.close()
            await db.close()
    assert (a.stats()["tx_errors"], a.stats()["tx_packets"]) == (1, 1)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("mrg_rxbuf", "version_1"),
    [(True, True), (False, True), (False, False)],
    ids=["mrg-rxbuf", "version-1", "legacy-header"],
)
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
async def test_two_front_ends_exchange_frames(
    tmp_path: Path, mrg_rxbuf: bool, version_1: bool, packed: bool
) -> None:
    a, b = NetBackend.peers()
    async with serving((a, b), tmp_path) as (path_a, path_b):
        da = await NetDriver.open(path_a, mrg_rxbuf=mrg_rxbuf, version_1=version_1, packed=packed)
        db = await NetDriver.open(path_b, mrg_rxbuf=mrg_rxbuf, version_1=version_1, packed=packed)
        try:
            for driver in (da, db):
                assert bool(driver.frontend.features & VirtioFeature.RING_PACKED.mask) == packed
            assert da.header_len == (12 if mrg_rxbuf or version_1 else 10)
            assert (da.mac, db.mac) == (a.mac, b.mac)
            sizes = [14, 60, 1514, 2036, 2037, 9000, 65535]
            out_a = [frame(i, n) for i, n in enumerate(sizes)]
            out_b = [frame(100 + i, n) for i, n in enumerate(reversed(sizes))]
            await asyncio.gather(da.send_all(out_a), db.send_all(out_b))
            got_b = [await db.recv(TIMEOUT) for _ in out_a]
            got_a = [await da.recv(TIMEOUT) for _ in out_b]
            assert got_b == out_a
            assert got_a == out_b
        finally:
            await da.close()
            await db.close()
    for side in (a.stats(), b.stats()):
        assert side["tx_packets"] == side["rx_packets"] == len(sizes)
        assert side["tx_dropped"] == side["tx_errors"] == side["rx_dropped"] == 0


@pytest.mark.asyncio
async def test_two_front_ends_exchange_frames_with_inband_notifications(tmp_path: Path) -> None:
    """One side's kicks and calls are messages (INBAND_NOTIFICATIONS), the other's eventfds:
    the native rx/tx workers serve both alike."""
    a, b = NetBackend.peers()
    async with serving((a, b), tmp_path) as (path_a, path_b):
        da = await NetDriver.open(path_a, inband=True)
        db = await NetDriver.open(path_b)
        try:
            assert da.frontend.inband and not db.frontend.inband
            sizes = [60, 1514, 9000]
            out_a = [frame(i, n) for i, n in enumerate(sizes)]
            out_b = [frame(100 + i, n) for i, n in enumerate(sizes)]
            await asyncio.gather(da.send_all(out_a), db.send_all(out_b))
            assert [await db.recv(TIMEOUT) for _ in out_a] == out_a
            assert [await da.recv(TIMEOUT) for _ in out_b] == out_b
            assert da.frontend.backend_requests[BackendRequest.BACKEND_VRING_CALL] >= 1
        finally:
            await da.close()
            await db.close()


@pytest.mark.asyncio
async def test_a_disabled_transmit_queue_discards_what_it_is_given(tmp_path: Path) -> None:
    """vhost-user.rst, "Ring states": a started but disabled ring is processed without side
    effects; for net the back-end "must process and discard any TX packets". A's transmit queue
    disabled: its frame is taken (the driver gets the buffer back) and never reaches B; enabled
    again, the next frames do, in order."""
    a, b = NetBackend.peers()
    async with serving((a, b), tmp_path) as (path_a, path_b):
        da = await NetDriver.open(path_a)
        db = await NetDriver.open(path_b)
        try:
            tx = 1  # transmitq1
            await da.frontend.request(FrontendRequest.SET_VRING_ENABLE, VringState(tx, 0))
            await asyncio.wait_for(da.send_all([frame(i, 600) for i in range(3)]), TIMEOUT)
            await da.frontend.request(FrontendRequest.SET_VRING_ENABLE, VringState(tx, 1))
            kept = [frame(10, 700), frame(11, 64)]
            await da.send_all(kept)
            assert [await db.recv(TIMEOUT) for _ in kept] == kept
        finally:
            await da.close()
            await db.close()
    assert a.stats()["tx_packets"] == b.stats()["rx_packets"] == len(kept)


@pytest.mark.asyncio
async def test_a_reconnected_front_end_gets_only_new_frames(tmp_path: Path) -> None:
    a, b = NetBackend.peers()
    async with serving((a, b), tmp_path) as (path_a, path_b):
        da = await NetDriver.open(path_a)
        db = await NetDriver.open(path_b, rx_buffers=4)
        try:
            # B's four buffers fill up, six frames wait (one staged, five in the link); then B
            # goes away without taking any, and its session end drains the six.
            await da.send_all([frame(i, 1000) for i in range(10)])
            await db.close()
            deadline = time.monotonic() + TIMEOUT
            while b.stats()["rx_dropped"] < 6:
                assert time.monotonic() < deadline, b.stats()
                await asyncio.sleep(0.01)
            db = await NetDriver.open(path_b)
            fresh = frame(42, 500)
            await da.send(fresh)
            assert await db.recv(TIMEOUT) == fresh
            back = frame(43, 70)
            await db.send(back)
            assert await da.recv(TIMEOUT) == back
        finally:
            await da.close()
            await db.close()


@pytest.mark.asyncio
async def test_each_queue_pair_has_its_own_link(tmp_path: Path) -> None:
    a, b = NetBackend.peers(queue_pairs=2)
    async with serving((a, b), tmp_path) as (path_a, path_b):
        da = await NetDriver.open(path_a, pair=1)
        db = await NetDriver.open(path_b, pair=1)
        try:
            f, g = frame(1, 800), frame(2, 3000)
            await da.send(f)
            await db.send(g)
            assert await db.recv(TIMEOUT) == f
            assert await da.recv(TIMEOUT) == g
        finally:
            await da.close()
            await db.close()
        # Pair 0 of A feeds pair 0 of B only: B's driver on pair 1 sees nothing of it.
        da = await NetDriver.open(path_a, pair=0)
        db = await NetDriver.open(path_b, pair=1)
        try:
            h = frame(3, 100)
            await da.send(h)
            with pytest.raises(TimeoutError):
                await db.recv(0.2)
        finally:
            await da.close()
            await db.close()
    assert a.ports[1].stats["tx_packets"] == 1 and a.ports[0].stats["tx_packets"] == 1
    assert b.ports[1].stats["rx_packets"] == 1 and b.ports[0].stats["rx_packets"] == 0


# --- the command line ---------------------------------------------------------------------------


@contextlib.contextmanager
def vvu_serve_net(sock: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [*VVU, "-q", "serve", "net", "--socket-path", str(sock), *args], stderr=subprocess.PIPE
    )
    try:
        wait_for_socket(sock, proc)
        yield proc
    finally:
        assert stop_process(proc) == 0


#: Runs inside the TAP's network namespace: brings the interface up, prints "ready", prints
#: the first frame with our ethertype the kernel sees on it (hex), then transmits the frame
#: read (hex) from stdin on it, which reaches the TAP's reader: `vvu serve net`.
TAP_PEER = """
import fcntl, socket, struct, sys
name = sys.argv[1]
ctl = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
fcntl.ioctl(ctl, 0x8914, struct.pack("16sH", name.encode(), 0x1 | 0x80))  # SIOCSIFFLAGS UP|NOARP
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
sock.bind((name, 0))
sock.settimeout(30)
print("ready", flush=True)
while True:
    data = sock.recv(70000)
    if data[12:14] == bytes.fromhex("88b5"):
        print(data.hex(), flush=True)
        break
sock.send(bytes.fromhex(sys.stdin.readline().strip()))
"""


def _wait_for_own_netns(holder: subprocess.Popen[bytes]) -> None:
    """Until unshare(2) ran, /proc/PID/ns/net is still ours: entering it then would put the
    daemon and the peer in different namespaces."""
    ours = os.readlink("/proc/self/ns/net")
    deadline = time.monotonic() + 30
    while os.readlink(f"/proc/{holder.pid}/ns/net") == ours:
        assert holder.poll() is None and time.monotonic() < deadline, "unshare --net failed"
        time.sleep(0.01)


@contextlib.contextmanager
def serve_net_tap_in_own_netns(
    tmp_path: Path, tap: str, *extra: str
) -> Iterator[tuple[Path, subprocess.Popen[bytes], list[str]]]:
    """`vvu serve net --tap TAP` in a private network namespace (root: CAP_NET_ADMIN; CI runs
    as root). Yields its socket, the daemon, and the command prefix that enters the namespace;
    at exit the daemon gets SIGTERM (it must exit 0) and the namespace goes."""
    if os.geteuid() != 0:
        assert os.environ.get("CI") != "true", "CI runs as root: the TAP test must run"
        pytest.skip("needs root (a network namespace and a TAP device)")
    unshare, nsenter = shutil.which("unshare"), shutil.which("nsenter")
    assert unshare and nsenter, "util-linux's unshare and nsenter"
    sock = tmp_path / "net.sock"
    # The namespace lives as long as this process does; everything else enters it.
    holder = subprocess.Popen([unshare, "--net", "sleep", "600"])
    enter = [nsenter, f"--net=/proc/{holder.pid}/ns/net"]
    daemon = None
    daemon_status = 0
    try:
        _wait_for_own_netns(holder)
        daemon = subprocess.Popen(
            [*enter, *VVU, "-q", "serve", "net", "--socket-path", str(sock), "--tap", tap, *extra]
        )
        wait_for_socket(sock, daemon)
        yield sock, daemon, enter
    finally:
        if daemon is not None:
            daemon_status = stop_process(daemon)
        stop_process(holder)
    assert daemon_status == 0, "vvu serve net exits 0 on SIGTERM"


@pytest.mark.timeout(180)
def test_vvu_serve_net_tap_passes_frames_both_ways(tmp_path: Path) -> None:
    """`vvu serve net --tap NAME` in a private network namespace: a frame our driver sends comes
    out of the TAP interface, a frame sent on the interface reaches our driver."""
    with serve_net_tap_in_own_netns(tmp_path, "vvutap0") as (sock, _, enter):
        peer = subprocess.Popen(
            [*enter, sys.executable, "-c", TAP_PEER, "vvutap0"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert peer.stdin is not None and peer.stdout is not None
            stdin, stdout = peer.stdin, peer.stdout

            async def exchange() -> None:
                driver = await NetDriver.open(str(sock))
                try:
                    ready = await asyncio.to_thread(stdout.readline)
                    assert ready.strip() == "ready", ready
                    out = frame(1, 300)
                    await driver.send(out)
                    seen = await asyncio.to_thread(stdout.readline)
                    assert bytes.fromhex(seen.strip()) == out, "the frame left through the TAP"
                    back = frame(2, 200)
                    stdin.write(back.hex() + "\n")
                    stdin.flush()
                    while True:  # the kernel's own IPv6 chatter comes through too
                        got = await driver.recv(TIMEOUT)
                        if got[12:14] == ETHERTYPE:
                            assert got == back, "the frame came in through the TAP"
                            break
                finally:
                    await driver.close()

            asyncio.run(exchange())
            assert peer.wait(TIMEOUT) == 0
        finally:
            if peer.poll() is None:
                peer.kill()
                peer.wait()


#: Runs inside the TAP's namespace: brings the interface up, prints "ready", waits for an
#: IPv4/UDP frame on it, prints it (hex) and sends the mirrored reply (MACs, addresses and ports
#: swapped) back into the TAP, i.e. the same flow in the other direction.
TAP_UDP_MIRROR = r"""
import fcntl, socket, struct, sys
name = sys.argv[1]
ctl = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
fcntl.ioctl(ctl, 0x8914, struct.pack("16sH", name.encode(), 0x1 | 0x80))  # SIOCSIFFLAGS UP|NOARP
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
sock.bind((name, 0))
sock.settimeout(30)
print("ready", flush=True)
while True:
    f = sock.recv(70000)
    if f[12:14] == b"\x08\x00" and f[23] == 17 and f[34:36] == (5000).to_bytes(2, "big"):
        break
print(f.hex(), flush=True)
ip = f[14:34]
reply = f[6:12] + f[0:6] + f[12:14] + ip[:12] + ip[16:20] + ip[12:16] + f[36:38] + f[34:36] + f[38:]
sock.send(reply)
"""


def udp_frame(payload: bytes) -> bytes:
    """An IPv4/UDP frame 10.0.0.2:5000 -> 10.0.0.1:6000 (checksums left 0: only steered, never
    delivered to a socket)."""
    udp = struct.pack("!HHHH", 5000, 6000, 8 + len(payload), 0) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, bytes([10, 0, 0, 2]),
        bytes([10, 0, 0, 1]),
    )  # fmt: skip
    return b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x00\x02" + b"\x08\x00" + ip + udp


@pytest.mark.timeout(180)
def test_vvu_serve_net_multi_queue_tap_steers_a_flow_back_to_its_queue_pair(
    tmp_path: Path,
) -> None:
    """`--tap NAME --num-queue-pairs 2`: one TAP queue (IFF_MULTI_QUEUE) per queue pair. A UDP
    frame our driver sends on pair 2 leaves through the interface; the kernel steers the reply
    of that flow to the TAP queue it came from (tun's flow table), so it reaches the same pair,
    the only one running."""
    tap = serve_net_tap_in_own_netns(tmp_path, "vvumq0", "--num-queue-pairs", "2")
    with tap as (sock, daemon, enter):
        peer = subprocess.Popen(
            [*enter, sys.executable, "-c", TAP_UDP_MIRROR, "vvumq0"],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert peer.stdout is not None
            stdout = peer.stdout
            queues = list(Path("/proc").glob(f"{daemon.pid}/fdinfo/*"))
            tap_queues = [q for q in queues if "iff:\tvvumq0" in q.read_text(errors="replace")]

            async def exchange() -> None:
                driver = await NetDriver.open(str(sock), pair=1)
                try:
                    ready = await asyncio.to_thread(stdout.readline)
                    assert ready.strip() == "ready", ready
                    out = udp_frame(b"queue pair 2")
                    await driver.send(out)
                    seen = await asyncio.to_thread(stdout.readline)
                    assert bytes.fromhex(seen.strip()) == out, "the frame left through the TAP"
                    while True:  # the kernel's own IPv6 chatter may come through too
                        got = await driver.recv(TIMEOUT)
                        if got[12:14] == b"\x08\x00":
                            assert got[:6] == out[6:12] and got[34:36] == out[36:38], got.hex()
                            assert got[42:] == b"queue pair 2"
                            break
                finally:
                    await driver.close()

            asyncio.run(exchange())
            assert peer.wait(TIMEOUT) == 0
            assert len(tap_queues) == 2, "one TAP queue (fd) per queue pair"
        finally:
            if peer.poll() is None:
                peer.kill()
                peer.wait()


def test_serve_net_peer_mode_links_two_sockets(tmp_path: Path) -> None:
    sock = tmp_path / "net.sock"
    peer = Path(f"{sock}.peer")

    async def exchange() -> None:
        da = await NetDriver.open(str(sock))
        db = await NetDriver.open(str(peer))
        try:
            f, g = frame(1, 1514), frame(2, 64)
            await da.send(f)
            await db.send(g)
            assert await db.recv(TIMEOUT) == f
            assert await da.recv(TIMEOUT) == g
        finally:
            await da.close()
            await db.close()

    with vvu_serve_net(sock, "--mac", "52:54:00:00:00:0a"):
        assert peer.exists()
        asyncio.run(exchange())
        asyncio.run(exchange())  # both sockets serve the next front-ends too
    assert not sock.exists() and not peer.exists(), "both sockets are removed on SIGTERM"


@pytest.mark.parametrize("extra", [[], ["--poll-us", "50"]], ids=["sleeping", "busy-poll"])
def test_serve_net_loopback(tmp_path: Path, extra: list[str]) -> None:
    sock = tmp_path / "lo.sock"

    async def echo() -> None:
        d = await NetDriver.open(str(sock), mrg_rxbuf=False)
        try:
            f = frame(7, 300)
            await d.send(f)
            assert await d.recv(TIMEOUT) == f
        finally:
            await d.close()

    with vvu_serve_net(sock, "--loopback", *extra):
        asyncio.run(echo())


def _ones_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return int(total)


def check_generated(got: bytes, size: int, seq: int, dst: bytes, src: bytes) -> None:
    """`got` is the generator's frame `seq` of `size` bytes: Ethernet to `dst` from `src`,
    IPv4 198.18.0.1 -> 198.18.0.2 with a good header checksum, UDP 9 -> 9 with a good
    checksum, payload starting with `seq` (see `vvu serve net --help`)."""
    assert len(got) == size
    assert (got[:6], got[6:12], got[12:14]) == (dst, src, b"\x08\x00")
    ip, udp = got[14:34], got[34:]
    assert ip[0] == 0x45 and ip[9] == 17 and struct.unpack("!H", ip[2:4])[0] == size - 14
    assert (ip[12:16], ip[16:20]) == (bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2]))
    assert _ones_sum(ip) == 0xFFFF, "IPv4 header checksum"
    sport, dport, length, check = struct.unpack("!HHHH", udp[:8])
    assert (sport, dport, length) == (9, 9, size - 34) and check != 0
    pseudo = ip[12:20] + struct.pack("!BBH", 0, 17, length)
    assert _ones_sum(pseudo + udp) == 0xFFFF, "UDP checksum"
    assert struct.unpack("!Q", udp[8:16])[0] == seq


@pytest.mark.parametrize("extra", [[], ["--poll-us", "50"]], ids=["sleeping", "busy-poll"])
def test_serve_net_generate_fills_our_driver_with_valid_udp_frames(
    tmp_path: Path, extra: list[str]
) -> None:
    """`--generate 60,64,1500`: every receive buffer gets the next frame, sizes in turn,
    sequence numbers without a gap, checksums right; what the driver sends is taken (its
    transmit buffers come back) and discarded. Also from the busy-polling thread."""
    sock = tmp_path / "gen.sock"
    mac, src = parse_mac("52:54:00:00:00:0a"), parse_mac("02:00:00:00:00:99")
    sizes = [60, 64, 1500]

    async def receive() -> None:
        d = await NetDriver.open(str(sock), rx_buffers=16)
        try:
            for seq in range(600):  # many rounds of the 16 buffers, re-posted as taken
                got = await d.recv(TIMEOUT)
                check_generated(got, sizes[seq % 3], seq, mac, src)
            await d.send_all([frame(i, 100) for i in range(20)])  # slots recycled: all taken
        finally:
            await d.close()

    args = ["--generate", "60,64,1500", "--mac", "52:54:00:00:00:0a", "--peer-mac"]
    with vvu_serve_net(sock, *args, "02:00:00:00:00:99", *extra):
        asyncio.run(receive())


def test_generator_counts_and_bounds() -> None:
    b = NetBackend.generator([64, 1514], queue_pairs=2, mtu=1500)
    assert [p.kind for p in b.ports] == ["generator"] * 2
    assert "generator of 64,1514-byte frames" in b.describe()
    first = b.ports[0].recv()
    assert first is not None
    check_generated(first, 64, 0, b.mac, parse_mac("02:76:76:75:00:02"))
    assert b.ports[0].drain() == 0 and b.ports[1].send(frame(1, 60))
    assert b.ports[1].stats["tx_packets"] == 1
    with pytest.raises(ValueError, match="MTU"):
        NetBackend.generator([1515], mtu=1500)
    with pytest.raises(ValueError, match="not 59"):
        NetBackend.generator([59])


@pytest.mark.asyncio
async def test_a_generator_whose_frames_never_fit_waits_for_buffers_instead_of_spinning(
    tmp_path: Path,
) -> None:
    """Without MRG_RXBUF and with 512-byte receive buffers no 1000- or 1500-byte frame fits:
    each size is dropped (counted) and the generator then waits for the guest to post more
    buffers, instead of generating and dropping frames at full CPU for as long as it runs."""
    gen = NetBackend.generator([1000, 1500])
    async with serving((gen,), tmp_path) as (path,):
        d = await NetDriver.open(path, mrg_rxbuf=False, buffer_size=512, rx_buffers=16)
        try:
            deadline = time.monotonic() + TIMEOUT
            while gen.stats()["rx_dropped"] == 0:
                assert time.monotonic() < deadline, gen.stats()
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.5)  # what a spinning source would drop in this time: millions
            dropped = gen.stats()["rx_dropped"]
            assert dropped <= 2 * 16, gen.stats()
            # Buffers that fit are filled again.
            await d.close()
            d = await NetDriver.open(path, rx_buffers=4)
            assert len(await d.recv(TIMEOUT)) == 1000
        finally:
            await d.close()


def thread_names(pid: int) -> list[str]:
    """The names (comm) of process `pid`'s threads."""
    names = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            names.append((task / "comm").read_text().strip())
    return names


@pytest.mark.parametrize("poll", [False, True], ids=["thread-per-queue", "one-poll-thread"])
def test_serve_net_busy_poll_runs_every_queue_in_one_thread(tmp_path: Path, poll: bool) -> None:
    """Peer mode, two queue pairs, a front-end on pair 1 of each socket: without `--poll-us`
    the two queues of each started pair share one sleeping thread (`vvu-net-pair`, one per
    queue pair, none per queue `vqN`); with it, the process's one polling thread (`vvu-poll`)
    moves the frames both ways."""
    sock = tmp_path / "net.sock"
    peer = Path(f"{sock}.peer")

    async def exchange(pid: int) -> list[str]:
        da = await NetDriver.open(str(sock), pair=1)
        db = await NetDriver.open(str(peer), pair=1)
        try:
            f, g = frame(1, 500), frame(2, 1514)
            await da.send(f)
            assert await db.recv(TIMEOUT) == f
            await db.send(g)
            assert await da.recv(TIMEOUT) == g
            return thread_names(pid)
        finally:
            await da.close()
            await db.close()

    extra = ["--poll-us", "50"] if poll else []
    with vvu_serve_net(sock, "--num-queue-pairs", "2", *extra) as proc:
        names = asyncio.run(exchange(proc.pid))
    workers = sorted(n for n in names if re.fullmatch(r"vq\d+", n))
    if poll:
        assert workers == [] and names.count("vvu-poll") == 1, names
    else:
        assert workers == [] and "vvu-poll" not in names, names
        assert names.count("vvu-net-pair") == 2, names


# --- DPDK testpmd as a real peer ----------------------------------------------------------------

TESTPMD = shutil.which("dpdk-testpmd")
STDBUF = shutil.which("stdbuf")
SETPRIV = shutil.which("setpriv")
#: Skipped where testpmd is missing, except in CI (CI=true): there scripts/setup.sh installs it
#: (dpdk-dev), so a missing one is a broken set-up and the tests fail instead of passing unseen.
needs_testpmd = pytest.mark.skipif(
    TESTPMD is None and os.environ.get("CI") != "true", reason="dpdk-testpmd is not installed"
)

# --- DPDK's memory in a file chosen in advance ---------------------------------------------------
#
# A VMM's vfio-user client (QEMU's vfio-user-pci) reads the VVU device's region info once, at
# realize, so the front-end's memory must be a file `vvu device --frontend-memory` is told before
# the back-end VM starts. testpmd's `--no-huge` memory is a memfd it makes itself; its hugepage
# memory can be a file of our choosing (DPDK 22.11, lib/eal/linux):
# - `--huge-dir DIR`: a hugetlbfs mount (get_hugepage_dir matches it in /proc/mounts);
# - `--single-file-segments`: one file per memseg list, DIR/{file-prefix}map_{list}
#   (eal_memalloc.c get_seg_fd, HUGEFILE_FMT), page k of the list at file offset k * 2 MiB;
#   without it every page is a file of its own, hence a vhost-user region of its own, and the
#   device refuses the memory table ("its fd is not the --frontend-memory file");
# - `--huge-unlink=never`: by default EAL init unlinks every unlocked `*map_*` file in DIR
#   (eal_hugepage_info.c hugepage_info_init -> clear_hugedir), so DPDK would make a new inode;
#   with `never` it opens the existing file (O_CREAT, no unlink), counts it as reusable pages and
#   keeps it (single-file segments never unlink on open);
# - `--socket-mem N --socket-limit N`: all N MiB are allocated at init, first fit in the first
#   memseg list, i.e. file offsets 0..N (eal_common_dynmem.c eal_dynmem_hugepage_init; those
#   pages are never freed), and the heap cannot grow past the file (the socket-limit validator).
# virtio-user sends one region per fd (vhost_user.c update_memory_region merges the segments of
# one fd), so SET_MEM_TABLE carries exactly one region: the file, offset 0, N MiB.
#
# The hugetlbfs mount lives in a private mount namespace held by one process of the test's own
# (killed with the test: pdeathsig), so no mount survives a crashed test; DPDK runs in it through
# nsenter, the device opens the file through /proc/PID/root. The pages are surplus hugepages,
# which the kernel takes back when their last user is gone.

HUGEPAGE_SIZE = 2 << 20
_HUGEPAGES_SYSFS = Path("/sys/kernel/mm/hugepages/hugepages-2048kB")
#: Mounts hugetlbfs at its argument in a mount namespace of its own, says so, and holds it.
_HOLD_HUGETLBFS = (
    "unshare", "--mount", "--propagation", "private", "--",
    "sh", "-c",
    'mount -t hugetlbfs -o pagesize=2M nodev "$1" && echo mounted && exec sleep infinity',
    "vvu-hugetlbfs",
)  # fmt: skip


def hugepages_unavailable() -> str | None:
    """Why testpmd cannot run on a hugepage file here, or None."""
    if TESTPMD is None:
        return "dpdk-testpmd is not installed"
    if os.geteuid() != 0:
        return "reserving hugepages and mounting hugetlbfs need root"
    for tool in ("unshare", "nsenter", "setpriv"):
        if shutil.which(tool) is None:
            return f"{tool} (util-linux) is not installed"
    if not _HUGEPAGES_SYSFS.is_dir():
        return "this kernel has no 2 MiB hugepages"
    return None


@dataclass(frozen=True)
class PmdMemory:
    """testpmd's memory as one hugetlbfs file made in advance (see above)."""

    huge_dir: Path
    """The hugetlbfs mount, as DPDK sees it."""
    prefix: str
    """`--file-prefix`: the file is `huge_dir/{prefix}map_0`."""
    size: int
    """Bytes: `--socket-mem` and `--socket-limit`, the whole file."""
    enter: tuple[str, ...]
    """Runs a command where `huge_dir` is mounted (nsenter into the mount namespace)."""

    def eal_args(self) -> list[str]:
        mib = str(self.size >> 20)
        return [
            "--huge-dir", str(self.huge_dir),
            "--single-file-segments",
            "--huge-unlink=never",
            "--socket-mem", mib,
            "--socket-limit", mib,
        ]  # fmt: skip


class HugepageFileError(Exception):
    """The hugepages or the hugetlbfs mount could not be had."""


@contextlib.contextmanager
def dpdk_hugepage_file(workdir: Path, size: int, prefix: str) -> Iterator[tuple[Path, PmdMemory]]:
    """A `size`-byte hugetlbfs file that testpmd run with the PmdMemory will use as all of its
    memory; yields (the file's path for this process, e.g. `vvu device --frontend-memory`, the
    PmdMemory). On exit the file, the namespace (with its mount) and the pages are gone.

    The pages are surplus hugepages: `nr_overcommit_hugepages` is raised by the file's pages
    (and lowered again on exit), and this process maps the file, which reserves them for every
    mapping of the file (the device's, the VMM's, DPDK's) until the end. Surplus pages go back
    to the kernel when their last user does, so even a killed test leaves no memory behind
    (only the raised overcommit limit); `nr_hugepages`, the persistent pool, is never touched."""
    if size % HUGEPAGE_SIZE:
        raise ValueError(f"{size:#x} is not a multiple of 2 MiB")
    pages = size // HUGEPAGE_SIZE
    overcommit = _HUGEPAGES_SYSFS / "nr_overcommit_hugepages"
    overcommit.write_text(f"{int(overcommit.read_text()) + pages}\n")
    holder: subprocess.Popen[bytes] | None = None
    try:
        mount_point = workdir / "hugetlbfs"
        mount_point.mkdir()
        assert SETPRIV is not None
        holder = subprocess.Popen(
            [SETPRIV, "--pdeathsig", "KILL", "--", *_HOLD_HUGETLBFS, str(mount_point)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        assert holder.stdout is not None and holder.stderr is not None
        if holder.stdout.readline() != b"mounted\n":  # or EOF: the mount failed
            holder.wait()
            raise HugepageFileError(f"mounting hugetlbfs failed: {holder.stderr.read()!r}")
        # setpriv, unshare and sh exec: the holder's PID is the namespace's.
        inside = Path(f"/proc/{holder.pid}/root") / mount_point.relative_to("/")
        path = inside / f"{prefix}map_0"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            try:
                reservation = mmap.mmap(fd, size)
            except OSError as err:
                raise HugepageFileError(f"{pages} 2 MiB hugepages: {err.strerror}") from err
        finally:
            os.close(fd)
        enter = ("nsenter", "--target", str(holder.pid), "--mount", "--")
        try:
            yield path, PmdMemory(mount_point, prefix, size, enter)
        finally:
            reservation.close()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        now = int(overcommit.read_text())
        overcommit.write_text(f"{max(now - pages, 0)}\n")


class PmdProcess:
    """dpdk-testpmd with a virtio-user port on a vhost-user socket.

    Memory: without `memory`, `--no-huge`: one memfd with `--single-file-segments` (shareable
    with the back-end; `--in-memory` cannot be combined with `--no-huge` in DPDK 22.11); with
    `memory`, the hugetlbfs file of `dpdk_hugepage_file`. `--no-shconf` and a private
    `--file-prefix` keep parallel runs apart. `tx_first`: send one burst (BURST frames) before
    forwarding starts. Killed if the test process dies (pdeathsig), else always stopped by PID.
    """

    def __init__(
        self,
        socket_path: Path,
        mode: str,
        log: Path,
        *,
        queues: int = 1,
        packed: bool = False,
        memory: PmdMemory | None = None,
        tx_first: bool = False,
    ) -> None:
        assert TESTPMD is not None
        self.prefix = f"vvu-test-{os.getpid()}-{mode}" if memory is None else memory.prefix
        self.log = log
        # EAL's runtime directory is RUNTIME_DIRECTORY/dpdk/PREFIX (lib/eal/unix/eal_filesystem.c;
        # root's default is /var/run): a fresh short directory of ours, removed in stop(). Short,
        # because EAL binds its mp_socket there and a unix socket path has at most 107 bytes (a
        # pytest tmp_path is too long for that on some runs).
        self.runtime_root = Path(tempfile.mkdtemp(prefix="vvu-dpdk-"))
        self.runtime_dir = self.runtime_root / "dpdk" / self.prefix
        self._out = open(log, "wb")  # noqa: SIM115 (closed in stop)
        if memory is None:
            eal_memory = ["--no-huge", "-m", "256", "--single-file-segments"]
        else:
            eal_memory = memory.eal_args()
        # setpriv, nsenter and stdbuf exec: the PID is testpmd's. Line-buffered output, so the
        # log can be watched.
        wrappers = [SETPRIV, "--pdeathsig", "KILL", "--"] if SETPRIV else []
        if memory is not None:
            wrappers += memory.enter
        if STDBUF:
            wrappers += [STDBUF, "-oL"]
        self.proc = subprocess.Popen(
            [
                *wrappers,
                TESTPMD,
                "-l",
                "0-1",
                *eal_memory,
                "--no-pci",
                "--no-shconf",
                "--file-prefix",
                self.prefix,
                "--log-level",
                "lib.eal:warning",
                "--vdev",
                f"net_virtio_user0,path={socket_path},queues={queues},packed_vq={int(packed)}",
                "--",
                f"--rxq={queues}",
                f"--txq={queues}",
                "--stats-period",
                "1",
                f"--forward-mode={mode}",
                f"--burst={BURST}",
                *(["--tx-first"] if tx_first else []),
                "--total-num-mbufs=2048",
                # Frames that arrive while forwarding starts stay in the ring (by default
                # testpmd drops them, after it printed its forwarding config).
                "--no-flush-rx",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "RUNTIME_DIRECTORY": str(self.runtime_root)},
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_forwarding(self, timeout: float = 30) -> str:
        """Wait until forwarding started; returns the port's MAC address."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.output()
            if "forwards packets on" in text:
                match = re.search(r"Port 0: ([0-9A-Fa-f:]{17})", text)
                assert match, text
                return match.group(1)
            if self.proc.poll() is not None:
                raise AssertionError(f"testpmd exited with {self.proc.returncode}:\n{text}")
            assert time.monotonic() < deadline, f"testpmd did not start:\n{text}"
            time.sleep(0.05)

    def wait_rx_packets(self, count: int, timeout: float = 60) -> None:
        """Wait until the periodic port statistics show at least `count` received frames."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.output()
            seen = re.findall(r"RX-packets: +(\d+)", text)
            if seen and int(seen[-1]) >= count:
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"testpmd exited with {self.proc.returncode}:\n{text}")
            assert time.monotonic() < deadline, f"testpmd received {seen[-1:]} frames:\n{text}"
            time.sleep(0.1)

    def totals(self) -> tuple[int, int, int, int]:
        """The forward statistics testpmd prints when it stops: RX, RX-dropped, TX, TX-dropped."""
        text = self.output()
        found = re.findall(
            r"RX-packets: (\d+) +RX-dropped: (\d+).*?TX-packets: (\d+) +TX-dropped: (\d+)",
            text,
            re.S,
        )
        assert found, text[-3000:]
        rx, rx_dropped, tx, tx_dropped = (int(n) for n in found[-1])
        return rx, rx_dropped, tx, tx_dropped

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._out.close()
        shutil.rmtree(self.runtime_root, ignore_errors=True)


@contextlib.contextmanager
def run_testpmd(
    socket_path: Path,
    mode: str,
    tmp_path: Path,
    *,
    queues: int = 1,
    packed: bool = False,
    memory: PmdMemory | None = None,
    tx_first: bool = False,
) -> Iterator[PmdProcess]:
    assert TESTPMD is not None, "dpdk-testpmd is not installed (scripts/setup.sh --tests: dpdk-dev)"
    log = tmp_path / f"testpmd-{mode}.log"
    pmd = PmdProcess(
        socket_path, mode, log, queues=queues, packed=packed, memory=memory, tx_first=tx_first
    )
    try:
        yield pmd
    finally:
        pmd.stop()


@needs_testpmd
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_dpdk_testpmd_macswaps_our_frames_back(tmp_path: Path, packed: bool) -> None:
    """Our frames reach testpmd (its RX), come back with the MACs swapped (its TX). `packed`:
    testpmd's virtio-user port (`packed_vq=1`) and our driver both run packed rings."""
    sock = tmp_path / "net.sock"
    peer = Path(f"{sock}.peer")

    async def round_trip(pmd: PmdProcess) -> None:
        driver = await NetDriver.open(str(peer), packed=packed)
        try:
            await asyncio.to_thread(pmd.wait_forwarding)
            src, dst = parse_mac("02:00:00:00:00:02"), parse_mac("02:00:00:00:00:01")
            frames = [frame(i, 60 + 29 * i, dst=dst, src=src) for i in range(50)]
            await driver.send_all(frames)
            for f in frames:
                got = await driver.recv(TIMEOUT)
                assert got[:6] == f[6:12] and got[6:12] == f[:6], "MACs swapped"
                assert got[12:] == f[12:], "payload intact"
        finally:
            await driver.close()

    with vvu_serve_net(sock), run_testpmd(sock, "macswap", tmp_path, packed=packed) as pmd:
        asyncio.run(round_trip(pmd))
    # The totals testpmd prints when it stops.
    text = pmd.output()
    totals = re.findall(r"RX-packets: (\d+) +RX-dropped: (\d+).*?TX-packets: (\d+)", text, re.S)
    assert totals and totals[-1] == ("50", "0", "50"), text[-3000:]


@needs_testpmd
def test_dpdk_testpmd_through_the_switch_learns_and_floods(tmp_path: Path) -> None:
    """`vvu serve net --switch`: testpmd (macswap) on port 0, our drivers on ports 1 and 2. The
    first frame to testpmd's MAC is flooded (port 2 sees it too); testpmd's reply teaches the
    switch its MAC, so the next 49 frames and all 50 replies are unicast: port 2 sees nothing
    more, and testpmd counts exactly 50 frames each way."""
    sock = tmp_path / "sw0.sock"
    ports = [tmp_path / "sw1.sock", tmp_path / "sw2.sock"]
    me = parse_mac("02:00:00:00:00:02")

    async def through_switch(pmd: PmdProcess) -> None:
        d1 = await NetDriver.open(str(ports[0]))
        d2 = await NetDriver.open(str(ports[1]))
        try:
            pmd_mac = parse_mac(await asyncio.to_thread(pmd.wait_forwarding))
            frames = [frame(i, 60 + 29 * i, dst=pmd_mac, src=me) for i in range(50)]
            await d1.send(frames[0])
            assert await d2.recv(TIMEOUT) == frames[0], "unknown destination: flooded"
            got = await d1.recv(TIMEOUT)
            assert got[:6] == me and got[6:12] == pmd_mac and got[12:] == frames[0][12:]
            await d1.send_all(frames[1:])
            for f in frames[1:]:
                got = await d1.recv(TIMEOUT)
                assert got[:6] == me and got[12:] == f[12:], "macswapped, in order"
            with pytest.raises(TimeoutError):
                await d2.recv(0.3)  # learnt: nothing more is flooded
        finally:
            await d1.close()
            await d2.close()

    args = ["--switch", "sw", *(a for p in ports for a in ("--switch-port", str(p)))]
    with vvu_serve_net(sock, *args) as proc, run_testpmd(sock, "macswap", tmp_path) as pmd:
        for p in ports:
            wait_for_socket(p, proc)
        asyncio.run(through_switch(pmd))
    rx, rx_dropped, tx, tx_dropped = pmd.totals()
    assert (rx, rx_dropped, tx, tx_dropped) == (50, 0, 50, 0), pmd.output()[-3000:]


@needs_testpmd
def test_dpdk_testpmd_txonly_frames_reach_our_driver(tmp_path: Path) -> None:
    """testpmd generates frames (txonly); our driver on the peer socket receives them."""
    sock = tmp_path / "net.sock"
    peer = Path(f"{sock}.peer")

    async def receive(pmd: PmdProcess) -> None:
        driver = await NetDriver.open(str(peer))
        try:
            mac = parse_mac(await asyncio.to_thread(pmd.wait_forwarding))
            for _ in range(200):
                got = await driver.recv(TIMEOUT)
                assert got[6:12] == mac, "sent by testpmd's port"
                assert got[12:14] == b"\x08\x00" and len(got) == 64, "txonly's UDP/IPv4 frame"
        finally:
            await driver.close()

    with vvu_serve_net(sock), run_testpmd(sock, "txonly", tmp_path) as pmd:
        asyncio.run(receive(pmd))


@needs_testpmd
@pytest.mark.parametrize("queues", [1, 2])
def test_dpdk_testpmd_rxonly_counts_generated_frames(tmp_path: Path, queues: int) -> None:
    """`vvu serve net --generate 64,1500` against testpmd `rxonly` (DPDK's RX-only benchmark
    shape): testpmd receives on every queue, its byte count says the frames alternate 64 and
    1500 bytes, and nothing is dropped on its side."""
    sock = tmp_path / "gen.sock"
    args = ["--generate", "64,1500", "--num-queue-pairs", str(queues)]
    with vvu_serve_net(sock, *args), run_testpmd(sock, "rxonly", tmp_path, queues=queues) as pmd:
        pmd.wait_forwarding()
        pmd.wait_rx_packets(20_000)
    text = pmd.output()
    stats = re.findall(r"RX-packets: +(\d+) +RX-missed: +(\d+) +RX-bytes: +(\d+)", text)
    assert stats, text[-3000:]
    packets, missed, rx_bytes = (int(n) for n in stats[-1])
    assert packets >= 20_000 and missed == 0
    # Frames alternate per queue: the mean is 782 bytes, give or take one frame per queue.
    assert abs(rx_bytes - 782 * packets) <= 718 * queues, (packets, rx_bytes)
    if queues > 1:
        per_queue = re.findall(r"RX Port= 0/Queue= (\d+) .*?RX-packets: (\d+)", text, re.S)
        assert {q for q, n in per_queue if int(n) > 0} == {"0", "1"}, text[-3000:]


# --- a Linux guest's virtio-net driver through QEMU ----------------------------------------------

HOST_MAC = parse_mac("02:00:00:00:00:01")
HOST_IP = bytes([10, 0, 0, 1])


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def answer(frame: bytes) -> bytes | None:
    """What a host at 10.0.0.1 answers: ARP requests for it, and ICMP echo requests to it."""
    src, ethertype = frame[6:12], frame[12:14]
    if ethertype == b"\x08\x06" and len(frame) >= 42:
        arp = frame[14:42]
        if arp[6:8] == b"\x00\x01" and arp[24:28] == HOST_IP:
            reply = b"\x00\x01\x08\x00\x06\x04\x00\x02" + HOST_MAC + HOST_IP + arp[8:18]
            return (src + HOST_MAC + ethertype + reply).ljust(60, b"\0")
    if ethertype == b"\x08\x00" and len(frame) >= 34:
        ip = frame[14:]
        ihl = (ip[0] & 0xF) * 4
        if ip[9] == 1 and ip[16:20] == HOST_IP and ip[ihl] == 8:  # ICMP echo request to us
            ip = ip[: int.from_bytes(ip[2:4], "big")]
            icmp = bytearray(ip[ihl:])
            icmp[0] = 0  # echo reply
            icmp[2:4] = b"\0\0"
            icmp[2:4] = _checksum(bytes(icmp)).to_bytes(2, "big")
            header = bytearray(ip[:ihl])
            header[12:16], header[16:20] = ip[16:20], ip[12:16]
            header[8] = 64
            header[10:12] = b"\0\0"
            header[10:12] = _checksum(bytes(header)).to_bytes(2, "big")
            return src + HOST_MAC + ethertype + bytes(header) + bytes(icmp)
    return None


@pytest.mark.guest
@pytest.mark.timeout(120)
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_linux_guest_pings_our_driver_through_vvu_serve_net(tmp_path: Path, packed: bool) -> None:
    """QEMU's vhost-user netdev on `vvu serve net`, the guest's virtio_net driver (MRG_RXBUF,
    EVENT_IDX, MTU 9000) pinging a host that our NetDriver plays on the peer socket: small
    echoes, and 8000-byte ones that span several of the guest's receive buffers. `packed`: the
    guest's rings (`packed=on`) and our driver's are packed."""
    guest_image()
    sock = tmp_path / "net.sock"
    peer = Path(f"{sock}.peer")
    script = """
set -e
ip link set eth0 up
ip addr add 10.0.0.2/24 dev eth0
cat /sys/class/net/eth0/mtu
ping -c 3 -W 5 10.0.0.1 | tail -2
ping -c 2 -W 5 -s 8000 10.0.0.1 | tail -2
cut -c 35 /sys/class/net/eth0/device/features
"""
    chardev = f"socket,id=vu0,path={qemu_escape(str(sock))}"
    # vectors=0 (INTx, no MSI-X): Debian 12's QEMU 7.2 segfaults in vhost_net_start ->
    # msix_set_vector_notifiers when the guest driver starts a vhost-user netdev with MSI-X,
    # whatever the back-end (DPDK's vhost PMD as the back-end crashes it the same way).
    device = "virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56,host_mtu=9000,vectors=0"
    if packed:
        device += ",packed=on"
    qemu_args = [
        "-chardev", chardev,
        "-netdev", "vhost-user,id=net0,chardev=vu0",
        "-device", device,
    ]  # fmt: skip
    sizes: list[int] = []

    async def host(driver: NetDriver) -> None:
        while True:
            frame_in = await driver.recv()
            reply = answer(frame_in)
            if reply is not None:
                sizes.append(len(frame_in))
                await driver.send(reply)

    async def main() -> str:
        driver = await NetDriver.open(str(peer), buffer_size=2048, packed=packed)
        responder = asyncio.ensure_future(host(driver))
        try:
            result = await run_guest_async(script, qemu_args=qemu_args, timeout=90)
        finally:
            responder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await responder
            await driver.close()
        assert result.exit_status == 0, result.serial
        return result.output

    with vvu_serve_net(sock, "--mtu", "9000"):
        lines = asyncio.run(main()).split("\n")
    assert lines[0] == "9000"
    assert "3 packets transmitted, 3 packets received" in lines[1]
    assert "2 packets transmitted, 2 packets received" in lines[3]
    assert max(sizes) == 14 + 20 + 8 + 8000
    assert lines[5] == ("1" if packed else "0"), "VIRTIO_F_RING_PACKED (bit 34) in the guest"


@needs_testpmd
def test_dpdk_testpmd_multi_queue_pair_two(tmp_path: Path) -> None:
    """testpmd with two queue pairs (MQ; it emulates the control queue itself): our driver on
    pair 2 of the peer socket gets its frames back from testpmd's second RX/TX queue."""
    sock = tmp_path / "net.sock"
    peer = Path(f"{sock}.peer")

    async def round_trip(pmd: PmdProcess) -> None:
        driver = await NetDriver.open(str(peer), pair=1)
        try:
            await asyncio.to_thread(pmd.wait_forwarding)
            frames = [frame(i, 100 + i) for i in range(20)]
            await driver.send_all(frames)
            for f in frames:
                got = await driver.recv(TIMEOUT)
                assert got[:6] == f[6:12] and got[12:] == f[12:]
        finally:
            await driver.close()

    with (
        vvu_serve_net(sock, "--num-queue-pairs", "2"),
        run_testpmd(sock, "macswap", tmp_path, queues=2) as pmd,
    ):
        asyncio.run(round_trip(pmd))
    assert re.search(r"RX P=0/Q=1 \(socket 0\) -> TX P=0/Q=1", pmd.output())


# Guest feature bits read from /sys/.../device/features (character i + 1 is bit i).
GUEST_OFFLOAD_BITS = {
    "CSUM": NetFeature.CSUM,
    "GUEST_CSUM": NetFeature.GUEST_CSUM,
    "HOST_TSO4": NetFeature.HOST_TSO4,
    "GUEST_TSO4": NetFeature.GUEST_TSO4,
    "HOST_UFO": NetFeature.HOST_UFO,
    "GUEST_UFO": NetFeature.GUEST_UFO,
}


@pytest.mark.guest
@pytest.mark.timeout(150)
def test_linux_guest_tcp_between_two_switch_ports_with_offloads(tmp_path: Path) -> None:
    """One guest, two virtio-net devices on two ports of `vvu serve net --switch`, the second
    in its own network namespace so that TCP between 10.0.0.2 and 10.0.0.3 crosses the switch.
    eth0 negotiates every offload; eth1 sends with CSUM/HOST_TSO4 but takes neither checksum
    nor TSO offload (QEMU's guest_csum=off, guest_tso4/6=off). 2 MiB over HTTP each way, md5
    compared: eth1 → eth0 goes as TSO packets, passed through whole (far fewer packets than
    MSS-sized segments arrive); eth0 → eth1 is cut and checksummed by the switch.

    The same boot has eth2 on `vvu serve net --generate 64,1500,9000` (MTU 9000), up only at
    the end: the guest's IP and UDP layers find every generated frame valid (no header or
    checksum error; each datagram, for a port nobody listens on, counted in Udp NoPorts, which
    Linux counts only after verifying the checksum)."""
    guest_image()
    socks = [tmp_path / "p0.sock", tmp_path / "p1.sock"]
    script = (
        """
set -e
for d in /sys/class/net/eth0 /sys/class/net/eth1; do cat $d/device/features; done
dd if=/dev/urandom of=/tmp/data bs=64k count=32 2>/dev/null
md5sum </tmp/data
"""
        + NET_PAIR_SETUP
        + """
ln -s /tmp/data /tmp/www/data
before=$(cat /sys/class/net/eth0/statistics/rx_packets)
wget -q -O - http://10.0.0.3:8080/data | md5sum
after=$(cat /sys/class/net/eth0/statistics/rx_packets)
echo $((after - before))
nsenter -t $NS -n sh -c 'wget -q -O - http://10.0.0.2:8080/data | md5sum'
kill $NS
ip link set eth2 mtu 9000
ip addr add 198.18.0.2/24 dev eth2
ip link set eth2 up
while [ "$(cat /sys/class/net/eth2/statistics/rx_packets)" -lt 3000 ]; do :; done
ip link set eth2 down
cat /sys/class/net/eth2/statistics/rx_packets
grep -E '^(Ip|Udp):' /proc/net/snmp
"""
    )
    no_guest_offloads = "guest_csum=off,guest_tso4=off,guest_tso6=off"
    qemu_args = vhost_user_net_args(0, str(socks[0]), "52:54:00:12:34:50")
    qemu_args += vhost_user_net_args(1, str(socks[1]), "52:54:00:12:34:51", no_guest_offloads)
    generator = tmp_path / "gen.sock"
    qemu_args += vhost_user_net_args(2, str(generator), "52:54:00:12:34:52")

    async def main() -> str:
        result = await run_guest_async(script, qemu_args=qemu_args, timeout=120)
        assert result.exit_status == 0, result.serial
        return result.output

    gen_args = ["--generate", "64,1500,9000", "--mtu", "9000", "--mac", "52:54:00:12:34:52"]
    with (
        vvu_serve_net(socks[0], "--switch", "sw", "--switch-port", str(socks[1])),
        vvu_serve_net(generator, *gen_args),
    ):
        lines = asyncio.run(main()).split("\n")
    eth0, eth1 = lines[0], lines[1]
    for name, bit in GUEST_OFFLOAD_BITS.items():
        assert eth0[bit] == "1", f"eth0 negotiated {name}"
    assert (eth1[NetFeature.CSUM], eth1[NetFeature.HOST_TSO4]) == ("1", "1")
    assert (eth1[NetFeature.GUEST_CSUM], eth1[NetFeature.GUEST_TSO4]) == ("0", "0")
    sent, to_eth0, eth0_packets, to_eth1 = lines[2], lines[3], int(lines[4]), lines[5]
    assert to_eth0 == sent and to_eth1 == sent, "2 MiB arrive intact both ways"
    # 2 MiB in 1448-byte segments would be over 1448 packets (plus ACKs): TSO packets arrived.
    assert eth0_packets < 2 * 1024 * 1024 // 1448 // 2, eth0_packets
    generated = int(lines[6])
    snmp: dict[str, int] = {}
    for names, values in zip(lines[7::2], lines[8::2], strict=False):
        proto = names.split(":")[0]
        for name, value in zip(names.split()[1:], values.split()[1:], strict=True):
            snmp[f"{proto}.{name}"] = int(value)
    assert generated >= 3000, lines[6:]
    for counter in ("Ip.InHdrErrors", "Ip.InAddrErrors", "Udp.InErrors", "Udp.InCsumErrors"):
        assert snmp[counter] == 0, (counter, snmp)
    # Every generated datagram passed IP and the UDP checksum (nothing else arrives on eth2).
    assert snmp["Udp.NoPorts"] == generated, snmp
