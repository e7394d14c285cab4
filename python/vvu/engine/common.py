"""What every room of the engine shares: how a request fails, and a reply that carries an fd."""

from __future__ import annotations

from dataclasses import dataclass

from vvu.errors import VvuError
from vvu.protocol import Payload


class RequestFailed(VvuError):
    """A request could not be carried out; answered with a failure ack or a disconnect."""


@dataclass(frozen=True)
class ReplyWithFd:
    """A handler's reply that carries one fd (still owned by whoever keeps it)."""

    payload: Payload
    fd: int


class Disconnect(Exception):
    """Drop this front-end (the reason is logged)."""
