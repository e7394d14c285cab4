"""A vfio-user client on asyncio: what our userspace virtio-pci driver sits on (via
`vvu.vfio_user.access`).

`VfioUserClient.connect(path)` negotiates VERSION and returns a client whose methods each send one
command (or a few: transfers are split at the server's `max_data_xfer_size`, eventfds at its
`max_msg_fds`) and await the reply; an error reply raises `VfioUserError` with the server's errno.
Commands may be issued concurrently (the server answers in order; replies are matched by id).
A reader task also serves the server's DMA_READ/DMA_WRITE for windows mapped without sharing the
fd, from the client's own mapping of its DMA memory (`client.memory`).

Fds: those the client receives (region fds, ioeventfds) are handed to the caller, who owns them;
those the caller passes in (`dma_map`'s fd, `set_irqs`'s eventfds) stay the caller's.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from vvu._core import EventFd, GuestMemory
from vvu.errors import GuestMemoryError
from vvu.transport.base import TransportError, close_fds
from vvu.vfio_user.connection import Frame, FramingError, VfioUserConnection, connect_unix
from vvu.vfio_user.protocol import (
    HEADER_SIZE,
    REGION_INFO_SIZE,
    Capabilities,
    Command,
    DeviceInfo,
    DmaAccess,
    DmaMap,
    DmaMapFlag,
    DmaUnmap,
    DmaUnmapFlag,
    Header,
    IoeventfdFlag,
    IoFdsReply,
    IoFdsRequest,
    IrqInfo,
    IrqSet,
    IrqSetFlag,
    PayloadError,
    RegionAccess,
    RegionFlag,
    RegionIndex,
    RegionInfo,
    SparseMmapCap,
    SparseMmapFdsCap,
    Version,
    VfioUserError,
    WriteMulti,
    command_name,
    encode,
    encode_error,
    split_chunks,
)

__all__ = ["ClientOptions", "IoRegionFd", "MappableArea", "Region", "VfioUserClient"]

log = logging.getLogger(__name__)

MAX_REGION_INFO: Final = 64 * 1024  # the most reply room we offer for one region's caps
INITIAL_REGION_INFO: Final = REGION_INFO_SIZE + 480


@dataclass(frozen=True, slots=True)
class ClientOptions:
    """What the client proposes in VERSION (and so accepts from the server)."""

    max_msg_fds: int = 16
    max_data_xfer_size: int = 1 << 20
    sparse_mmap_fds: bool = True  # unmerged per-area-fds extension, see docs/vfio-user.md
    write_multiple: bool = False
    minor: int = 1
    #: Ask for GET_REGION_IO_FDS (ioeventfds). False: a client that never does, like QEMU 11's
    #: vfio-user-pci, so every doorbell is a REGION_WRITE.
    io_fds: bool = True


@dataclass(frozen=True, slots=True)
class Region:
    """A region as the server describes it (DEVICE_GET_REGION_INFO)."""

    index: int
    flags: RegionFlag
    size: int
    offset: int
    info: RegionInfo

    @property
    def readable(self) -> bool:
        return bool(self.flags & RegionFlag.READ)

    @property
    def writable(self) -> bool:
        return bool(self.flags & RegionFlag.WRITE)

    @property
    def mappable(self) -> bool:
        return bool(self.flags & RegionFlag.MMAP)


@dataclass(slots=True)
class MappableArea:
    """`size` bytes at region offset `offset`, mapped from `fd` at `fd_offset`: hand it to
    `GuestMemory.add_region(fd, base + offset, size, mmap_offset=fd_offset)`. The caller owns
    `fd` (close it, or `close()`)."""

    offset: int
    size: int
    fd: int
    fd_offset: int

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


@dataclass(slots=True)
class IoRegionFd:
    """A sub-range of a region backed by an eventfd (GET_REGION_IO_FDS): a write there may
    signal `eventfd` instead of sending REGION_WRITE. `size` 0 = any width; `datamatch` None =
    any value. The caller owns `eventfd`."""

    offset: int
    size: int
    eventfd: EventFd
    datamatch: int | None = None
    flags: int = 0

    def matches(self, offset: int, data: bytes) -> bool:
        if offset != self.offset or (self.size and len(data) != self.size):
            return False
        return self.datamatch is None or int.from_bytes(data, "little") == self.datamatch


@dataclass(slots=True)
class _Window:
    iova: int
    size: int
    flags: DmaMapFlag
    shared: bool


@dataclass(slots=True)
class _Pending:
    command: int
    future: asyncio.Future[Frame] = field(repr=False)
    #: The caller stopped waiting (cancelled): its reply is still due and is discarded.
    abandoned: bool = False


class VfioUserClient:
    """One connection to a vfio-user server. Build it with `connect()`."""

    def __init__(self, sock: socket.socket, peer: str, options: ClientOptions) -> None:
        self.options = options
        room = max(options.max_data_xfer_size, MAX_REGION_INFO)
        self._conn = VfioUserConnection(sock, peer, max_message_size=HEADER_SIZE + 16 + room)
        self._pending: dict[int, _Pending] = {}
        self._next_id = 0
        self._reader: asyncio.Task[None] | None = None
        self._broken: BaseException | None = None
        self.version: tuple[int, int] = (0, 0)
        self.server_caps = Capabilities()
        self.memory = GuestMemory()  # the client's own view of its DMA windows, by IOVA
        self._windows: list[_Window] = []

    # -- setup ---------------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls, path: str, *, timeout: float = 0.0, options: ClientOptions | None = None
    ) -> VfioUserClient:
        """Connect to the server at `path` (retrying up to `timeout` s) and negotiate VERSION."""
        sock = await connect_unix(path, timeout=timeout)
        return await cls.from_socket(sock, peer=path, options=options)

    @classmethod
    async def from_socket(
        cls, sock: socket.socket, *, peer: str = "server", options: ClientOptions | None = None
    ) -> VfioUserClient:
        client = cls(sock, peer, options or ClientOptions())
        client._reader = asyncio.get_running_loop().create_task(client._read_loop())
        try:
            await client._negotiate()
        except BaseException:
            await client.close()
            raise
        return client

    async def _negotiate(self) -> None:
        opts = self.options
        caps = Capabilities(
            max_msg_fds=opts.max_msg_fds,
            max_data_xfer_size=opts.max_data_xfer_size,
            pgsizes=4096,
            write_multiple=True if opts.write_multiple else None,
            sparse_mmap_fds=True if opts.sparse_mmap_fds else None,
        )
        frame = await self.request(Command.VERSION, Version(0, opts.minor, caps).pack())
        try:
            reply = Version.unpack(frame.payload)
        except PayloadError as err:
            raise VfioUserError(errno.EPROTO, f"bad VERSION reply: {err}") from err
        if reply.major != 0 or reply.minor > opts.minor:
            raise VfioUserError(
                errno.EPROTO, f"server answered version {reply.major}.{reply.minor}"
            )
        theirs = reply.capabilities or Capabilities()
        if theirs.twin_socket is not None and theirs.twin_socket.supported:
            raise VfioUserError(errno.EPROTO, "server enabled twin-socket mode we did not offer")
        # A member the server leaves out was not accepted: keep the spec default for it.
        self.server_caps = Capabilities(
            max_msg_fds=theirs.max_msg_fds,
            max_data_xfer_size=theirs.max_data_xfer_size,
            max_dma_maps=theirs.max_dma_maps,
            pgsizes=theirs.pgsizes,
            write_multiple=bool(theirs.write_multiple and opts.write_multiple),
            sparse_mmap_fds=bool(theirs.sparse_mmap_fds and opts.sparse_mmap_fds),
        )
        self.version = (reply.major, reply.minor)

    async def close(self) -> None:
        """Close the connection (the server then drops our DMA windows and irq eventfds)."""
        self._conn.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
            self._reader = None
        self._fail_pending(TransportError(f"{self._conn.peer}: connection closed"))
        for window in list(self._windows):
            with contextlib.suppress(GuestMemoryError):
                self.memory.remove_region(window.iova)
        self._windows.clear()

    async def __aenter__(self) -> VfioUserClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        return self._conn.closed or self._broken is not None

    # -- the message engine --------------------------------------------------------------------

    def _fail_pending(self, err: BaseException) -> None:
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(err)
        self._pending.clear()

    async def _read_loop(self) -> None:
        try:
            while True:
                frame = await self._conn.recv()
                if frame is None:
                    raise TransportError(f"{self._conn.peer}: server closed the connection")
                if frame.header.is_reply:
                    self._route(frame)
                else:
                    await self._serve(frame)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            self._broken = err
            if not self._conn.closed:
                log.warning("%s: connection lost: %s", self._conn.peer, err)
            self._fail_pending(err if isinstance(err, TransportError) else TransportError(str(err)))

    def _route(self, frame: Frame) -> None:
        pending = self._pending.pop(frame.header.id, None)
        if pending is not None and pending.abandoned:
            frame.close_fds()  # the reply to a request whose caller was cancelled
            return
        if pending is None or pending.future.done():
            frame.close_fds()
            raise FramingError(f"reply id {frame.header.id} answers nothing we sent")
        if frame.header.command != pending.command:
            frame.close_fds()
            pending.future.set_exception(
                FramingError(
                    f"reply to {command_name(pending.command)} says "
                    f"{command_name(frame.header.command)}"
                )
            )
            return
        pending.future.set_result(frame)

    async def _serve(self, frame: Frame) -> None:
        """The server's own commands: DMA_READ / DMA_WRITE on our windows."""
        hdr = frame.header
        frame.close_fds()
        try:
            if hdr.command == Command.DMA_READ:
                req = DmaAccess.unpack(frame.payload, with_data=False)
                self._check_dma(req.address, req.count, DmaMapFlag.READ)
                data = self.memory.read(req.address, req.count)
                payload = DmaAccess(req.address, req.count, data).pack()
            elif hdr.command == Command.DMA_WRITE:
                req = DmaAccess.unpack(frame.payload, with_data=True)
                self._check_dma(req.address, req.count, DmaMapFlag.WRITE)
                self.memory.write(req.address, req.data)
                payload = DmaAccess(req.address, req.count).pack()
            else:
                raise VfioUserError(errno.ENOTSUP, "not a server → client command")
        except (VfioUserError, PayloadError, GuestMemoryError) as err:
            code = getattr(err, "errno", errno.EFAULT)
            log.warning(
                "%s: server's %s refused: %s", self._conn.peer, command_name(hdr.command), err
            )
            if not hdr.no_reply:
                await self._conn.send(encode_error(hdr.id, hdr.command, code))
            return
        if not hdr.no_reply:
            await self._conn.send(encode(hdr.id, hdr.command, payload, reply=True))

    def _check_dma(self, address: int, count: int, need: DmaMapFlag) -> None:
        if count > self.options.max_data_xfer_size:
            raise VfioUserError(errno.E2BIG, f"{count} bytes is over our max_data_xfer_size")
        for w in self._windows:
            if w.iova <= address and address + count <= w.iova + w.size:
                if not w.flags & need:
                    raise VfioUserError(errno.EPERM, f"window {w.iova:#x} is not {need!r}")
                return
        raise VfioUserError(errno.EFAULT, f"{address:#x}+{count} is in no DMA window")

    async def request(
        self,
        command: int,
        payload: bytes = b"",
        fds: Sequence[int] = (),
        *,
        no_reply: bool = False,
    ) -> Frame:
        """Send one command and await its reply (raising VfioUserError on an error reply).

        The returned frame's fds belong to the caller. With `no_reply` the command is posted
        and an empty frame is returned at once."""
        if self._broken is not None:
            raise TransportError(f"{self._conn.peer}: connection is broken: {self._broken}")
        msg_id = self._next_id
        while msg_id in self._pending:
            msg_id = (msg_id + 1) & 0xFFFF
        self._next_id = (msg_id + 1) & 0xFFFF
        data = encode(msg_id, command, payload, no_reply=no_reply)
        if no_reply:
            await self._conn.send(data, fds)
            return Frame(Header(msg_id, command, HEADER_SIZE), b"")
        fut: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = _Pending(command, fut)
        try:
            await self._conn.send(data, fds)
            frame = await fut
        except asyncio.CancelledError:
            # The request may be on the wire already: keep its id, so that its reply is
            # recognised and dropped instead of breaking the connection as a stray.
            pending = self._pending.get(msg_id)
            if pending is not None:
                pending.abandoned = True
            raise
        except BaseException:
            self._pending.pop(msg_id, None)
            raise
        else:
            self._pending.pop(msg_id, None)
        if frame.header.is_error:
            frame.close_fds()
            raise VfioUserError(frame.header.error or errno.EIO, command=command)
        return frame

    # -- device, regions, interrupts -----------------------------------------------------------

    async def device_info(self) -> DeviceInfo:
        frame = await self.request(Command.DEVICE_GET_INFO, DeviceInfo().pack())
        frame.close_fds()
        return DeviceInfo.unpack(frame.payload)

    async def _region_info(self, index: int) -> tuple[RegionInfo, list[int]]:
        offer = INITIAL_REGION_INFO
        while True:
            req = RegionInfo(index, argsz=offer).pack_request()
            frame = await self.request(Command.DEVICE_GET_REGION_INFO, req)
            info = RegionInfo.unpack(frame.payload)
            if info.argsz <= offer:
                return info, frame.fds
            frame.close_fds()  # a short reply: retry with the room it asks for
            if info.argsz > MAX_REGION_INFO:
                raise VfioUserError(errno.E2BIG, f"region {index} info needs {info.argsz} bytes")
            offer = info.argsz

    async def region_info(self, index: int) -> Region:
        info, fds = await self._region_info(index)
        close_fds(fds)
        return Region(index, RegionFlag(info.flags), info.size, info.offset, info)

    async def mmap_region(self, index: int) -> list[MappableArea]:
        """The mmap-able areas of a region with their fds (the caller owns them); [] when the
        region cannot be mapped."""
        info, fds = await self._region_info(index)
        try:
            if not info.flags & RegionFlag.MMAP:
                return []
            if not fds:
                raise VfioUserError(errno.EPROTO, f"region {index} is MMAP but came without fd")
            areas: list[MappableArea] = []
            sparse = [c for c in info.caps if isinstance(c, SparseMmapCap)]
            per_fd = [c for c in info.caps if isinstance(c, SparseMmapFdsCap)]
            if per_fd:
                for offset, fd_offset, size, fd_index in per_fd[0].areas:
                    if fd_index >= len(fds):
                        raise VfioUserError(errno.EPROTO, f"area fd index {fd_index} is missing")
                    areas.append(MappableArea(offset, size, os.dup(fds[fd_index]), fd_offset))
            elif sparse:
                for offset, size in sparse[0].areas:
                    areas.append(MappableArea(offset, size, os.dup(fds[0]), info.offset + offset))
            else:  # MMAP without SPARSE: the whole region
                areas.append(MappableArea(0, info.size, os.dup(fds[0]), info.offset))
            for area in areas:
                if area.offset + area.size > info.size:
                    for a in areas:
                        a.close()
                    raise VfioUserError(errno.EPROTO, f"region {index}: area leaves the region")
            return areas
        finally:
            close_fds(fds)

    async def region_io_fds(self, index: int) -> list[IoRegionFd]:
        """The region's ioeventfds; [] when the server has none or does not implement it (or
        the client was told not to ask: `ClientOptions.io_fds`)."""
        if not self.options.io_fds:
            return []
        offer = 16 + 40 * 16
        while True:
            try:
                frame = await self.request(
                    Command.DEVICE_GET_REGION_IO_FDS, IoFdsRequest(index, argsz=offer).pack()
                )
            except VfioUserError as err:
                if err.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                    return []
                raise
            try:
                reply = IoFdsReply.unpack(frame.payload)
            except PayloadError:
                frame.close_fds()
                raise
            if reply.argsz > offer and not reply.entries:
                frame.close_fds()
                if reply.argsz > MAX_REGION_INFO:
                    raise VfioUserError(errno.E2BIG, f"IO_FDS of region {index} is too large")
                offer = reply.argsz
                continue
            try:
                out = []
                for e in reply.entries:
                    if e.fd_index >= len(frame.fds) or e.type != 0:
                        continue  # not an ioeventfd we can use
                    out.append(
                        IoRegionFd(
                            e.offset,
                            e.size,
                            EventFd.from_fd(frame.fds[e.fd_index]),
                            e.datamatch if e.flags & IoeventfdFlag.DATAMATCH else None,
                            e.flags,
                        )
                    )
                return out
            finally:
                frame.close_fds()

    async def irq_info(self, index: int) -> IrqInfo:
        frame = await self.request(Command.DEVICE_GET_IRQ_INFO, IrqInfo(index).pack())
        return IrqInfo.unpack(frame.payload)

    async def set_irqs(
        self,
        index: int,
        start: int,
        count: int,
        *,
        action: IrqSetFlag = IrqSetFlag.ACTION_TRIGGER,
        eventfds: Sequence[EventFd] | None = None,
        bools: Sequence[bool] | None = None,
    ) -> None:
        """One SET_IRQS (split into several when there are more eventfds than the server takes
        per message). `eventfds` given: DATA_EVENTFD (empty = unbind); `bools`: DATA_BOOL;
        neither: DATA_NONE."""
        if eventfds is not None:
            if eventfds and len(eventfds) != count:
                raise ValueError(f"{len(eventfds)} eventfds for {count} vectors")
            flags = IrqSetFlag.DATA_EVENTFD | action
            if not eventfds:
                await self._set_irqs(IrqSet(int(flags), index, start, count))
                return
            step = max(1, self.server_caps.msg_fds)
            for pos in range(0, count, step):
                chunk = eventfds[pos : pos + step]
                await self._set_irqs(
                    IrqSet(int(flags), index, start + pos, len(chunk)),
                    [e.fileno() for e in chunk],
                )
        elif bools is not None:
            if len(bools) != count:
                raise ValueError(f"{len(bools)} bools for {count} vectors")
            flags = IrqSetFlag.DATA_BOOL | action
            await self._set_irqs(IrqSet(int(flags), index, start, count, bytes(map(int, bools))))
        else:
            await self._set_irqs(IrqSet(int(IrqSetFlag.DATA_NONE | action), index, start, count))

    async def _set_irqs(self, req: IrqSet, fds: Sequence[int] = ()) -> None:
        frame = await self.request(Command.DEVICE_SET_IRQS, req.pack(), fds)
        frame.close_fds()

    async def enable_irqs(self, index: int, count: int, start: int = 0) -> list[EventFd]:
        """Bind `count` new eventfds to vectors start.. of irq type `index`; returns them."""
        eventfds = [EventFd() for _ in range(count)]
        try:
            await self.set_irqs(index, start, count, eventfds=eventfds)
        except BaseException:
            for efd in eventfds:
                efd.close()
            raise
        return eventfds

    async def disable_irqs(self, index: int) -> None:
        """Unbind every vector of irq type `index` (NONE|TRIGGER, start = count = 0)."""
        await self.set_irqs(index, 0, 0)

    # -- region access -------------------------------------------------------------------------

    def _xfer_chunk(self) -> int:
        return max(1, min(self.server_caps.data_xfer_size, self.options.max_data_xfer_size))

    async def region_read(self, index: int, offset: int, size: int) -> bytes:
        out = bytearray()
        for pos, length in split_chunks(size, self._xfer_chunk()):
            req = RegionAccess(offset + pos, index, length).pack()
            frame = await self.request(Command.REGION_READ, req)
            reply = RegionAccess.unpack(frame.payload, with_data=True)
            if (reply.offset, reply.region, reply.count) != (offset + pos, index, length):
                raise VfioUserError(errno.EPROTO, "REGION_READ reply does not match the request")
            out += reply.data
        return bytes(out)

    async def region_write(
        self, index: int, offset: int, data: bytes, *, posted: bool = False
    ) -> None:
        """Write `data`; `posted`: NO_REPLY (still applied before any later command)."""
        for pos, length in split_chunks(len(data), self._xfer_chunk()):
            req = RegionAccess(offset + pos, index, length, bytes(data[pos : pos + length]))
            await self.request(Command.REGION_WRITE, req.pack(), no_reply=posted)

    async def region_write_multi(self, writes: Sequence[tuple[int, int, bytes]]) -> int:
        """(region, offset, data ≤ 8 bytes) writes in one message; needs write_multiple."""
        if not self.server_caps.write_multiple:
            raise VfioUserError(errno.ENOTSUP, "write_multiple was not negotiated")
        msg = WriteMulti(tuple(RegionAccess(off, reg, len(d), d) for reg, off, d in writes))
        frame = await self.request(Command.REGION_WRITE_MULTI, msg.pack())
        if len(frame.payload) != 8:
            raise VfioUserError(errno.EPROTO, "REGION_WRITE_MULTI reply is not 8 bytes")
        return int(struct.unpack("<Q", frame.payload)[0])

    async def config_read(self, offset: int, size: int) -> bytes:
        return await self.region_read(RegionIndex.CONFIG, offset, size)

    async def config_write(self, offset: int, data: bytes) -> None:
        await self.region_write(RegionIndex.CONFIG, offset, data)

    # -- DMA -----------------------------------------------------------------------------------

    async def dma_map(
        self,
        fd: int,
        iova: int,
        size: int,
        *,
        offset: int = 0,
        readable: bool = True,
        writable: bool = True,
        share_fd: bool = True,
    ) -> None:
        """Make `size` bytes of `fd` (from `offset`) the device's DMA window at `iova`.

        The client maps the window itself too (`self.memory`, by IOVA). `share_fd` False keeps
        the fd to ourselves: the server then reaches the window by DMA_READ/DMA_WRITE messages,
        which this client answers from its own mapping."""
        flags = (DmaMapFlag.READ if readable else 0) | (DmaMapFlag.WRITE if writable else 0)
        self.memory.add_region(fd, iova, size, mmap_offset=offset)
        window = _Window(iova, size, DmaMapFlag(flags), share_fd)
        self._windows.append(window)
        try:
            req = DmaMap(int(flags), offset if share_fd else 0, iova, size).pack()
            await self.request(Command.DMA_MAP, req, [fd] if share_fd else [])
        except BaseException:
            self._windows.remove(window)
            self.memory.remove_region(iova)
            raise

    async def dma_unmap(self, iova: int, size: int) -> None:
        frame = await self.request(Command.DMA_UNMAP, DmaUnmap(0, iova, size).pack())
        DmaUnmap.unpack(frame.payload)
        # The server removed every window inside the range (none is fine too).
        end = iova + size
        for window in [w for w in self._windows if iova <= w.iova and w.iova + w.size <= end]:
            self._windows.remove(window)
            self.memory.remove_region(window.iova)

    async def dma_unmap_all(self) -> None:
        await self.request(Command.DMA_UNMAP, DmaUnmap(int(DmaUnmapFlag.ALL), 0, 0).pack())
        for window in self._windows:
            self.memory.remove_region(window.iova)
        self._windows.clear()

    async def reset(self) -> None:
        await self.request(Command.DEVICE_RESET)
