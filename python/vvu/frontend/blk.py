"""A virtio-blk driver on top of the scriptable front-end: read, write, flush, discard, ..."""

from __future__ import annotations

import asyncio
import struct
from typing import Final

from vvu.errors import VvuError
from vvu.frontend.core import Frontend, FrontendQueue, Iommu
from vvu.protocol import IotlbPerm, ProtocolFeature

__all__ = ["BlkDriver", "BlkIOError"]

SECTOR: Final = 512
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
_STATUS_NAMES = {S_IOERR: "IOERR", S_UNSUPP: "UNSUPP"}
MiB = 1 << 20


class BlkIOError(VvuError):
    """The device completed a request with a non-OK status."""

    def __init__(self, what: str, status: int) -> None:
        super().__init__(f"{what}: device status {_STATUS_NAMES.get(status, status)}")
        self.status = status


class _Slot:
    """Guest memory for one request in flight: header, data buffer, status byte; and the
    addresses the device uses for them (IOVAs under an IOMMU, with the device's access)."""

    def __init__(self, frontend: Frontend, max_data: int) -> None:
        self.header = frontend.allocator.alloc(16, 16)
        self.status = frontend.allocator.alloc(1, 1)
        self.data = frontend.allocator.alloc(max_data, 4096)
        self.header_dma = frontend.dma(self.header, 16, IotlbPerm.RO)
        self.status_dma = frontend.dma(self.status, 1, IotlbPerm.WO)
        self.data_dma = frontend.dma(self.data, max_data, IotlbPerm.RW)


class BlkDriver:
    """Block I/O through one virtqueue with up to `depth` requests in flight."""

    def __init__(
        self,
        frontend: Frontend,
        queue: FrontendQueue,
        capacity: int,
        *,
        depth: int = 32,
        max_request: int = MiB,
    ) -> None:
        if depth > queue.size // 3:
            raise ValueError(
                f"depth {depth} needs {3 * depth} descriptors; the ring has {queue.size}"
            )
        self.frontend = frontend
        self.queue = queue
        self.capacity = capacity  # in 512-byte sectors
        self.max_request = max_request
        self._free: asyncio.Queue[_Slot] = asyncio.Queue()
        #: Set each time a resize announced by the back-end has been read into `capacity`.
        self.resized = asyncio.Event()
        self._config_tasks: set[asyncio.Task[None]] = set()
        for _ in range(depth):
            self._free.put_nowait(_Slot(frontend, max_request))

    @classmethod
    async def open(
        cls,
        path: str,
        *,
        depth: int = 32,
        max_request: int = MiB,
        queue_size: int = 256,
        timeout: float = 5.0,
        backend_channel: bool = False,
        inband: bool = False,
        packed: bool = False,
        iommu: Iommu | None = None,
        memory_path: str | None = None,
    ) -> BlkDriver:
        """Connect to a vhost-user-blk back-end listening on `path`; see `start`. `packed`:
        use a packed ring (the back-end must offer VIRTIO_F_RING_PACKED); `iommu`: the device
        reaches every buffer through IOTLB translations; `memory_path`: guest memory in that
        file (see `Frontend`)."""
        memory = 2 * MiB + depth * (max_request + 8192)
        frontend = await Frontend.connect(
            path,
            memory_size=memory,
            timeout=timeout,
            packed=packed,
            iommu=iommu,
            memory_path=memory_path,
        )
        return await cls.start(
            frontend,
            depth=depth,
            max_request=max_request,
            queue_size=queue_size,
            backend_channel=backend_channel,
            inband=inband,
        )

    @classmethod
    async def start(
        cls,
        frontend: Frontend,
        *,
        depth: int = 32,
        max_request: int = MiB,
        queue_size: int = 256,
        backend_channel: bool = False,
        inband: bool = False,
    ) -> BlkDriver:
        """Set up a connected front-end (closed on failure): handshake, memory, queue 0. With
        `backend_channel`, the back-end gets a channel (BACKEND_REQ) and a resize it announces
        there updates `capacity` (and sets `resized`). With `inband`, kicks and calls are
        messages (INBAND_NOTIFICATIONS, when the back-end offers it; implies the channel)."""
        try:
            await frontend.negotiate(backend_channel=backend_channel, inband=inband)
            await frontend.set_mem_table()
            capacity = 0
            if frontend.protocol_features & ProtocolFeature.CONFIG.mask:
                capacity = await cls._read_capacity(frontend)
            await frontend.setup_inflight(1, queue_size)
            queue = await frontend.start_queue(0, queue_size)
            driver = cls(frontend, queue, capacity, depth=depth, max_request=max_request)
        except BaseException:
            await frontend.close()
            raise
        frontend.config_listeners.append(driver._on_config_change)
        return driver

    @staticmethod
    async def _read_capacity(frontend: Frontend) -> int:
        (capacity,) = struct.unpack("<Q", await frontend.get_config(0, 8))
        return int(capacity)

    def _on_config_change(self) -> None:
        # Re-read from a task: the back-end-channel reader must not wait on the main socket.
        task = asyncio.ensure_future(self._reread_capacity())
        self._config_tasks.add(task)
        task.add_done_callback(self._config_tasks.discard)

    async def _reread_capacity(self) -> None:
        self.capacity = await self._read_capacity(self.frontend)
        self.resized.set()

    async def close(self) -> None:
        for task in list(self._config_tasks):
            task.cancel()
        await self.frontend.close()

    async def reconnect(self, *, timeout: float = 5.0) -> None:
        """Reattach to a restarted back-end; requests in flight complete (see
        `Frontend.reconnect`)."""
        await self.frontend.reconnect(timeout=timeout)

    async def __aenter__(self) -> BlkDriver:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _submit(
        self, kind: int, sector: int, out: bytes = b"", in_len: int = 0, what: str = ""
    ) -> bytes:
        if max(len(out), in_len) > self.max_request:
            raise ValueError(f"request of {max(len(out), in_len)} bytes > {self.max_request}")
        slot = await self._free.get()
        memory = self.frontend.memory
        try:
            memory.write(slot.header, struct.pack("<IIQ", kind, 0, sector))
            memory.write(slot.status, b"\xff")
            readable = [(slot.header_dma, 16)]
            writable = []
            if out:
                memory.write(slot.data, out)
                readable.append((slot.data_dma, len(out)))
            if in_len:
                writable.append((slot.data_dma, in_len))
            writable.append((slot.status_dma, 1))
            await self.queue.request(readable, writable)
            status = memory.read(slot.status, 1)[0]
            if status != S_OK:
                raise BlkIOError(what or f"request type {kind} at sector {sector}", status)
            return memory.read(slot.data, in_len) if in_len else b""
        finally:
            self._free.put_nowait(slot)

    async def read(self, sector: int, length: int) -> bytes:
        """Read `length` bytes (a multiple of 512) starting at `sector`."""
        return await self._submit(T_IN, sector, in_len=length, what=f"read at sector {sector}")

    async def write(self, sector: int, data: bytes) -> None:
        """Write `data` (a multiple of 512 bytes) starting at `sector`."""
        await self._submit(T_OUT, sector, out=data, what=f"write at sector {sector}")

    async def flush(self) -> None:
        await self._submit(T_FLUSH, 0, what="flush")

    async def get_id(self) -> bytes:
        """The device's serial number (up to 20 bytes, NUL padding removed)."""
        return (await self._submit(T_GET_ID, 0, in_len=20, what="get-id")).rstrip(b"\0")

    async def discard(self, sector: int, sectors: int) -> None:
        segment = struct.pack("<QII", sector, sectors, 0)
        await self._submit(T_DISCARD, 0, out=segment, what=f"discard at sector {sector}")

    async def write_zeroes(self, sector: int, sectors: int, *, unmap: bool = False) -> None:
        segment = struct.pack("<QII", sector, sectors, int(unmap))
        await self._submit(T_WRITE_ZEROES, 0, out=segment, what=f"write-zeroes at {sector}")
