"""virtio-net over a TAP device, an in-process switch between front-ends, or a loopback.

Every queue runs in a native Rust worker; frames never touch Python. Queue `2k` is receiveq k+1
(device → driver) and `2k + 1` is transmitq k+1; each queue pair has its own `NetPort`:

- **peer** (the default of `vvu serve net`): two front-ends exchange frames through one process,
  a two-port switch. The main socket (`--socket-path`) serves one of them, `--peer-socket-path`
  (default: the main path plus `.peer`) the other, from a helper thread with its own event loop,
  so each socket serves one front-end at a time as usual. Frames move ring to ring in native
  code (vvu_core `worker::net::switch`): queue pair k of one side delivers to queue pair k of
  the other, with no socket and no GIL in between.
- **switch** (`--switch NAME`): an N-port learning L2 switch. The main socket and every
  `--switch-port PATH` are ports of switch NAME (one per front-end); broadcast, multicast and
  unknown destinations are flooded. Switches are looked up by name in the process
  (`NetBackend.switch`), so every device of one process that names the same switch is a port of
  it. A frame from queue pair k goes to queue pair k mod N of the destination (no RSS).
- **tap** (`--tap NAME`): a TAP interface with virtio-net headers (IFF_VNET_HDR, 12 bytes); with
  several queue pairs a multi-queue TAP.
- **loopback** (`--loopback`): every transmitted frame comes back on the receive queue, ring to
  ring in native code.
- **generator** (`--generate SIZE[,SIZE...]`): a frame source for benchmarks and tests, as DPDK
  testpmd's `txonly` on a `net_vhost` port: every receive queue is filled with valid IPv4/UDP
  frames of those sizes in turn (to `--mac`, from `--peer-mac`, 198.18.0.1:9 → 198.18.0.2:9,
  IP and UDP checksums set, the first 8 payload bytes a per-queue-pair sequence number) as fast
  as the guest posts buffers, counted in `rx_packets`; transmitted frames are checked, counted
  and discarded (vvu_core `worker::net::generate`).

Each receive queue of a switch port holds a bounded number of bytes (`--port-buffer`); frames for
a full one are dropped and counted (`rx_overflow` of that port), so a guest that never refills
its receive ring only loses its own frames. `--poll-us N` moves every queue of the process into
one polling thread (vvu_core `worker::PollGroup`, as a DPDK lcore polls all its ports), which
steps the queues in turn and, once all were idle for N µs, sleeps on their eventfds (one core
while traffic flows).

The two queues of a pair are independent workers that share the port, so the engine's per-queue
`native_worker(index)` life cycle applies as it is: a ring runs while it is started and enabled;
a started but disabled transmit queue discards what it is given (`disabled_worker`).
Offloads (unless `--no-offloads`): CSUM, GUEST_CSUM, HOST_TSO4/6, GUEST_TSO4/6, HOST_UFO,
GUEST_UFO, HOST_USO (not on a TAP of a kernel before 6.2) and GUEST_USO4/6 are offered and the
virtio-net header travels with the frame (vvu_core `worker::net::offload`). Every header from a
guest is checked against what it negotiated and against its frame (flags, gso_type, gso_size
against the MTU, csum_start/csum_offset, hdr_len); a bad one drops the frame (`tx_errors`). A
receiving port whose guest lacks an offload gets the checksum completed, the TCP packet cut into
segments, the USO packet into UDP datagrams or the UFO datagram into IP fragments in software; a
TAP is told the guest's offloads with TUNSETOFFLOAD (USO only on Linux 6.2 and later; the kernel
ignores UFO since 4.14 and cuts UDP itself). The control
queue is not implemented (a front-end that uses more than one queue pair must steer them itself,
as QEMU and DPDK do).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import logging
import struct
import threading
from collections.abc import Sequence
from typing import ClassVar

from vvu._core import NativeHandler, NetPort, Switch
from vvu.backends.base import Backend, ConfigError
from vvu.protocol import ProtocolFeature, VirtioFeature
from vvu.transport.unix import UnixListener

log = logging.getLogger(__name__)

__all__ = ["CompanionServer", "NetBackend", "NetFeature", "parse_mac", "rarp_frame"]


class NetFeature:
    """virtio-net feature bits (virtio 1.2, 5.1.3)."""

    CSUM = 0
    GUEST_CSUM = 1
    MTU = 3
    MAC = 5
    GUEST_TSO4 = 7
    GUEST_TSO6 = 8
    GUEST_UFO = 10
    HOST_TSO4 = 11
    HOST_TSO6 = 12
    HOST_UFO = 14
    MRG_RXBUF = 15
    STATUS = 16
    CTRL_VQ = 17
    GUEST_ANNOUNCE = 21
    MQ = 22
    GUEST_USO4 = 54
    GUEST_USO6 = 55
    HOST_USO = 56


#: Checksum, TCP segmentation and UDP fragmentation/segmentation offloads, both directions
#: (HOST_USO only where every port takes it: `NetPort.takes_uso`).
OFFLOAD_FEATURES = [
    NetFeature.CSUM,
    NetFeature.GUEST_CSUM,
    NetFeature.HOST_TSO4,
    NetFeature.HOST_TSO6,
    NetFeature.GUEST_TSO4,
    NetFeature.GUEST_TSO6,
    NetFeature.HOST_UFO,
    NetFeature.GUEST_UFO,
    NetFeature.HOST_USO,
    NetFeature.GUEST_USO4,
    NetFeature.GUEST_USO6,
]

#: Config space `status`: the link is up.
LINK_UP = 1
#: Largest frame the data path carries, without the virtio-net header.
MAX_FRAME_LEN = 65535
#: Ethernet header with one VLAN tag: what a frame has beyond its MTU.
ETH_VLAN_HLEN = 14 + 4
#: MTU bounds: the IPv4 minimum; the largest that leaves room for an Ethernet and a VLAN header.
MIN_MTU = 68
MAX_MTU = MAX_FRAME_LEN - ETH_VLAN_HLEN
#: Shortest generated frame (`--generate`): the Ethernet minimum without FCS.
MIN_GENERATED = 60
DEFAULT_MAC = "02:76:76:75:00:01"
DEFAULT_PEER_MAC = "02:76:76:75:00:02"
#: Bytes each receive queue of a peer, switch or loopback port holds before frames for it drop.
DEFAULT_PORT_BUFFER = 1 << 20
ETH_P_RARP = 0x8035

#: The switches of this process, by name (see `NetBackend.switch`).
_switches: dict[str, Switch] = {}


def named_switch(name: str) -> Switch:
    """The process's switch called `name`, created on first use."""
    switch = _switches.get(name)
    if switch is None:
        switch = _switches[name] = Switch(name)
    return switch


def parse_mac(text: str | bytes) -> bytes:
    """`aa:bb:cc:dd:ee:ff` (or 6 raw bytes) as 6 bytes; ValueError otherwise."""
    if isinstance(text, bytes):
        if len(text) != 6:
            raise ValueError(f"a MAC address is 6 bytes, not {len(text)}")
        return text
    parts = text.replace("-", ":").split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"{text!r} is not a MAC address like 02:00:00:00:00:01")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"{text!r} is not a MAC address like 02:00:00:00:00:01") from None


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def rarp_frame(mac: bytes) -> bytes:
    """The RARP "reverse request" a switch learns `mac` from (what QEMU announces after a
    migration), padded to the 60-byte Ethernet minimum."""
    header = b"\xff" * 6 + mac + struct.pack("!H", ETH_P_RARP)
    # htype Ethernet, ptype IPv4, hlen 6, plen 4, op 3 (reverse request), sha, spa, tha, tpa.
    body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 3, mac, b"\0" * 4, mac, b"\0" * 4)
    return (header + body).ljust(60, b"\0")


class NetBackend(Backend):
    """The network device (virtio id 1): TAP, switch port, peer link, loopback or generator."""

    name: ClassVar[str] = "net"
    device_id: ClassVar[int] = 1

    def __init__(
        self,
        ports: Sequence[NetPort],
        *,
        mac: str | bytes = DEFAULT_MAC,
        mtu: int | None = None,
        description: str | None = None,
    ) -> None:
        if not ports:
            raise ValueError("a network device needs at least one queue pair")
        super().__init__(num_queues=2 * len(ports))
        self.ports = list(ports)
        self.mac = parse_mac(mac)
        if mtu is not None and not MIN_MTU <= mtu <= MAX_MTU:
            raise ValueError(f"MTU {mtu} is outside {MIN_MTU}..{MAX_MTU}")
        self.mtu = mtu
        self.description = description or f"{ports[0].kind} port"
        #: The second front-end's server in peer mode (`vvu serve net`), if this side runs it.
        self.companion: CompanionServer | None = None
        #: Servers of further switch ports (`vvu serve net --switch-port`).
        self.extra_servers: list[CompanionServer] = []
        #: Offer checksum and TSO offloads (read at feature negotiation).
        self.offloads = True

    # --- construction ------------------------------------------------------------------------

    @classmethod
    def peers(
        cls,
        *,
        queue_pairs: int = 1,
        mac: str | bytes = DEFAULT_MAC,
        peer_mac: str | bytes = DEFAULT_PEER_MAC,
        mtu: int | None = None,
        buffer_size: int = DEFAULT_PORT_BUFFER,
    ) -> tuple[NetBackend, NetBackend]:
        """Two devices whose queue pair k are linked: what one front-end transmits, the other
        receives. Serve each on its own socket (each serves one front-end at a time)."""
        links = [NetPort.pair(buffer_size=buffer_size) for _ in range(queue_pairs)]
        a = cls([p[0] for p in links], mac=mac, mtu=mtu, description="peer link, side A")
        b = cls([p[1] for p in links], mac=peer_mac, mtu=mtu, description="peer link, side B")
        return a, b

    @classmethod
    def switch(
        cls,
        name: str,
        *,
        queue_pairs: int = 1,
        mac: str | bytes = DEFAULT_MAC,
        mtu: int | None = None,
        buffer_size: int = DEFAULT_PORT_BUFFER,
    ) -> NetBackend:
        """A device that is a new port of this process's learning switch `name`."""
        ports = named_switch(name).attach(queue_pairs=queue_pairs, buffer_size=buffer_size)
        port_id = ports[0].switch_port
        return cls(ports, mac=mac, mtu=mtu, description=f"switch {name} port {port_id}")

    @classmethod
    def tap(
        cls,
        name: str,
        *,
        queue_pairs: int = 1,
        mac: str | bytes = DEFAULT_MAC,
        mtu: int | None = None,
    ) -> NetBackend:
        """A device on TAP interface `name` (created if missing; `%d` numbers it)."""
        multi = queue_pairs > 1
        first = NetPort.tap(name, multi_queue=multi)
        actual = first.name or name
        ports = [first] + [NetPort.tap(actual, multi_queue=True) for _ in range(queue_pairs - 1)]
        return cls(ports, mac=mac, mtu=mtu, description=f"TAP {actual}")

    @classmethod
    def loopback(
        cls,
        *,
        queue_pairs: int = 1,
        mac: str | bytes = DEFAULT_MAC,
        mtu: int | None = None,
        buffer_size: int = DEFAULT_PORT_BUFFER,
    ) -> NetBackend:
        """A device that receives every frame it transmits."""
        ports = [NetPort.loopback(buffer_size=buffer_size) for _ in range(queue_pairs)]
        return cls(ports, mac=mac, mtu=mtu, description="loopback")

    @classmethod
    def generator(
        cls,
        sizes: Sequence[int],
        *,
        queue_pairs: int = 1,
        mac: str | bytes = DEFAULT_MAC,
        src_mac: str | bytes = DEFAULT_PEER_MAC,
        mtu: int | None = None,
    ) -> NetBackend:
        """A device whose receive queues get generated IPv4/UDP frames of `sizes` bytes in turn
        (Ethernet without FCS, 60..65535; at most the MTU plus 14), to `mac` from `src_mac`."""
        if not sizes:
            raise ValueError("a generator needs at least one frame size")
        limit = MAX_FRAME_LEN if mtu is None else mtu + 14
        for size in sizes:
            if not MIN_GENERATED <= size <= MAX_FRAME_LEN:
                raise ValueError(f"a generated frame is 60..=65535 bytes, not {size}")
            if size > limit:
                raise ValueError(f"a {size}-byte frame exceeds the MTU {mtu} (+ 14)")
        dst, src = parse_mac(mac), parse_mac(src_mac)
        ports = [
            NetPort.generator(list(sizes), dst_mac=dst, src_mac=src) for _ in range(queue_pairs)
        ]
        label = ",".join(str(s) for s in sizes)
        return cls(ports, mac=mac, mtu=mtu, description=f"generator of {label}-byte frames")

    # --- command line ------------------------------------------------------------------------

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        mode = parser.add_mutually_exclusive_group()
        mode.add_argument("--tap", metavar="NAME", help="use TAP interface NAME (%%d: numbered)")
        mode.add_argument(
            "--loopback", action="store_true", help="hand every transmitted frame back"
        )
        mode.add_argument(
            "--switch",
            metavar="NAME",
            help="a port of learning switch NAME; --switch-port adds more (front-ends) to it",
        )
        mode.add_argument(
            "--generate",
            metavar="SIZE[,SIZE...]",
            help=(
                "test/benchmark source (as DPDK testpmd txonly on net_vhost): fill the receive "
                "queues with IPv4/UDP frames of these sizes in turn (bytes without FCS, 60..65535; "
                "to --mac from --peer-mac, 198.18.0.1:9 -> 198.18.0.2:9, checksums set, payload "
                "starts with a 64-bit sequence number) as fast as the guest posts buffers; "
                "transmitted frames are counted and discarded"
            ),
        )
        mode.add_argument(
            "--peer-socket-path",
            metavar="PATH",
            help=(
                "peer mode (the default): a second front-end connects here and exchanges frames "
                "with the one on --socket-path (default: SOCKET_PATH.peer)"
            ),
        )
        parser.add_argument(
            "--switch-port",
            action="append",
            default=[],
            metavar="PATH",
            help="with --switch: serve one more port of the switch on PATH (repeatable); "
            "port i gets --mac with i added to its last byte",
        )
        parser.add_argument(
            "--poll-us",
            type=int,
            default=0,
            metavar="N",
            help="run every queue in one busy-polling thread that sleeps on eventfds after N "
            "idle microseconds (0: a thread per queue, woken by eventfds; polling costs one core "
            "while traffic flows)",
        )
        parser.add_argument(
            "--no-offloads",
            action="store_true",
            help="offer no checksum, TSO, UFO or USO offload (guests checksum and segment "
            "themselves)",
        )
        parser.add_argument("--mac", default=DEFAULT_MAC, help=f"MAC address ({DEFAULT_MAC})")
        parser.add_argument(
            "--peer-mac", default=DEFAULT_PEER_MAC, help=f"the peer's MAC ({DEFAULT_PEER_MAC})"
        )
        parser.add_argument("--mtu", type=int, help="advertise this MTU (VIRTIO_NET_F_MTU)")
        parser.add_argument(
            "--num-queue-pairs", type=int, default=1, metavar="N", help="queue pairs (1)"
        )
        parser.add_argument(
            "--port-buffer",
            type=int,
            default=DEFAULT_PORT_BUFFER // 1024,
            metavar="KiB",
            help="peer/loopback: bytes queued per direction before frames drop (1024)",
        )

    @classmethod
    def from_arguments(cls, args: argparse.Namespace) -> NetBackend:
        pairs: int = args.num_queue_pairs
        if pairs < 1:
            raise ValueError("--num-queue-pairs must be at least 1")
        buffer_size = args.port_buffer * 1024
        poll_us: int = args.poll_us
        if not 0 <= poll_us <= 1_000_000:
            raise ValueError("--poll-us must be 0..1000000")
        extra: list[str] = args.switch_port
        if extra and not args.switch:
            raise ValueError("--switch-port needs --switch")
        backend = cls._from_mode(args, pairs, buffer_size)
        offloads = not args.no_offloads
        backend.set_busy_poll(poll_us)
        backend.offloads = offloads
        if backend.companion is not None and isinstance(backend.companion.backend, NetBackend):
            # Before a front-end connects: workers start with the budget.
            backend.companion.backend.set_busy_poll(poll_us)
            backend.companion.backend.offloads = offloads
        mode = int(getattr(args, "socket_mode", "600"), 8)
        mac = parse_mac(args.mac)
        for i, path in enumerate(extra, start=1):
            port_mac = mac[:5] + bytes([(mac[5] + i) & 0xFF])
            other = cls.switch(
                args.switch, queue_pairs=pairs, mac=port_mac, mtu=args.mtu, buffer_size=buffer_size
            )
            other.set_busy_poll(poll_us)
            other.offloads = offloads
            backend.extra_servers.append(CompanionServer(other, path, mode=mode))
        return backend

    @classmethod
    def _from_mode(cls, args: argparse.Namespace, pairs: int, buffer_size: int) -> NetBackend:
        if args.tap:
            return cls.tap(args.tap, queue_pairs=pairs, mac=args.mac, mtu=args.mtu)
        if args.loopback:
            return cls.loopback(
                queue_pairs=pairs, mac=args.mac, mtu=args.mtu, buffer_size=buffer_size
            )
        if args.generate:
            try:
                sizes = [int(s) for s in args.generate.split(",")]
            except ValueError:
                raise ValueError(
                    f"--generate takes sizes like 64,1500, not {args.generate!r}"
                ) from None
            return cls.generator(
                sizes, queue_pairs=pairs, mac=args.mac, src_mac=args.peer_mac, mtu=args.mtu
            )
        if args.switch:
            return cls.switch(
                args.switch, queue_pairs=pairs, mac=args.mac, mtu=args.mtu, buffer_size=buffer_size
            )
        peer_path: str | None = args.peer_socket_path
        if peer_path is None:
            if getattr(args, "socket_path", None) is None:
                raise ValueError(
                    "peer mode without --socket-path (--fd, socket activation) needs "
                    "--peer-socket-path"
                )
            peer_path = f"{args.socket_path}.peer"
        a, b = cls.peers(
            queue_pairs=pairs,
            mac=args.mac,
            peer_mac=args.peer_mac,
            mtu=args.mtu,
            buffer_size=buffer_size,
        )
        mode = int(getattr(args, "socket_mode", "600"), 8)
        a.companion = CompanionServer(b, peer_path, mode=mode)
        a.description = f"peer link (peer front-end on {peer_path})"
        return a

    # --- features and config space -----------------------------------------------------------

    @property
    def queue_pairs(self) -> int:
        return len(self.ports)

    def device_features(self) -> int:
        bits = [NetFeature.MAC, NetFeature.STATUS, NetFeature.MRG_RXBUF]
        if self.offloads:
            bits += OFFLOAD_FEATURES
            if not all(port.takes_uso for port in self.ports):
                bits.remove(NetFeature.HOST_USO)  # a TAP of a kernel before 6.2
        if self.mtu is not None:
            bits.append(NetFeature.MTU)
        if self.queue_pairs > 1:
            bits.append(NetFeature.MQ)
        return sum(1 << b for b in bits)

    def protocol_features(self) -> int:
        return super().protocol_features() | ProtocolFeature.RARP.mask | ProtocolFeature.MTU.mask

    def queue_num(self) -> int:
        return self.queue_pairs

    def config_space(self) -> bytes:
        # struct virtio_net_config up to mtu: mac[6], status, max_virtqueue_pairs, mtu (le16).
        return struct.pack("<6sHHH", self.mac, LINK_UP, self.queue_pairs, self.mtu or 0)

    def write_config(self, offset: int, data: bytes) -> None:
        # Legacy drivers may write the MAC (without VIRTIO_NET_F_CTRL_MAC_ADDR); nothing else.
        if offset + len(data) <= 6:
            mac = bytearray(self.mac)
            mac[offset : offset + len(data)] = data
            self.mac = bytes(mac)
            return
        raise ConfigError(f"only the MAC is writable (write of {len(data)} bytes at {offset})")

    # --- data path ---------------------------------------------------------------------------

    def _header_features(self) -> tuple[bool, bool]:
        acked = self.acked_features
        return bool(acked & (1 << NetFeature.MRG_RXBUF)), bool(acked & VirtioFeature.VERSION_1.mask)

    def native_worker(self, queue_index: int) -> NativeHandler:
        pair, is_tx = divmod(queue_index, 2)
        port = self.ports[pair]
        # The guest must not send more than the MTU it was told (plus Ethernet and VLAN header).
        port.max_frame = MAX_FRAME_LEN if self.mtu is None else self.mtu + ETH_VLAN_HLEN
        mrg_rxbuf, version_1 = self._header_features()
        acked = self.acked_features
        if is_tx:
            return port.tx_handler(mrg_rxbuf=mrg_rxbuf, version_1=version_1, features=acked)
        return port.rx_handler(mrg_rxbuf=mrg_rxbuf, version_1=version_1, features=acked)

    def set_busy_poll(self, microseconds: int) -> None:
        """Busy-poll this long on the queue workers started from now on (0: never)."""
        for port in self.ports:
            port.busy_poll = microseconds / 1e6

    def disabled_worker(self, queue_index: int) -> NativeHandler | None:
        # A disabled transmit queue's frames are taken and dropped; a disabled receive queue
        # gets none (they wait in the port).
        return NativeHandler.discard() if queue_index % 2 else None

    def stats(self) -> dict[str, int]:
        """Counters summed over the queue pairs."""
        total: dict[str, int] = {}
        for port in self.ports:
            for key, value in port.stats.items():
                total[key] = total.get(key, 0) + value
        return total

    # --- device requests ---------------------------------------------------------------------

    def net_set_mtu(self, mtu: int) -> None:
        """VHOST_USER_NET_SET_MTU: the front-end's MTU; ValueError if out of range."""
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise ValueError(f"MTU {mtu} is outside {MIN_MTU}..{MAX_MTU}")
        self.mtu = mtu

    def send_rarp(self, mac: bytes) -> None:
        """VHOST_USER_SEND_RARP: announce `mac` (the first 6 bytes of the payload) on the port,
        as if the guest had, so that switches learn where it moved."""
        if not self.ports[0].send(rarp_frame(parse_mac(mac[:6]))):
            log.warning("RARP for %s dropped: the port is full", format_mac(mac[:6]))

    # --- life cycle --------------------------------------------------------------------------

    def reset(self) -> None:
        super().reset()
        # Frames that were waiting for the guest that went away are not for the next one.
        for port in self.ports:
            with contextlib.suppress(OSError):
                port.drain()

    def describe(self) -> str:
        mtu = f", MTU {self.mtu}" if self.mtu is not None else ""
        return (
            f"net: {self.description}, MAC {format_mac(self.mac)}{mtu}, "
            f"{self.queue_pairs} queue pair(s)"
        )

    def close(self) -> None:
        if self.companion is not None:
            self.companion.close()
            self.companion = None
        for server in self.extra_servers:
            server.close()
        self.extra_servers.clear()


class CompanionServer:
    """Serves a second back-end on its own socket, from a helper thread with its own event loop.

    `vvu serve` runs one engine on one socket; peer mode needs a second socket in the same
    process. The two engines share nothing but their ports (kernel sockets), so each can keep
    its own loop. Stopped by `close()`, which also runs at interpreter exit.
    """

    def __init__(self, backend: Backend, path: str, *, mode: int = 0o600) -> None:
        self.backend: Backend = backend
        self.path = path
        self._mode = mode
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="vvu-peer-serve", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        atexit.register(self.close)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as err:  # reported to the constructor if it is still waiting
            if not self._ready.is_set():
                self._error = err
                self._ready.set()
            else:
                log.error("peer server on %s failed: %s", self.path, err)

    async def _serve(self) -> None:
        # Late import: the engine imports the back-end API, whose package imports this module.
        from vvu.engine import BackendEngine  # noqa: PLC0415

        listener = UnixListener(self.path, mode=self._mode)
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        engine = BackendEngine(self.backend)
        server = asyncio.ensure_future(engine.serve_forever(listener))
        stopper = asyncio.ensure_future(self._stop.wait())
        self._ready.set()
        try:
            await asyncio.wait({server, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            server.cancel()
            stopper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await server
            listener.close()

    def close(self) -> None:
        """Stop serving (the session in progress is torn down) and remove the socket."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop already closed
                loop.call_soon_threadsafe(stop.set)
            self._thread.join(timeout=10)
        atexit.unregister(self.close)
