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
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

from vvu import stop_signals, systemd
from vvu.daemon.core import Daemon, DaemonError, Event
from vvu.daemon.metrics import MetricsServer, registry_for, render
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


#: `--metrics-http unix:PATH`: the metrics on an AF_UNIX socket (as nginx-prometheus-exporter's
#: `-web.listen-address=unix:PATH` and gunicorn's `--bind unix:PATH` spell it).
UNIX_PREFIX = "unix:"
#: The names (FileDescriptorName=) of the sockets systemd may pass besides device ids.
API_FD_NAME, METRICS_FD_NAME = "api", "metrics"


def _http_address(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--metrics-http wants HOST:PORT or unix:PATH, not {value!r}")
    return host.strip("[]"), int(port)


def _passed_socket(fd: int, name: str, *, unix: bool = False) -> socket.socket:
    """The listening stream socket systemd passed as `fd` (FileDescriptorName=`name`); `unix`:
    it must be an AF_UNIX one."""
    sock = socket.socket(fileno=fd)
    listening = sock.type == socket.SOCK_STREAM and sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_ACCEPTCONN
    )
    if not listening or (unix and sock.family != socket.AF_UNIX):
        sock.detach()
        kind = "a listening unix stream socket" if unix else "a listening stream socket"
        raise ValueError(f"the socket systemd passed as {name!r} (fd {fd}) is not {kind}")
    return sock


def _check_activated(activated: Mapping[str, int], devices: Sequence[DeviceSpec]) -> None:
    """Every socket systemd passed must be the API's, the metrics' or a configured device's."""
    ids = {spec.id for spec in devices}
    stray = sorted(set(activated) - ids - {API_FD_NAME, METRICS_FD_NAME})
    if stray:
        raise SpecError(
            f"systemd passed socket(s) named {', '.join(stray)}: FileDescriptorName= must be "
            f"{API_FD_NAME!r}, {METRICS_FD_NAME!r} or the id of a [[device]] of the config"
        )


def _metrics_socket(
    metrics_http: str | None, activated: Mapping[str, int], made: list[str]
) -> tuple[socket.socket | None, str | None]:
    """The listening socket of the metrics' HTTP server when vvu's own server serves it (passed
    by systemd, or unix:PATH, whose path is added to `made`), and where the metrics are (None:
    nowhere). HOST:PORT is prometheus_client's `start_http_server`'s: (None, where)."""
    if METRICS_FD_NAME in activated:
        sock = _passed_socket(activated[METRICS_FD_NAME], METRICS_FD_NAME)
        return sock, f"the socket systemd passed ({_sockname(sock)})"
    if metrics_http is None:
        return None, None
    if metrics_http.startswith(UNIX_PREFIX):
        path = metrics_http.removeprefix(UNIX_PREFIX)
        if not path:
            raise ValueError("--metrics-http unix:PATH needs a PATH")
        sock = listening_socket(path, 0o600)
        made.append(path)
        return sock, f"http+unix:{path} (GET /metrics)"
    _http_address(metrics_http)  # refused here when malformed
    return None, f"http://{metrics_http}/metrics"


def _api_socket(
    path: str | None, mode: int, activated: Mapping[str, int], made: list[str]
) -> tuple[socket.socket, str]:
    """The management socket (passed by systemd as "api", or bound at `path`, which is then
    added to `made`) and where it is."""
    if API_FD_NAME in activated:
        sock = _passed_socket(activated[API_FD_NAME], API_FD_NAME, unix=True)
        return sock, f"the socket systemd passed ({_sockname(sock)})"
    assert path is not None, "no API socket"
    sock = listening_socket(path, mode)
    made.append(path)
    return sock, path


async def run_daemon(
    api_socket: str | None,
    devices: Sequence[DeviceSpec],
    *,
    api_mode: int = 0o600,
    metrics_http: str | None = None,
    activated: Mapping[str, int] | None = None,
) -> None:
    """`vvu daemon`: serve `devices` and the management API until SIGINT or SIGTERM.

    `metrics_http`: HOST:PORT or unix:PATH (mode 0600). `activated`: the sockets systemd passed,
    by name (`vvu.systemd.listen_fds`): "api" is the management socket (then `api_socket` may
    be None), "metrics" the metrics' HTTP socket, any other name the listening socket of the
    configured device with that id. Passed sockets are systemd's: they are not removed on exit.
    """
    activated = dict(activated or {})
    _check_activated(activated, devices)
    loop = asyncio.get_running_loop()
    daemon = Daemon()
    registry = registry_for(daemon, loop)
    api = ManagementApi(daemon, registry)
    server: asyncio.Server | None = None
    http: list[WSGIServer] = []  # the metrics' HTTP server, serving from its thread
    made: list[str] = []  # socket files this process created, removed on exit
    try:
        for spec in devices:
            try:
                await daemon.add(spec, fd=activated.get(spec.id))
            except DaemonError as err:
                raise SpecError(f"device {spec.id}: {err}") from err
        metrics_sock, metrics_where = _metrics_socket(metrics_http, activated, made)
        if metrics_sock is not None:
            http.append(MetricsServer(metrics_sock, registry).start())
        elif metrics_http is not None:
            host, port = _http_address(metrics_http)
            http.append(start_http_server(port, host, registry)[0])
        sock, api_where = _api_socket(api_socket, api_mode, activated, made)
        server = await asyncio.start_unix_server(api.rpc.serve_client, sock=sock, limit=MAX_LINE)
        stop = asyncio.Event()
        stop_signals.handle(loop, {signal.SIGINT: stop.set, signal.SIGTERM: stop.set})
        where = f"; metrics on {metrics_where}" if metrics_where else ""
        print(
            f"vvu: daemon serving {len(daemon.devices)} device(s); management API on "
            f"{api_where}{where}",
            file=sys.stderr,
            flush=True,
        )
        systemd.notify(f"READY=1\nSTATUS=serving {len(daemon.devices)} device(s)")
        await stop.wait()
        systemd.notify("STOPPING=1")
    finally:
        for httpd in http:
            httpd.shutdown()
            httpd.server_close()
        if server is not None:
            server.close()
            api.rpc.close()
        for path in made:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        served = sum(d.engine.sessions_served for d in daemon.devices.values())
        await daemon.close()
        print(f"vvu: daemon stopped ({served} front-end session(s))", file=sys.stderr)


def _sockname(sock: socket.socket) -> str:
    name = sock.getsockname()
    return name if isinstance(name, str) else ":".join(str(part) for part in name[:2])
