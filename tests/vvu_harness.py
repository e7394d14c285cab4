"""Serving a back-end in this event loop over AF_UNIX or virtio-vhost-user, for the tests.

Shared by test_vvu_e2e.py (our own front-end drivers over every transport) and test_engine.py (a
raw scripted front-end over "unix" and "vvu").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from vvu.backends import Backend
from vvu.device.vvu import VvuDevice
from vvu.engine import BackendEngine
from vvu.pci.virtio_device import VirtioPciDevice
from vvu.transport.base import Listener
from vvu.transport.unix import UnixListener
from vvu.transport.vvu import VvuListener
from vvu.vfio_user import ClientOptions, VfioUserPciAccess
from vvu.vfio_user.echo import EchoDevice
from vvu.vfio_user.server import VfioUserServer


@contextlib.contextmanager
def tmpfs_file(size: int) -> Iterator[Path]:
    """A `size`-byte tmpfs file (a VM's memory-backend-file, a `--frontend-memory` file) that has
    no name: a memfd, as a path any process of ours can open while this one runs
    (/proc/PID/fd/N). Nothing is left in /dev/shm however the test ends, even by SIGKILL."""
    fd = os.memfd_create("vvu-test-memory")  # close-on-exec: children open the path instead
    try:
        os.ftruncate(fd, size)
        yield Path(f"/proc/{os.getpid()}/fd/{fd}")
    finally:
        os.close(fd)


async def _serve_sessions(
    engine: BackendEngine, listener: Listener, sessions: asyncio.Queue[asyncio.Task[None]]
) -> None:
    """`engine.serve_forever`, handing out each session's task as it starts."""
    while True:
        channel = await listener.accept()
        task = asyncio.ensure_future(engine.serve(channel))
        sessions.put_nowait(task)
        await task


@contextlib.asynccontextmanager
async def running_server(
    device: EchoDevice | VirtioPciDevice, path: str
) -> AsyncIterator[VfioUserServer]:
    """Serve `device` over vfio-user on `path` in this event loop; stop and close both after."""
    server = VfioUserServer(device, path)
    task = asyncio.ensure_future(server.serve_forever())
    try:
        yield server
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        server.close()
        device.close()


@contextlib.asynccontextmanager
async def served(
    backend: Backend | BackendEngine,
    transport: str,
    tmp_path: Path,
    devices: list[VvuDevice] | None = None,
    *,
    sessions: asyncio.Queue[asyncio.Task[None]] | None = None,
    servers: list[VfioUserServer] | None = None,
    frontend_memory: str | None = None,
    client_options: ClientOptions | None = None,
) -> AsyncIterator[str]:
    """Serve `backend` in this event loop; yields the socket front-ends connect to. Transport
    "vvu" uses direct kicks (the default), "vvu-msix" has the device relay them to MSI-X; the
    device goes into `devices` when given. Given an engine, serves that engine and leaves its
    back-end open (its owner closes it); given a back-end, closes it at the end. With
    `sessions`, each session's serving task is put there when the session starts. Over VVU:
    the vfio-user server goes into `servers` when given, `frontend_memory` is the device's
    `--frontend-memory` file, `client_options` the driver's vfio-user client options."""
    if isinstance(backend, BackendEngine):
        engine, owned = backend, None
    else:
        engine, owned = BackendEngine(backend), backend
    frontend_socket = str(tmp_path / "frontend.sock")
    tasks: list[asyncio.Task[None]] = []
    listener: Listener
    device: VvuDevice | None = None
    server: VfioUserServer | None = None
    if transport == "unix":
        listener = UnixListener(frontend_socket)
    else:
        device = VvuDevice(
            UnixListener(frontend_socket), max_queues=8, frontend_memory=frontend_memory
        )
        if devices is not None:
            devices.append(device)
        server = VfioUserServer(device, str(tmp_path / "vvu.sock"))
        if servers is not None:
            servers.append(server)
        tasks.append(asyncio.ensure_future(server.serve_forever()))
        pci = await VfioUserPciAccess.open(
            str(tmp_path / "vvu.sock"), timeout=5, options=client_options
        )
        listener = VvuListener(pci, kick_mode="msix" if transport == "vvu-msix" else "direct")
    serving = (
        engine.serve_forever(listener)
        if sessions is None
        else _serve_sessions(engine, listener, sessions)
    )
    tasks.append(asyncio.ensure_future(serving))
    try:
        yield frontend_socket
    finally:
        for task in reversed(tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if isinstance(listener, VvuListener):
            await listener.aclose()
        else:
            listener.close()
        if server is not None and device is not None:
            server.close()
            device.close()
        if owned is not None:
            owned.close()
