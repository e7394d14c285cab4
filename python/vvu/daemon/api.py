"""The management API of `vvu daemon`: JSON-RPC 2.0 methods over its unix socket.

Methods (params by name; docs/daemon.md has examples): device-add, device-remove, device-list,
resize, set-read-only, disconnect, stats, metrics, subscribe, unsubscribe. Every request is
validated before it changes anything; a refused one gets a JSON-RPC error whose code says why:
-32602 invalid params, 1 no such device, 2 the device (or its socket) exists, 3 not supported by
the device type, 4 failed (an OS error, a refusing front-end).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

from vvu import systemd
from vvu.daemon.core import Daemon, DaemonError, Event
from vvu.daemon.metrics import registry_for, render
from vvu.daemon.rpc import (
    INVALID_PARAMS,
    MAX_LINE,
    Connection,
    Method,
    Param,
    RpcFault,
    RpcServer,
)
from vvu.daemon.spec import DeviceSpec, SpecError
from vvu.transport.unix import listening_socket

log = logging.getLogger(__name__)

__all__ = ["ManagementApi", "run_daemon"]

#: The method that carries events to subscribed clients (a JSON-RPC notification).
EVENT_METHOD = "event"


class ManagementApi:
    """The methods, bound to one daemon."""

    def __init__(self, daemon: Daemon, registry: CollectorRegistry) -> None:
        self.daemon = daemon
        self.registry = registry
        s, i, b, d = (str,), (int,), (bool,), (dict,)
        methods = [
            Method(
                "device-add",
                (
                    Param("id", s),
                    Param("type", s),
                    Param("socket", s, required=False),
                    Param("socket-mode", s, required=False),
                    Param("options", d, required=False),
                    Param("vvu", s, required=False),
                    Param("vvu-kick-mode", s, required=False),
                ),
                self.device_add,
                "Add a device, serve it on its socket (or VVU device); returns it as listed.",
            ),
            Method("device-remove", (Param("id", s),), self.device_remove, "Remove a device."),
            Method("device-list", (), self.device_list, "Every device."),
            Method(
                "resize",
                (Param("id", s), Param("size", i)),
                self.resize,
                "Resize a blk device to `size` bytes and tell its front-end.",
            ),
            Method(
                "set-read-only",
                (Param("id", s), Param("read-only", b)),
                self.set_read_only,
                "Make a blk device read-only or read-write.",
            ),
            Method(
                "disconnect", (Param("id", s),), self.disconnect, "Drop the device's front-end."
            ),
            Method(
                "stats",
                (Param("id", s, required=False),),
                self.stats,
                "Per-device and per-queue statistics.",
            ),
            Method(
                "metrics",
                (Param("format", s, required=False),),
                self.metrics,
                "Statistics as Prometheus (default) or OpenMetrics text.",
            ),
            Method("subscribe", (), self.subscribe, "Receive events as `event` notifications."),
            Method("unsubscribe", (), self.unsubscribe, "Stop receiving events."),
        ]
        self.rpc = RpcServer({m.name: m for m in methods})
        self._subscriptions: dict[Connection, Callable[[], None]] = {}

    async def device_add(self, conn: Connection, params: dict[str, Any]) -> object:
        try:
            spec = DeviceSpec.from_mapping(params)
        except SpecError as err:
            raise RpcFault(INVALID_PARAMS, str(err)) from err
        device = await _daemon_call(self.daemon.add(spec))
        return device.info()

    async def device_remove(self, conn: Connection, params: dict[str, Any]) -> object:
        await _daemon_call(self.daemon.remove(params["id"]))
        return None

    async def device_list(self, conn: Connection, params: dict[str, Any]) -> object:
        return [device.info() for device in self.daemon.devices.values()]

    async def resize(self, conn: Connection, params: dict[str, Any]) -> object:
        if params["size"] <= 0:
            raise RpcFault(INVALID_PARAMS, "size must be a positive number of bytes")
        told = await _daemon_call(self.daemon.resize(params["id"], params["size"]))
        return {"told": told}

    async def set_read_only(self, conn: Connection, params: dict[str, Any]) -> object:
        await _daemon_call(self.daemon.set_read_only(params["id"], params["read-only"]))
        return None

    async def disconnect(self, conn: Connection, params: dict[str, Any]) -> object:
        device = _lookup(self.daemon, params["id"])
        return {"disconnected": device.disconnect()}

    async def stats(self, conn: Connection, params: dict[str, Any]) -> object:
        if "id" in params:
            return [_lookup(self.daemon, params["id"]).stats()]
        return [device.stats() for device in self.daemon.devices.values()]

    async def metrics(self, conn: Connection, params: dict[str, Any]) -> object:
        kind = params.get("format", "prometheus")
        if kind not in ("prometheus", "openmetrics"):
            raise RpcFault(INVALID_PARAMS, f"format is prometheus or openmetrics, not {kind!r}")
        return render(self.registry, openmetrics=kind == "openmetrics")

    async def subscribe(self, conn: Connection, params: dict[str, Any]) -> object:
        if conn not in self._subscriptions:

            def deliver(event: Event) -> None:
                conn.notify(EVENT_METHOD, event.to_json())

            self._subscriptions[conn] = self.daemon.subscribe(deliver)
            conn.on_close.append(lambda: self._drop(conn))
        return True

    async def unsubscribe(self, conn: Connection, params: dict[str, Any]) -> object:
        self._drop(conn)
        return True

    def _drop(self, conn: Connection) -> None:
        unsubscribe = self._subscriptions.pop(conn, None)
        if unsubscribe is not None:
            unsubscribe()


def _lookup(daemon: Daemon, device_id: str) -> Any:
    try:
        return daemon.get(device_id)
    except DaemonError as err:
        raise RpcFault(err.code, str(err)) from err


async def _daemon_call(call: Any) -> Any:
    try:
        return await call
    except DaemonError as err:
        raise RpcFault(err.code, str(err)) from err


def _http_address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--metrics-http wants HOST:PORT, not {value!r}")
    return host.strip("[]"), int(port)


async def run_daemon(
    api_socket: str,
    devices: Sequence[DeviceSpec],
    *,
    api_mode: int = 0o600,
    metrics_http: str | None = None,
) -> None:
    """`vvu daemon`: serve `devices` and the management API until SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    daemon = Daemon()
    registry = registry_for(daemon, loop)
    api = ManagementApi(daemon, registry)
    server: asyncio.Server | None = None
    http = None
    try:
        for spec in devices:
            try:
                await daemon.add(spec)
            except DaemonError as err:
                raise SpecError(f"device {spec.id}: {err}") from err
        sock = listening_socket(api_socket, api_mode)
        server = await asyncio.start_unix_server(api.rpc.serve_client, sock=sock, limit=MAX_LINE)
        if metrics_http is not None:
            host, port = _http_address(metrics_http)
            http, _ = start_http_server(port, host, registry)
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        where = f"; metrics on http://{metrics_http}/metrics" if metrics_http else ""
        print(
            f"vvu: daemon serving {len(daemon.devices)} device(s); management API on "
            f"{api_socket}{where}",
            file=sys.stderr,
            flush=True,
        )
        systemd.notify(f"READY=1\nSTATUS=serving {len(daemon.devices)} device(s)")
        await stop.wait()
        systemd.notify("STOPPING=1")
    finally:
        if http is not None:
            http.shutdown()
            http.server_close()
        if server is not None:
            server.close()
            api.rpc.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(api_socket)
        served = sum(d.engine.sessions_served for d in daemon.devices.values())
        await daemon.close()
        print(f"vvu: daemon stopped ({served} front-end session(s))", file=sys.stderr)
