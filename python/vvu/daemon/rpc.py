"""JSON-RPC 2.0 on a stream socket: one JSON text per line (newline-delimited).

Written here rather than taken from a library: the envelope is a page of the spec, and what a
daemon needs around it is the part the Python JSON-RPC libraries leave out or fix differently —
asyncio stream framing on an AF_UNIX socket, server-sent notifications (events) interleaved with
responses on the same connection, and per-method parameter validation that refuses a request
before anything changes. jsonrpcserver and json-rpc dispatch strings only (no transport, no
server push); aiorpcx brings its own session framework. Every frame is one line: `json.dumps`
never emits a raw newline, so framing is `readline` with a size limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

__all__ = [
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "METHOD_NOT_FOUND",
    "PARSE_ERROR",
    "Connection",
    "Method",
    "Param",
    "RpcFault",
    "RpcServer",
]

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

#: Longest request line accepted; a longer one is a parse error and ends the connection.
MAX_LINE = 1 << 20
#: Notifications queued for a client that does not read; past this it is disconnected.
MAX_PENDING_NOTIFICATIONS = 1024


class RpcFault(Exception):
    """An error response: `code` and `message` (and optional `data`) as JSON-RPC says."""

    def __init__(self, code: int, message: str, data: object = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_json(self) -> dict[str, object]:
        error: dict[str, object] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


@dataclass(frozen=True)
class Param:
    """One named parameter: its JSON type(s) and whether it must be given."""

    name: str
    types: tuple[type, ...]
    required: bool = True
    doc: str = ""


Handler = Callable[["Connection", dict[str, Any]], Awaitable[object]]


@dataclass(frozen=True)
class Method:
    name: str
    params: tuple[Param, ...]
    handler: Handler
    doc: str = ""

    def bind(self, raw: object) -> dict[str, Any]:
        """The validated parameters (by name or by position), or INVALID_PARAMS."""
        if raw is None:
            raw = {}
        if isinstance(raw, list):
            if len(raw) > len(self.params):
                raise RpcFault(
                    INVALID_PARAMS, f"{self.name} takes at most {len(self.params)} parameters"
                )
            raw = {p.name: v for p, v in zip(self.params, raw, strict=False)}
        if not isinstance(raw, dict):
            raise RpcFault(INVALID_PARAMS, "params must be an object or an array")
        known = {p.name: p for p in self.params}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            names = ", ".join(known) or "none"
            raise RpcFault(
                INVALID_PARAMS, f"{self.name}: unknown parameter(s) {', '.join(unknown)} ({names})"
            )
        for param in self.params:
            if param.name not in raw:
                if param.required:
                    raise RpcFault(INVALID_PARAMS, f"{self.name}: missing {param.name!r}")
                continue
            value = raw[param.name]
            # JSON true is not a number here, whatever Python thinks of bool.
            bad_bool = isinstance(value, bool) and bool not in param.types
            if bad_bool or not isinstance(value, param.types):
                want = " or ".join(_json_type(t) for t in param.types)
                raise RpcFault(
                    INVALID_PARAMS, f"{self.name}: {param.name!r} must be {want}, not {value!r}"
                )
        return dict(raw)


def _json_type(t: type) -> str:
    names = {str: "a string", int: "an integer", bool: "a boolean", dict: "an object"}
    return names.get(t, "a list" if t is list else t.__name__)


class Connection:
    """One client: requests answered in order, notifications pushed in between."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._out: asyncio.Queue[bytes | None] = asyncio.Queue(MAX_PENDING_NOTIFICATIONS)
        self._pump = asyncio.ensure_future(self._write_out())
        self.on_close: list[Callable[[], None]] = []
        self.closed = False

    async def _write_out(self) -> None:
        while True:
            data = await self._out.get()
            if data is None:
                return
            self._writer.write(data)
            try:
                await self._writer.drain()
            except (ConnectionError, OSError):
                self.close()
                return

    def send(self, message: Mapping[str, object]) -> None:
        if self.closed:
            return
        try:
            self._out.put_nowait(json.dumps(message, separators=(",", ":")).encode() + b"\n")
        except asyncio.QueueFull:  # a client that does not read loses its connection, not us
            log.warning("management client does not read its events: disconnected")
            self.close()

    def notify(self, method: str, params: Mapping[str, object]) -> None:
        self.send({"jsonrpc": "2.0", "method": method, "params": params})

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for callback in self.on_close:
            callback()
        self._pump.cancel()
        self._writer.close()

    async def flush_and_close(self) -> None:
        if not self.closed:
            with contextlib.suppress(asyncio.QueueFull):
                self._out.put_nowait(None)
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
        self.close()


class RpcServer:
    """Serves `methods` to every client of a listening socket."""

    def __init__(self, methods: Mapping[str, Method]) -> None:
        self.methods = dict(methods)
        self.connections: set[Connection] = set()

    async def serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        conn = Connection(writer)
        self.connections.add(conn)
        try:
            while not conn.closed:
                try:
                    line = await reader.readline()
                except ValueError:  # longer than the stream's limit
                    conn.send(_error(None, RpcFault(PARSE_ERROR, f"request over {MAX_LINE} bytes")))
                    break
                except ConnectionError:
                    break
                if not line:
                    break
                if not line.strip():
                    continue
                reply = await self.handle_text(conn, line)
                if reply is not None:
                    conn.send(reply)  # type: ignore[arg-type]
        finally:
            self.connections.discard(conn)
            await conn.flush_and_close()

    async def handle_text(self, conn: Connection, text: bytes) -> object:
        """The response to one frame: an object, a list (batch), or None (notifications)."""
        try:
            request = json.loads(text)
        except (ValueError, UnicodeDecodeError) as err:
            return _error(None, RpcFault(PARSE_ERROR, f"not JSON: {err}"))
        if isinstance(request, list):
            if not request:
                return _error(None, RpcFault(INVALID_REQUEST, "empty batch"))
            replies = [await self.handle_one(conn, item) for item in request]
            answered = [r for r in replies if r is not None]
            return answered or None
        return await self.handle_one(conn, request)

    async def handle_one(self, conn: Connection, request: object) -> dict[str, object] | None:
        if not isinstance(request, dict):
            return _error(None, RpcFault(INVALID_REQUEST, "a request is a JSON object"))
        rid = request.get("id")
        is_notification = "id" not in request
        if ("id" in request and not (rid is None or isinstance(rid, str | int))) or isinstance(
            rid, bool
        ):
            return _error(None, RpcFault(INVALID_REQUEST, "id must be a string, number or null"))
        try:
            if request.get("jsonrpc") != "2.0":
                raise RpcFault(INVALID_REQUEST, 'jsonrpc must be "2.0"')
            name = request.get("method")
            if not isinstance(name, str):
                raise RpcFault(INVALID_REQUEST, "method must be a string")
            extra = set(request) - {"jsonrpc", "method", "params", "id"}
            if extra:
                raise RpcFault(INVALID_REQUEST, f"unknown member(s) {', '.join(sorted(extra))}")
            method = self.methods.get(name)
            if method is None:
                raise RpcFault(METHOD_NOT_FOUND, f"no method {name!r}")
            params = method.bind(request.get("params"))
            result = await method.handler(conn, params)
        except RpcFault as fault:
            log.info("management request refused: %s", fault.message)
            # Not even a valid request: answered (id null when it has none), as the spec's
            # examples do; a valid notification is never answered.
            answer = fault.code == INVALID_REQUEST or not is_notification
            return _error(rid, fault) if answer else None
        except Exception as err:  # a bug: answered, logged, the daemon goes on
            log.exception("management request %r failed", request.get("method"))
            return None if is_notification else _error(rid, RpcFault(INTERNAL_ERROR, str(err)))
        return None if is_notification else {"jsonrpc": "2.0", "id": rid, "result": result}

    def close(self) -> None:
        for conn in list(self.connections):
            conn.close()


def _error(rid: object, fault: RpcFault) -> dict[str, object]:
    return {"jsonrpc": "2.0", "id": rid, "error": fault.to_json()}
