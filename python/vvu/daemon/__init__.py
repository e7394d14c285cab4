"""`vvu daemon`: many devices in one process, a JSON-RPC management API, metrics.

The public parts are `DaemonClient` (the typed asyncio client of the management API), its
`RpcError`, and `DeviceSpec` (what a device is made of); docs/daemon.md describes the daemon,
its config file and every API method.
"""

from __future__ import annotations

from vvu.daemon.client import DaemonClient, DeviceInfo, DeviceStats, QueueStats, RpcError
from vvu.daemon.spec import DeviceSpec, SpecError

__all__ = [
    "DaemonClient",
    "DeviceInfo",
    "DeviceSpec",
    "DeviceStats",
    "QueueStats",
    "RpcError",
    "SpecError",
]
