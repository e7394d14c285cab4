"""`vvu daemon` and `vvu ctl`: the command lines of the daemon and of its management client."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

from vvu import stop_signals, systemd
from vvu.daemon.client import DaemonClient, DeviceInfo, DeviceStats, RpcError
from vvu.daemon.spec import ConfigFile, SpecError, load_config

__all__ = ["add_parsers"]

#: Where `vvu ctl` looks for the API socket when neither --api-socket nor the config says.
API_SOCKET_ENV = "VVU_API_SOCKET"


def _default_api_socket() -> str | None:
    return os.environ.get(API_SOCKET_ENV)


# --- vvu daemon --------------------------------------------------------------------------------


def cmd_daemon(args: argparse.Namespace) -> int:
    from vvu.daemon.api import API_FD_NAME, run_daemon  # noqa: PLC0415 (prometheus_client lazily)

    try:
        config = (
            load_config(args.config)
            if args.config
            else ConfigFile(api_socket=None, api_mode=0o600, metrics_http=None, devices=[])
        )
    except SpecError as err:
        print(f"vvu daemon: {err}", file=sys.stderr)
        return 2
    activated = dict(systemd.listen_fds())
    if list(activated) == ["unknown"]:  # one socket, unnamed (no LISTEN_FDNAMES): the API's
        activated = {API_FD_NAME: activated["unknown"]}
    api_socket = args.api_socket or config.api_socket or _default_api_socket()
    if api_socket is None and API_FD_NAME not in activated:
        print(
            f"vvu daemon: give --api-socket (or [api] socket in the config, or {API_SOCKET_ENV},"
            f" or a socket systemd passes named {API_FD_NAME!r})",
            file=sys.stderr,
        )
        return 2
    mode = int(args.api_socket_mode, 8) if args.api_socket_mode else config.api_mode
    try:
        with stop_signals.held():  # from the first socket until run_daemon handles them
            asyncio.run(
                run_daemon(
                    api_socket,
                    config.devices,
                    api_mode=mode,
                    metrics_http=args.metrics_http or config.metrics_http,
                    activated=activated,
                )
            )
    except (SpecError, OSError, ValueError) as err:
        print(f"vvu daemon: {err}", file=sys.stderr)
        return 1
    return 0


# --- vvu ctl -----------------------------------------------------------------------------------


def _option(text: str) -> tuple[str, str | int | bool]:
    """`KEY=VALUE` (integers and true/false typed) or `KEY` (a flag: true)."""
    key, sep, value = text.partition("=")
    if not sep:
        return key, True
    if value in ("true", "false"):
        return key, value == "true"
    if value.isdigit():
        return key, int(value)
    return key, value


def _device_line(device: DeviceInfo) -> str:
    where = device.get("socket") or f"VVU device {device.get('vvu')}"
    state = f"connected ({device['peer']})" if device["connected"] else "idle"
    return f"{device['id']:<16} {device['type']:<5} {where}  {state}  {device['description']}"


def _human_stats(stats: list[DeviceStats]) -> str:
    lines = []
    for device in stats:
        state = "connected" if device["connected"] else "idle"
        lines.append(f"{device['id']} ({device['type']}, {state}, {device['sessions']} sessions)")
        for queue in device["queues"]:
            shown = {
                k: v
                for k, v in queue.items()
                if k not in ("index", "fault", "latency_us_buckets") and v
            }
            text = " ".join(f"{k}={v}" for k, v in shown.items()) or "idle"
            fault = f" FAULT: {queue['fault']}" if queue["fault"] else ""
            lines.append(f"  queue {queue['index']}: {text}{fault}")
    return "\n".join(lines) or "no devices"


async def _ctl(args: argparse.Namespace) -> int:
    async with await DaemonClient.connect(args.api_socket) as api:
        result: Any
        human: str
        action = args.action
        if action == "device-add":
            options = dict(_option(o) for o in args.option)
            result = await api.device_add(
                args.id,
                args.type,
                args.socket_path,
                options,
                socket_mode=args.socket_mode,
                vvu=args.vvu,
                vvu_kick_mode=args.vvu_kick_mode,
            )
            where = result.get("socket") or f"VVU device {args.vvu}"
            human = f"{result['id']}: {result['description']} on {where}"
        elif action == "device-remove":
            await api.device_remove(args.id)
            result = None
            human = f"{args.id} removed"
        elif action == "device-list":
            result = await api.device_list()
            human = "\n".join(_device_line(d) for d in result) or "no devices"
        elif action == "resize":
            told = await api.resize(args.id, args.size)
            result = {"told": told}
            human = f"{args.id} resized; front-end {'told' if told else 'not told'}"
        elif action == "set-read-only":
            read_only = args.state == "on"
            await api.set_read_only(args.id, read_only)
            result = None
            human = f"{args.id} is {'read-only' if read_only else 'read-write'}"
        elif action == "disconnect":
            gone = await api.disconnect(args.id)
            result = {"disconnected": gone}
            human = f"{args.id}: " + ("front-end disconnected" if gone else "no front-end")
        elif action == "stats":
            result = await api.stats(args.id)
            human = _human_stats(result)
        elif action == "metrics":
            result = await api.metrics("openmetrics" if args.openmetrics else "prometheus")
            human = result.rstrip("\n")
        else:  # events
            await api.subscribe()
            print("subscribed" if not args.json else json.dumps({"subscribed": True}), flush=True)
            async for event in api.events():
                if args.json:
                    print(json.dumps(event), flush=True)
                else:
                    rest = {k: v for k, v in event.items() if k not in ("event", "device", "time")}
                    extra = " ".join(f"{k}={v}" for k, v in rest.items())
                    print(f"{event['device']}: {event['event']} {extra}".rstrip(), flush=True)
            return 0
    print(json.dumps(result, indent=2) if args.json else human)
    return 0


def cmd_ctl(args: argparse.Namespace) -> int:
    if args.api_socket is None:
        print(f"vvu ctl: give --api-socket (or set {API_SOCKET_ENV})", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_ctl(args))
    except RpcError as err:
        if args.json:
            print(json.dumps({"error": {"code": err.code, "message": err.message}}))
        print(f"vvu ctl {args.action}: {err.message} (error {err.code})", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"vvu ctl: cannot reach the daemon at {args.api_socket}: {err}", file=sys.stderr)
        return 1


# --- parsers -----------------------------------------------------------------------------------


def add_parsers(commands: Any) -> None:
    """Add `daemon` and `ctl` to vvu's subcommands."""
    daemon = commands.add_parser(
        "daemon",
        help="serve many devices in one process, managed over a JSON-RPC socket",
        description=(
            "Serve any number of devices of any back-end type, each on its own vhost-user "
            "socket, from a TOML config file (--config) and added or removed at runtime through "
            "the management API (JSON-RPC 2.0 on --api-socket, mode 0600; `vvu ctl`). A "
            "front-end's fault ends only its own session. Until SIGINT or SIGTERM; the sockets "
            "it made are removed on exit. Under systemd it tells NOTIFY_SOCKET READY=1 and "
            "STOPPING=1, and serves the sockets passed (LISTEN_FDS) by their names "
            "(LISTEN_FDNAMES): api, metrics, or a configured device's id. docs/daemon.md."
        ),
    )
    daemon.add_argument("--config", metavar="FILE", help="TOML file: [api] and [[device]] tables")
    daemon.add_argument(
        "--api-socket",
        metavar="PATH",
        help=f"the management socket (or [api] socket, {API_SOCKET_ENV})",
    )
    daemon.add_argument(
        "--api-socket-mode", metavar="OCTAL", help="permissions of the management socket (600)"
    )
    daemon.add_argument(
        "--metrics-http",
        metavar="HOST:PORT|unix:PATH",
        help=(
            "also serve the metrics over HTTP: at http://HOST:PORT/metrics (e.g. "
            "127.0.0.1:9101), or on the unix socket PATH (mode 0600; GET /metrics)"
        ),
    )
    daemon.set_defaults(func=cmd_daemon)

    ctl = commands.add_parser(
        "ctl",
        help="talk to a running `vvu daemon` (add/remove/list devices, stats, metrics, events)",
        description="The management client of `vvu daemon`; --json prints the API's answer.",
    )
    ctl.add_argument("--api-socket", default=_default_api_socket(), metavar="PATH")
    ctl.add_argument("--json", action="store_true", help="print the JSON result")
    actions = ctl.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser("device-add", help="add a device")
    add.add_argument("id")
    add.add_argument("type", help="back-end type (blk, net, rng, or a plugin's)")
    where = add.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket-path", help="the device's vhost-user socket")
    where.add_argument(
        "--vvu",
        metavar="DEVICE_SOCK",
        help="serve through a virtio-vhost-user device (its vfio-user socket): `serve --vvu`",
    )
    add.add_argument("--vvu-kick-mode", choices=("direct", "msix"), help="with --vvu (direct)")
    add.add_argument("--socket-mode", help="octal (600)")
    add.add_argument(
        "-o",
        "--option",
        action="append",
        default=[],
        metavar="KEY[=VALUE]",
        help=(
            "a back-end option as in `vvu serve TYPE --KEY VALUE` "
            "(e.g. -o blk-file=/d.img -o read-only)"
        ),
    )
    for name, text in (
        ("device-remove", "remove a device"),
        ("disconnect", "drop a device's front-end"),
    ):
        actions.add_parser(name, help=text).add_argument("id")
    actions.add_parser("device-list", help="list devices")
    resize = actions.add_parser("resize", help="resize a blk device (bytes)")
    resize.add_argument("id")
    resize.add_argument("size", type=int)
    ro = actions.add_parser("set-read-only", help="make a blk device read-only (on) or not")
    ro.add_argument("id")
    ro.add_argument("state", choices=("on", "off"))
    stats = actions.add_parser("stats", help="per-device and per-queue statistics")
    stats.add_argument("id", nargs="?")
    metrics = actions.add_parser("metrics", help="Prometheus text")
    metrics.add_argument("--openmetrics", action="store_true", help="OpenMetrics text instead")
    actions.add_parser("events", help="print events as they happen (until Ctrl-C)")
    ctl.set_defaults(func=cmd_ctl)
