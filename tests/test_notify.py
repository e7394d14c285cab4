"""Doorbells from Python: eventfds, the poller, asyncio, and Ctrl-C during a native wait."""

from __future__ import annotations

import asyncio
import ctypes
import signal
import threading
import time
from collections.abc import Callable

import pytest

from vvu._core import EventFd, Poller
from vvu.aio import wait_eventfd


def test_signal_consume_counts() -> None:
    efd = EventFd()
    assert efd.consume() == 0
    efd.signal()
    efd.signal()
    assert efd.consume() == 2
    assert efd.wait(0.01) is False


def test_wait_wakes_when_another_thread_signals() -> None:
    efd = EventFd()
    threading.Timer(0.05, efd.signal).start()
    assert efd.wait(5.0) is True


def test_from_fd_shares_the_counter_and_owns_a_duplicate() -> None:
    efd = EventFd()
    copy = EventFd.from_fd(efd.fileno())
    assert copy.fileno() != efd.fileno()
    copy.signal()
    assert efd.consume() == 1
    copy.close()
    assert copy.closed
    efd.signal()  # the original is unaffected by closing the copy
    with pytest.raises(OSError, match="closed"):
        copy.signal()


def test_poller_reports_ready_tokens_without_consuming() -> None:
    fds = [EventFd() for _ in range(4)]
    poller = Poller()
    for token, efd in enumerate(fds):
        poller.register(efd.fileno(), 100 + token)
    assert poller.wait(0.01) == []
    fds[1].signal()
    fds[3].signal()
    assert sorted(poller.wait(1.0)) == [101, 103]
    assert sorted(poller.wait(1.0)) == [101, 103]  # level-triggered until consumed
    fds[1].consume()
    poller.unregister(fds[3].fileno())
    assert poller.wait(0.01) == []
    with pytest.raises(OSError):
        poller.register(fds[0].fileno(), 1)  # already registered


def test_busy_poll_mode_still_wakes() -> None:
    efd = EventFd()
    poller = Poller(busy_poll=0.001)
    assert poller.busy_poll == pytest.approx(0.001)
    poller.register(efd.fileno(), 7)
    threading.Timer(0.02, efd.signal).start()
    assert poller.wait(5.0) == [7]


def test_ctrl_c_interrupts_a_native_wait() -> None:
    """Ctrl-C while the main thread blocks in a native wait raises KeyboardInterrupt there.

    Deterministic on a loaded machine: SIGINT goes to the main thread itself (a process-directed
    signal may land on any thread), with Python's own handler installed for the test (whatever
    an earlier test left), and is repeated until the wait has ended, so a main thread that
    reached the wait late still gets one while it waits."""
    efd = EventFd()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    main = threading.main_thread().ident
    assert main is not None and threading.get_ident() == main
    done = threading.Event()

    def interrupt() -> None:
        while not done.wait(0.2):
            signal.pthread_kill(main, signal.SIGINT)

    sender = threading.Thread(target=interrupt)
    started = time.monotonic()
    try:
        sender.start()
        with pytest.raises(KeyboardInterrupt):
            efd.wait(30.0)
    finally:
        signal.signal(signal.SIGINT, lambda signum, frame: None)  # a last one may be in flight
        done.set()
        sender.join()
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - started < 10, "the wait must end on Ctrl-C, not at its timeout"


def python_runs_during(wait: Callable[[float], object]) -> int:
    """How many times a Python thread got to run in the middle of `wait(1.0)`: between 0.2 s and
    0.8 s after the wait began. A wait that holds the GIL leaves no room there at all (the
    thread can run only before the wait starts, or after it ends), whatever the machine's load."""
    ticks = 0
    start = time.monotonic()

    def spin() -> None:
        nonlocal ticks
        while (now := time.monotonic()) < start + 0.8:
            if now > start + 0.2:
                ticks += 1

    thread = threading.Thread(target=spin)
    thread.start()
    wait(1.0)
    thread.join()
    return ticks


def test_wait_releases_the_gil() -> None:
    assert python_runs_during(EventFd().wait) > 0, "a Python thread must run during a native wait"


def test_gil_check_catches_a_wait_that_holds_the_gil() -> None:
    """The check above fails for a native wait that keeps the GIL: libc's usleep called through
    ctypes.PyDLL (which, unlike CDLL, does not release the GIL around the call)."""
    usleep = ctypes.PyDLL(None).usleep

    def holding(timeout: float) -> None:
        usleep(int(timeout * 1e6))

    assert python_runs_during(holding) == 0


@pytest.mark.asyncio
async def test_eventfd_awaited_from_asyncio() -> None:
    efd = EventFd()
    loop = asyncio.get_running_loop()
    loop.call_later(0.02, efd.signal)
    assert await wait_eventfd(efd, timeout=5) == 1
    with pytest.raises(TimeoutError):
        await wait_eventfd(efd, timeout=0.02)
    efd.signal()
    assert await wait_eventfd(efd) == 1  # already signalled: returns at once


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="timeout"):
        EventFd().wait(-1.0)
    with pytest.raises(ValueError):
        Poller().register(-1, 0)
    with pytest.raises(OSError):
        EventFd.from_fd(-1)
