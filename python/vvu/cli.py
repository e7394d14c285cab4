"""The `vvu` command: serve back-ends, probe any back-end, run the demo."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import struct
import sys
import uuid
from collections.abc import Sequence

from vvu import bench, stop_signals, systemd
from vvu.backends import Backend, available_backends
from vvu.daemon.cli import add_parsers as add_daemon_parsers
from vvu.demo import run_demo
from vvu.device.vvu import BACKEND_UP, FRONTEND_UP, VVU_VIRTIO_ID, VvuDevice
from vvu.engine import BackendEngine
from vvu.errors import VvuError
from vvu.frontend import Frontend
from vvu.pci.sysfs import bind_vfio
from vvu.pci.vfio import VfioPciAccess
from vvu.pci.virtio_driver import VirtioPciDriver, VirtioPciError
from vvu.protocol import U64, FrontendRequest, ProtocolFeature, VhostFeature, feature_names
from vvu.trace import run_trace
from vvu.transport.base import Channel, Listener
from vvu.transport.unix import UnixConnector, UnixListener, inherited_socket
from vvu.transport.vvu import KICK_MODES, KickMode, VvuListener
from vvu.vfio_user import PciAccess, VfioUserPciAccess
from vvu.vfio_user.server import VfioUserServer

log = logging.getLogger("vvu")

#: vhost-user.json "type" for each virtio device id (QEMU docs/interop/vhost-user.json).
_CAPABILITY_TYPES = {
    1: "net", 2: "block", 3: "console", 4: "rng", 5: "scsi", 16: "gpu", 18: "input",
    19: "vsock", 26: "fs",
}  # fmt: skip


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose < 0 else (logging.INFO, logging.DEBUG)[min(verbose, 1)]
    logging.basicConfig(
        level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr
    )


# --- serve -----------------------------------------------------------------------------------


def capabilities(backend_cls: type[Backend]) -> dict[str, object]:
    """The --print-capabilities JSON (QEMU's back-end program conventions)."""
    caps: dict[str, object] = {"type": _CAPABILITY_TYPES.get(backend_cls.device_id, "unknown")}
    if backend_cls.name == "blk":
        caps["features"] = ["read-only", "blk-file"]
    return caps


async def _open_vvu(
    vvu: str | None, vvu_pci: str | None, bind: bool, timeout: float = 5.0
) -> PciAccess:
    """The VVU device: over vfio-user (--vvu SOCK) or through Linux VFIO (--vvu-pci BDF)."""
    if vvu_pci is not None:
        return await VfioPciAccess.open(vvu_pci, bind=bind)
    assert vvu is not None
    return await VfioUserPciAccess.open(vvu, timeout=timeout)


async def _serve(
    backend: Backend,
    endpoint: Listener | Channel | None,
    vvu: str | None = None,
    kick_mode: KickMode = "direct",
    *,
    vvu_pci: str | None = None,
    bind: bool = False,
    where: str | None = None,
) -> None:
    """Serve `endpoint` until SIGINT or SIGTERM: a listener's front-ends one after another, or
    the one session of a connected channel (then return); None: the VVU device. `where` names
    a listener in the "serving" line. A service manager (systemd's NOTIFY_SOCKET) is told
    READY=1 once it serves and STOPPING=1 when it stops."""
    engine = BackendEngine(backend)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reloads: set[asyncio.Task[None]] = set()

    def on_sighup() -> None:
        task = asyncio.ensure_future(_reload(backend, engine))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    # Before anything that may wait (the VVU device's open): a stop asked for meanwhile is
    # honoured as soon as serving would start.
    stop_signals.handle(
        loop, {signal.SIGINT: stop.set, signal.SIGTERM: stop.set, signal.SIGHUP: on_sighup}
    )
    if endpoint is None:  # --vvu / --vvu-pci: a VVU device
        pci = await _open_vvu(vvu, vvu_pci, bind)
        endpoint = VvuListener(pci, kick_mode=kick_mode)
        where = f"VVU device {vvu}" if vvu_pci is None else f"VVU device {vvu_pci} (VFIO)"
    elif isinstance(endpoint, UnixConnector):
        where = f"{endpoint.path} (client)"
    elif isinstance(endpoint, Channel):
        where = f"{endpoint.peer} (a connected socket: one session)"
    elif where is None:
        where = getattr(endpoint, "path", None) or "inherited fd"
    session = (
        engine.serve(endpoint) if isinstance(endpoint, Channel) else engine.serve_forever(endpoint)
    )
    server = asyncio.ensure_future(session)
    # The summary lines ("vvu: serving", "vvu: stopped after") are printed, not logged: scripts
    # read them at every verbosity, and logging them too would say each event twice.
    print(f"vvu: serving {backend.describe()} on {where}", file=sys.stderr, flush=True)
    systemd.notify(f"READY=1\nSTATUS=serving {backend.describe()} on {where}")
    stopper = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({server, stopper}, return_when=asyncio.FIRST_COMPLETED)
    systemd.notify("STOPPING=1")
    server.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await server
    stopper.cancel()
    loop.remove_signal_handler(signal.SIGHUP)
    for task in list(reloads):
        task.cancel()
    if isinstance(endpoint, VvuListener):
        await endpoint.aclose()  # clears BACKEND_UP, closes the vfio-user connection
    else:
        endpoint.close()
    if server in done and server.exception() is not None:
        raise server.exception()  # type: ignore[misc]
    print(f"vvu: stopped after {engine.sessions_served} front-end session(s)", file=sys.stderr)


async def _reload(backend: Backend, engine: BackendEngine) -> None:
    """SIGHUP: the back-end re-reads its outside state (blk: the image size); a changed config
    space is announced to the front-end (BACKEND_CONFIG_CHANGE_MSG)."""
    try:
        told = await engine.reload()
    except (OSError, ValueError, VvuError) as err:
        log.error("SIGHUP: reload failed: %s", err)
        return
    log.info(
        "SIGHUP: %s; front-end %s",
        backend.describe(),
        "told"
        if told
        else "not told (nothing changed, or no session, back-end channel or CONFIG, or no ring "
        "started yet: then when one starts)",
    )


def _capabilities_asked(argv: Sequence[str]) -> type[Backend] | None:
    """The back-end of `vvu [-v|-q] serve NAME ... --print-capabilities ...`, if that is the
    command line: the conventions say the option prints the capabilities and exits whatever else
    is given, so it is answered before argparse can refuse the rest."""
    if "--print-capabilities" not in argv or "serve" not in argv:
        return None
    at = list(argv).index("serve")
    if at + 1 >= len(argv) or not all(a.startswith("-") for a in argv[:at]):
        return None
    return available_backends().get(argv[at + 1])


def _serve_usage(
    args: argparse.Namespace, kick_mode: KickMode, activated: list[tuple[str, int]]
) -> str | None:
    """What is wrong with a `vvu serve` command line, or None. `activated`: the sockets systemd
    passed, used when no other endpoint is given."""
    given = 4 - [args.socket_path, args.fd, args.vvu, args.vvu_pci].count(None)
    if given > 1 or (given == 0 and not activated):
        return (
            "give exactly one of --socket-path and --fd (or --vvu, --vvu-pci), or start vvu "
            "through systemd socket activation (LISTEN_FDS)"
        )
    if args.fd_name is not None and (given or not activated):
        return "--fd-name picks one of the sockets systemd passed (LISTEN_FDS, LISTEN_FDNAMES)"
    if args.vvu_pci is not None and kick_mode == "direct":
        return (
            "--vvu-pci needs --vvu-kick-mode msix: direct kicks hand the driver the front-end's "
            "eventfds over vfio-user, which a VMM does not pass into its guest"
        )
    if args.connect and args.socket_path is None:
        return "--connect goes with --socket-path (the front-end's listening socket)"
    if args.vvu_pci_bind and args.vvu_pci is None:
        return "--vvu-pci-bind goes with --vvu-pci"
    return None


def _activated_socket(activated: list[tuple[str, int]], name: str | None) -> tuple[str, int]:
    """The one socket systemd passed, or the one called `name` (FileDescriptorName=)."""
    names = ", ".join(f"fd {fd} {n!r}" for n, fd in activated)
    if name is None:
        if len(activated) > 1:
            raise ValueError(f"systemd passed {len(activated)} sockets ({names}): --fd-name NAME")
        return activated[0]
    for passed in activated:
        if passed[0] == name:
            return passed
    raise ValueError(f"systemd passed no socket named {name!r} ({names})")


def cmd_serve(args: argparse.Namespace) -> int:
    backend_cls: type[Backend] = args.backend_cls
    if args.print_capabilities:  # only reached through a caller of build_parser() itself
        print(json.dumps(capabilities(backend_cls)))
        return 0
    kick_mode: KickMode = args.vvu_kick_mode or ("direct" if args.vvu_pci is None else "msix")
    activated = systemd.listen_fds()
    usage = _serve_usage(args, kick_mode, activated)
    if usage is not None:
        print(f"vvu serve: {usage}", file=sys.stderr)
        return 2
    try:
        backend = backend_cls.from_arguments(args)
    except (OSError, ValueError) as err:
        print(f"vvu serve {backend_cls.name}: {err}", file=sys.stderr)
        return 1
    with stop_signals.held():  # from the listening socket until _serve handles them
        return _listen_and_serve(args, backend, kick_mode, activated)


def _listen_and_serve(
    args: argparse.Namespace,
    backend: Backend,
    kick_mode: KickMode,
    activated: list[tuple[str, int]],
) -> int:
    """`vvu serve` from its endpoint on: open it, serve until stopped, close `backend`."""
    endpoint: Listener | Channel | None = None
    where = None
    try:
        if args.socket_path is None and args.fd is None and args.vvu is None and activated:
            name, fd = _activated_socket(activated, args.fd_name)
            endpoint, where = inherited_socket(fd), f"socket-activated fd {fd} ({name})"
        elif args.fd is not None:
            endpoint = inherited_socket(args.fd)
        elif args.connect:
            endpoint = UnixConnector(args.socket_path)
        elif args.socket_path is not None:
            endpoint = UnixListener(args.socket_path, mode=int(args.socket_mode, 8))
    except (OSError, ValueError) as err:
        print(f"vvu serve: cannot listen: {err}", file=sys.stderr)
        return 1
    try:
        asyncio.run(
            _serve(
                backend,
                endpoint,
                args.vvu,
                kick_mode,
                vvu_pci=args.vvu_pci,
                bind=args.vvu_pci_bind,
                where=where,
            )
        )
    except VvuError as err:  # e.g. the VVU device's socket cannot be reached
        print(f"vvu serve: {err}", file=sys.stderr)
        return 1
    finally:
        backend.close()
    return 0


# --- device ----------------------------------------------------------------------------------


async def _device(args: argparse.Namespace) -> None:
    device = VvuDevice(
        UnixListener(args.socket_path, mode=int(args.socket_mode, 8)),
        uuid=args.uuid.bytes if args.uuid is not None else None,
        max_queues=args.max_queues,
        device_id=args.device_id,
        frontend_memory=args.frontend_memory,
    )
    server = VfioUserServer(device, args.vfio_user)
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(server.serve_forever())
    loop.add_signal_handler(signal.SIGUSR1, lambda: _print_device_stats(server, device))
    stop_signals.handle(loop, {signal.SIGINT: task.cancel, signal.SIGTERM: task.cancel})
    print(
        f"vvu: virtio-vhost-user device {device.uuid.hex()} (virtio id {args.device_id}, "
        f"{args.max_queues} vhost queues): front-ends connect to {args.socket_path}, "
        f"the driver to {args.vfio_user}"
        + (
            f"; BAR4 is {args.frontend_memory} ({device.shm_layout[1][1]:#x} bytes)"
            if args.frontend_memory
            else ""
        ),
        file=sys.stderr,
        flush=True,
    )
    cpu0 = os.times()
    try:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        _print_device_stats(server, device)
        server.close()
        device.close()
        cpu = os.times()
        used = cpu.user - cpu0.user + cpu.system - cpu0.system
        print(
            f"vvu: device stopped after {device.sessions} front-end session(s); "
            f"device process CPU time {used:.3f} s",
            file=sys.stderr,
        )


def _print_device_stats(server: VfioUserServer, device: VvuDevice) -> None:
    """One line of JSON on stderr (SIGUSR1, and at exit): what reached the device by vfio-user
    message (commands, region accesses by region), doorbells rung by message, kicks relayed."""
    stats = {
        **server.stats(),
        "doorbell_writes": device.doorbell_writes,
        "kicks_forwarded": device.kicks_forwarded,
        "sessions": device.sessions,
    }
    print(f"vvu: device stats {json.dumps(stats, sort_keys=True)}", file=sys.stderr, flush=True)


def cmd_device(args: argparse.Namespace) -> int:
    try:
        with stop_signals.held():  # from the sockets until _device handles them
            asyncio.run(_device(args))
    except (OSError, ValueError) as err:
        print(f"vvu device: {err}", file=sys.stderr)
        return 1
    return 0


# --- probe -----------------------------------------------------------------------------------


async def _probe(path: str, config_size: int, timeout: float) -> dict[str, object]:
    report: dict[str, object] = {"socket": path}
    frontend = await Frontend.connect(path, timeout=timeout)
    try:
        features = await frontend.request_u64(FrontendRequest.GET_FEATURES)
        report["features"] = f"{features:#x}"
        report["feature_names"] = feature_names(features)
        if features & VhostFeature.PROTOCOL_FEATURES.mask:
            protocol = await frontend.request_u64(FrontendRequest.GET_PROTOCOL_FEATURES)
            report["protocol_features"] = f"{protocol:#x}"
            report["protocol_feature_names"] = ProtocolFeature.names(protocol)
            wanted = protocol & (
                ProtocolFeature.MQ.mask
                | ProtocolFeature.CONFIG.mask
                | ProtocolFeature.CONFIGURE_MEM_SLOTS.mask
            )
            await frontend.request(FrontendRequest.SET_PROTOCOL_FEATURES, U64(wanted))
            frontend.protocol_features = wanted
            if protocol & ProtocolFeature.MQ.mask:
                report["queues"] = await frontend.request_u64(FrontendRequest.GET_QUEUE_NUM)
            if protocol & ProtocolFeature.CONFIGURE_MEM_SLOTS.mask:
                report["max_mem_slots"] = await frontend.request_u64(
                    FrontendRequest.GET_MAX_MEM_SLOTS
                )
            if protocol & ProtocolFeature.CONFIG.mask and config_size:
                report["config"] = (await frontend.get_config(0, config_size)).hex()
    finally:
        await frontend.close()
    return report


#: virtio_pci_cap cfg_type names (virtio 1.2 §4.1.4; 6 and 7 are virtio-vhost-user's).
_CFG_TYPE_NAMES = {
    1: "COMMON",
    2: "NOTIFY",
    3: "ISR",
    4: "DEVICE",
    5: "PCI_CFG",
    6: "DEVICE_AUX_NOTIFY",
    7: "DRIVER_AUX_NOTIFY",
    8: "SHARED_MEMORY",
    9: "VENDOR",
}
_VVU_STATUS_BITS = ((BACKEND_UP, "BACKEND_UP"), (FRONTEND_UP, "FRONTEND_UP"))


async def _probe_vvu(
    path: str | None, bdf: str | None = None, bind: bool = False
) -> dict[str, object]:
    """Discover a VVU device (over vfio-user, or through Linux VFIO) without resetting or
    initialising it: config space reads, BAR0 common/device config reads, and
    device_feature_select writes only."""
    report: dict[str, object] = {"vvu_socket": path} if bdf is None else {"vvu_pci": bdf}
    pci = await _open_vvu(path, bdf, bind, timeout=0.0)
    try:
        drv = await VirtioPciDriver.open(pci)
        vendor, device = await pci.config_read_u16(0), await pci.config_read_u16(2)
        sub_vendor, sub_device = await pci.config_read_u16(0x2C), await pci.config_read_u16(0x2E)
        report["pci_id"] = f"{vendor:04x}:{device:04x}"
        report["pci_subsystem"] = f"{sub_vendor:04x}:{sub_device:04x}"
        report["revision"] = await pci.config_read_u8(8)
        report["virtio_device_id"] = drv.virtio_id
        features = await drv.device_features()
        report["device_features"] = f"{features:#x}"
        report["device_feature_names"] = [
            "VERSION_1" if bit == 32 else f"bit{bit}" for bit in range(64) if features >> bit & 1
        ]
        report["virtio_status"] = f"{await drv.status():#x}"
        config = await drv.read_config(0, 24)
        status, max_queues = struct.unpack_from("<II", config)
        report["status"] = f"{status:#x}"
        report["status_names"] = [name for bit, name in _VVU_STATUS_BITS if status & bit]
        report["max_vhost_queues"] = max_queues
        report["uuid"] = str(uuid.UUID(bytes=config[8:24]))
        caps: list[dict[str, object]] = []
        for cap in drv.caps:
            entry: dict[str, object] = {
                "at": f"{cap.at:#x}",
                "type": _CFG_TYPE_NAMES.get(cap.cfg_type, str(cap.cfg_type)),
                "bar": cap.bar,
                "offset": cap.offset,
                "length": cap.length,
            }
            if cap.cfg_type == 8 and len(cap.extra) >= 8:  # virtio_pci_cap64
                high_offset, high_length = struct.unpack_from("<II", cap.extra)
                entry["offset"] = cap.offset | high_offset << 32
                entry["length"] = cap.length | high_length << 32
                entry["shmid"] = cap.cap_id
            if cap.cfg_type in (2, 6) and len(cap.extra) >= 4:  # notify multiplier
                entry["multiplier"] = struct.unpack_from("<I", cap.extra)[0]
            caps.append(entry)
        report["capabilities"] = caps
        report["bar_sizes"] = {str(bar): pci.bar_info(bar).size for bar in range(6)}
        report["msix_vectors"] = await pci.msix_vectors()
    finally:
        await pci.close()  # not drv.close(): that would reset the device
    return report


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n:#x}"


def _print_vvu_report(report: dict[str, object]) -> None:
    for key, value in report.items():
        if key == "capabilities":
            assert isinstance(value, list)
            print("capabilities")
            for cap in value:
                extra = "".join(f" {k} {cap[k]}" for k in ("shmid", "multiplier") if k in cap)
                print(
                    f"  {cap['at']:>5} {cap['type']:18} bar {cap['bar']} "
                    f"offset {cap['offset']:#x} length {cap['length']:#x}{extra}"
                )
        elif key == "bar_sizes":
            assert isinstance(value, dict)
            sizes = ", ".join(f"BAR{b} {_size(s)}" for b, s in value.items() if s)
            print(f"{'bar_sizes':24} {sizes}")
        elif isinstance(value, list):
            print(f"{key:24} {' '.join(str(v) for v in value) or '-'}")
        else:
            print(f"{key:24} {value}")


def cmd_probe(args: argparse.Namespace) -> int:
    if args.vvu is not None or args.vvu_pci is not None:
        try:
            report = asyncio.run(
                asyncio.wait_for(
                    _probe_vvu(args.vvu, args.vvu_pci, args.vvu_pci_bind), args.timeout
                )
            )
        except TimeoutError:
            print(
                f"vvu probe: no answer from {args.vvu or args.vvu_pci} within {args.timeout} s "
                "(is a driver attached? the device serves one vfio-user client at a time)",
                file=sys.stderr,
            )
            return 1
        except (VvuError, OSError, VirtioPciError) as err:
            print(f"vvu probe: {err}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            _print_vvu_report(report)
        return 0
    try:
        report = asyncio.run(_probe(args.socket_path, args.config_size, args.timeout))
    except (VvuError, OSError) as err:
        print(f"vvu probe: {err}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for key, value in report.items():
        text = (" ".join(str(v) for v in value) or "-") if isinstance(value, list) else value
        print(f"{key:24} {text}")
    return 0


# --- bind ----------------------------------------------------------------------------------


def cmd_bind(args: argparse.Namespace) -> int:
    try:
        fn = bind_vfio(args.bdf)
    except VvuError as err:
        print(f"vvu bind: {err}", file=sys.stderr)
        return 1
    print(f"vvu: {fn.bdf} ({fn.pci_id}) is bound to vfio-pci, IOMMU group {fn.iommu_group}")
    return 0


# --- trace ---------------------------------------------------------------------------------


async def _trace(frontend_socket: str, backend_socket: str) -> None:
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(run_trace(frontend_socket, backend_socket, out=sys.stdout))
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


def cmd_trace(args: argparse.Namespace) -> int:
    try:
        asyncio.run(_trace(args.socket_path, args.backend_socket))
    except OSError as err:
        print(f"vvu trace: {err}", file=sys.stderr)
        return 1
    return 0


# --- demo ------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    return asyncio.run(run_demo(total_mib=args.size, request_kib=args.request_size))


# --- parser ----------------------------------------------------------------------------------


def _add_serve_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve a device back-end to vhost-user front-ends (QEMU, DPDK, vvu's own)",
        description=(
            "Serve one device back-end on a vhost-user socket, to front-ends one after another, "
            "until SIGINT or SIGTERM (a socket file vvu created is removed on exit). SIGHUP "
            "makes the "
            "back-end re-read its outside state and tell the front-end when its config space "
            "changed: `vvu serve blk --blk-file` then takes the image file's current size (grow "
            "the file, then `kill -HUP`; the guest sees the new capacity). Follows QEMU's "
            "vhost-user back-end program conventions (--socket-path, --fd, "
            "--print-capabilities; `vvu-blk`, `vvu-net`, `vvu-rng` are the same as "
            "`vvu serve TYPE`, for vhost-user.json descriptors). Client mode: --connect. "
            "Under systemd: with none of --socket-path, --fd, --vvu, --vvu-pci it serves the "
            "socket systemd passed (LISTEN_FDS), and tells NOTIFY_SOCKET READY=1 and STOPPING=1."
        ),
    )
    kinds = serve.add_subparsers(dest="backend", required=True, metavar="BACKEND")
    for name, cls in sorted(available_backends().items()):
        sub = kinds.add_parser(name, help=(cls.__doc__ or name).strip().splitlines()[0])
        sub.add_argument(
            "--socket-path",
            help="listen on this AF_UNIX socket path (with --connect: connect to it)",
        )
        sub.add_argument(
            "--connect",
            action="store_true",
            help=(
                "client mode: connect to a front-end listening on --socket-path (QEMU "
                "-chardev socket,server=on,wait=off; DPDK's vhost client mode) instead of "
                "listening; retries with backoff (50 ms doubling to 2 s) while nobody listens, "
                "and connects again after each session, until SIGINT or SIGTERM"
            ),
        )
        sub.add_argument(
            "--fd",
            type=int,
            help=(
                "serve on this inherited AF_UNIX socket: a listening one serves front-ends one "
                "after another, a connected one is a single front-end session, after which "
                "vvu exits"
            ),
        )
        sub.add_argument(
            "--fd-name",
            metavar="NAME",
            help=(
                "under systemd socket activation, serve the passed socket with this name "
                "(FileDescriptorName= in the .socket unit; LISTEN_FDNAMES); needed only when "
                "more than one is passed. Without --socket-path, --fd, --vvu or --vvu-pci, vvu "
                "serves the socket systemd passed (LISTEN_FDS, LISTEN_PID)"
            ),
        )
        sub.add_argument(
            "--vvu",
            metavar="DEVICE_SOCK",
            help="serve through a virtio-vhost-user device (its vfio-user socket)",
        )
        sub.add_argument(
            "--vvu-pci",
            metavar="BDF",
            help=(
                "serve through a virtio-vhost-user device that is PCI function BDF of this "
                "machine (e.g. 0000:00:04.0 inside the back-end VM), driven through Linux VFIO: "
                "needs an IOMMU (in a VM: a vIOMMU and intel_iommu=on), the vfio-pci module and "
                "the function bound to vfio-pci (--vvu-pci-bind or `vvu bind BDF`)"
            ),
        )
        sub.add_argument(
            "--vvu-pci-bind",
            action="store_true",
            help="with --vvu-pci: first unbind its driver (virtio-pci) and bind vfio-pci",
        )
        sub.add_argument(
            "--vvu-kick-mode",
            choices=KICK_MODES,
            default=None,
            help=(
                "how kicks reach the back-end: 'direct' (default with --vvu) reads the "
                "front-end's kick eventfds (a vvu extension over vfio-user; rings whose direct "
                "kick the device refuses fall back to MSI-X), 'msix' (the only mode with "
                "--vvu-pci: a VMM's vfio-user client has no GET_REGION_IO_FDS, so the guest "
                "cannot get those eventfds) has the device relay each kick to an MSI-X vector, "
                "which VFIO delivers as an eventfd"
            ),
        )
        sub.add_argument(
            "--socket-mode", default="600", help="permissions of the socket file (octal, 600)"
        )
        sub.add_argument(
            "--print-capabilities",
            action="store_true",
            help=(
                "print the capabilities as JSON (QEMU docs/interop/vhost-user.json) and exit; "
                "every other option is ignored"
            ),
        )
        cls.add_arguments(sub)
        sub.set_defaults(func=cmd_serve, backend_cls=cls)


def _add_device_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    device = commands.add_parser(
        "device",
        help="run a virtio-vhost-user device: front-ends on one socket, its driver over vfio-user",
        description=(
            "Run the virtio-vhost-user (VVU) device, the part a VMM hosts: vhost-user "
            "front-ends (QEMU, DPDK, vvu's own) connect to --socket-path; the device is a "
            "virtio-pci device served over vfio-user on --vfio-user, where a VVU driver "
            "(`vvu serve BACKEND --vvu SOCK`, or a VMM with vfio-user-pci) runs the back-end. "
            "Memory, kicks and calls are passed as fds, so the device is off the data path. "
            "SIGUSR1 (and exit) prints one line of JSON statistics: vfio-user messages by "
            "command and by region, doorbells rung by message, kicks relayed. "
            "Layout: docs/vvu-device.md."
        ),
    )
    device.add_argument("--socket-path", required=True, help="where front-ends connect")
    device.add_argument("--vfio-user", required=True, help="the vfio-user socket for the driver")
    device.add_argument("--uuid", type=uuid.UUID, help="device uuid (default: random)")
    device.add_argument("--max-queues", type=int, default=64, help="max vhost queues, 1..125 (64)")
    device.add_argument(
        "--device-id",
        type=int,
        default=VVU_VIRTIO_ID,
        help=(
            f"virtio device id (private; default {VVU_VIRTIO_ID}, "
            f"PCI 0x{0x1040 + VVU_VIRTIO_ID:04x})"
        ),
    )
    device.add_argument(
        "--socket-mode", default="600", help="permissions of the front-end socket (octal, 600)"
    )
    device.add_argument(
        "--frontend-memory",
        metavar="PATH",
        help=(
            "the file backing the front-end's RAM (a front-end VM's memory-backend-file "
            "mem-path with share=on, a /dev/shm or hugetlbfs file): BAR4 becomes that file, "
            "mappable by any vfio-user client (QEMU's vfio-user-pci); regions outside it are "
            "refused; inflight regions live in the device's own memfd (BAR3); no dirty log "
            "(LOG_SHMFD filtered). "
            "Default: each region its own fd (vvu's per-area-fds extension)"
        ),
    )
    device.set_defaults(func=cmd_device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vvu",
        description=(
            "vhost-user back-ends, a scriptable front-end and virtio-vhost-user. "
            "Run `vvu demo` for an end-to-end demonstration."
        ),
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_serve_parser(commands)
    add_daemon_parsers(commands)

    _add_device_parser(commands)

    probe = commands.add_parser(
        "probe",
        help="connect to a back-end (or a VVU device) and print what it offers",
        description=(
            "With --socket-path: connect as a vhost-user front-end and print the back-end's "
            "features and protocol features by name, its queue count, memory slots and config "
            "space. Does not set up memory or rings. "
            "With --vvu: connect to a virtio-vhost-user device's vfio-user socket and print its "
            "PCI ids, virtio device id, device features, config (status by name, "
            "max_vhost_queues, uuid), virtio capabilities, BAR sizes and MSI-X vector count. "
            "The device is not reset or initialised (config and BAR0 reads; only "
            "device_feature_select is written), but the device serves one vfio-user client at "
            "a time, so the device must be idle: while a driver (`vvu serve --vvu`, a VMM) is "
            "attached, the probe waits for --timeout and fails. "
            "With --vvu-pci BDF (inside the back-end VM): the same report for a VVU device that "
            "is a PCI function here, read through Linux VFIO (bound to vfio-pci: "
            "--vvu-pci-bind or `vvu bind BDF`); it fails with what is missing (IOMMU, module, "
            "bind step) when VFIO cannot reach it."
        ),
    )
    target = probe.add_mutually_exclusive_group(required=True)
    target.add_argument("--socket-path", help="the back-end's socket")
    target.add_argument("--vvu", metavar="DEVICE_SOCK", help="a VVU device's vfio-user socket")
    target.add_argument(
        "--vvu-pci", metavar="BDF", help="a VVU device that is a PCI function here (Linux VFIO)"
    )
    probe.add_argument(
        "--vvu-pci-bind",
        action="store_true",
        help="with --vvu-pci: bind it to vfio-pci first (ignored otherwise)",
    )
    probe.add_argument(
        "--config-size", type=int, default=60, help="config bytes to read (60: virtio-blk)"
    )
    probe.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for it")
    probe.add_argument("--json", action="store_true", help="print JSON")
    probe.set_defaults(func=cmd_probe)

    bind = commands.add_parser(
        "bind",
        help="hand a virtio-vhost-user PCI function to vfio-pci (inside the back-end VM)",
        description=(
            "Unbind PCI function BDF from its driver (Linux's virtio_pci claims the VVU "
            "device, 1af4:107f by default, at boot) and bind it to vfio-pci through "
            "driver_override, as dpdk-devbind.py or driverctl do, so that `vvu serve BACKEND "
            "--vvu-pci BDF` can drive it. Refuses anything but a modern virtio function that no "
            "virtio driver uses, and says what is missing: an IOMMU group (boot the VM with a "
            "vIOMMU and intel_iommu=on), the vfio-pci module (modprobe vfio-pci), root."
        ),
    )
    bind.add_argument("bdf", metavar="BDF", help="PCI address, e.g. 0000:00:04.0")
    bind.set_defaults(func=cmd_bind)

    trace = commands.add_parser(
        "trace",
        help="transparent proxy printing every vhost-user message between two peers",
        description=(
            "Listen on --socket-path for a front-end (point QEMU, DPDK or `vvu probe` at it), "
            "connect to the back-end on --backend-socket, and pass every message and fd through "
            "unchanged, both channels, printing one decoded line per message: direction, "
            "request name, payload, fds, and the reply latency."
        ),
    )
    trace.add_argument("--socket-path", required=True, help="where front-ends connect")
    trace.add_argument("--backend-socket", required=True, help="the real back-end's socket")
    trace.set_defaults(func=cmd_trace)

    demo = commands.add_parser(
        "demo",
        help="end-to-end demo: a blk back-end and our front-end, over AF_UNIX and over VVU",
        description=(
            "Start `vvu serve blk` on an in-memory disk in a child process, connect vvu's "
            "front-end to it, write and read back data with verification, and print what "
            "happened at each step with throughput. Then the same through the "
            "virtio-vhost-user device: `vvu device` and `vvu serve blk --vvu` in child "
            "processes, the front-end on the device's socket; prints both throughputs, their "
            "ratio and the device process's CPU time. Exit 0 only if both paths verified. "
            "No QEMU needed."
        ),
    )
    demo.add_argument("--size", type=int, default=256, help="MiB to write and verify (256)")
    demo.add_argument("--request-size", type=int, default=1024, help="KiB per request (1024)")
    demo.set_defaults(func=cmd_demo)

    bench.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    asked = _capabilities_asked(argv)
    if asked is not None:
        print(json.dumps(capabilities(asked)))
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(-1 if args.quiet else args.verbose)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return code


def _serve_main(backend: str, argv: Sequence[str] | None) -> int:
    """`vvu-BACKEND ARGS` is `vvu serve BACKEND ARGS`; leading -v/-q are `vvu`'s own."""
    args = list(sys.argv[1:] if argv is None else argv)

    def global_option(arg: str) -> bool:
        return arg in ("-q", "--quiet", "--verbose") or (arg[:1] == "-" and set(arg[1:]) == {"v"})

    lead = 0
    while lead < len(args) and global_option(args[lead]):
        lead += 1
    return main([*args[:lead], "serve", backend, *args[lead:]])


def main_blk(argv: Sequence[str] | None = None) -> int:
    """The `vvu-blk` program (what vhost-user.json descriptors name): `vvu serve blk`."""
    return _serve_main("blk", argv)


def main_net(argv: Sequence[str] | None = None) -> int:
    """The `vvu-net` program: `vvu serve net`."""
    return _serve_main("net", argv)


def main_rng(argv: Sequence[str] | None = None) -> int:
    """The `vvu-rng` program: `vvu serve rng`."""
    return _serve_main("rng", argv)


def main_console(argv: Sequence[str] | None = None) -> int:
    """The `vvu-console` program: `vvu serve console`."""
    return _serve_main("console", argv)


def main_input(argv: Sequence[str] | None = None) -> int:
    """The `vvu-input` program: `vvu serve input`."""
    return _serve_main("input", argv)


def main_vsock(argv: Sequence[str] | None = None) -> int:
    """The `vvu-vsock` program: `vvu serve vsock`."""
    return _serve_main("vsock", argv)


if __name__ == "__main__":
    sys.exit(main())
