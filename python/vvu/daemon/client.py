"""The typed asyncio client of `vvu daemon`'s management API (part of vvu's public API).

    async with await DaemonClient.connect("/run/vvu/api.sock") as api:
        await api.device_add("disk1", "blk", "/run/vvu/disk1.sock", {"blk-file": "/srv/d.img"})
        for device in await api.device_list():
            print(device["id"], device["connected"])
        async for event in api.events():   # after subscribe()
            ...

One method per API method, same names with underscores; an error response raises `RpcError`
with the JSON-RPC code and message.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import Any, Literal, NotRequired, TypedDict, cast

from vvu.errors import VvuError

__all__ = ["DaemonClient", "DeviceInfo", "DeviceStats", "Event", "QueueStats", "RpcError"]

#: Longest response line read (a `metrics` text of many devices is the longest).
MAX_RESPONSE = 64 << 20


class RpcError(VvuError):
    """An error response: `code` (JSON-RPC's, or the daemon's 1-4), `message`, `data`."""

    def __init__(self, code: int, message: str, data: object = None) -> None:
        super().__init__(f"{message} (error {code})")
        self.code = code
        self.message = message
        self.data = data


class DeviceInfo(TypedDict):
    id: str
    type: str
    socket: NotRequired[str]  # or "vvu" (and "vvu-kick-mode") for a device behind a VVU device
    # "socket-mode" (octal string) and "options" are there too, under their dashed names.
    description: str
    connected: bool
    peer: str | None
    sessions: int


class QueueStats(TypedDict):
    index: int
    fault: str | None
    chains: NotRequired[int]
    batches: NotRequired[int]
    kicks: NotRequired[int]
    notifications: NotRequired[int]
    requests: NotRequired[int]
    bytes_read: NotRequired[int]
    bytes_written: NotRequired[int]
    io_errors: NotRequired[int]
    unsupported: NotRequired[int]
    malformed: NotRequired[int]
    in_flight: NotRequired[int]
    latency_ns_sum: NotRequired[int]
    latency_us_buckets: NotRequired[list[int]]


class DeviceStats(TypedDict):
    id: str
    type: str
    connected: bool
    sessions: int
    totals: dict[str, int]
    queues: list[QueueStats]


class Event(TypedDict):
    event: str
    device: str
    time: float


class DaemonClient:
    """A connection to the management socket; requests may run concurrently."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._events: asyncio.Queue[Event | None] = asyncio.Queue()
        self._reading = asyncio.ensure_future(self._read())

    @classmethod
    async def connect(cls, path: str) -> DaemonClient:
        reader, writer = await asyncio.open_unix_connection(path, limit=MAX_RESPONSE)
        return cls(reader, writer)

    async def __aenter__(self) -> DaemonClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        self._reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reading
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()

    async def _read(self) -> None:
        error: Exception = ConnectionError("the daemon closed the connection")
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    break
                message = json.loads(line)
                if "id" not in message:
                    if message.get("method") == "event":
                        self._events.put_nowait(cast(Event, message["params"]))
                    continue
                future = self._pending.pop(message["id"], None)
                if future is None or future.done():
                    continue
                if "error" in message:
                    err = message["error"]
                    future.set_exception(RpcError(err["code"], err["message"], err.get("data")))
                else:
                    future.set_result(message.get("result"))
        except (ConnectionError, ValueError) as err:
            error = err
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(error)
            self._pending.clear()
            self._events.put_nowait(None)

    async def call(self, method: str, params: Mapping[str, object] | None = None) -> Any:
        """Send one request and wait for its result (RpcError for an error response)."""
        if self._reading.done():
            raise ConnectionError("the connection to the daemon is closed")
        rid = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        request: dict[str, object] = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params:
            request["params"] = dict(params)
        self._writer.write(json.dumps(request).encode() + b"\n")
        await self._writer.drain()
        return await future

    # --- one method per API method --------------------------------------------------------------

    async def device_add(
        self,
        id: str,
        type: str,
        socket: str | None,
        options: Mapping[str, str | int | bool] | None = None,
        *,
        socket_mode: str | None = None,
        vvu: str | None = None,
        vvu_kick_mode: Literal["direct", "msix"] | None = None,
    ) -> DeviceInfo:
        """Add a device served on `socket`, or (socket None) through the virtio-vhost-user
        device whose vfio-user socket is `vvu`."""
        params: dict[str, object] = {"id": id, "type": type}
        if socket is not None:
            params["socket"] = socket
        if vvu is not None:
            params["vvu"] = vvu
        if vvu_kick_mode is not None:
            params["vvu-kick-mode"] = vvu_kick_mode
        if options:
            params["options"] = dict(options)
        if socket_mode is not None:
            params["socket-mode"] = socket_mode
        return cast(DeviceInfo, await self.call("device-add", params))

    async def device_remove(self, id: str) -> None:
        await self.call("device-remove", {"id": id})

    async def device_list(self) -> list[DeviceInfo]:
        return cast(list[DeviceInfo], await self.call("device-list"))

    async def resize(self, id: str, size: int) -> bool:
        """Resize a blk device to `size` bytes; returns whether its front-end was told."""
        result = await self.call("resize", {"id": id, "size": size})
        return bool(result["told"])

    async def set_read_only(self, id: str, read_only: bool) -> None:
        await self.call("set-read-only", {"id": id, "read-only": read_only})

    async def disconnect(self, id: str) -> bool:
        """Drop the device's front-end; returns whether one was connected."""
        result = await self.call("disconnect", {"id": id})
        return bool(result["disconnected"])

    async def stats(self, id: str | None = None) -> list[DeviceStats]:
        return cast(list[DeviceStats], await self.call("stats", {"id": id} if id else None))

    async def metrics(self, format: Literal["prometheus", "openmetrics"] = "prometheus") -> str:
        return cast(str, await self.call("metrics", {"format": format}))

    async def subscribe(self) -> None:
        """Events from now on are queued for `events()`."""
        await self.call("subscribe")

    async def unsubscribe(self) -> None:
        await self.call("unsubscribe")

    async def next_event(self) -> Event:
        """The next event (after `subscribe`); ConnectionError once the connection closed."""
        event = await self._events.get()
        if event is None:
            self._events.put_nowait(None)
            raise ConnectionError("the connection to the daemon is closed")
        return event

    async def events(self) -> AsyncIterator[Event]:
        """Events as they come, until the connection closes."""
        while True:
            try:
                yield await self.next_event()
            except ConnectionError:
                return
