"""`vvu trace`: a transparent vhost-user proxy that prints one decoded line per message.

The front-end connects to the tracer's socket; the tracer connects to the real back-end and
passes every message and fd through unchanged, in both directions, on the main channel and on the
back-end channel (SET_BACKEND_REQ_FD is re-plumbed through a socketpair the tracer watches).
Replies are matched to their requests to show the latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from vvu.errors import ProtocolError
from vvu.protocol import (
    NEED_REPLY,
    REPLY,
    ChannelName,
    FrontendRequest,
    decode_message,
    describe,
)
from vvu.protocol.codec import Header
from vvu.protocol.table import ReplyKind, spec_for
from vvu.transport.base import Channel, RawMessage, TransportError, close_fds
from vvu.transport.unix import UnixChannel, UnixListener, connect_unix

log = logging.getLogger(__name__)

__all__ = ["Tracer"]


@dataclass
class _Pending:
    """Requests waiting for a reply on one channel, oldest first (replies come in order)."""

    sent: deque[tuple[int, float]] = field(default_factory=deque)

    def started(self, request: int) -> None:
        self.sent.append((request, time.perf_counter()))

    def finished(self, request: int) -> float | None:
        for i, (pending, at) in enumerate(self.sent):
            if pending == request:
                del self.sent[i]
                return time.perf_counter() - at
        return None


def format_message(raw: RawMessage, channel: ChannelName) -> str:
    """One line for a message as it crosses the tracer; never raises."""
    try:
        msg = decode_message(
            Header(raw.request, raw.flags, len(raw.payload)),
            raw.payload,
            raw.fds,
            channel=channel,
            is_reply=bool(raw.flags & REPLY),
        )
        return describe(msg)
    except ProtocolError as err:
        return (
            f"request {raw.request} flags {raw.flags:#x} size {len(raw.payload)}: MALFORMED ({err})"
        )


def _expects_reply(raw: RawMessage, channel: ChannelName) -> bool:
    if raw.flags & NEED_REPLY:
        return True
    spec = spec_for(raw.request, channel)
    return spec is not None and spec.replies is not ReplyKind.ACK


class Tracer:
    """Proxies one front-end session at a time to `backend_path`, printing to `out`."""

    def __init__(
        self, backend_path: str, *, out: TextIO = sys.stdout, timeout: float = 5.0
    ) -> None:
        self.backend_path = backend_path
        self.out = out
        self.timeout = timeout
        self._start = time.perf_counter()
        self.messages = 0

    def _print(self, arrow: str, channel: str, text: str, latency: float | None) -> None:
        stamp = time.perf_counter() - self._start
        suffix = f"  ({latency * 1e6:.0f} us)" if latency is not None else ""
        print(f"{stamp:10.6f} {channel:8} {arrow} {text}{suffix}", file=self.out, flush=True)
        self.messages += 1

    async def serve_forever(self, listener: UnixListener) -> None:
        while True:
            front = await listener.accept()
            await self.session(front)

    async def session(self, front: Channel) -> None:
        """Relay one front-end until either side closes."""
        try:
            back = await connect_unix(self.backend_path, timeout=self.timeout)
        except TransportError as err:
            log.error("cannot reach the back-end: %s", err)
            front.close()
            return
        self._print("--", "session", f"{front.peer} <-> {self.backend_path}", None)
        pending = _Pending()
        helpers: list[asyncio.Task[None]] = []

        def plumb_backend_channel(raw: RawMessage) -> None:
            # Put ourselves between the back-end and the front-end's back-end channel socket.
            if raw.request != FrontendRequest.SET_BACKEND_REQ_FD or not raw.fds:
                return
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            front_side = UnixChannel(socket.socket(fileno=raw.fds[0]), peer="front-end (bch)")
            raw.fds[0] = theirs.detach()
            back_side = UnixChannel(ours, peer="back-end (bch)")
            bch_pending = _Pending()
            helpers.append(
                asyncio.ensure_future(
                    self._pump(
                        back_side, front_side, channel="backend", arrow="<-", pending=bch_pending
                    )
                )
            )
            helpers.append(
                asyncio.ensure_future(
                    self._pump(
                        front_side, back_side, channel="backend", arrow="->", pending=bch_pending
                    )
                )
            )

        pumps = [
            asyncio.ensure_future(
                self._pump(
                    front,
                    back,
                    channel="frontend",
                    arrow="->",
                    pending=pending,
                    rewrite=plumb_backend_channel,
                )
            ),
            asyncio.ensure_future(
                self._pump(back, front, channel="frontend", arrow="<-", pending=pending)
            ),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps + helpers:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, TransportError):
                    await task
            front.close()
            back.close()
            self._print("--", "session", "closed", None)

    async def _pump(
        self,
        src: Channel,
        dst: Channel,
        *,
        channel: ChannelName,
        arrow: str,
        pending: _Pending,
        rewrite: Callable[[RawMessage], None] | None = None,
    ) -> None:
        """Copy messages from `src` to `dst` until `src` closes, printing each."""
        while True:
            raw = await src.recv()
            if raw is None:
                return
            try:
                text = format_message(raw, channel)
                is_reply = bool(raw.flags & REPLY)
                latency = pending.finished(raw.request) if is_reply else None
                if not is_reply and _expects_reply(raw, channel):
                    pending.started(raw.request)
                self._print(arrow, channel, text, latency)
                if rewrite is not None:
                    rewrite(raw)
                header = Header(raw.request, raw.flags, len(raw.payload)).pack()
                await dst.send(header + raw.payload, raw.fds)
            finally:
                close_fds(raw.fds)


async def run_trace(frontend_socket: str, backend_socket: str, *, out: TextIO) -> None:
    """Listen on `frontend_socket`, relay to `backend_socket`, until cancelled."""
    listener = UnixListener(frontend_socket)
    tracer = Tracer(backend_socket, out=out)
    print(
        f"vvu trace: front-ends connect to {frontend_socket}; relaying to {backend_socket}",
        file=sys.stderr,
        flush=True,
    )
    try:
        await tracer.serve_forever(listener)
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            os.unlink(frontend_socket)
