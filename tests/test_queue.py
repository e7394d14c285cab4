"""Virtqueues from Python: driver and device over one memfd mapped twice. The shared tests run
on split and packed rings alike."""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vvu import QueueError
from vvu._core import (
    EventFd,
    GuestMemory,
    NativeHandler,
    PackedQueue,
    PackedQueueDriver,
    QueueWorker,
    SplitQueue,
    SplitQueueDriver,
    memfd,
    writable_views,
)

MiB = 1 << 20
DESC, AVAIL, USED = 0x0, 0x4000, 0x8000
DATA = 0x10_0000


@dataclass
class Pair:
    driver_memory: GuestMemory
    device_memory: GuestMemory
    driver: SplitQueueDriver | PackedQueueDriver
    device: SplitQueue | PackedQueue


@contextlib.contextmanager
def make_pair(
    size: int = 256, *, event_idx: bool = False, start: int = 0, packed: bool = False
) -> Iterator[Pair]:
    fd = memfd(4 * MiB)
    try:
        driver_memory, device_memory = GuestMemory(), GuestMemory()
        driver_memory.add_region(fd, 0, 4 * MiB)
        device_memory.add_region(fd, 0, 4 * MiB)
        driver: SplitQueueDriver | PackedQueueDriver
        device: SplitQueue | PackedQueue
        if packed:  # the packed areas at the split rings' places; a fresh ring
            driver = PackedQueueDriver(driver_memory, size, DESC, AVAIL, USED, event_idx=event_idx)
            device = PackedQueue(size, DESC, AVAIL, USED, event_idx=event_idx)
            device.attach(device_memory)
            device.vring_base = driver.vring_base
        else:
            driver = SplitQueueDriver(
                driver_memory, size, DESC, AVAIL, USED, event_idx=event_idx, start_index=start
            )
            device = SplitQueue(size, DESC, AVAIL, USED, event_idx=event_idx)
            device.attach(device_memory)
            device.next_avail = start
        yield Pair(driver_memory, device_memory, driver, device)
    finally:
        os.close(fd)


@pytest.fixture(
    params=[(False, False), (True, False), (False, True), (True, True)],
    ids=["split", "split-event-idx", "packed", "packed-event-idx"],
)
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    event_idx, packed = request.param
    # Packed: an odd size, so that 40 rounds of 8 two-slot chains wrap the ring several times.
    size = 100 if packed else 256
    with make_pair(size, event_idx=event_idx, start=65530, packed=packed) as p:
        yield p


def test_round_trip_every_byte_and_used_length(pair: Pair) -> None:
    """Many requests, across the 16-bit index wrap: the device echoes each request reversed."""
    for round_ in range(40):
        heads = {}
        for i in range(8):
            payload = os.urandom(64 + i)
            gpa_in, gpa_out = DATA + i * 0x1000, DATA + 0x80000 + i * 0x1000
            pair.driver_memory.write(gpa_in, payload)
            head = pair.driver.add_chain([(gpa_in, len(payload))], [(gpa_out, 256)])
            heads[head] = (payload, gpa_out)
        pair.driver.publish()
        chains = pair.device.pop(64)
        assert sorted(c.head for c in chains) == sorted(heads)
        for chain in chains:
            data = chain.read()
            assert data == heads[chain.head][0], f"round {round_}"
            written = chain.write(data[::-1])
            pair.device.push_used(chain.head, written)
        pair.device.publish_used()
        used = pair.driver.reap_all()
        assert len(used) == len(heads)
        for head, length in used:
            payload, gpa_out = heads[head]
            assert length == len(payload)
            assert pair.driver_memory.read(gpa_out, length) == payload[::-1]
    assert pair.driver.in_flight == 0


def test_segments_are_zero_copy_views(pair: Pair) -> None:
    pair.driver_memory.write(DATA, b"abcd")
    head = pair.driver.add_chain([(DATA, 2), (DATA + 2, 2)], [(DATA + 0x100, 8), (DATA + 0x200, 8)])
    pair.driver.publish()
    (chain,) = pair.device.pop()
    assert [bytes(v) for v in chain.readable] == [b"ab", b"cd"]
    assert (chain.readable_len, chain.writable_len) == (4, 16)
    first, second = chain.writable
    first[:] = b"11111111"
    second[:4] = b"2222"
    assert pair.driver_memory.read(DATA + 0x100, 8) == b"11111111"
    assert pair.driver_memory.read(DATA + 0x200, 4) == b"2222"
    with pytest.raises(TypeError):
        chain.readable[0][0] = 0  # the device must not write device-readable buffers
    assert chain.write(b"x" * 20, offset=4) == 12  # only what fits
    pair.device.push_used(head, 16)
    pair.device.publish_used()
    assert pair.driver.reap_used() == (head, 16)


def test_a_batch_is_filled_and_returned_in_one_call_each(pair: Pair) -> None:
    """writable_views flattens the batch's writable buffers in chain order (readable ones are
    not in it); push_used_many returns each chain with its own length."""
    shapes = [[(DATA + 0x100, 8)], [(DATA + 0x200, 4), (DATA + 0x300, 4)], []]
    heads = [pair.driver.add_chain([(DATA, 2)], writable) for writable in shapes]
    pair.driver.publish()
    chains = pair.device.pop()
    assert [c.head for c in chains] == heads
    views = writable_views(chains)
    assert [len(v) for v in views] == [8, 4, 4]
    for i, view in enumerate(views):
        view[:] = bytes([0x41 + i]) * len(view)
    assert pair.driver_memory.read(DATA + 0x100, 8) == b"A" * 8
    assert pair.driver_memory.read(DATA + 0x300, 4) == b"C" * 4
    with pytest.raises(ValueError, match="2 used lengths for 3 chains"):
        pair.device.push_used_many(chains, [8, 8])
    pair.device.push_used_many(chains, [8, 7, 0])
    pair.device.publish_used()
    assert sorted(pair.driver.reap_all()) == sorted(zip(heads, [8, 7, 0], strict=True))


def test_indirect_chain(pair: Pair) -> None:
    pair.driver_memory.write(DATA, b"indirect")
    head = pair.driver.add_indirect(DATA + 0x3000, [(DATA, 8)], [(DATA + 0x100, 4)])
    pair.driver.publish()
    (chain,) = pair.device.pop()
    assert chain.head == head and chain.read() == b"indirect" and chain.writable_len == 4


def test_notification_suppression_without_event_idx() -> None:
    with make_pair(event_idx=False) as p:

        def complete_one(p: Pair = p) -> bool:
            p.driver.add_chain([(DATA, 1)])
            p.driver.publish()
            (chain,) = p.device.pop()
            p.device.push_used(chain.head, 0)
            notify = p.device.publish_used()
            p.driver.reap_all()
            return notify

        p.driver.disable_call_notifications()  # NO_INTERRUPT
        assert complete_one() is True  # the first completion after attach always notifies
        assert complete_one() is False
        p.driver.enable_call_notifications()
        assert complete_one() is True


def test_device_asks_for_kicks_only_when_idle() -> None:
    with make_pair(event_idx=True) as p:
        p.driver.add_chain([(DATA, 1)])
        assert p.driver.publish() is True  # first publish after start: kick
        assert p.device.enable_notifications() is True  # work is pending: don't sleep
        p.device.pop()
        assert p.device.enable_notifications() is False


def _hostile(pair: Pair, head: int, desc: bytes) -> None:
    pair.driver_memory.write(DESC + 16 * head, desc)
    pair.driver_memory.store_u16(AVAIL + 4, head)
    pair.driver_memory.store_u16(AVAIL + 2, 1)


@pytest.mark.parametrize(
    ("desc", "match"),
    [
        (struct.pack("<QIHH", DATA, 16, 1, 0), "loop|longer|chain"),  # NEXT to itself
        (struct.pack("<QIHH", 0x7000_0000, 16, 0, 0), "outside guest memory"),
        (struct.pack("<QIHH", DATA, 16, 1, 4000), "links to 4000, outside"),
        (struct.pack("<QIHH", DATA, 0, 4, 0), "indirect"),  # indirect table of length 0
    ],
    ids=["loop", "outside-memory", "next-out-of-range", "empty-indirect"],
)
def test_hostile_descriptors_break_the_queue(desc: bytes, match: str) -> None:
    with make_pair() as p:
        _hostile(p, 0, desc)
        with pytest.raises(QueueError, match=match):
            p.device.pop()
        assert p.device.broken_reason is not None
        with pytest.raises(QueueError, match="broken"):
            p.device.pop()


def test_avail_index_jump_breaks_the_queue() -> None:
    with make_pair(size=16) as p:
        p.driver_memory.store_u16(AVAIL + 2, 17)
        with pytest.raises(QueueError, match="ahead"):
            p.device.pop()


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(QueueError, match="power of two"):
        SplitQueue(100, DESC, AVAIL, USED)
    with pytest.raises(ValueError, match="32768"):
        SplitQueue(65536, DESC, AVAIL, USED)
    with pytest.raises(QueueError, match="align"):
        SplitQueue(256, DESC + 8, AVAIL, USED)
    queue = SplitQueue(256, 0x7000_0000, AVAIL, USED)
    with pytest.raises(QueueError):
        queue.attach(GuestMemory())  # rings outside (empty) memory


def test_full_driver_ring_raises() -> None:
    with make_pair(size=4) as p:
        for _ in range(4):
            p.driver.add_chain([(DATA, 1)])
        with pytest.raises(QueueError, match="full"):
            p.driver.add_chain([(DATA, 1)])


def test_queue_keeps_its_memory_snapshot_mapped() -> None:
    with make_pair() as p:
        with pytest.raises(Exception, match="still in use"):
            p.device_memory.remove_region(0)
        p.device.detach()
        p.device_memory.remove_region(0)


def test_packed_queue_runs_in_a_native_worker_and_comes_back_packed(tmp_path: Path) -> None:
    """A PackedQueue handed to a QueueWorker (native blk handler) completes a write and a read,
    and stop() gives back a PackedQueue whose vring_base is where the driver stands."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    fd = os.open(disk, os.O_RDWR)
    kick, call = EventFd(), EventFd()
    try:
        with make_pair(10, packed=True) as pair:
            assert isinstance(pair.driver, PackedQueueDriver)
            worker = QueueWorker(
                "vq-packed", pair.device, NativeHandler.blk(fd, 2048), kick=kick, call=call
            )
            data = os.urandom(4096)
            pair.driver_memory.write(DATA + 0x1000, data)
            for request_type, data_gpa in ((1, DATA + 0x1000), (0, DATA + 0x3000)):
                header = struct.pack("<IIQ", request_type, 0, 8)  # OUT / IN at sector 8
                pair.driver_memory.write(DATA, header)
                data_buf = [(data_gpa, len(data))]
                readable = [(DATA, 16)] + (data_buf if request_type == 1 else [])
                writable = ([] if request_type == 1 else data_buf) + [(DATA + 0x100, 1)]
                head = pair.driver.add_chain(readable, writable)
                if pair.driver.publish():
                    kick.signal()
                assert call.wait(10.0)  # consumes the call
                used = pair.driver.reap_all()
                assert [h for h, _ in used] == [head]
                assert pair.driver_memory.read(DATA + 0x100, 1) == b"\0"  # VIRTIO_BLK_S_OK
            assert pair.driver_memory.read(DATA + 0x3000, len(data)) == data
            assert disk.read_bytes()[8 * 512 : 8 * 512 + len(data)] == data
            stopped = worker.stop()
            assert isinstance(stopped, PackedQueue)
            # Two 3-slot requests on a ring of 10: both positions at slot 6, wrap counter 1.
            assert stopped.vring_base == pair.driver.vring_base == 0x8006_8006
            stopped.detach()
    finally:
        os.close(fd)
        kick.close()
        call.close()
