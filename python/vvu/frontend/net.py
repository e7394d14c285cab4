"""A virtio-net driver on top of the scriptable front-end: send and receive Ethernet frames.

One queue pair (receiveq1 = queue 0 and transmitq1 = queue 1, or pair k: queues 2k, 2k + 1),
no offloads. Receive buffers are
posted up front and re-posted as frames are taken; with VIRTIO_NET_F_MRG_RXBUF a frame may span
several of them (`num_buffers` in the first header says how many used entries belong to it).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections import deque

from vvu.errors import VvuError
from vvu.frontend.core import Frontend, FrontendQueue
from vvu.protocol import ProtocolFeature, VirtioFeature

__all__ = ["NetDriver", "NetDriverError"]

MRG_RXBUF = 1 << 15
#: Checksum, segmentation and receive-coalescing offloads (bits 0-2, 7-14, and the USO bits
#: 54-56): this driver does none of them, so it never acks them (frames come whole and
#: checksummed, and go out so).
OFFLOADS = 0b111 | sum(1 << bit for bit in (*range(7, 15), 54, 55, 56))
MQ = 1 << 22
FEATURE_MAC = 1 << 5
MAX_FRAME = 65535
ETH_HLEN = 14
MiB = 1 << 20


class NetDriverError(VvuError):
    """The device completed a receive buffer in a way the driver cannot use."""


class NetDriver:
    """Frames through one virtio-net queue pair of a vhost-user back-end."""

    def __init__(
        self,
        frontend: Frontend,
        rx: FrontendQueue,
        tx: FrontendQueue,
        *,
        rx_buffers: int,
        buffer_size: int,
        tx_slots: int,
    ) -> None:
        self.frontend = frontend
        self.rx = rx
        self.tx = tx
        self.mrg_rxbuf = bool(frontend.features & MRG_RXBUF)
        version_1 = bool(frontend.features & VirtioFeature.VERSION_1.mask)
        self.header_len = 12 if self.mrg_rxbuf or version_1 else 10
        self.buffer_size = buffer_size
        self.mac: bytes | None = None
        memory = frontend.memory
        self._memory = memory
        self._rx_gpa: dict[int, int] = {}  # head in flight → buffer address
        # Used buffers not taken yet, as (address, length): the driver frees a head when it
        # reaps it, and a re-posted buffer may get that head again at once.
        self._used: deque[tuple[int, int]] = deque()
        self._error: NetDriverError | None = None
        self._arrived = asyncio.Event()
        self._tx_free: asyncio.Queue[int] = asyncio.Queue()
        for _ in range(tx_slots):
            self._tx_free.put_nowait(frontend.allocator.alloc(self.header_len + MAX_FRAME, 64))
        asyncio.get_running_loop().add_reader(rx.call.fileno(), self._reap_rx)
        self._reader = True
        for _ in range(rx_buffers):
            self._post(frontend.allocator.alloc(buffer_size, 64))
        self.rx.notify()

    @classmethod
    async def open(
        cls,
        path: str,
        *,
        mrg_rxbuf: bool = True,
        version_1: bool = True,
        event_idx: bool = True,
        rx_buffers: int = 64,
        buffer_size: int | None = None,
        tx_slots: int = 8,
        queue_size: int = 256,
        pair: int = 0,
        timeout: float = 5.0,
        inband: bool = False,
        packed: bool = False,
        memory_path: str | None = None,
    ) -> NetDriver:
        """Connect to a vhost-user-net back-end, negotiate and start queue pair `pair` (0:
        receiveq1 and transmitq1; others need VIRTIO_NET_F_MQ). Only that pair runs. `inband`:
        kicks and calls as messages (INBAND_NOTIFICATIONS, when the back-end offers it).
        `memory_path`: guest memory in that file (see `Frontend`).

        `buffer_size` defaults to 2048 with MRG_RXBUF and to a whole maximum frame without it.
        """
        features_off = OFFLOADS | (0 if mrg_rxbuf else MRG_RXBUF)
        if not version_1:
            features_off |= VirtioFeature.VERSION_1.mask
        if not event_idx:
            features_off |= VirtioFeature.EVENT_IDX.mask
        header = 12 if mrg_rxbuf or version_1 else 10
        size = buffer_size or (2048 if mrg_rxbuf else header + MAX_FRAME)
        memory = 2 * MiB + rx_buffers * (size + 64) + tx_slots * (header + MAX_FRAME + 64)
        frontend = await Frontend.connect(
            path, memory_size=memory, timeout=timeout, packed=packed, memory_path=memory_path
        )
        try:
            await frontend.negotiate(features=~features_off & ((1 << 64) - 1), inband=inband)
            if version_1 and not frontend.features & VirtioFeature.VERSION_1.mask:
                raise NetDriverError("the back-end does not offer VIRTIO_F_VERSION_1")
            if pair and not frontend.features & MQ:
                raise NetDriverError(f"queue pair {pair} needs VIRTIO_NET_F_MQ")
            # For net, GET_QUEUE_NUM counts queue pairs (QEMU's and DPDK's reading).
            if pair and pair >= frontend.num_queues:
                raise NetDriverError(
                    f"the back-end has {frontend.num_queues} queue pair(s), no pair {pair}"
                )
            await frontend.set_mem_table()
            rx = await frontend.start_queue(2 * pair, queue_size)
            tx = await frontend.start_queue(2 * pair + 1, queue_size)
            driver = cls(
                frontend, rx, tx, rx_buffers=rx_buffers, buffer_size=size, tx_slots=tx_slots
            )
            if (
                frontend.features & FEATURE_MAC
                and frontend.protocol_features & ProtocolFeature.CONFIG.mask
            ):
                driver.mac = await frontend.get_config(0, 6)
            return driver
        except BaseException:
            await frontend.close()
            raise

    # --- receive -----------------------------------------------------------------------------

    def _post(self, gpa: int) -> None:
        head = self.rx.submit([], [(gpa, self.buffer_size)])
        self._rx_gpa[head] = gpa

    def _reap_rx(self) -> None:
        self.rx.call.consume()
        driver = self.rx.driver
        while True:
            for head, length in driver.reap_all():
                gpa = self._rx_gpa.pop(head, None)
                if gpa is None:
                    self._error = NetDriverError(f"used entry for unknown receive head {head}")
                    continue
                self._used.append((gpa, length))
            # Re-arm, then look once more so an entry racing with the re-arm is not lost.
            if not driver.enable_call_notifications():
                break
        if self._used or self._error is not None:
            self._arrived.set()

    async def _next_used(self) -> tuple[int, int]:
        while not self._used:
            if self._error is not None:
                raise self._error
            self._arrived.clear()
            await self._arrived.wait()
        return self._used.popleft()

    def _take(self, gpa: int, length: int, done: list[int]) -> bytes:
        """The bytes of a used buffer; its address goes to `done` for re-posting."""
        done.append(gpa)
        if length > self.buffer_size:
            raise NetDriverError(f"used length {length} exceeds the {self.buffer_size}-byte buffer")
        return self._memory.read(gpa, length)

    async def recv(self, timeout: float | None = None) -> bytes:
        """The next frame (without its virtio-net header); TimeoutError after `timeout` s."""
        done: list[int] = []
        try:
            async with asyncio.timeout(timeout):
                gpa, length = await self._next_used()
                first = self._take(gpa, length, done)
                if len(first) < self.header_len:
                    raise NetDriverError(f"receive buffer of {len(first)} bytes holds no header")
                num_buffers = 1
                if self.header_len == 12:
                    (num_buffers,) = struct.unpack_from("<H", first, 10)
                if num_buffers < 1 or (num_buffers > 1 and not self.mrg_rxbuf):
                    raise NetDriverError(f"num_buffers {num_buffers} is invalid")
                parts = [first[self.header_len :]]
                for _ in range(num_buffers - 1):
                    gpa, length = await self._next_used()
                    parts.append(self._take(gpa, length, done))
        finally:
            for gpa in done:
                self._post(gpa)
            self.rx.notify()
        return b"".join(parts)

    # --- transmit ----------------------------------------------------------------------------

    async def send(self, frame: bytes) -> None:
        """Transmit one frame (14..65535 bytes) and wait until the device took it."""
        if not ETH_HLEN <= len(frame) <= MAX_FRAME:
            raise ValueError(f"a frame is {ETH_HLEN}..{MAX_FRAME} bytes, not {len(frame)}")
        gpa = await self._tx_free.get()
        try:
            self._memory.write(gpa, bytes(self.header_len) + frame)
            await self.tx.request([(gpa, self.header_len + len(frame))], [])
        finally:
            self._tx_free.put_nowait(gpa)

    async def send_all(self, frames: list[bytes]) -> None:
        """Transmit frames concurrently (up to the number of transmit slots in flight)."""
        await asyncio.gather(*(self.send(f) for f in frames))

    async def close(self) -> None:
        if self._reader:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.rx.call.fileno())
            self._reader = False
        await self.frontend.close()
