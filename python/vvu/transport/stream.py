"""A non-blocking AF_UNIX stream socket on asyncio, with fds as SCM_RIGHTS.

Both protocols vvu speaks over sockets (vhost-user and vfio-user) frame messages the same way at
this level: read exactly N bytes across short reads, collecting the fds that arrive with any of
them; send a whole message with its fds attached to the first byte. Nothing here blocks the event
loop: every wait is a loop reader or writer.
"""

from __future__ import annotations

import array
import asyncio
import errno
import os
import socket
import time
from asyncio import Future
from asyncio.tasks import _enter_task, _leave_task
from collections.abc import Callable, Coroutine, Generator, Sequence
from typing import Any

from vvu.transport.base import TransportError, close_fds

__all__ = ["FdStream", "connect_socket"]

#: Room for many more fds than any message may carry, so that a peer sending too many is caught
#: by the per-message fd check (and its fds closed) instead of losing some to truncation. Past
#: this the kernel sets MSG_CTRUNC and drops the rest: the stream is broken.
MAX_RECV_FDS = 64
_FD_SPACE = socket.CMSG_SPACE(MAX_RECV_FDS * array.array("i").itemsize)


def _take_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            usable = len(data) - len(data) % arr.itemsize
            arr.frombytes(data[:usable])
            fds.extend(arr)
    for fd in fds:
        os.set_inheritable(fd, False)
    return fds


def _ancillary(fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
    """SCM_RIGHTS control data carrying `fds` (none: nothing)."""
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


class _PendingRead:
    """One read in progress: `size` bytes, and with `payload_size` then the payload the header
    announces. Filled synchronously as far as the socket allows, then by the loop's reader
    callback; `frame` is the result once complete (None: a clean EOF at the boundary)."""

    __slots__ = ("at_boundary", "buf", "fds", "frame", "future", "header", "payload_size", "size")

    def __init__(
        self,
        size: int,
        fds: list[int],
        at_boundary: bool,
        payload_size: Callable[[bytes], int] | None,
    ) -> None:
        self.size = size
        self.buf = bytearray()
        self.fds = fds
        self.at_boundary = at_boundary
        self.payload_size = payload_size
        self.header: bytes | None = None
        self.frame: tuple[bytes, bytes] | None = None
        self.future: Future[tuple[bytes, bytes] | None] | None = None


#: Handles one message (header bytes, payload bytes, its fds) to the end: `FdStream.serve_frames`.
FrameHandler = Callable[[bytes, bytes, list[int]], Coroutine[Any, Any, None]]

#: At most this many messages handled per reader callback before the event loop gets a turn (a
#: front-end sending without pause must not starve the loop's other work).
EAGER_BURST = 16


class _Resumed:
    """A coroutine started outside any task step (eagerly, from a reader callback) and suspended
    there, finished by the task that awaits this: the task gets the future the coroutine waits
    on, then drives the coroutine as if it had started it (sends, throws, cancellation)."""

    __slots__ = ("coro", "first")

    def __init__(self, coro: Coroutine[Any, Any, None], first: object) -> None:
        self.coro = coro
        self.first = first

    def __await__(self) -> Generator[Any, None, None]:
        coro, value = self.coro, self.first
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # the task throws (a cancellation, a future's error)
                try:
                    value = coro.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    value = coro.send(sent)
                except StopIteration:
                    return


class _Serving:
    """`FdStream.serve_frames` in progress: what the reader callback needs to handle messages
    itself, and the future that wakes the serving task (a message's handling waits, the peer
    closed, an error)."""

    __slots__ = ("future", "handle", "header_size", "loop", "orphan", "payload_size", "task")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        task: asyncio.Task[Any],
        header_size: int,
        payload_size: Callable[[bytes], int],
        handle: FrameHandler,
    ) -> None:
        self.loop = loop
        self.task = task
        self.header_size = header_size
        self.payload_size = payload_size
        self.handle = handle
        # Result: None for a clean EOF, or a handling that waits.
        self.future: Future[_Resumed | None] | None = None
        # A handling that started waiting after the task was cancelled: closed by the task.
        self.orphan: _Resumed | None = None

    def next_read(self) -> _PendingRead:
        return _PendingRead(self.header_size, [], True, self.payload_size)


class _Wait:
    """`FdStream._pump`'s answer when the socket has no whole message yet."""


_WAIT = _Wait()


class FdStream:
    """One connected stream socket. `broken` is the error class for a stream that can no longer
    be delimited (EOF mid-message, fds lost to truncation); other failures raise TransportError.

    A read that has to wait leaves the socket registered with the event loop, and the loop's
    reader callback reads what that read asks for, no more: a session's next message (the
    common case, a front-end waiting for our reply) then costs no epoll registration. The
    registration goes when data arrives that nobody waits for, and with `close`."""

    def __init__(
        self, sock: socket.socket, peer: str, *, broken: type[TransportError] = TransportError
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.peer = peer
        self._broken = broken
        self._send_lock = asyncio.Lock()
        self.closed = False
        self._reader_loop: asyncio.AbstractEventLoop | None = None  # registered with
        self._pending: _PendingRead | None = None
        self._serving: _Serving | None = None

    def fileno(self) -> int:
        return self.sock.fileno()

    async def _wait_writable(self) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        fd = self.sock.fileno()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        loop.add_writer(fd, ready)
        try:
            await fut
        finally:
            loop.remove_writer(fd)

    def _read_some(self, want: int, fds: list[int]) -> bytes | None:
        """One recvmsg of at most `want` bytes, its fds appended to `fds`: the bytes (b"" at
        EOF), or None when none are there yet."""
        if self.closed:
            raise TransportError(f"{self.peer}: connection closed")
        try:
            data, ancdata, msg_flags, _ = self.sock.recvmsg(want, _FD_SPACE)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as err:
            raise TransportError(f"{self.peer}: receive failed: {err}") from err
        if ancdata:
            fds.extend(_take_fds(ancdata))
        if msg_flags & socket.MSG_CTRUNC:
            raise self._broken(
                f"{self.peer}: more than {MAX_RECV_FDS} fds attached, some were lost"
            )
        return data

    def _eof(self, got: int, size: int, at_boundary: bool) -> None:
        """The peer closed after `got` of `size` bytes: clean only at a message boundary."""
        if not (at_boundary and got == 0):
            raise self._broken(f"{self.peer}: peer closed mid-message ({got} of {size} bytes)")

    async def recv_exact(self, size: int, fds: list[int], *, at_boundary: bool) -> bytes | None:
        """Exactly `size` bytes, appending the fds that came with them to `fds` (the caller owns
        and closes those, also when this raises). None for a clean EOF before the first byte
        when `at_boundary`."""
        frame = await self._recv(_PendingRead(size, fds, at_boundary, None))
        return None if frame is None else frame[0]

    async def recv_frame(
        self, header_size: int, payload_size: Callable[[bytes], int], fds: list[int]
    ) -> tuple[bytes, bytes] | None:
        """One message at a boundary: `header_size` bytes, then the `payload_size(header)`
        bytes after them (it may raise, e.g. for a payload over a cap), with the fds of both
        appended to `fds` as in `recv_exact`. None for a clean EOF before the header. Read
        whole by the reader callback when it has to wait, so the event loop is not woken
        again for a payload still in the socket."""
        return await self._recv(_PendingRead(header_size, fds, True, payload_size))

    async def _recv(self, pending: _PendingRead) -> tuple[bytes, bytes] | None:
        if self._advance(pending):
            return pending.frame
        loop = asyncio.get_running_loop()  # the rest comes through the loop's reader callback
        if self._pending is not None:
            raise RuntimeError(f"{self.peer}: two reads at once on one stream")
        future: Future[tuple[bytes, bytes] | None] = loop.create_future()
        pending.future = future
        self._pending = pending
        if self._reader_loop is not loop:
            self._stop_reading()
            loop.add_reader(self.sock.fileno(), self._on_readable)
            self._reader_loop = loop
        try:
            return await future
        finally:
            if self._pending is pending:
                self._pending = None

    def _advance(self, pending: _PendingRead) -> bool:
        """Read for `pending` what the socket holds; True once it is complete."""
        while True:
            want = pending.size - len(pending.buf)
            if want:
                data = self._read_some(want, pending.fds)
                if data is None:
                    return False
                if not data:
                    self._eof(len(pending.buf), pending.size, pending.at_boundary)
                    pending.frame = None
                    return True
                if len(data) == want and not pending.buf:
                    got = data  # the usual case: all of it in one recvmsg, no copy
                else:
                    pending.buf += data
                    if len(pending.buf) < pending.size:
                        continue
                    got = bytes(pending.buf)
            else:
                got = b""
            if pending.header is not None:
                pending.frame = (pending.header, got)
                return True
            if pending.payload_size is None:
                pending.frame = (got, b"")
                return True
            size = pending.payload_size(got)
            if size == 0:
                pending.frame = (got, b"")
                return True
            pending.header, pending.size, pending.buf = got, size, bytearray()
            pending.at_boundary = False

    def _on_readable(self) -> None:
        if self._serving is not None:
            self._serve_ready(self._serving)
            return
        pending = self._pending
        if pending is None or pending.future is None or pending.future.done():
            # Nobody waits (a request is being handled, a read was cancelled): stop watching,
            # or this level-triggered reader would run on every loop iteration until someone
            # reads. The next read that has to wait registers again.
            self._stop_reading()
            return
        try:
            if not self._advance(pending):
                return  # part of it so far
        except Exception as err:  # the waiting read raises it
            self._pending = None
            pending.future.set_exception(err)
            return
        self._pending = None
        pending.future.set_result(pending.frame)

    # --- eager serving ---------------------------------------------------------------------

    async def serve_frames(
        self, header_size: int, payload_size: Callable[[bytes], int], handle: FrameHandler
    ) -> None:
        """Read messages as `recv_frame` does and run `handle(header, payload, fds)` for each,
        one after another in order, until a clean EOF (returns) or an error (raised: a broken
        stream, or whatever a handling raised; the fds of a message not handed over are closed).

        Eager: a message that arrives while this waits is handled from the event loop's reader
        callback, as part of the calling task (`asyncio.current_task()` is that task), and as
        far as its handling goes without waiting. A handling that never waits (the common case:
        answer and send) then costs no wake-up of the task; one that waits is finished by the
        task itself, and the next message is read only after it. At most `EAGER_BURST` messages
        are handled per callback before the loop gets a turn."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        if task is None or self._serving is not None or self._pending is not None:
            raise RuntimeError(f"{self.peer}: serve_frames needs a task and an idle stream")
        serving = _Serving(loop, task, header_size, payload_size, handle)
        self._pending = serving.next_read()
        self._serving = serving
        try:
            while True:
                outcome = self._pump(serving, burst=0)
                if outcome is _WAIT:  # the rest comes through the reader callback
                    serving.future = loop.create_future()
                    if self._reader_loop is not loop:
                        self._stop_reading()
                        loop.add_reader(self.sock.fileno(), self._on_readable)
                        self._reader_loop = loop
                    outcome = await serving.future
                    serving.future = None
                if outcome is None:
                    return
                assert isinstance(outcome, _Resumed)
                await outcome  # a handling that waits: finished here, in order
        finally:
            self._serving = None
            if serving.orphan is not None:
                serving.orphan.coro.close()
            pending, self._pending = self._pending, None
            if pending is not None:
                close_fds(pending.fds)

    def _pump(self, serving: _Serving, *, burst: int) -> _Resumed | _Wait | None:
        """Read and handle whole messages while the socket has them: _WAIT when it has no
        whole one (or after `burst` messages, if not 0), None at a clean EOF, or a handling
        that waits. Raises what reading or a handling raised."""
        handled = 0
        while True:
            pending = self._pending
            assert pending is not None
            try:
                if not self._advance(pending):
                    return _WAIT
            except BaseException:
                self._pending = None
                close_fds(pending.fds)
                raise
            frame = pending.frame
            if frame is None:
                self._pending = None
                return None
            self._pending = serving.next_read()
            coro = serving.handle(frame[0], frame[1], pending.fds)  # it owns the fds now
            try:
                awaited = coro.send(None)
            except StopIteration:
                handled += 1
                if burst and handled >= burst:
                    return _WAIT
                continue
            return _Resumed(coro, awaited)

    def _serve_ready(self, serving: _Serving) -> None:
        """The reader callback while `serve_frames` waits: handle what arrived, as the task."""
        future = serving.future
        if future is None or future.done():
            # The task is busy (a handling that waits) or was cancelled: stop watching, as in
            # `_on_readable`; `serve_frames` registers again when it waits.
            self._stop_reading()
            return
        _enter_task(serving.loop, serving.task)
        try:
            outcome = self._pump(serving, burst=EAGER_BURST)
        except asyncio.CancelledError:
            future.cancel()
            return
        except Exception as err:
            future.set_exception(err)
            return
        finally:
            _leave_task(serving.loop, serving.task)
        if isinstance(outcome, _Wait):
            return
        if not future.done():
            future.set_result(outcome)
        elif outcome is not None:  # cancelled meanwhile: the task closes it
            serving.orphan = outcome

    def _stop_reading(self) -> None:
        loop, self._reader_loop = self._reader_loop, None
        if loop is not None and not loop.is_closed():
            loop.remove_reader(self.sock.fileno())

    async def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send `data` whole with `fds` attached to its first byte (the caller keeps them)."""
        if not self._send_lock.locked() and not self.closed:
            # Nobody else is sending: one sendmsg usually takes it all, with no lock to take.
            try:
                sent = self.sock.sendmsg([data], _ancillary(fds))
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as err:
                raise TransportError(f"{self.peer}: send failed: {err}") from err
            if sent == len(data):
                return
            if sent:
                data, fds = data[sent:], ()  # fds went with the first byte
        async with self._send_lock:
            view = memoryview(data)
            ancillary = _ancillary(fds)
            while view:
                if self.closed:
                    raise TransportError(f"{self.peer}: connection closed")
                try:
                    sent = self.sock.sendmsg([view], ancillary)
                except (BlockingIOError, InterruptedError):
                    await self._wait_writable()
                    continue
                except OSError as err:
                    raise TransportError(f"{self.peer}: send failed: {err}") from err
                ancillary = []  # fds travel once, with the first byte
                view = view[sent:]

    def close(self) -> None:
        """Close the socket; a read waiting for bytes fails with TransportError."""
        if not self.closed:
            self.closed = True
            self._stop_reading()
            pending, self._pending = self._pending, None
            closed = TransportError(f"{self.peer}: connection closed")
            future = pending.future if pending is not None else None
            if future is not None and not future.done():
                future.set_exception(closed)
            serving = self._serving.future if self._serving is not None else None
            if serving is not None and not serving.done():
                serving.set_exception(closed)
            self.sock.close()


async def connect_socket(
    path: str, *, timeout: float = 0.0, retry_interval: float = 0.1
) -> socket.socket:
    """A connected non-blocking socket to `path` (client mode), retrying for up to `timeout`
    seconds while the socket does not exist yet or refuses connections."""
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, path)
            # A full listen backlog fails an AF_UNIX connect with EAGAIN, which asyncio takes
            # for a connect in progress and reports as done: not connected (ENOTCONN) then.
            try:
                sock.getpeername()
            except OSError as err:
                if err.errno != errno.ENOTCONN:
                    raise
                raise ConnectionRefusedError(errno.ENOTCONN, "listen backlog full") from err
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as err:
            sock.close()
            if time.monotonic() >= deadline:
                raise TransportError(f"cannot connect to {path}: {err.strerror}") from err
            await asyncio.sleep(retry_interval)
        except BaseException:
            sock.close()
            raise
