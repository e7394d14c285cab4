"""SIGINT, SIGTERM and SIGHUP held from a command's first socket until its event loop handles
them.

A serving command binds its socket before its event loop can install signal handlers, and
whoever waits for that socket (libvirt, a script, a test fixture) may signal it the moment it
appears. By default SIGTERM would kill the process there, leaving the socket file behind; held
(blocked) instead, the signal stays pending and reaches the handler, and the command stops
cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterator, Mapping

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Hold the stop signals inside the block (threads started meanwhile keep them held, so
    they go to the main thread); the previous signal mask comes back at the end."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def handle(
    loop: asyncio.AbstractEventLoop, handlers: Mapping[signal.Signals, Callable[[], object]]
) -> None:
    """Install `handlers` on `loop`, then let the stop signals through: one that arrived while
    they were held is handled now, by the loop; one without a handler here gets its default
    action, as it would have without holding."""
    for signum, handler in handlers.items():
        loop.add_signal_handler(signum, handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
