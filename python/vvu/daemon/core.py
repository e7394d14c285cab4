"""One process, many devices: each its own back-end, engine and socket, each session isolated.

A `Device` is one back-end (any registered type) with its own `BackendEngine` and listening
AF_UNIX socket, served by its own task: front-ends one after another, as `vvu serve` does. A
front-end that breaks the protocol, sends garbage or faults a ring ends only its own session
(the engine releases it and the device listens again); a device whose socket fails is logged
and retried without touching the others. The `Daemon` adds and removes devices at runtime,
reads their statistics on request and publishes events (front-end connected/disconnected, ring
broken, device added/removed) to its subscribers.

Idle cost per device: the back-end object, one engine, one listening socket and one task
waiting in accept (benches/RESULTS.md, "Daemon").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from vvu.backends import Backend
from vvu.daemon.spec import DeviceSpec
from vvu.engine import BackendEngine
from vvu.errors import VvuError
from vvu.transport.base import Channel
from vvu.transport.unix import UnixListener
from vvu.transport.vvu import KickMode, VvuListener
from vvu.vfio_user import VfioUserPciAccess

log = logging.getLogger(__name__)

__all__ = ["Daemon", "DaemonError", "Device", "Event"]

#: How often rings are looked at for faults while someone listens for events.
FAULT_POLL_INTERVAL = 0.25
#: How long a device added with `vvu` waits for the VVU device's vfio-user socket.
VVU_CONNECT_TIMEOUT = 5.0
#: After a failed accept (EMFILE, ...), how long a device waits before it tries again
#: (doubling up to ACCEPT_RETRY_MAX while it keeps failing).
ACCEPT_RETRY = 0.5
ACCEPT_RETRY_MAX = 10.0


class DaemonError(Exception):
    """A request the daemon refuses; `code` is its JSON-RPC error code."""

    NOT_FOUND = 1
    EXISTS = 2
    NOT_SUPPORTED = 3
    FAILED = 4

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Event:
    """Something that happened to a device: `name` is one of frontend-connected,
    frontend-disconnected, ring-broken, device-added, device-removed."""

    name: str
    device: str
    data: dict[str, object]
    time: float

    def to_json(self) -> dict[str, object]:
        return {"event": self.name, "device": self.device, "time": self.time, **self.data}


class Device:
    """One served device: back-end, engine, listener and the task that accepts front-ends."""

    def __init__(
        self,
        spec: DeviceSpec,
        backend: Backend,
        listener: UnixListener | VvuListener,
        emit: Callable[[str, str, dict[str, object]], None],
    ) -> None:
        self.spec = spec
        self.backend = backend
        self.engine = BackendEngine(backend)
        self.listener = listener
        self.peer: str | None = None
        self._emit = emit
        self._session: asyncio.Task[None] | None = None
        self._task = asyncio.get_running_loop().create_task(
            self._serve(), name=f"vvu-device-{spec.id}"
        )
        self.reported_faults: set[int] = set()  # rings whose fault was published, this session

    @property
    def id(self) -> str:
        return self.spec.id

    async def _serve(self) -> None:
        retry = ACCEPT_RETRY
        while True:
            try:
                channel = await self.listener.accept()
            except Exception as err:  # EMFILE, a VVU device gone: this device waits, not others
                log.error("device %s: accept failed (again in %.1f s): %s", self.id, retry, err)
                await asyncio.sleep(retry)
                retry = min(retry * 2, ACCEPT_RETRY_MAX)
                continue
            retry = ACCEPT_RETRY
            await self._serve_session(channel)

    async def _serve_session(self, channel: Channel) -> None:
        self.peer = channel.peer
        self.reported_faults = set()
        self._emit("frontend-connected", self.id, {"peer": channel.peer})
        self._session = asyncio.ensure_future(self.engine.serve(channel))
        reason = "disconnected"
        try:
            await asyncio.shield(self._session)
            reason = self.engine.last_session_end or reason
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # the device itself is going
                self._session.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._session
                raise
            reason = "disconnected by the management API"  # only the session was cancelled
        finally:
            self._session = None
            self.peer = None
            self._emit("frontend-disconnected", self.id, {"peer": channel.peer, "reason": reason})

    def disconnect(self) -> bool:
        """Drop the current front-end (the device listens for the next); False: none."""
        session = self._session
        if session is None or session.done():
            return False
        session.cancel()
        return True

    async def close(self) -> None:
        """Stop serving: the session is released, the socket file removed, the back-end closed."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        session = self._session
        if session is not None:  # cancelled with the task; wait for its teardown
            with contextlib.suppress(asyncio.CancelledError):
                await session
        if isinstance(self.listener, VvuListener):
            await self.listener.aclose()  # clears BACKEND_UP, closes the vfio-user connection
        else:
            self.listener.close()
        self.backend.close()

    def info(self) -> dict[str, object]:
        return {
            **self.spec.to_json(),
            "description": self.backend.describe(),
            "connected": self.peer is not None,
            "peer": self.peer,
            "sessions": self.engine.sessions_served,
        }

    def stats(self) -> dict[str, object]:
        """Per device and per queue: runner counters (engine) plus device counters (back-end),
        read now; nothing here is counted per request."""
        runner = self.engine.queue_stats()
        faults = self.engine.queue_faults()
        queues: list[dict[str, object]] = []
        totals: dict[str, int] = {}
        for index, counts in enumerate(runner):
            merged: dict[str, int] = {**counts, **self.backend.queue_stats(index)}
            for name, value in merged.items():
                totals[name] = totals.get(name, 0) + value
            queue: dict[str, object] = {"index": index, **merged, "fault": faults.get(index)}
            histogram = self.backend.latency_histogram(index)
            if histogram is not None:
                queue["latency_us_buckets"] = histogram
            queues.append(queue)
        return {
            "id": self.id,
            "type": self.spec.type,
            "connected": self.peer is not None,
            "sessions": self.engine.sessions_served,
            "totals": totals,
            "queues": queues,
        }


async def _listen(spec: DeviceSpec, fd: int | None = None) -> UnixListener | VvuListener:
    if fd is not None:
        return _passed_listener(spec, fd)
    if spec.vvu is None:
        assert spec.socket is not None
        return UnixListener(spec.socket, mode=spec.socket_mode)
    pci = await VfioUserPciAccess.open(spec.vvu, timeout=VVU_CONNECT_TIMEOUT)
    kick_mode: KickMode = "msix" if spec.vvu_kick_mode == "msix" else "direct"
    return VvuListener(pci, kick_mode=kick_mode)


def _passed_listener(spec: DeviceSpec, fd: int) -> UnixListener:
    """The device's listening socket as systemd passed it (socket activation): it must be the
    one the device's `socket` names; it stays systemd's (not removed when the device goes)."""
    if spec.socket is None:
        raise ValueError("a device behind a VVU device has no socket systemd could pass")
    sock = socket.socket(fileno=fd)
    try:
        bound = sock.getsockname()
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        family = sock.family
    finally:
        sock.detach()
    if family != socket.AF_UNIX or not listening:
        raise ValueError(f"fd {fd} is not a listening AF_UNIX socket")
    if not isinstance(bound, str) or os.path.abspath(bound) != os.path.abspath(spec.socket):
        raise ValueError(f"systemd passed fd {fd} bound to {bound!r}, not {spec.socket}")
    return UnixListener(fd=fd)


class Daemon:
    """The devices of one `vvu daemon`, by id."""

    def __init__(self) -> None:
        self.devices: dict[str, Device] = {}
        self.started = time.time()
        self._subscribers: set[Callable[[Event], None]] = set()
        self._fault_watch: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one add/remove at a time

    # --- events -------------------------------------------------------------------------------

    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Call `callback` with every event from now on; returns the unsubscribe function."""
        self._subscribers.add(callback)
        if self._fault_watch is None:
            self._fault_watch = asyncio.ensure_future(self._watch_faults())

        def unsubscribe() -> None:
            self._subscribers.discard(callback)
            if not self._subscribers and self._fault_watch is not None:
                self._fault_watch.cancel()
                self._fault_watch = None

        return unsubscribe

    def emit(self, name: str, device: str, data: dict[str, object]) -> None:
        log.info("device %s: %s %s", device, name, data)
        event = Event(name, device, data, time.time())
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception:  # one subscriber's bug must not silence the others
                log.exception("event subscriber failed")

    async def _watch_faults(self) -> None:
        """Publish ring faults: native workers stop on their own and cannot call back, so the
        rings of connected devices are looked at a few times a second, while anyone listens."""
        while True:
            await asyncio.sleep(FAULT_POLL_INTERVAL)
            for device in list(self.devices.values()):
                for index, why in device.engine.queue_faults().items():
                    if index not in device.reported_faults:
                        device.reported_faults.add(index)
                        self.emit("ring-broken", device.id, {"queue": index, "reason": why})

    # --- devices ------------------------------------------------------------------------------

    def get(self, device_id: str) -> Device:
        device = self.devices.get(device_id)
        if device is None:
            raise DaemonError(DaemonError.NOT_FOUND, f"no device {device_id!r}")
        return device

    async def add(self, spec: DeviceSpec, *, fd: int | None = None) -> Device:
        """Create and serve a device; nothing is left behind when that fails. `fd`: its
        listening socket, passed by systemd (socket activation), instead of binding `socket`."""
        async with self._lock:
            if spec.id in self.devices:
                raise DaemonError(DaemonError.EXISTS, f"device {spec.id!r} exists")
            path = os.path.abspath(spec.socket or spec.vvu or "")
            for other in self.devices.values():
                if os.path.abspath(other.spec.socket or other.spec.vvu or "") == path:
                    raise DaemonError(DaemonError.EXISTS, f"{spec.where} is device {other.id}'s")
            try:
                backend = spec.make_backend()
            except (OSError, ValueError) as err:
                raise DaemonError(DaemonError.FAILED, f"{spec.type}: {err}") from err
            try:
                listener = await _listen(spec, fd)
            except (OSError, ValueError, VvuError) as err:
                backend.close()
                raise DaemonError(
                    DaemonError.FAILED, f"cannot serve on {spec.where}: {err}"
                ) from err
            device = Device(spec, backend, listener, self.emit)
            self.devices[spec.id] = device
        self.emit(
            "device-added",
            spec.id,
            {"type": spec.type, "socket": spec.where, "description": backend.describe()},
        )
        return device

    async def remove(self, device_id: str) -> None:
        async with self._lock:
            device = self.get(device_id)
            del self.devices[device_id]
        await device.close()
        self.emit("device-removed", device_id, {})

    async def resize(self, device_id: str, size: int) -> bool:
        """Resize a blk device to `size` bytes and tell its front-end; returns whether told."""
        device = self.get(device_id)
        resize = getattr(device.backend, "resize", None)
        if resize is None:
            raise DaemonError(DaemonError.NOT_SUPPORTED, f"{device.spec.type} cannot be resized")
        try:
            changed = resize(size)
        except (OSError, ValueError) as err:
            raise DaemonError(DaemonError.FAILED, str(err)) from err
        if not changed:
            return False
        try:
            return await device.engine.config_changed()
        except VvuError as err:  # the front-end refused or did not answer
            raise DaemonError(DaemonError.FAILED, f"resized, but: {err}") from err

    async def set_read_only(self, device_id: str, read_only: bool) -> None:
        device = self.get(device_id)
        setter = getattr(device.backend, "set_read_only", None)
        if setter is None:
            raise DaemonError(
                DaemonError.NOT_SUPPORTED, f"{device.spec.type} has no read-only mode"
            )
        try:
            setter(read_only)
        except OSError as err:
            raise DaemonError(DaemonError.FAILED, str(err)) from err
        await device.engine.restart_rings()

    async def close(self) -> None:
        """Remove every device (their sockets go too)."""
        for device_id in list(self.devices):
            await self.remove(device_id)
        if self._fault_watch is not None:
            self._fault_watch.cancel()
            self._fault_watch = None
