"""The back-end channel of one session (BACKEND_REQ): requests the back-end sends to the
front-end, one at a time, and only while the device is not suspended.

Back-end requests are sent from outside the handling of a front-end request: QEMU does not read
the back-end channel while it waits for one of our replies, so waiting for its ack from inside a
handler could deadlock. Requests that nobody waits for (an IOTLB miss, a config change noted
while suspended) go out from tasks the channel keeps (`spawn`) and cancels when it closes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Coroutine, Sequence
from typing import Any, Protocol

from vvu._core import EventFd
from vvu.engine.common import RequestFailed
from vvu.errors import ProtocolError
from vvu.protocol import (
    EMPTY,
    U64,
    BackendRequest,
    Payload,
    VringState,
    decode_message,
    encode_message,
)
from vvu.protocol.codec import Header
from vvu.protocol.table import BACKEND_REQUESTS, Answer
from vvu.transport.base import Channel, TransportError

log = logging.getLogger(__name__)

# How long a back-end request waits for the front-end's answer.
BACKEND_REPLY_TIMEOUT = 5.0


class BackendChannel:
    """One session's back-end channel, what is waiting to be sent on it, and whether the
    device is suspended (vhost-user.rst, "Suspended device state": every ring stopped, from the
    start of a session until a ring starts and again once the last one stops): a suspended
    device "must not send any messages to the front-end"."""

    def __init__(self) -> None:
        self.channel: Channel | None = None
        # One back-end request (and its answer) at a time on the channel.
        self.lock = asyncio.Lock()
        # Sends in flight from tasks (kept referenced until done).
        self.sends: set[asyncio.Task[None]] = set()
        # Set while a ring is started: back-end requests may go out.
        self.resumed = asyncio.Event()
        # A config change noted while suspended: announced when a ring starts.
        self.config_change_pending = False

    def replace(self, channel: Channel | None) -> None:
        """SET_BACKEND_REQ_FD: close the channel in use, if any, and take `channel`."""
        if self.channel is not None:
            self.channel.close()
        self.channel = channel

    async def request(
        self,
        request: BackendRequest,
        payload: Payload = EMPTY,
        fds: Sequence[int] = (),
        *,
        protocol_features: int,
        need_reply: bool = True,
        timeout: float = BACKEND_REPLY_TIMEOUT,
    ) -> Payload | None:
        """`BackendEngine.backend_request` for a session that negotiated `protocol_features`."""
        if self.channel is None:
            raise RequestFailed(f"{request.name}: the front-end gave no back-end channel")
        spec = BACKEND_REQUESTS[request]
        if spec.feature is not None and not protocol_features & spec.feature.mask:
            raise RequestFailed(f"{request.name} needs protocol feature {spec.feature.name}")
        answer = spec.answer(need_reply=need_reply, protocol_features=protocol_features)
        if not self.resumed.is_set():
            # A suspended device "must not send any messages to the front-end": this one goes
            # out once a ring starts (or fails below if the session ends first).
            log.debug("%s waits: the device is suspended (no ring started)", request.name)
            await self.resumed.wait()
        async with self.lock:
            channel = self.channel  # (dropped or replaced while we waited?)
            if channel is None:
                raise RequestFailed(f"{request.name}: the back-end channel is gone")
            data = encode_message(request, payload, need_reply=answer is Answer.ACK, nfds=len(fds))
            log.debug("=> %s", request.name)
            try:
                reply = await self._exchange(
                    channel, request, data, fds, answer=answer, timeout=timeout
                )
            except RequestFailed as err:
                self.drop(channel, str(err))
                raise
            except asyncio.CancelledError:
                # Half a message sent, or an answer still to come: the channel is out of step.
                self.drop(channel, f"{request.name} cancelled")
                raise
        if reply is None:
            return None
        if answer is Answer.ACK:
            assert isinstance(reply, U64)
            if reply.value != 0:
                raise RequestFailed(f"the front-end refused {request.name}")
        return reply

    @staticmethod
    async def _exchange(
        channel: Channel,
        request: BackendRequest,
        data: bytes,
        fds: Sequence[int],
        *,
        answer: Answer,
        timeout: float,
    ) -> Payload | None:
        """Send one back-end request and read its answer when one is due. RequestFailed means
        the channel is out of step (no answer, a broken one, or the channel failed)."""
        try:
            await channel.send(data, fds)
            if answer is Answer.NOTHING:
                return None
            raw = await asyncio.wait_for(channel.recv(), timeout)
        except TimeoutError:
            raise RequestFailed(f"{request.name}: no answer within {timeout} s") from None
        except TransportError as err:
            raise RequestFailed(f"{request.name}: {err}") from err
        if raw is None:
            raise RequestFailed(f"{request.name}: the front-end closed the back-end channel")
        try:
            reply = decode_message(
                Header(raw.request, raw.flags, len(raw.payload)),
                raw.payload,
                raw.fds,
                channel="backend",
                is_reply=True,
            )
        except ProtocolError as err:
            raise RequestFailed(f"{request.name}: bad answer: {err}") from err
        finally:
            raw.close_fds()
        if reply.request != request:
            raise RequestFailed(f"{request.name}: answered as {reply.name}")
        return reply.payload

    def drop(self, channel: Channel, why: str) -> None:
        log.warning("back-end channel dropped: %s", why)
        channel.close()
        if self.channel is channel:  # unless SET_BACKEND_REQ_FD replaced it already
            self.channel = None

    def spawn(self, send: Coroutine[Any, Any, None]) -> None:
        """Run `send` as a task the channel keeps until it is done (or cancels on close)."""
        task = asyncio.get_running_loop().create_task(send)
        self.sends.add(task)
        task.add_done_callback(self.sends.discard)

    def note_config_change(self) -> None:
        """A config change while suspended: announced (once) when a ring starts."""
        if not self.config_change_pending:
            log.info("config change noted; the front-end is told when a ring starts")
        self.config_change_pending = True

    def suspend(self) -> None:
        """Every ring stopped: back-end requests wait."""
        self.resumed.clear()

    def resume(self) -> bool:
        """A ring started: back-end requests may go out. True when a config change was noted
        while suspended and is now the caller's to announce."""
        if self.resumed.is_set():
            return False
        self.resumed.set()
        pending, self.config_change_pending = self.config_change_pending, False
        return pending

    def close(self) -> None:
        """The session ends: cancel the sends in flight, close the channel, and let requests
        still waiting for a ring fail (there is no channel any more)."""
        for task in list(self.sends):
            task.cancel()
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        self.resumed.set()


class _SendRequest(Protocol):
    def __call__(
        self, request: BackendRequest, payload: Payload, *, need_reply: bool
    ) -> Awaitable[Payload | None]: ...


class InbandSignal:
    """An eventfd a queue runner signals as it would a front-end's call or err eventfd; each
    signal becomes one back-end request (BACKEND_VRING_CALL/ERR) on the back-end channel
    (INBAND_NOTIFICATIONS, for a ring whose front-end gave no fd). Signals that arrive while one
    is being sent coalesce, as they do on an eventfd."""

    def __init__(
        self, send: _SendRequest, request: BackendRequest, index: int, efd: EventFd
    ) -> None:
        self.efd = efd
        self._send_request = send
        self._request = request
        self._index = index
        self._sending: asyncio.Task[None] | None = None
        asyncio.get_running_loop().add_reader(efd.fileno(), self._on_signal)

    def _on_signal(self) -> None:
        if self.efd.closed or self._sending is not None or not self.efd.consume():
            return
        self._sending = asyncio.ensure_future(self._send())

    async def _send(self) -> None:
        try:
            # With NEED_REPLY: INBAND comes with REPLY_ACK, which "needs to be used with the
            # in-band notification messages to block until they are processed" (vhost-user.rst).
            # The runner does not wait: signals during the round trip coalesce into one more.
            await self._send_request(self._request, VringState(self._index, 0), need_reply=True)
        except RequestFailed as err:
            log.warning("vring %d: in-band %s lost: %s", self._index, self._request.name, err)
        finally:
            self._sending = None
            self._on_signal()  # signalled again while sending: send once more

    def close(self) -> None:
        """Stop watching and close the eventfd (a send in progress still completes)."""
        if not self.efd.closed:
            asyncio.get_running_loop().remove_reader(self.efd.fileno())
            self.efd.close()
