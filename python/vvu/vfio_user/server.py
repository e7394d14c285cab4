"""A vfio-user server: serves one `PciDevice` to one client at a time over AF_UNIX.

Sessions: VERSION first (anything else before it gets EINVAL), then every command is handled in
arrival order and answered exactly once, unless it set NO_REPLY. Nothing the client sends is
trusted: sizes, region indexes, offsets (with overflow), irq ranges, DMA windows (overlaps), fd
counts and fd kinds are checked before the device sees a request. A bad request gets an error
reply with an errno and one log line; a framing error (a header that cannot be trusted, fds lost
to truncation, EOF mid-message, a reply nobody asked for) ends the session with one log line.

When a client goes, its DMA windows are unmapped, its irq eventfds unbound, and the device is
reset; then the next client is accepted. Every fd received is closed once its request is handled:
what is kept (a DMA mapping, an irq eventfd) is a duplicate owned by its keeper.

Server → client DMA (DMA_READ/DMA_WRITE, for windows mapped without an fd) shares the socket:
the reader loop keeps handling commands while a device task waits for its reply.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Final

from vvu._core import EventFd, GuestMemory
from vvu.errors import GuestMemoryError
from vvu.transport.base import TransportError, is_eventfd
from vvu.vfio_user.connection import Frame, FramingError, VfioUserConnection, VfioUserListener
from vvu.vfio_user.device import (
    DmaMapping,
    DmaSpace,
    IrqAction,
    IrqRequest,
    IrqSpec,
    PciDevice,
    RegionSpec,
    check_regions,
)
from vvu.vfio_user.protocol import (
    HEADER_SIZE,
    KNOWN_FLAGS,
    MAX_VERSION_JSON,
    MAX_WRITE_MULTI,
    NUM_IRQS,
    REGION_INFO_SIZE,
    Capabilities,
    Command,
    DeviceFlag,
    DeviceInfo,
    DmaAccess,
    DmaMap,
    DmaMapFlag,
    DmaUnmap,
    DmaUnmapFlag,
    IoeventfdFlag,
    IoFdEntry,
    IoFdsReply,
    IoFdsRequest,
    IrqInfo,
    IrqInfoFlag,
    IrqSet,
    IrqSetFlag,
    PayloadError,
    RegionAccess,
    RegionCap,
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

__all__ = ["ServerLimits", "VfioUserServer"]

log = logging.getLogger(__name__)

PROTOCOL_MAJOR: Final = 0
PROTOCOL_MINOR: Final = 1
PAGE_SIZE: Final = 4096
# How long DMA_UNMAP waits for a device that still holds a window (a view, a queue).
UNMAP_TIMEOUT: Final = 1.0
# How long a server → client DMA request waits for its reply.
DMA_REPLY_TIMEOUT: Final = 10.0


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """What the server accepts, advertised in its VERSION reply."""

    max_msg_fds: int = 16
    max_data_xfer_size: int = 1 << 20
    #: A guest behind a vIOMMU has QEMU send one DMA_MAP per IOMMU mapping, i.e. per page
    #: unless the guest maps hugepages (an 8 MiB area in 4 KiB pages is 2048 windows). Each
    #: window is one mmap of ours: 8192 stays far below the kernel's 65530 per process.
    max_dma_maps: int = 8192

    @property
    def max_message_size(self) -> int:
        return HEADER_SIZE + max(
            16 + self.max_data_xfer_size,  # REGION_WRITE, DMA_READ replies
            8 + 24 * MAX_WRITE_MULTI,
            4 + MAX_VERSION_JSON,
            4096,  # DMA_UNMAP with a bitmap struct, SET_IRQS bools, …
        )


@dataclass(slots=True)
class _Reply:
    payload: bytes = b""
    fds: Sequence[int] = ()


@dataclass(slots=True)
class _Window:
    mapping: DmaMapping
    end: int = field(init=False)

    def __post_init__(self) -> None:
        self.end = self.mapping.iova + self.mapping.size


class _Session(DmaSpace):
    """One client: negotiation state, DMA windows, pending server → client requests."""

    def __init__(self, server: VfioUserServer, conn: VfioUserConnection) -> None:
        self.server = server
        self.device = server.device
        self.conn = conn
        self.peer = conn.peer
        self.negotiated = False
        self.client_caps = Capabilities()
        self._memory = GuestMemory()
        self._windows: list[_Window] = []
        self._pending: dict[int, asyncio.Future[Frame]] = {}
        self._next_id = 0

    # -- DmaSpace ------------------------------------------------------------------------------

    @property
    def memory(self) -> GuestMemory:
        return self._memory

    @property
    def mappings(self) -> Sequence[DmaMapping]:
        return [w.mapping for w in self._windows]

    @property
    def client_capabilities(self) -> Capabilities:
        return self.client_caps

    def _window_for(self, iova: int, size: int, need: DmaMapFlag) -> DmaMapping:
        for w in self._windows:
            if w.mapping.contains(iova, size):
                if not w.mapping.flags & need:
                    raise VfioUserError(errno.EPERM, f"DMA window at {iova:#x} is not {need!r}")
                return w.mapping
        raise VfioUserError(errno.EFAULT, f"no DMA window holds {iova:#x}+{size:#x}")

    def _chunk(self) -> int:
        return min(self.client_caps.data_xfer_size, self.server.limits.max_data_xfer_size)

    async def read(self, iova: int, size: int) -> bytes:
        mapping = self._window_for(iova, size, DmaMapFlag.READ)
        if mapping.mapped:
            return self._memory.read(iova, size)
        out = bytearray()
        for off, length in split_chunks(size, self._chunk()):
            frame = await self._request(Command.DMA_READ, DmaAccess(iova + off, length).pack())
            reply = DmaAccess.unpack(frame.payload, with_data=True)
            if (reply.address, reply.count) != (iova + off, length):
                raise VfioUserError(errno.EIO, "DMA_READ reply does not match the request")
            out += reply.data
        return bytes(out)

    async def write(self, iova: int, data: bytes) -> None:
        mapping = self._window_for(iova, len(data), DmaMapFlag.WRITE)
        if mapping.mapped:
            self._memory.write(iova, data)
            return
        for off, length in split_chunks(len(data), self._chunk()):
            piece = DmaAccess(iova + off, length, data[off : off + length]).pack()
            # The reply is {address, count} (spec, libvfio-user) or a bare header (QEMU).
            await self._request(Command.DMA_WRITE, piece)

    async def _request(self, command: Command, payload: bytes) -> Frame:
        if self.conn.closed:
            raise VfioUserError(errno.ENOTCONN, "the client is gone")
        msg_id = self._next_id
        while msg_id in self._pending:
            msg_id = (msg_id + 1) & 0xFFFF
        self._next_id = (msg_id + 1) & 0xFFFF
        fut: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        try:
            await self.conn.send(encode(msg_id, command, payload))
            frame = await asyncio.wait_for(fut, DMA_REPLY_TIMEOUT)
        except TransportError as err:
            raise VfioUserError(errno.ENOTCONN, str(err)) from err
        except TimeoutError as err:
            raise VfioUserError(errno.ETIMEDOUT, f"{command.name}: no reply") from err
        finally:
            self._pending.pop(msg_id, None)
        frame.close_fds()
        if frame.header.command != command:
            raise VfioUserError(errno.EIO, f"{command.name}: reply is for another command")
        if frame.header.is_error:
            raise VfioUserError(frame.header.error or errno.EIO, command=command)
        return frame

    def route_reply(self, frame: Frame) -> None:
        fut = self._pending.get(frame.header.id)
        if fut is None or fut.done():
            frame.close_fds()
            raise FramingError(
                f"{self.peer}: reply id {frame.header.id} "
                f"({command_name(frame.header.command)}) answers nothing we sent"
            )
        fut.set_result(frame)

    def fail_pending(self) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(VfioUserError(errno.ENOTCONN, "the client is gone"))
        self._pending.clear()

    # -- Dispatch ------------------------------------------------------------------------------

    def handle(self, frame: Frame) -> _Reply:
        """Handle one command; raises VfioUserError/PayloadError for an error reply."""
        hdr = frame.header
        if hdr.flags & ~KNOWN_FLAGS or hdr.is_error:  # (the error field is reserved: ignored)
            raise PayloadError(f"command flags {hdr.flags:#x} are not valid")
        if len(frame.fds) > self.server.limits.max_msg_fds:
            raise PayloadError(
                f"{len(frame.fds)} fds attached, more than max_msg_fds "
                f"{self.server.limits.max_msg_fds}"
            )
        if not self.negotiated and hdr.command != Command.VERSION:
            raise PayloadError("VERSION must come first")
        handler = self._handlers.get(hdr.command)
        if handler is None:
            if hdr.command in (Command.DMA_READ, Command.DMA_WRITE):
                raise PayloadError(f"{command_name(hdr.command)} goes from server to client")
            raise VfioUserError(errno.ENOTSUP, "not supported")
        if hdr.command not in (Command.DMA_MAP, Command.DEVICE_SET_IRQS) and frame.fds:
            raise PayloadError(f"{len(frame.fds)} fds attached to a command that takes none")
        return handler(self, frame)

    def _version(self, frame: Frame) -> _Reply:
        if self.negotiated:
            raise PayloadError("VERSION was negotiated already")
        if frame.header.no_reply:
            raise PayloadError("VERSION needs a reply")
        proposal = Version.unpack(frame.payload)
        if proposal.major != PROTOCOL_MAJOR:
            raise VfioUserError(errno.ENOTSUP, f"major version {proposal.major} (we speak 0)")
        theirs = proposal.capabilities or Capabilities()
        limits = self.server.limits
        if theirs.pgsizes is not None and not theirs.pgsizes & PAGE_SIZE:
            raise VfioUserError(errno.ENOTSUP, f"pgsizes {theirs.pgsizes:#x} lack 4 KiB")
        # Reply with a subset of the proposal: only members the client named, with our values.
        # Migration and twin-socket mode are not offered (absent from the reply).
        ours = Capabilities(
            max_msg_fds=limits.max_msg_fds if theirs.max_msg_fds is not None else None,
            max_data_xfer_size=limits.max_data_xfer_size
            if theirs.max_data_xfer_size is not None
            else None,
            max_dma_maps=min(limits.max_dma_maps, theirs.max_dma_maps)
            if theirs.max_dma_maps is not None
            else None,
            pgsizes=PAGE_SIZE if theirs.pgsizes is not None else None,
            write_multiple=True if theirs.write_multiple else None,
            sparse_mmap_fds=True if theirs.sparse_mmap_fds else None,
        )
        # QEMU sizes its receive buffer from its own request: never answer with more bytes.
        # Shed optional members first, then everything (the client keeps the defaults).
        minor = min(proposal.minor, PROTOCOL_MINOR)
        essential = Capabilities(
            max_msg_fds=ours.max_msg_fds, max_data_xfer_size=ours.max_data_xfer_size
        )
        for caps in (ours, essential, Capabilities(), None):
            reply = Version(PROTOCOL_MAJOR, minor, caps).pack()
            if len(reply) <= len(frame.payload):
                break
        self.client_caps = theirs
        self.negotiated = True
        log.info(
            "%s: vfio-user %d.%d negotiated (client: max_msg_fds %d, max_data_xfer_size %d)",
            self.peer,
            PROTOCOL_MAJOR,
            minor,
            theirs.msg_fds,
            theirs.data_xfer_size,
        )
        self.device.client_connected(self)
        return _Reply(reply)

    def _check_dma_map(self, req: DmaMap, fds: Sequence[int]) -> None:
        if req.argsz != DmaMap.LAYOUT.size:
            raise PayloadError(f"DMA_MAP argsz {req.argsz}, expected 32")
        if len(fds) > 1:
            raise PayloadError(f"DMA_MAP carries {len(fds)} fds, at most 1")
        known = int(DmaMapFlag.READ | DmaMapFlag.WRITE | DmaMapFlag.MMAP | DmaMapFlag.FILE_IO)
        if req.flags & ~known:  # (an IntFlag's ~ keeps only known bits: use ints)
            raise PayloadError(f"DMA_MAP flags {req.flags:#x} has unknown bits")
        if req.flags & DmaMapFlag.FILE_IO:
            raise VfioUserError(errno.ENOTSUP, "DMA through file I/O is not supported")
        if not req.flags & (DmaMapFlag.READ | DmaMapFlag.WRITE):
            raise PayloadError("DMA_MAP grants neither read nor write")
        if req.flags & DmaMapFlag.MMAP and not fds:
            raise PayloadError("DMA_MAP asks for mmap access without an fd")
        if req.size == 0 or req.address % PAGE_SIZE or req.size % PAGE_SIZE:
            raise PayloadError(
                f"DMA_MAP {req.address:#x}+{req.size:#x} is empty or not 4 KiB aligned"
            )
        end = req.address + req.size
        if end > 1 << 64 or req.offset + req.size > 1 << 64:
            raise PayloadError("DMA_MAP range overflows 64 bits")
        if len(self._windows) >= self.server.limits.max_dma_maps:
            raise VfioUserError(errno.ENOSPC, "too many DMA windows")
        for w in self._windows:
            if req.address < w.end and w.mapping.iova < end:
                raise VfioUserError(
                    errno.EEXIST,
                    f"{req.address:#x}+{req.size:#x} overlaps the window at {w.mapping.iova:#x}",
                )

    def _dma_map(self, frame: Frame) -> _Reply:
        req = DmaMap.unpack(frame.payload)
        self._check_dma_map(req, frame.fds)
        mapped = bool(frame.fds)
        if mapped:
            try:
                self._memory.add_region(frame.fds[0], req.address, req.size, mmap_offset=req.offset)
            except (GuestMemoryError, OSError, ValueError, OverflowError) as err:
                raise VfioUserError(errno.EINVAL, f"cannot map the fd: {err}") from err
        mapping = DmaMapping(
            req.address,
            req.size,
            DmaMapFlag(req.flags & (DmaMapFlag.READ | DmaMapFlag.WRITE)),
            req.offset,
            mapped,
        )
        self._windows.append(_Window(mapping))
        try:
            self.device.dma_map(mapping, self)
        except BaseException:
            self._drop_window(self._windows[-1], notify=False)
            raise
        return _Reply()

    def _drop_window(
        self, window: _Window, *, notify: bool = True, timeout: float = UNMAP_TIMEOUT
    ) -> None:
        if notify:
            self.device.dma_unmap(window.mapping, self)
        if window.mapping.mapped:
            try:
                self._memory.remove_region(window.mapping.iova, timeout)
            except GuestMemoryError as err:
                raise VfioUserError(errno.EBUSY, f"window still in use: {err}") from err
        self._windows.remove(window)

    def _drop_all_windows(self) -> None:
        """Teardown: drop every window without waiting for anyone. The device has been reset,
        so it holds none; a window something still holds stays mapped until it lets go (it
        goes with this session's memory), and one line says how many."""
        busy = 0
        for window in list(reversed(self._windows)):
            try:
                self._drop_window(window, timeout=0)
            except VfioUserError:
                busy += 1
                self._windows.remove(window)
        if busy:
            log.warning(
                "%s: teardown: %d DMA window(s) still in use, unmapped when released",
                self.peer,
                busy,
            )

    def _windows_to_unmap(self, address: int, size: int) -> list[_Window]:
        """The windows DMA_UNMAP `address`+`size` removes: every window inside the range (Linux
        VFIO type1, which QEMU's vfio-user container follows: an IOMMU unmaps whole power-of-two
        ranges that may hold no mapping at all, and that is a success). A window the range
        would cut in two is refused (EINVAL) and nothing is removed."""
        end = address + size
        if size == 0 or address % PAGE_SIZE or size % PAGE_SIZE or end > 1 << 64:
            raise PayloadError(f"DMA_UNMAP {address:#x}+{size:#x} is empty, unaligned or overflows")
        inside = []
        for w in self._windows:
            if address <= w.mapping.iova and w.end <= end:
                inside.append(w)
            elif w.mapping.iova < end and address < w.end:
                raise VfioUserError(
                    errno.EINVAL,
                    f"DMA_UNMAP {address:#x}+{size:#x} would split the window at "
                    f"{w.mapping.iova:#x}+{w.mapping.size:#x}",
                )
        if not inside:
            log.debug("%s: DMA_UNMAP %#x+%#x: no window there", self.peer, address, size)
        return inside[::-1]

    def _dma_unmap(self, frame: Frame) -> _Reply:
        req = DmaUnmap.unpack(frame.payload)
        if req.flags & DmaUnmapFlag.GET_DIRTY_BITMAP:
            raise VfioUserError(errno.ENOTSUP, "dirty page tracking is not supported")
        if req.flags & ~int(DmaUnmapFlag.ALL):
            raise PayloadError(f"DMA_UNMAP flags {req.flags:#x} has unknown bits")
        if len(frame.payload) != DmaUnmap.LAYOUT.size:
            raise PayloadError(f"DMA_UNMAP payload is {len(frame.payload)} bytes, expected 24")
        if req.argsz < DmaUnmap.LAYOUT.size:
            raise PayloadError(f"DMA_UNMAP argsz {req.argsz} has no room for the reply")
        if req.flags & DmaUnmapFlag.ALL:
            if req.address or req.size:
                raise PayloadError("DMA_UNMAP ALL takes address = size = 0")
            for window in list(reversed(self._windows)):
                self._drop_window(window)
        else:
            for window in self._windows_to_unmap(req.address, req.size):
                self._drop_window(window)
        return _Reply(DmaUnmap(req.flags, req.address, req.size, argsz=24).pack())

    def _get_info(self, frame: Frame) -> _Reply:
        req = DeviceInfo.unpack(frame.payload)
        if req.argsz < DeviceInfo.LAYOUT.size:
            raise PayloadError(f"DEVICE_GET_INFO argsz {req.argsz} has no room for the reply")
        flags = DeviceFlag.PCI | (DeviceFlag.RESET if self.device.resettable else 0)
        regions = self.server.regions()
        return _Reply(DeviceInfo(int(flags), len(regions), NUM_IRQS).pack())

    def _region(self, index: int) -> RegionSpec:
        regions = self.server.regions()
        if not 0 <= index < len(regions):
            raise PayloadError(f"region {index} does not exist")
        return regions[index]

    def _mmap_layout(
        self, index: int, spec: RegionSpec
    ) -> tuple[RegionFlag, int, tuple[RegionCap, ...], list[int]]:
        """(flags, info.offset, caps, fds) for a region's mmap-able areas."""
        flags = spec.flags
        if not spec.areas:
            return flags, 0, (), []
        fds = list(dict.fromkeys(a.fd for a in spec.areas))
        deltas = {a.fd_offset - a.offset for a in spec.areas}
        if len(fds) == 1 and len(deltas) == 1 and min(deltas) >= 0:
            # The merged spec: one fd, area i at info.offset + area.offset in it.
            cap = SparseMmapCap(tuple((a.offset, a.size) for a in spec.areas))
            return flags, deltas.pop(), (cap,), fds
        if self.client_caps.sparse_mmap_fds:
            fd_cap = SparseMmapFdsCap(
                tuple((a.offset, a.fd_offset, a.size, fds.index(a.fd)) for a in spec.areas)
            )
            return flags, 0, (fd_cap,), fds
        # The client cannot express this layout: it reaches the region by messages only.
        return flags & ~RegionFlag.MMAP, 0, (), []

    def _get_region_info(self, frame: Frame) -> _Reply:
        req = RegionInfo.unpack(frame.payload)
        if len(frame.payload) != REGION_INFO_SIZE:
            raise PayloadError(f"DEVICE_GET_REGION_INFO payload is {len(frame.payload)} bytes")
        if req.argsz < REGION_INFO_SIZE:
            raise PayloadError(f"DEVICE_GET_REGION_INFO argsz {req.argsz} is below 32")
        spec = self._region(req.index)
        flags, offset, caps, fds = self._mmap_layout(req.index, spec)
        info = RegionInfo(req.index, int(flags), spec.size, offset, caps=caps)
        full = info.full_argsz()
        info = RegionInfo(req.index, int(flags), spec.size, offset, full, caps=caps)
        if req.argsz < full:
            # Too little room: the struct alone, argsz = what the full reply needs, no fd.
            return _Reply(info.pack(with_caps=False))
        if len(fds) > self.client_caps.msg_fds:
            raise VfioUserError(
                errno.E2BIG,
                f"region {req.index} needs {len(fds)} fds, the client takes "
                f"{self.client_caps.msg_fds} per message",
            )
        return _Reply(info.pack(), fds)

    def _get_region_io_fds(self, frame: Frame) -> _Reply:
        req = IoFdsRequest.unpack(frame.payload)
        if req.flags or req.count:
            raise PayloadError("DEVICE_GET_REGION_IO_FDS takes flags = count = 0")
        if req.argsz < 16:
            raise PayloadError(f"DEVICE_GET_REGION_IO_FDS argsz {req.argsz} is below 16")
        spec = self._region(req.index)
        ioeventfds = list(self.device.ioeventfds(req.index))
        fds: list[int] = []
        entries: list[IoFdEntry] = []
        for ioe in ioeventfds:
            if ioe.offset < 0 or ioe.size not in (0, 1, 2, 4, 8):
                raise ValueError(f"device bug: ioeventfd {ioe} has a bad size")
            if ioe.offset + max(ioe.size, 1) > spec.size:
                raise ValueError(f"device bug: ioeventfd {ioe} leaves region {req.index}")
            fd = ioe.eventfd.fileno()
            if fd not in fds:
                fds.append(fd)
            entries.append(
                IoFdEntry(
                    ioe.offset,
                    ioe.size,
                    fds.index(fd),
                    flags=IoeventfdFlag.DATAMATCH if ioe.datamatch is not None else 0,
                    datamatch=ioe.datamatch or 0,
                )
            )
        full = 16 + IoFdEntry.SIZE * len(entries)
        if req.argsz < full:
            return _Reply(IoFdsReply(req.index, len(entries), (), argsz=full).pack())
        if len(fds) > self.client_caps.msg_fds:
            raise VfioUserError(
                errno.E2BIG,
                f"region {req.index} has {len(fds)} ioeventfds, the client takes "
                f"{self.client_caps.msg_fds} fds per message",
            )
        return _Reply(IoFdsReply(req.index, len(entries), tuple(entries), argsz=full).pack(), fds)

    def _get_irq_info(self, frame: Frame) -> _Reply:
        req = IrqInfo.unpack(frame.payload)
        if req.argsz < IrqInfo.LAYOUT.size:
            raise PayloadError(f"DEVICE_GET_IRQ_INFO argsz {req.argsz} is below 16")
        if not 0 <= req.index < NUM_IRQS:
            raise PayloadError(f"irq type {req.index} does not exist")
        spec = self.server.irqs()[req.index]
        return _Reply(IrqInfo(req.index, int(spec.flags), spec.count).pack())

    def _check_irq_set(self, req: IrqSet, payload_size: int, fds: Sequence[int]) -> None:
        if req.argsz != payload_size:
            raise PayloadError(f"SET_IRQS argsz {req.argsz}, payload {payload_size} bytes")
        if not 0 <= req.index < NUM_IRQS:
            raise PayloadError(f"irq type {req.index} does not exist")
        data, action = req.data_kind, req.action
        if (
            req.flags & ~0x3F
            or data not in (IrqSetFlag.DATA_NONE, IrqSetFlag.DATA_BOOL, IrqSetFlag.DATA_EVENTFD)
            or action
            not in (IrqSetFlag.ACTION_MASK, IrqSetFlag.ACTION_UNMASK, IrqSetFlag.ACTION_TRIGGER)
        ):
            raise PayloadError(f"SET_IRQS flags {req.flags:#x}: need one DATA and one ACTION bit")
        spec = self.server.irqs()[req.index]
        if req.count == 0:
            if not (data == IrqSetFlag.DATA_NONE and action == IrqAction.TRIGGER and not req.start):
                raise PayloadError("SET_IRQS count 0 is only NONE|TRIGGER with start 0")
        elif req.start + req.count > spec.count:
            raise PayloadError(
                f"SET_IRQS vectors {req.start}..{req.start + req.count - 1} of irq type "
                f"{req.index}, which has {spec.count}"
            )
        expected_data = req.count if data == IrqSetFlag.DATA_BOOL else 0
        if len(req.data) != expected_data:
            raise PayloadError(f"SET_IRQS carries {len(req.data)} data bytes, {expected_data} due")
        if action != IrqAction.TRIGGER and not spec.flags & IrqInfoFlag.MASKABLE:
            raise PayloadError(f"irq type {req.index} is not maskable")
        if data != IrqSetFlag.DATA_EVENTFD:
            if fds:
                raise PayloadError("SET_IRQS carries fds without DATA_EVENTFD")
            return
        if len(fds) not in (0, req.count):
            raise PayloadError(f"SET_IRQS has {len(fds)} fds for {req.count} vectors")
        bad = [fd for fd in fds if not is_eventfd(fd)]
        if bad:
            raise PayloadError(f"SET_IRQS: {len(bad)} of the fds are not eventfds")

    def _set_irqs(self, frame: Frame) -> _Reply:
        req = IrqSet.unpack(frame.payload)
        self._check_irq_set(req, len(frame.payload), frame.fds)
        action, data = req.action, req.data_kind
        request = IrqRequest(
            req.index,
            action,
            req.start,
            req.count,
            data,
            eventfds=[EventFd.from_fd(fd) for fd in frame.fds],
            bools=tuple(bool(b) for b in req.data),
        )
        try:
            self.device.set_irqs(request)
        except BaseException:
            for efd in request.eventfds:
                efd.close()
            raise
        return _Reply()

    def _check_access(self, access: RegionAccess, *, write: bool) -> None:
        limit = self.server.limits.max_data_xfer_size
        if access.count == 0:
            raise PayloadError("region access of 0 bytes")
        if access.count > limit:
            raise PayloadError(
                f"count {access.count} exceeds max_data_xfer_size {limit}", errno.E2BIG
            )
        spec = self._region(access.region)
        need = RegionFlag.WRITE if write else RegionFlag.READ
        if not spec.flags & need:
            raise PayloadError(f"region {access.region} lacks {need!r} access")
        if access.offset + access.count > spec.size:
            raise PayloadError(
                f"region {access.region} access {access.offset:#x}+{access.count} leaves its "
                f"{spec.size:#x} bytes"
            )
        self.server.region_accesses[access.region] += 1

    def _do_write(self, access: RegionAccess) -> None:
        self._check_access(access, write=True)
        if access.region == RegionIndex.CONFIG:
            self.device.config_write(access.offset, access.data)
        else:
            self.device.region_write(access.region, access.offset, access.data)

    def _region_read(self, frame: Frame) -> _Reply:
        req = RegionAccess.unpack(frame.payload, with_data=False)
        self._check_access(req, write=False)
        if req.region == RegionIndex.CONFIG:
            data = self.device.config_read(req.offset, req.count)
        else:
            data = self.device.region_read(req.region, req.offset, req.count)
        if len(data) != req.count:
            raise ValueError(f"device bug: read of {req.count} bytes returned {len(data)}")
        return _Reply(RegionAccess(req.offset, req.region, req.count, bytes(data)).pack())

    def _region_write(self, frame: Frame) -> _Reply:
        req = RegionAccess.unpack(frame.payload, with_data=True)
        self._do_write(req)
        return _Reply(RegionAccess(req.offset, req.region, req.count).pack())

    def _region_write_multi(self, frame: Frame) -> _Reply:
        if not self.client_caps.write_multiple:
            raise VfioUserError(errno.ENOTSUP, "write_multiple was not negotiated")
        req = WriteMulti.unpack(frame.payload)
        for access in req.writes:
            self._do_write(access)
        return _Reply(struct.pack("<Q", len(req.writes)))

    def _reset(self, frame: Frame) -> _Reply:
        if frame.payload:
            raise PayloadError("DEVICE_RESET has no payload")
        self.device.reset()  # even without FLAGS_RESET: the Rust crate inverts that flag
        return _Reply()

    _handlers: Final[dict[int, Callable[[_Session, Frame], _Reply]]] = {
        Command.VERSION: _version,
        Command.DMA_MAP: _dma_map,
        Command.DMA_UNMAP: _dma_unmap,
        Command.DEVICE_GET_INFO: _get_info,
        Command.DEVICE_GET_REGION_INFO: _get_region_info,
        Command.DEVICE_GET_REGION_IO_FDS: _get_region_io_fds,
        Command.DEVICE_GET_IRQ_INFO: _get_irq_info,
        Command.DEVICE_SET_IRQS: _set_irqs,
        Command.REGION_READ: _region_read,
        Command.REGION_WRITE: _region_write,
        Command.REGION_WRITE_MULTI: _region_write_multi,
        Command.DEVICE_RESET: _reset,
    }

    # -- Teardown ------------------------------------------------------------------------------

    def teardown(self) -> None:
        """Drop what the client gave: pending requests, irq eventfds, DMA windows; then reset."""
        self.fail_pending()
        steps: list[tuple[str, Callable[[], None]]] = []
        for index, spec in enumerate(self.server.irqs()):
            if spec.count:
                req = IrqRequest(index, IrqAction.TRIGGER, 0, 0, IrqSetFlag.DATA_NONE)
                steps.append((f"disable irq type {index}", partial(self.device.set_irqs, req)))
        # The device lets go of the client's memory first (queues, chains), so the windows
        # can be unmapped without waiting: a VMM behind a vIOMMU leaves hundreds of them.
        if self.negotiated:
            steps.append(("client_disconnected", self.device.client_disconnected))
        steps.append(("reset", self.device.reset))
        steps.append(("unmap the DMA windows", self._drop_all_windows))
        for what, step in steps:
            try:
                step()
            except Exception as err:  # keep tearing down; the next client needs a clean device
                log.warning("%s: teardown: %s failed: %s", self.peer, what, err)


class VfioUserServer:
    """Serve `device` on `listener` (a VfioUserListener, or a socket path to bind)."""

    def __init__(
        self,
        device: PciDevice,
        listener: VfioUserListener | str,
        *,
        limits: ServerLimits | None = None,
    ) -> None:
        self.device = device
        self.listener = VfioUserListener(listener) if isinstance(listener, str) else listener
        self.limits = limits or ServerLimits()
        self.clients_served = 0
        #: Commands handled, by command; region accesses (REGION_READ/WRITE and each write of
        #: a WRITE_MULTI), by region index: what a client reached by message, not by mmap.
        self.commands: Counter[int] = Counter()
        self.region_accesses: Counter[int] = Counter()
        self._session: _Session | None = None
        self._started = False
        check_regions(device.regions())
        if len(device.irqs()) != NUM_IRQS:
            raise ValueError(f"a PCI device describes {NUM_IRQS} irq types")

    def stats(self) -> dict[str, dict[str, int]]:
        """The counters by name: commands ("REGION_WRITE": n, ...) and region accesses by
        message ("BAR0": n, ..., "CONFIG": n), for logs and benchmarks."""
        commands = {_command_name(c): n for c, n in sorted(self.commands.items())}
        regions = {_region_name(r): n for r, n in sorted(self.region_accesses.items())}
        return {"commands": commands, "region_accesses": regions}

    @property
    def connected(self) -> bool:
        return self._session is not None

    @property
    def dma(self) -> DmaSpace | None:
        """The current client's DMA space (None between clients)."""
        return self._session

    def regions(self) -> Sequence[RegionSpec]:
        regions = self.device.regions()
        check_regions(regions)
        return regions

    def irqs(self) -> Sequence[IrqSpec]:
        return self.device.irqs()

    async def serve_forever(self) -> None:
        """Accept clients one after the other until cancelled."""
        self._start()
        try:
            while True:
                sock = await self.listener.accept_socket()
                self.clients_served += 1
                await self.serve_connection(sock, f"client #{self.clients_served}")
        finally:
            self._stop()

    def _start(self) -> None:
        if not self._started:
            self._started = True
            self.device.start()

    def _stop(self) -> None:
        if self._started:
            self._started = False
            self.device.stop()

    async def serve_connection(self, sock: socket.socket, peer: str = "client") -> None:
        """Serve one connected socket until the client goes or breaks framing."""
        self._start()
        conn = VfioUserConnection(sock, peer, max_message_size=self.limits.max_message_size)
        session = _Session(self, conn)
        self._session = session
        try:
            await self._loop(session)
        finally:
            self._session = None
            session.teardown()
            conn.close()
            log.info("%s: disconnected", peer)

    async def _loop(self, session: _Session) -> None:
        conn = session.conn
        while True:
            try:
                frame = await conn.recv()
            except FramingError as err:
                log.warning("%s: dropping the client: %s", conn.peer, err)
                return
            except TransportError as err:
                log.info("%s: connection lost: %s", conn.peer, err)
                return
            if frame is None:
                return
            if frame.header.is_reply:
                try:
                    session.route_reply(frame)
                except FramingError as err:
                    log.warning("%s: dropping the client: %s", conn.peer, err)
                    return
                continue
            reply = self._dispatch(session, frame)
            if reply is None:
                continue
            data, fds = reply
            try:
                await conn.send(data, fds)
            except TransportError as err:
                log.info("%s: connection lost: %s", conn.peer, err)
                return

    def _dispatch(self, session: _Session, frame: Frame) -> tuple[bytes, Sequence[int]] | None:
        hdr = frame.header
        name = command_name(hdr.command)
        self.commands[hdr.command] += 1
        try:
            reply = session.handle(frame)
        except (VfioUserError, PayloadError) as err:
            log.warning(
                "%s: %s (id %d) refused: %s [%s]",
                session.peer,
                name,
                hdr.id,
                err,
                errno.errorcode.get(err.errno, err.errno),
            )
            return None if hdr.no_reply else (encode_error(hdr.id, hdr.command, err.errno), ())
        except Exception:
            log.exception("%s: %s (id %d) failed", session.peer, name, hdr.id)
            return None if hdr.no_reply else (encode_error(hdr.id, hdr.command, errno.EIO), ())
        finally:
            frame.close_fds()
        if hdr.no_reply:
            return None
        return encode(hdr.id, hdr.command, reply.payload, reply=True), reply.fds

    def close(self) -> None:
        self.listener.close()


def _command_name(command: int) -> str:
    try:
        return Command(command).name
    except ValueError:
        return f"command{command}"


def _region_name(region: int) -> str:
    try:
        return RegionIndex(region).name
    except ValueError:
        return f"region{region}"
