"""Fuzzing the Python side: the message codec and the engine's state machine (hypothesis).

- The codec: any bytes as a header, any bytes as a payload, any fd count: decoding either gives
  a message that encodes back to the same bytes, or raises ProtocolError (never anything else).
- The engine: a hostile front-end sends random sequences of requests — valid payloads of the
  request's type, random bytes, wrong flags, unknown ids — each with random fds of every kind
  (eventfds, memfds of odd sizes, pipes, sockets, /dev/null, a directory), sometimes after a
  complete handshake with a running ring. After every message a GET_FEATURES barrier must be
  answered (or the engine hangs up: a clean disconnect). Then: no hang (every step is bounded
  by TIMEOUT), no exception out of `serve`, every fd and mapping of the session released, and
  the same engine serves the next front-end's I/O.

CI runs a bounded number of examples; `VVU_FUZZ_EXAMPLES=N pytest tests/test_fuzz.py` runs N
(docs/reliability.md, "Fuzzing"). A failure prints the `@reproduce_failure` blob and the
minimal sequence: add it to the test as an `@example` (the repository's reproducers).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_engine import (
    DISK,
    TIMEOUT,
    Connector,
    Guest,
    Peer,
    Ring,
    blk_session,
    fresh_blk_frontend,
    open_fds,
)
from test_protocol import PAYLOADS
from vvu._core import EventFd, memfd
from vvu.backends import BlkBackend
from vvu.engine import BackendEngine
from vvu.errors import ProtocolError
from vvu.protocol import NEED_REPLY, VERSION, FrontendRequest, Header, decode_message, encode
from vvu.protocol.codec import decode_header
from vvu.protocol.table import spec_for
from vvu.transport.base import TransportError
from vvu.transport.unix import socketpair_channels

pytestmark = pytest.mark.timeout(600)

EXAMPLES = int(os.environ.get("VVU_FUZZ_EXAMPLES", "0"))
HEADER_SIZE = 12


def budget(default: int) -> settings:
    return settings(
        max_examples=EXAMPLES or default,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# --- the codec ----------------------------------------------------------------------------------


@budget(150)
@given(
    header=st.binary(min_size=HEADER_SIZE, max_size=HEADER_SIZE),
    payload=st.binary(max_size=512),
    nfds=st.integers(0, 9),
    is_reply=st.booleans(),
    channel=st.sampled_from(["frontend", "backend"]),
)
def test_fuzz_codec_decodes_or_refuses(
    header: bytes, payload: bytes, nfds: int, is_reply: bool, channel: str
) -> None:
    try:
        parsed = decode_header(header, channel=channel)  # type: ignore[arg-type]
        message = decode_message(
            parsed,
            payload[: parsed.size],
            tuple(range(100, 100 + nfds)),
            channel=channel,  # type: ignore[arg-type]
            is_reply=is_reply,
        )
    except ProtocolError:
        return
    if spec_for(message.request, channel) is not None and not is_reply:  # type: ignore[arg-type]
        assert encode(message) == header + payload[: parsed.size]


@budget(150)
@given(st.sampled_from(sorted(FrontendRequest)), st.data())
def test_fuzz_codec_typed_payloads_with_wrong_fd_counts(
    request: FrontendRequest, data: st.DataObject
) -> None:
    spec = spec_for(request, "frontend")
    assert spec is not None
    body = data.draw(PAYLOADS[spec.payload]).pack()
    cut = data.draw(st.integers(0, len(body)))
    body = body[:cut] if data.draw(st.booleans()) else body
    nfds = data.draw(st.integers(0, 9))
    header = Header(request, VERSION, len(body))
    with contextlib.suppress(ProtocolError):
        decode_message(header, body, tuple(range(100, 100 + nfds)))


# --- the engine ---------------------------------------------------------------------------------

FD_KINDS = ["eventfd", "memfd", "memfd-odd", "pipe", "socket", "devnull", "directory"]


def make_fd(kind: str, stack: contextlib.ExitStack) -> int:
    """A fresh fd of `kind`, closed by `stack` (the message carries a duplicate)."""
    if kind == "eventfd":
        efd = EventFd()
        stack.callback(efd.close)
        return efd.fileno()
    if kind in ("memfd", "memfd-odd"):
        fd = memfd(2 << 20 if kind == "memfd" else 4097, "vvu-fuzz")
    elif kind == "pipe":
        fd, w = os.pipe()
        stack.callback(os.close, w)
    elif kind == "socket":
        a, b = socket.socketpair()
        stack.callback(b.close)
        fd = a.detach()
    elif kind == "devnull":
        fd = os.open(os.devnull, os.O_RDWR)
    else:
        fd = os.open(tempfile.gettempdir(), os.O_RDONLY | os.O_DIRECTORY)
    stack.callback(os.close, fd)
    return fd


@dataclass(frozen=True)
class Step:
    request: int
    body: bytes
    flags: int
    fds: tuple[str, ...]


REQUEST_IDS = st.one_of(
    st.sampled_from(sorted(int(r) for r in FrontendRequest)),
    st.integers(0, 2**32 - 1),
)


@st.composite
def steps(draw: st.DrawFn) -> Step:
    request = draw(REQUEST_IDS)
    spec = spec_for(request, "frontend")
    if spec is not None and draw(st.integers(0, 3)):
        body = draw(PAYLOADS[spec.payload]).pack()  # well-formed, any values
    else:
        body = draw(st.binary(max_size=64))
    flags = draw(
        st.one_of(
            st.sampled_from([VERSION, VERSION | NEED_REPLY]),
            st.integers(0, 2**32 - 1),
        )
    )
    fds = tuple(draw(st.lists(st.sampled_from(FD_KINDS), max_size=3)))
    return Step(request, body, flags, fds)


async def barrier(peer: Peer) -> bool:
    """GET_FEATURES, then read until its reply: True when answered, False when the engine hung
    up (a clean disconnect). A hang fails (TIMEOUT)."""
    await peer.send(FrontendRequest.GET_FEATURES)
    while True:
        try:
            raw = await peer.recv()
        except TransportError:
            return False
        if raw is None:
            return False
        raw.close_fds()
        if raw.request == FrontendRequest.GET_FEATURES and len(raw.payload) == 8:
            return True


async def hostile_session(
    engine: BackendEngine, handshake: bool, sequence: list[Step], tmp_path: Path
) -> None:
    before = open_fds()
    client, server = socketpair_channels()
    peer = Peer(engine, client, asyncio.ensure_future(engine.serve(server)))
    guest = Guest()
    ring = Ring(guest)
    try:
        if handshake:
            await blk_session(peer, guest, ring)
        for step in sequence:
            with contextlib.ExitStack() as stack:
                fds = [make_fd(kind, stack) for kind in step.fds]
                data = Header(step.request, step.flags, len(step.body)).pack() + step.body
                try:
                    await peer.channel.send(data, fds)
                except (TransportError, OSError):
                    break  # the engine hung up already
            if not await barrier(peer):
                break
    finally:
        peer.channel.close()
        # `serve` ends by itself, without raising, whatever the front-end did.
        await asyncio.wait_for(peer.task, TIMEOUT)
        assert guest.engine_mappings() == 0
        ring.close()
        guest.close()
    assert engine.session is None
    after = open_fds()
    assert len(after) == len(before), {fd: t for fd, t in after.items() if before.get(fd) != t}
    # The next front-end is served: a full blk session with data checked.
    async with contextlib.AsyncExitStack() as stack:
        await fresh_blk_frontend(Connector("unix", tmp_path, stack), engine)


@budget(25)
@given(handshake=st.booleans(), sequence=st.lists(steps(), min_size=1, max_size=12))
def test_fuzz_engine_survives_hostile_request_sequences(
    tmp_path_factory: pytest.TempPathFactory, handshake: bool, sequence: list[Step]
) -> None:
    backend = BlkBackend(size=DISK, num_queues=2)
    try:
        engine = BackendEngine(backend)
        asyncio.run(hostile_session(engine, handshake, sequence, tmp_path_factory.mktemp("fuzz")))
    finally:
        backend.close()


@budget(25)
@given(garbage=st.binary(min_size=1, max_size=256), handshake=st.booleans())
def test_fuzz_engine_survives_an_unframed_byte_stream(
    tmp_path_factory: pytest.TempPathFactory, garbage: bytes, handshake: bool
) -> None:
    """Bytes that are not even framed: the engine parses what it can, refuses or waits for the
    rest; when the front-end hangs up, the session ends cleanly and the next one is served."""

    async def run(engine: BackendEngine, tmp_path: Path) -> None:
        before = open_fds()
        client, server = socketpair_channels()
        peer = Peer(engine, client, asyncio.ensure_future(engine.serve(server)))
        guest = Guest()
        ring = Ring(guest)
        try:
            if handshake:
                await blk_session(peer, guest, ring, io=False)
            with contextlib.suppress(TransportError, OSError):
                await peer.channel.send(garbage, [])
        finally:
            peer.channel.close()
            await asyncio.wait_for(peer.task, TIMEOUT)
            ring.close()
            guest.close()
        assert len(open_fds()) == len(before)
        async with contextlib.AsyncExitStack() as stack:
            await fresh_blk_frontend(Connector("unix", tmp_path, stack), engine)

    backend = BlkBackend(size=DISK, num_queues=2)
    try:
        asyncio.run(run(BackendEngine(backend), tmp_path_factory.mktemp("fuzz")))
    finally:
        backend.close()
