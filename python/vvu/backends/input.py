"""virtio-input (virtio id 18): a keyboard whose key events come from a script.

The guest sees an input device (`/dev/input/event*`, named by `--name`) that reports key events
(EV_KEY, every key code up to 255). Events come from programs connected to a unix socket
(`--events-socket PATH`), one per line as three integers, `TYPE CODE VALUE` in evdev's terms,
e.g. `1 30 1` (EV_KEY, KEY_A, pressed), `1 30 0` (released), `0 0 0` (EV_SYN, SYN_REPORT: end of
a group, as a real device sends it). Any number of programs may connect; their lines are
delivered in the order read.

On the asynchronous request path (`Backend.run_queue`): the guest's event buffers (queue 0,
eventq) are held until an event happens; the status queue (queue 1: LEDs and the like, from the
guest) is read and acknowledged. Events wait in a bounded queue: while it is full (a guest that
gives no buffers) the programs' lines are not read, so they block, not the device's memory.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import logging
import os
import socket
import struct
from typing import ClassVar

from vvu.backends.base import Backend
from vvu.backends.request import RequestQueue
from vvu.transport.unix import listening_socket

log = logging.getLogger(__name__)

__all__ = ["InputBackend"]

EVENTQ, STATUSQ = 0, 1
#: virtio_input_config's select values (virtio spec 5.8.5).
CFG_UNSET, CFG_ID_NAME, CFG_ID_SERIAL, CFG_ID_DEVIDS = 0x00, 0x01, 0x02, 0x03
CFG_PROP_BITS, CFG_EV_BITS, CFG_ABS_INFO = 0x10, 0x11, 0x12
CONFIG_SIZE = 136  # select, subsel, size, 5 reserved, a 128-byte union
EV_SYN, EV_KEY = 0x00, 0x01
BUS_VIRTUAL = 0x06
EVENT = struct.Struct("<HHi")  # virtio_input_event: type, code, value (little-endian)
#: Events waiting for guest buffers, at most.
MAX_PENDING = 1024
#: Longest line a program may send.
MAX_LINE = 256


class InputBackend(Backend):
    """A virtio keyboard fed by scripts over a unix socket."""

    name: ClassVar[str] = "input"
    device_id: ClassVar[int] = 18

    def __init__(
        self, *, socket_path: str | None = None, device_name: str = "vvu keyboard"
    ) -> None:
        super().__init__(num_queues=2)
        self.socket_path = socket_path
        self.device_name = device_name.encode()[:128]
        self._select = self._subsel = 0
        #: What happened, by name: events, bad_lines, status_events, short_buffers.
        self.stats: collections.Counter[str] = collections.Counter()
        self._pending: asyncio.Queue[bytes] | None = None
        self._server: asyncio.Server | None = None
        self._listener: socket.socket | None = None
        if socket_path is not None:  # listening from the start; served once a queue runs
            self._listener = listening_socket(socket_path)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--events-socket",
            metavar="PATH",
            help="a unix socket to listen on for events, one 'TYPE CODE VALUE' line each",
        )
        parser.add_argument("--name", default="vvu keyboard", help="the device's name")

    @classmethod
    def from_arguments(cls, args: argparse.Namespace) -> InputBackend:
        return cls(socket_path=args.events_socket, device_name=args.name)

    # --- config space: the driver selects what it reads ----------------------------------------

    def _selected(self) -> bytes:
        select, subsel = self._select, self._subsel
        if select == CFG_ID_NAME and subsel == 0:
            return self.device_name
        if select == CFG_ID_SERIAL and subsel == 0:
            return b"vvu-0"
        if select == CFG_ID_DEVIDS and subsel == 0:
            return struct.pack("<HHHH", BUS_VIRTUAL, 0x1AF4, 0x0001, 0x0001)
        if select == CFG_EV_BITS and subsel == EV_KEY:
            return b"\xfe" + b"\xff" * 31  # key codes 1-255
        return b""

    def config_space(self) -> bytes:
        data = self._selected()
        header = bytes([self._select, self._subsel, len(data)]) + bytes(5)
        return (header + data).ljust(CONFIG_SIZE, b"\0")

    def write_config(self, offset: int, data: bytes) -> None:
        # QEMU forwards a driver's write as the whole config space: only select and subsel
        # are writable, everything else is what the driver read before.
        for field, position in (("_select", 0), ("_subsel", 1)):
            if offset <= position < offset + len(data):
                setattr(self, field, data[position - offset])

    # --- the event source --------------------------------------------------------------------

    def _events(self) -> asyncio.Queue[bytes]:
        if self._pending is None:
            self._pending = asyncio.Queue(MAX_PENDING)
        return self._pending

    async def _start_source(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            self._server = await asyncio.start_unix_server(
                self._read_events, sock=listener, limit=MAX_LINE
            )

    async def _read_events(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        events = self._events()
        try:
            while line := await reader.readline():
                try:
                    kind, code, value = (int(word, 0) for word in line.split())
                    event = EVENT.pack(kind, code, value)
                except (ValueError, struct.error):
                    self.stats["bad_lines"] += 1
                    log.warning("input: ignored a malformed event line %r", line[:64])
                    continue
                await events.put(event)  # blocks this program while MAX_PENDING wait
        except (ValueError, ConnectionError):  # a line beyond MAX_LINE, or the program left
            self.stats["bad_lines"] += 1
        except asyncio.CancelledError:  # the device is closing: asyncio's stream server would
            pass  # report a cancelled connection task as an error
        finally:
            writer.close()

    # --- the queues --------------------------------------------------------------------------

    async def run_queue(self, queue: RequestQueue) -> None:
        await self._start_source()
        if queue.index == EVENTQ:
            events = self._events()
            async for request in queue:  # an empty event buffer: held until an event comes
                if request.writable_len < EVENT.size:
                    self.stats["short_buffers"] += 1
                    request.complete(0)
                    continue
                event = await events.get()
                request.complete(request.write(event))
                self.stats["events"] += 1
        else:
            async for request in queue:  # LEDs and the like: noted, acknowledged
                self.stats["status_events"] += 1
                request.complete(0)

    def reset(self) -> None:
        super().reset()
        self._select = self._subsel = 0
        if self._pending is not None:  # events meant for the guest that left
            while not self._pending.empty():
                self._pending.get_nowait()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self.socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
