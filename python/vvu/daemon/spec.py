"""What a device is made of: its id, back-end type, socket and back-end options.

The same `DeviceSpec` comes from a `[[device]]` table of the daemon's TOML file and from the
`device-add` request of the management API, and is validated the same way, before anything is
created. Back-end options are the `vvu serve TYPE` options without their dashes (`blk-file`,
`read-only`, `size`, `num-queues`), parsed by the back-end's own `add_arguments`, so every
registered back-end type (third-party ones too) is configured exactly as on the command line.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from vvu.backends import Backend, available_backends

__all__ = ["ConfigFile", "DeviceSpec", "SpecError", "load_config"]

#: A device id: what the API, the metrics and the logs call the device.
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Keys of a device that are not back-end options.
_DEVICE_KEYS = frozenset({"id", "type", "socket", "socket-mode", "vvu", "vvu-kick-mode"})
#: How a VVU device's kicks reach the back-end (`vvu serve --vvu-kick-mode`).
_KICK_MODES = ("direct", "msix")
_API_KEYS = frozenset({"socket", "socket-mode", "metrics-http"})


class SpecError(ValueError):
    """A device description (or config file) that cannot be used; says what is wrong."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise SpecError(message)


def _mode(value: object, what: str) -> int:
    if not isinstance(value, str) or not re.fullmatch(r"[0-7]{3,4}", value):
        raise SpecError(f'{what} must be an octal string such as "600", not {value!r}')
    return int(value, 8)


@dataclass(frozen=True)
class DeviceSpec:
    """One device: back-end `type` (a registered back-end name), served on `socket` (a
    listening AF_UNIX socket), or through the virtio-vhost-user device whose vfio-user socket is
    `vvu` (as `vvu serve TYPE --vvu`; front-ends connect to that device's own socket)."""

    id: str
    type: str
    socket: str | None
    socket_mode: int = 0o600
    options: dict[str, str | int | bool] = field(default_factory=dict)
    vvu: str | None = None
    vvu_kick_mode: str = "direct"

    @property
    def where(self) -> str:
        """The socket, or "VVU device PATH"."""
        return self.socket if self.socket is not None else f"VVU device {self.vvu}"

    @classmethod
    def from_mapping(cls, raw: object) -> DeviceSpec:
        """Validate a device table / `device-add` params; SpecError says what is wrong."""
        if not isinstance(raw, dict):
            raise SpecError("a device is a table (object) of id, type, socket and options")
        for key in ("id", "type"):
            if not isinstance(raw.get(key), str):
                raise SpecError(f"device needs {key!r} (a string)")
        if ("socket" in raw) == ("vvu" in raw):
            raise SpecError("device needs exactly one of 'socket' and 'vvu' (a string)")
        path = raw.get("socket", raw.get("vvu"))
        if not isinstance(path, str):
            raise SpecError(f"device needs 'socket' or 'vvu' as a string, not {path!r}")
        device_id, kind = raw["id"], raw["type"]
        if not ID_PATTERN.match(device_id):
            raise SpecError(
                f"device id {device_id!r}: 1-64 of letters, digits, '_', '.', '-' (not first)"
            )
        if kind not in available_backends():
            known = ", ".join(sorted(available_backends()))
            raise SpecError(f"unknown device type {kind!r} (known: {known})")
        if not path or "\0" in path or len(path.encode()) > 107:
            raise SpecError(f"socket {path!r} is not a usable AF_UNIX path (1-107 bytes)")
        mode = _mode(raw.get("socket-mode", "600"), "socket-mode")
        kick_mode = raw.get("vvu-kick-mode", "direct")
        if kick_mode not in _KICK_MODES or ("vvu-kick-mode" in raw and "vvu" not in raw):
            raise SpecError(f"vvu-kick-mode is one of {', '.join(_KICK_MODES)}, with 'vvu'")
        options = raw.get("options", {})
        if not isinstance(options, dict):
            raise SpecError("options must be a table (object)")
        extra = {k: v for k, v in raw.items() if k not in _DEVICE_KEYS and k != "options"}
        merged: dict[str, str | int | bool] = {}
        for key, value in {**options, **extra}.items():
            if not isinstance(value, str | int | bool) or isinstance(value, float):
                raise SpecError(f"option {key!r}: a string, integer or boolean, not {value!r}")
            merged[str(key)] = value
        socket, vvu = (path, None) if "socket" in raw else (None, path)
        spec = cls(device_id, kind, socket, mode, merged, vvu, kick_mode)
        spec.backend_arguments()  # refuse unknown or mistyped options now
        return spec

    def backend_arguments(self) -> argparse.Namespace:
        """The options as the back-end's `from_arguments` takes them (`vvu serve TYPE` ones)."""
        cls = available_backends()[self.type]
        parser = _Parser(prog=self.type, add_help=False)
        cls.add_arguments(parser)
        flags = {
            opt[2:]: action
            for action in parser._actions  # argparse has no public listing of its options
            for opt in action.option_strings
            if opt.startswith("--")
        }
        argv: list[str] = []
        for key, value in self.options.items():
            action = flags.get(key)
            if action is None:
                known = ", ".join(sorted(flags)) or "none"
                raise SpecError(f"{self.type} has no option {key!r} (options: {known})")
            takes_value = action.nargs != 0
            if isinstance(value, bool) != (not takes_value):
                need = "a value" if takes_value else "true or false"
                raise SpecError(f"option {key!r} of {self.type} takes {need}, not {value!r}")
            if value is True:
                argv.append(f"--{key}")
            elif value is not False:
                argv += [f"--{key}", str(value)]
        return parser.parse_args(argv)

    def make_backend(self) -> Backend:
        """Build the back-end (opens its files): OSError/ValueError when it cannot be."""
        cls = available_backends()[self.type]
        return cls.from_arguments(self.backend_arguments())

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"id": self.id, "type": self.type}
        if self.vvu is not None:
            out |= {"vvu": self.vvu, "vvu-kick-mode": self.vvu_kick_mode}
        else:
            out |= {"socket": self.socket, "socket-mode": f"{self.socket_mode:o}"}
        return out | {"options": dict(self.options)}


@dataclass(frozen=True)
class ConfigFile:
    """The daemon's TOML file: `[api]` (socket, socket-mode, metrics-http) and `[[device]]`."""

    api_socket: str | None
    api_mode: int
    metrics_http: str | None
    devices: list[DeviceSpec]


def load_config(path: str | Path) -> ConfigFile:
    """Read and validate a daemon config file; SpecError (with the file name) when it is bad."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise SpecError(f"{path}: {err}") from err
    unknown = set(raw) - {"api", "device"}
    if unknown:
        raise SpecError(f"{path}: unknown section(s) {', '.join(sorted(unknown))}")
    api = raw.get("api", {})
    if not isinstance(api, dict) or set(api) - _API_KEYS:
        raise SpecError(f"{path}: [api] takes {', '.join(sorted(_API_KEYS))}")
    devices_raw = raw.get("device", [])
    if not isinstance(devices_raw, list):
        raise SpecError(f"{path}: devices are [[device]] tables")
    devices: list[DeviceSpec] = []
    for n, table in enumerate(devices_raw, 1):
        try:
            devices.append(DeviceSpec.from_mapping(table))
        except SpecError as err:
            raise SpecError(f"{path}: device #{n}: {err}") from err
    ids = [d.id for d in devices]
    sockets = [d.socket or d.vvu or "" for d in devices]
    for what, values in (("id", ids), ("socket", sockets)):
        dup = {v for v in values if values.count(v) > 1}
        if dup:
            raise SpecError(f"{path}: device {what} used twice: {', '.join(sorted(dup))}")
    for key in ("socket", "metrics-http"):
        if key in api and not isinstance(api[key], str):
            raise SpecError(f"{path}: [api] {key} must be a string")
    return ConfigFile(
        api_socket=api.get("socket"),
        api_mode=_mode(api.get("socket-mode", "600"), "[api] socket-mode"),
        metrics_http=api.get("metrics-http"),
        devices=devices,
    )
