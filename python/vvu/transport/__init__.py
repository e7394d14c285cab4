"""Transports: how vhost-user messages and their fds reach the engine.

`base` defines the small interface; `unix` implements it over AF_UNIX sockets. The VVU transport
implements the same interface, so the engine and every back-end run unchanged over either.
"""

from __future__ import annotations

from vvu.transport.base import Channel, Listener, RawMessage, TransportError

__all__ = ["Channel", "Listener", "RawMessage", "TransportError"]
