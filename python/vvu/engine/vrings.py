"""The rings of a session: what the front-end told us about each one (`Vring`), where a ring
starts, and the runners' counters kept over every session (`QueueCounters`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from vvu._core import EventFd
from vvu.engine.backend_channel import InbandSignal
from vvu.engine.runners import QueueRunner
from vvu.protocol import VringAddr

#: A fresh packed ring (SET_VRING_BASE never sent): both positions at slot 0, wrap counter 1.
PACKED_START_BASE = 0x8000_8000


def packed_vring_base(num: int) -> int:
    """The packed-ring SET_VRING_BASE value to apply: bits 0-15 the next available position,
    bits 16-31 the next used one (QEMU). Front-ends that send only the low half (DPDK
    virtio-user, whose own vhost library reads it as both) mean used = avail."""
    if num >> 16 == 0:
        return num | num << 16
    return num


@dataclass
class Vring:
    """What the front-end told us about one ring, and its runner while it runs."""

    index: int
    size: int = 0
    addr: VringAddr | None = None
    base: int | None = None  # SET_VRING_BASE's num, or where the ring stopped; None: fresh
    kick: EventFd | None = None
    kick_set: bool = False  # SET_VRING_KICK seen (possibly NOFD)
    call: EventFd | None = None
    err: EventFd | None = None
    started: bool = False
    enabled: bool = False
    runner: QueueRunner | None = None
    # The runner is the back-end's `disabled_worker` (a started but disabled ring), not its
    # device worker.
    runner_disabled: bool = False
    # INBAND_NOTIFICATIONS: `call`/`err` are then these signals' eventfds.
    inband_call: InbandSignal | None = None
    inband_err: InbandSignal | None = None

    def release(self) -> None:
        for signal in (self.inband_call, self.inband_err):
            if signal is not None:
                signal.close()
        self.inband_call = self.inband_err = None
        for efd in (self.kick, self.call, self.err):
            if efd is not None:
                efd.close()
        self.kick = self.call = self.err = None


class QueueCounters:
    """Per queue, the runner counters since the engine was made (every session, every start of
    the ring), read from the runners' own counters: nothing is counted per request here."""

    def __init__(self) -> None:
        # Counters of runners that stopped, by queue: `snapshot` adds the running ones.
        self._retired: dict[int, dict[str, int]] = {}
        # What `snapshot` last returned: a ring being stopped is in neither place until its
        # worker has joined, and counters must not step back meanwhile.
        self._reported: dict[int, dict[str, int]] = {}

    def retire(self, index: int, runner: QueueRunner) -> None:
        """Queue `index`'s runner stopped: keep what it counted."""
        totals = self._retired.setdefault(index, {})
        for name, value in runner.stats.items():
            totals[name] = totals.get(name, 0) + value

    def snapshot(self, num_queues: int, running: Mapping[int, QueueRunner]) -> list[dict[str, int]]:
        """The totals of queues 0..`num_queues`-1, the `running` runners (by queue) counted in."""
        out = []
        for index in range(num_queues):
            totals = dict(self._retired.get(index, {}))
            runner = running.get(index)
            if runner is not None:
                for name, value in runner.stats.items():
                    totals[name] = totals.get(name, 0) + value
            before = self._reported.get(index, {})
            for name, value in before.items():
                totals[name] = max(totals.get(name, 0), value)
            self._reported[index] = totals
            out.append(dict(totals))
        return out
