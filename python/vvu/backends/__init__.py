"""Device back-ends: the plugin API and the built-in devices.

Back-ends register through the `vvu.backends` entry-point group (name → `Backend` subclass); the
built-in ones are registered the same way in vvu's own metadata, and are also known directly so
that a source checkout without installed metadata still finds them.
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points

from vvu.backends.base import Backend, ConfigError
from vvu.backends.blk import BlkBackend
from vvu.backends.console import ConsoleBackend
from vvu.backends.input import InputBackend
from vvu.backends.net import NetBackend
from vvu.backends.request import Request, RequestDone, RequestQueue
from vvu.backends.rng import RngBackend
from vvu.backends.vsock import VsockBackend

log = logging.getLogger(__name__)

__all__ = [
    "Backend",
    "BlkBackend",
    "ConfigError",
    "ConsoleBackend",
    "InputBackend",
    "NetBackend",
    "Request",
    "RequestDone",
    "RequestQueue",
    "RngBackend",
    "VsockBackend",
    "available_backends",
]

ENTRY_POINT_GROUP = "vvu.backends"


def _builtin() -> dict[str, type[Backend]]:
    return {
        cls.name: cls
        for cls in (BlkBackend, ConsoleBackend, InputBackend, NetBackend, RngBackend, VsockBackend)
    }


def available_backends() -> dict[str, type[Backend]]:
    """Every back-end by CLI name: the built-ins plus third-party entry points."""
    found = _builtin()
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found and ep.value.startswith("vvu."):
            continue
        try:
            cls = ep.load()
        except Exception as err:  # a broken plugin must not take the CLI down
            log.warning("back-end plugin %s (%s) failed to load: %s", ep.name, ep.value, err)
            continue
        if not (isinstance(cls, type) and issubclass(cls, Backend)):
            log.warning("back-end plugin %s is not a vvu.backends.Backend subclass", ep.name)
            continue
        found[ep.name] = cls
    return found
