"""The back-end plugin API: one class with sensible defaults.

A minimal device overrides `device_id`, `num_queues` and one request path:

- `handle` (synchronous, batched): fed batches of descriptor chains with zero-copy buffers, it
  returns a used length for each before it returns. The fastest Python path, for devices that
  answer at once (rng).
- `run_queue` (asynchronous): a coroutine per running queue that takes `Request`s when it wants
  them and completes each when it is done, from any task, callback or thread, in any order
  (console, vsock, input: anything that waits for the outside). See `vvu.backends.request`.

Hot devices override `native_worker` instead, and their queues then run entirely in Rust threads
without the GIL. Everything the vhost-user protocol needs beyond that (features, memory, rings,
replies, what happens to held requests when a ring stops) is the engine's job.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import ClassVar

from vvu._core import DescriptorChain, NativeHandler
from vvu.backends.request import RequestQueue
from vvu.protocol import ProtocolFeature, VirtioFeature

log = logging.getLogger(__name__)

__all__ = ["Backend", "ConfigError"]


class ConfigError(ValueError):
    """A config-space write the device refuses (read-only field, out of range)."""


class Backend:
    """Base class of every device back-end.

    Subclasses set the class attributes and override what they need. An instance serves one
    front-end at a time; `reset` brings it back to its initial state between sessions.
    """

    #: Short name used by the CLI (`vvu serve NAME`) and in logs.
    name: ClassVar[str] = "backend"
    #: The virtio device id (1 net, 2 blk, 4 rng, ...).
    device_id: ClassVar[int] = 0
    #: Largest ring size the device accepts.
    max_queue_size: ClassVar[int] = 1024
    #: The device keeps internal state beyond its rings (`save_state`/`load_state`), so the
    #: engine offers DEVICE_STATE for migrating it.
    has_state: ClassVar[bool] = False
    #: Every queue runs in a native worker that can translate through an IOTLB, so the engine
    #: offers VIRTIO_F_ACCESS_PLATFORM (a vIOMMU in front of the device).
    supports_iommu: ClassVar[bool] = False

    def __init__(self, *, num_queues: int = 1) -> None:
        if num_queues < 1:
            raise ValueError("a device needs at least one queue")
        self.num_queues = num_queues
        self.acked_features = 0
        #: Seconds a native worker keeps polling its ring (and its I/O completions) after it ran
        #: empty before it sleeps; 0 sleeps at once.
        self.busy_poll = 0.0

    # --- command line ------------------------------------------------------------------------

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add this back-end's options to `vvu serve NAME`."""

    @classmethod
    def from_arguments(cls, args: argparse.Namespace) -> Backend:
        """Build the back-end from parsed `vvu serve` options."""
        return cls()

    # --- features and config space -----------------------------------------------------------

    def device_features(self) -> int:
        """Device-specific virtio feature bits (0-23 and 41+)."""
        return 0

    def features(self) -> int:
        """Every virtio feature bit offered; the engine adds VHOST_USER_F_PROTOCOL_FEATURES."""
        return (
            self.device_features()
            | VirtioFeature.VERSION_1.mask
            | VirtioFeature.INDIRECT_DESC.mask
            | VirtioFeature.EVENT_IDX.mask
            | VirtioFeature.RING_PACKED.mask
        )

    def protocol_features(self) -> int:
        """Protocol features this device adds to the engine's own (CONFIG, DEVICE_STATE)."""
        features = ProtocolFeature.CONFIG.mask if self.config_space() else 0
        if self.has_state:
            features |= ProtocolFeature.DEVICE_STATE.mask
        return features

    def set_features(self, features: int) -> None:
        """The front-end acked `features` (device bits already checked against `features()`)."""
        self.acked_features = features

    def config_space(self) -> bytes:
        """The whole device config space as the driver sees it (empty: no config space)."""
        return b""

    def write_config(self, offset: int, data: bytes) -> None:
        """A driver write to the config space; raise ConfigError to refuse it."""
        raise ConfigError(f"config space is read-only (write of {len(data)} bytes at {offset})")

    def queue_num(self) -> int:
        """The GET_QUEUE_NUM answer: queues (net devices answer queue pairs, as QEMU expects)."""
        return self.num_queues

    # --- device-specific requests (offer the protocol feature only where implemented) ---------

    def net_set_mtu(self, mtu: int) -> None:
        """VHOST_USER_NET_SET_MTU (protocol feature MTU); ValueError refuses it."""
        raise ValueError(f"{self.name} is not a network device: NET_SET_MTU does not apply")

    def send_rarp(self, mac: bytes) -> None:
        """VHOST_USER_SEND_RARP (protocol feature RARP): announce `mac` after a migration."""
        raise ValueError(f"{self.name} is not a network device: SEND_RARP does not apply")

    # --- internal state (DEVICE_STATE, set `has_state`) --------------------------------------

    def save_state(self) -> bytes:
        """The device's internal state beyond the rings, for a migration's destination; called
        with every ring stopped."""
        raise NotImplementedError(f"{self.name} keeps no internal state")

    def load_state(self, state: bytes) -> None:
        """Take over what `save_state` of the migration's source returned; called with every
        ring stopped. Raise ValueError (changing nothing) for state that is malformed or does
        not fit this device."""
        raise NotImplementedError(f"{self.name} keeps no internal state")

    # --- request paths -----------------------------------------------------------------------

    def native_worker(self, queue_index: int) -> NativeHandler | None:
        """A native handler that processes queue `queue_index` in a Rust thread, or None to use
        the Python path (`handle`)."""
        return None

    def prepare_native_worker(self, queue_index: int) -> None:
        """Queue `queue_index` may start soon (a front-end connected, or the queue has its
        kick and waits to be enabled): make ahead whatever `native_worker` would make that
        takes long (an io_uring), for it to use if nothing changed meanwhile. Called between
        front-end requests, after a reply went out, so it overlaps with the front-end's own
        work; the default does nothing."""

    def discard_prepared(self) -> None:
        """Let go of what `prepare_native_worker` made that no queue took (the session
        ended)."""

    def disabled_worker(self, queue_index: int) -> NativeHandler | None:
        """What a started but disabled queue does: vhost-user.rst, "Ring states", has the
        back-end process it "without causing any side effects". None (the default) leaves its
        chains where they are until it is enabled, which is the only side-effect-free
        processing of a request a device must carry out (blk) or of buffers it would fill (rng,
        net receive); net's transmit queues return `NativeHandler.discard()` ("process and
        discard any TX packets")."""
        return None

    def handle(self, queue_index: int, chains: Sequence[DescriptorChain]) -> Sequence[int]:
        """Process a batch of chains from queue `queue_index` (Python path).

        Read request data from `chain.readable` and write results into `chain.writable`
        (memoryviews straight into guest memory); return, per chain, the number of bytes
        written into its writable part. Raising marks the queue broken.
        """
        raise NotImplementedError(f"{type(self).__name__} has no Python request handler")

    # --- statistics (read by `vvu daemon` at query or scrape time) ----------------------------

    def queue_stats(self, queue_index: int) -> dict[str, int]:
        """Device counters of queue `queue_index` since the back-end was made (blk: requests,
        bytes, errors, malformed, in_flight); counted where the requests are served, only read
        here. Names ending in nothing special are counters, `in_flight` is a gauge."""
        return {}

    def latency_histogram(self, queue_index: int) -> list[int] | None:
        """Requests of queue `queue_index` by service time: element `i` counts those served in
        less than `2**i` microseconds, the last one every slower request; None: not measured."""
        return None

    async def run_queue(self, queue: RequestQueue) -> None:
        """Serve one running queue asynchronously (the path taken when a subclass overrides
        this method; `handle` is then not used).

        Called in its own task when the ring starts; the task is cancelled when the ring stops
        (and the engine waits a little for it and for the requests it holds). Take requests
        with `await queue.get()` or `async for request in queue`, and finish each with
        `request.complete(length)` whenever the answer is there. Raising marks the queue broken.
        """
        raise NotImplementedError(f"{type(self).__name__} has no asynchronous request path")

    @classmethod
    def asynchronous(cls) -> bool:
        """Whether the device serves its Python queues with `run_queue`."""
        return cls.run_queue is not Backend.run_queue

    # --- life cycle --------------------------------------------------------------------------

    def queue_started(self, queue_index: int) -> None:
        """Queue `queue_index` starts processing."""

    def queue_stopped(self, queue_index: int) -> None:
        """Queue `queue_index` stopped (GET_VRING_BASE, disable, or disconnect)."""

    def reset(self) -> None:
        """Forget the session: the front-end went away or sent RESET_DEVICE, or the driver
        reset the device (SET_STATUS 0; the engine then hands the features back at once)."""
        self.acked_features = 0

    def reload(self) -> bool:
        """Re-read outside state (`vvu serve` calls it on SIGHUP, e.g. blk re-reads its image
        size). Returns whether the config space changed, so the front-end must be told."""
        return False

    def close(self) -> None:
        """Release what the back-end holds (files, fds) when it will serve no more."""

    def describe(self) -> str:
        """One line for logs and `vvu serve` start-up."""
        return f"{self.name} (device id {self.device_id}, {self.num_queues} queue(s))"
