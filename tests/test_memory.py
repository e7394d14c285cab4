"""Guest memory from Python: memfd regions, translation, zero-copy views and their lifetime."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

import vvu

MiB = 1 << 20


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = vvu.memfd(2 * MiB)
    yield fd
    os.close(fd)


def test_region_from_memfd_reads_what_the_fd_holds(memfd: int) -> None:
    os.pwrite(memfd, b"written through the fd", 0x2345)
    mem = vvu.GuestMemory()
    info = mem.add_region(
        memfd, guest_phys_addr=0x10_0000, size=2 * MiB, userspace_addr=0x7F00_0000
    )
    assert (info.guest_phys_addr, info.size, info.userspace_addr) == (
        0x10_0000,
        2 * MiB,
        0x7F00_0000,
    )
    assert mem.read(0x10_2345, 22) == b"written through the fd"
    assert mem.uva_to_gpa(0x7F00_2345) == 0x10_2345


def test_writes_are_visible_through_a_second_mapping(memfd: int) -> None:
    """Two GuestMemory objects over one fd behave like two processes sharing guest RAM."""
    front, back = vvu.GuestMemory(), vvu.GuestMemory()
    front.add_region(memfd, 0, 2 * MiB)
    back.add_region(memfd, 0, 2 * MiB)
    front.write(0x1000, b"ping")
    assert back.read(0x1000, 4) == b"ping"
    back.store_u32(0x2000, 0xDEADBEEF)
    assert front.read(0x2000, 4) == bytes.fromhex("efbeadde")  # little-endian
    assert front.load_u16(0x2000) == 0xBEEF


def test_mmap_offset_selects_part_of_the_fd(memfd: int) -> None:
    os.pwrite(memfd, b"at one MiB", MiB)
    mem = vvu.GuestMemory()
    mem.add_region(memfd, guest_phys_addr=0, size=MiB, mmap_offset=MiB)
    assert mem.read(0, 10) == b"at one MiB"


def test_reads_and_writes_span_adjacent_regions() -> None:
    fds = [vvu.memfd(4096), vvu.memfd(4096)]
    try:
        mem = vvu.GuestMemory()
        mem.add_region(fds[0], 0, 4096)
        mem.add_region(fds[1], 4096, 4096)
        mem.write(4090, bytes(range(12)))
        assert mem.read(4090, 12) == bytes(range(12))
        assert os.pread(fds[1], 6, 0) == bytes(range(6, 12))
        with pytest.raises(vvu.GuestMemoryError):
            mem.view(4090, 12)  # a view must be contiguous in one region
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize(
    ("gpa", "length"),
    [(2 * MiB, 1), (2 * MiB - 2, 4), (2**64 - 2, 4), (0x5000_0000, 16)],
)
def test_out_of_range_access_raises_and_writes_nothing(memfd: int, gpa: int, length: int) -> None:
    mem = vvu.GuestMemory()
    mem.add_region(memfd, 0, 2 * MiB)
    with pytest.raises(vvu.GuestMemoryError, match="outside guest memory"):
        mem.read(gpa, length)
    with pytest.raises(vvu.GuestMemoryError):
        mem.write(gpa, b"\xff" * length)
    with pytest.raises(vvu.GuestMemoryError):
        mem.view(gpa, length)
    assert os.pread(memfd, 2, 2 * MiB - 2) == b"\0\0"


def test_bad_regions_are_refused(memfd: int) -> None:
    mem = vvu.GuestMemory()
    with pytest.raises(vvu.GuestMemoryError, match="file is"):
        mem.add_region(memfd, 0, 4 * MiB)  # larger than the file: would SIGBUS on access
    with pytest.raises(vvu.GuestMemoryError, match="size is zero"):
        mem.add_region(memfd, 0, 0)
    mem.add_region(memfd, 0, MiB)
    with pytest.raises(vvu.GuestMemoryError, match="overlaps"):
        mem.add_region(memfd, MiB // 2, MiB, userspace_addr=0x9000_0000)
    with pytest.raises(vvu.GuestMemoryError, match="not a regular file"):
        read_end, write_end = os.pipe()
        try:
            mem.add_region(read_end, 8 * MiB, 4096)
        finally:
            os.close(read_end)
            os.close(write_end)
    with pytest.raises(OSError):
        mem.add_region(-1, 8 * MiB, 4096)


def test_view_is_zero_copy_and_writable(memfd: int) -> None:
    mem = vvu.GuestMemory()
    mem.add_region(memfd, 0, 2 * MiB)
    view = mem.view(0x3000, 8)
    view[:] = b"ABCDEFGH"
    assert os.pread(memfd, 8, 0x3000) == b"ABCDEFGH"
    os.pwrite(memfd, b"xy", 0x3000)
    assert bytes(view[:2]) == b"xy"
    view.release()


def test_live_view_keeps_the_mapping_and_blocks_removal(memfd: int) -> None:
    mem = vvu.GuestMemory()
    mem.add_region(memfd, 0, 2 * MiB)
    mem.write(0x100, b"still here")
    view = mem.view(0x100, 10)
    with pytest.raises(vvu.GuestMemoryError, match="still in use"):
        mem.remove_region(0, timeout=0.01)
    # The refused removal left everything in place, and the view still reads the mapping.
    assert bytes(view) == b"still here"
    assert len(mem.regions) == 1
    view.release()
    mem.remove_region(0)
    assert mem.regions == []
    with pytest.raises(vvu.GuestMemoryError):
        mem.read(0x100, 1)


def test_view_outlives_its_guest_memory_object(memfd: int) -> None:
    mem = vvu.GuestMemory()
    mem.add_region(memfd, 0, 2 * MiB)
    mem.write(0, b"orphan")
    view = mem.view(0, 6)
    del mem
    assert bytes(view) == b"orphan"  # the region is unmapped only when the view goes


def test_remove_unknown_region_and_bad_timeout(memfd: int) -> None:
    mem = vvu.GuestMemory()
    with pytest.raises(vvu.GuestMemoryError, match="no region"):
        mem.remove_region(0x1000)
    mem.add_region(memfd, 0, MiB)
    with pytest.raises(ValueError, match="timeout"):
        mem.remove_region(0, timeout=-1.0)
