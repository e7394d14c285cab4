"""IOMMU (VIRTIO_F_ACCESS_PLATFORM) with our own front-end playing the IOMMU.

The back-end (vvu serve blk's engine, served in-process over AF_UNIX or behind the
virtio-vhost-user device) gets no translation up front: every ring and buffer address is an IOVA
it has to ask for with BACKEND_IOTLB_MSG MISS, answered with IOTLB_MSG UPDATE. The data written
is checked in the disk image itself, and read back. `TIMEOUT` only guards against hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

import pytest

from vvu._core import EventFd
from vvu.aio import wait_eventfd
from vvu.backends import BlkBackend, RngBackend
from vvu.engine import BackendEngine
from vvu.frontend import BlkDriver, Frontend, FrontendError, Iommu
from vvu.frontend.blk import T_IN
from vvu.frontend.core import WANTED_PROTOCOL_FEATURES
from vvu.protocol import (
    U64,
    FrontendRequest,
    Iotlb,
    IotlbPerm,
    ProtocolFeature,
    VhostFeature,
    VirtioFeature,
)
from vvu_harness import served

TIMEOUT = 60.0
T = TypeVar("T")
MiB = 1 << 20
TRANSPORTS = ["unix", "vvu"]


def disk_image(tmp_path: Path, size: int = 4 * MiB) -> Path:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(size))
    return image


@pytest.mark.asyncio
@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("mode", ["identity", "shuffled"])
async def test_blk_io_goes_through_translations_the_backend_asks_for(
    tmp_path: Path, transport: str, mode: str
) -> None:
    image = disk_image(tmp_path)
    iommu = Iommu("identity" if mode == "identity" else "shuffled")
    data = random.Random(5).randbytes(64 * 1024)
    async with served(BlkBackend(str(image)), transport, tmp_path) as path:
        blk = await BlkDriver.open(path, iommu=iommu, depth=4, max_request=64 * 1024)
        try:
            assert blk.frontend.features & VirtioFeature.ACCESS_PLATFORM.mask
            await blk.write(8, data)
            assert image.read_bytes()[8 * 512 : 8 * 512 + len(data)] == data
            assert await blk.read(8, len(data)) == data

            # Nothing was pushed: every translation the device used, it asked for first.
            asked = {iommu.lookup(iova) for iova, _ in iommu.misses}
            assert None not in asked
            rings = iommu.mappings[:3]  # desc, used, avail: mapped by start_queue, first
            assert set(rings) <= asked
            # Each request asked for its own slot's buffers, with the access it needed.
            for iova, perm in iommu.misses:
                mapping = iommu.lookup(iova)
                assert mapping is not None and perm & mapping.perm == perm

            # After an invalidation the device no longer has the data buffers: it asks again.
            buffers = [m for m in iommu.mappings if m.size == 64 * 1024]
            for mapping in buffers:
                await blk.frontend.iotlb_invalidate(mapping.iova, mapping.size)
            before = len(iommu.misses)
            for _ in range(4):  # every slot once
                assert await blk.read(8, len(data)) == data
            again = {iommu.lookup(iova) for iova, _ in iommu.misses[before:]}
            assert set(buffers) <= again
        finally:
            await blk.close()


@pytest.mark.asyncio
@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_device_write_into_a_read_only_mapping_is_refused(
    tmp_path: Path, transport: str
) -> None:
    """A read request whose data buffer the IOMMU maps read-only: the device must not write it.
    The queue breaks (SET_VRING_ERR is signalled) and the buffer and status stay untouched."""
    image = disk_image(tmp_path)
    image.write_bytes(b"\xaa" * 4096 + bytes(4 * MiB - 4096))
    iommu = Iommu("shuffled")
    async with served(BlkBackend(str(image)), transport, tmp_path) as path:
        frontend = await Frontend.connect(path, memory_size=4 * MiB, iommu=iommu)
        err = EventFd()
        try:
            await frontend.negotiate()
            await frontend.set_mem_table()
            await frontend.request(FrontendRequest.SET_VRING_ERR, U64.vring(0), [err.fileno()])
            queue = await frontend.start_queue(0, 16)
            memory = frontend.memory
            header = frontend.allocator.alloc(16, 16)
            data = frontend.allocator.alloc(4096, 4096)
            status = frontend.allocator.alloc(1, 1)
            memory.write(header, struct.pack("<IIQ", T_IN, 0, 0))
            memory.write(data, b"\x55" * 4096)
            memory.write(status, b"\xff")
            read_only = frontend.dma(data, 4096, IotlbPerm.RO)
            queue.submit(
                [(frontend.dma(header, 16, IotlbPerm.RO), 16)],
                [(read_only, 4096), (frontend.dma(status, 1, IotlbPerm.WO), 1)],
            )
            queue.notify()
            assert await wait_eventfd(err, TIMEOUT)
            assert memory.read(data, 4096) == b"\x55" * 4096
            assert memory.read(status, 1) == b"\xff"
            # The device asked for the buffer to write it and got the read-only translation.
            assert (read_only, IotlbPerm.WO) in iommu.misses
        finally:
            err.close()
            await frontend.close()


@pytest.mark.asyncio
@pytest.mark.timeout(TIMEOUT)
async def test_bad_iotlb_messages_are_refused_and_the_session_goes_on(tmp_path: Path) -> None:
    """IOTLB_MSG always gets its u64: 1 for an entry outside the memory table, a zero size, a
    type meant for the back-end; the session stays usable."""
    image = disk_image(tmp_path)
    iommu = Iommu("shuffled")
    async with served(BlkBackend(str(image)), "unix", tmp_path) as path:
        blk = await BlkDriver.open(path, iommu=iommu, depth=2, max_request=4096)
        try:
            for entry in (
                # uaddr outside every region
                (0x1000, 0x1000, 0x10, IotlbPerm.RW, 2),
                # zero size
                (0x1000, 0, 0x7F00_0000_0000, IotlbPerm.RW, 2),
                # MISS and ACCESS_FAIL go from back-end to front-end only
                (0x1000, 0x1000, 0x7F00_0000_0000, IotlbPerm.RW, 1),
                (0x1000, 0x1000, 0x7F00_0000_0000, IotlbPerm.RW, 4),
            ):
                reply = await blk.frontend.request(FrontendRequest.IOTLB_MSG, Iotlb(*entry))
                assert reply == U64(1)
            await blk.write(0, b"still here".ljust(4096, b"\0"))
            assert (await blk.read(0, 4096)).startswith(b"still here")
        finally:
            await blk.close()


class _LoggingBlk(BlkBackend):
    """A blk back-end that (pretends to) offer dirty logging, to see the engine refuse it
    together with an IOMMU."""

    def features(self) -> int:
        return super().features() | VhostFeature.LOG_ALL.mask


@pytest.mark.asyncio
@pytest.mark.timeout(TIMEOUT)
async def test_dirty_logging_with_an_iommu_is_refused(tmp_path: Path) -> None:
    backend = _LoggingBlk(size=MiB)
    engine = BackendEngine(backend)
    assert engine.offered_features() & VirtioFeature.ACCESS_PLATFORM.mask
    async with served(engine, "unix", tmp_path) as path:
        frontend = await Frontend.connect(path, memory_size=MiB, iommu=Iommu())
        try:
            await frontend.negotiate(features=0)  # REPLY_ACK and BACKEND_REQ, no features yet
            both = VirtioFeature.ACCESS_PLATFORM.mask | VhostFeature.LOG_ALL.mask
            with pytest.raises(FrontendError, match="refused SET_FEATURES"):
                await frontend.request(
                    FrontendRequest.SET_FEATURES,
                    U64(both | VhostFeature.PROTOCOL_FEATURES.mask),
                )
            await frontend.request(
                FrontendRequest.SET_FEATURES,
                U64(VirtioFeature.ACCESS_PLATFORM.mask | VhostFeature.PROTOCOL_FEATURES.mask),
            )
        finally:
            await frontend.close()
            backend.close()


def test_only_backends_with_native_workers_offer_an_iommu() -> None:
    blk, rng = BlkBackend(size=MiB), RngBackend()
    try:
        assert BackendEngine(blk).offered_features() & VirtioFeature.ACCESS_PLATFORM.mask
        assert not BackendEngine(rng).offered_features() & VirtioFeature.ACCESS_PLATFORM.mask
    finally:
        blk.close()
        rng.close()


@pytest.mark.asyncio
@pytest.mark.timeout(TIMEOUT)
async def test_an_iommu_without_the_backend_channel_is_refused(tmp_path: Path) -> None:
    """Without BACKEND_REQ the back-end could never ask for a translation."""
    async with served(BlkBackend(size=MiB), "unix", tmp_path) as path:
        frontend = await Frontend.connect(path, memory_size=MiB)
        try:
            await frontend.negotiate(features=0)  # REPLY_ACK, no BACKEND_REQ
            assert not frontend.protocol_features & ProtocolFeature.BACKEND_REQ.mask
            iommu = VirtioFeature.ACCESS_PLATFORM.mask | VhostFeature.PROTOCOL_FEATURES.mask
            with pytest.raises(FrontendError, match="refused SET_FEATURES"):
                await frontend.request(FrontendRequest.SET_FEATURES, U64(iommu))
        finally:
            await frontend.close()


@pytest.mark.asyncio
@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_invalidations_racing_with_io_lose_nothing(tmp_path: Path, transport: str) -> None:
    """Requests in flight on every slot while the IOMMU withdraws every buffer's translation
    after each completion: each invalidation waits for the worker to let go, the misses that
    follow are answered, and every block reads back what was written."""
    image = disk_image(tmp_path)
    iommu = Iommu("shuffled")
    blocks = [random.Random(i).randbytes(4096) for i in range(16)]
    async with served(BlkBackend(str(image)), transport, tmp_path) as path:
        blk = await BlkDriver.open(path, iommu=iommu, depth=4, max_request=4096)
        try:
            buffers = [m for m in iommu.mappings if m.size == 4096 and m.perm == IotlbPerm.RW]
            assert len(buffers) == 4
            completed = asyncio.Condition()
            count = 0
            rounds = 0

            async def counted(io: Awaitable[T]) -> T:
                nonlocal count
                result = await io
                async with completed:
                    count += 1
                    completed.notify_all()
                return result

            async def invalidate_after_each_completion() -> None:
                # Withdrawing faster than the device can use a translation would only livelock.
                nonlocal rounds
                seen = 0
                while True:
                    async with completed:
                        while count == seen:
                            await completed.wait()
                        seen = count
                    for mapping in buffers:
                        await blk.frontend.iotlb_invalidate(mapping.iova, mapping.size)
                    rounds += 1

            invalidator = asyncio.ensure_future(invalidate_after_each_completion())
            try:
                for _ in range(3):
                    writes = (blk.write(8 * i, block) for i, block in enumerate(blocks))
                    await asyncio.gather(*(counted(w) for w in writes))
                    reads = (blk.read(8 * i, 4096) for i in range(16))
                    assert await asyncio.gather(*(counted(r) for r in reads)) == blocks
            finally:
                invalidator.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await invalidator
            assert rounds > 0
            data = image.read_bytes()
            assert [data[8 * 512 * i : 8 * 512 * i + 4096] for i in range(16)] == blocks
        finally:
            await blk.close()


@pytest.mark.asyncio
@pytest.mark.timeout(TIMEOUT)
async def test_reset_device_forgets_the_iotlb(tmp_path: Path) -> None:
    """After RESET_DEVICE the IOMMU is negotiated again: until then IOTLB_MSG is refused."""
    iommu = Iommu("shuffled")
    async with served(BlkBackend(size=MiB), "unix", tmp_path) as path:
        frontend = await Frontend.connect(path, memory_size=MiB, iommu=iommu)
        try:
            protocol = WANTED_PROTOCOL_FEATURES | ProtocolFeature.RESET_DEVICE.mask
            await frontend.negotiate(protocol_features=protocol)
            await frontend.set_mem_table()
            frontend.dma(0x1000, 0x1000)
            mapping = iommu.mappings[-1]
            await frontend.iotlb_update(mapping)  # accepted
            await frontend.request(FrontendRequest.RESET_DEVICE)
            with pytest.raises(FrontendError, match="refused IOTLB_MSG"):
                await frontend.iotlb_update(mapping)
        finally:
            await frontend.close()
